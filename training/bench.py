"""`python -m training bench`: one outer step of meta-training in float32 and in bfloat16
(`maml.precision`) on the same meta-batches, side by side.

For each batch it prints the time of each, the loss of each, and how closely the bfloat16
meta-gradient follows the float32 one (cosine similarity, separately for the weights and the
step sizes), beside the float32 gradient's similarity to the previous batch's: the noise that
training lives with anyway, and the ratio of the two weight gradients' norms. No update is
applied: every batch starts from the same prior.
"""

import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from MetaShapeReconLib.bench import machine_description
from MetaShapeReconLib.prior import load_prior

from .data import TaskSampler, load_shapes, load_split
from .maml import MetaLearner, draw_shapes, new_prior

PRECISIONS = ("float32", "bfloat16")


def gradient_parts(learner: MetaLearner) -> Dict[str, torch.Tensor]:
    """The meta-gradient left in .grad, flattened: the weights, and the step sizes when learned."""
    parts = {"weights": torch.cat([p.grad.flatten() for p in learner.params.values()])}
    sizes = [p for p in list(learner.inner_lr.values()) + list((learner.first_step_lr or {}).values())
             if p.grad is not None]
    if sizes:
        parts["step sizes"] = torch.cat([p.grad.flatten() for p in sizes])
    return parts


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def similarity(row: dict, part: str) -> str:
    """'agreement (previous batch)' for a table cell; '-' for what was not learned or measured."""
    if f"cos_{part}" not in row:
        return "-"
    before = row[f"cos_{part}_previous"]
    return f"{row[f'cos_{part}']:.4f} ({'-' if np.isnan(before) else f'{before:.3f}'})"


def bench_outer_step(config: dict, prior_path: Optional[str], batches: int, first_order: bool = False,
                     shapes: Optional[list] = None, report: Callable[[str], None] = print) -> List[dict]:
    """Times `MetaLearner.meta_gradient` (forward and backward of the outer step, the cost of an
    iteration) per precision on `batches` meta-batches drawn from the training shapes, after
    one unreported warm-up batch each. Returns one row per batch."""
    maml = config["maml"]
    if batches < 1:
        raise SystemExit(f"--batches {batches}: expected 1 or more")
    if shapes is None:
        shapes = load_shapes(config["data"]["cache"], load_split(config)["train"],
                             float(config["tasks"]["boundary_mm"]))
    if not shapes:
        raise SystemExit("no training shapes: check the cache and the split (run `prepare` first)")
    prior = load_prior(prior_path) if prior_path else new_prior(config)
    device = torch.device("cpu")  # bfloat16 meta-training is a CPU setting: `auto` is float32 on a GPU
    learners = {name: MetaLearner(prior, dict(config, maml=dict(maml, precision=name)), device)
                for name in PRECISIONS}
    rng = np.random.default_rng(int(config["seed"]))
    sampler = TaskSampler(config, seed=int(config["seed"]))
    draw = [sampler.batch(draw_shapes(shapes, rng, int(maml["meta_batch"]))) for _ in range(batches + 1)]
    for learner in learners.values():  # warm-up: the first call also builds vmap's graph
        learner.meta_gradient(draw[0], first_order)

    report(f"- machine: {machine_description()}")
    report(f"- prior: {prior_path or 'a new SIREN initialisation'}; {maml['inner_steps']} inner steps, "
           f"{'first' if first_order else 'second'} order, meta_batch {maml['meta_batch']}, "
           f"{config['tasks']['context_points']} context / {config['tasks']['target_points']} target points")
    report("")
    report("| batch | float32 s | bfloat16 s | ratio | loss float32 | loss bfloat16 | cos weights (previous batch) "
           "| cos step sizes (previous batch) | norm ratio |")
    report("|---|---|---|---|---|---|---|---|---|")
    rows, previous = [], None
    for index, batch in enumerate(draw[1:], start=1):
        row, gradients = {"batch": index}, {}
        for name in PRECISIONS if index % 2 else PRECISIONS[::-1]:  # alternate who runs first
            learner = learners[name]
            started = time.perf_counter()
            losses = learner.meta_gradient(batch, first_order)
            row[f"seconds_{name}"] = time.perf_counter() - started
            row[f"loss_{name}"] = float(losses.mean())
            gradients[name] = {part: g.clone() for part, g in gradient_parts(learner).items()}
        exact, approx = gradients["float32"], gradients["bfloat16"]
        for part in exact:
            row[f"cos_{part}"] = cosine(exact[part], approx[part])
            row[f"cos_{part}_previous"] = cosine(exact[part], previous[part]) if previous else float("nan")
        row["norm_ratio"] = float(approx["weights"].norm() / exact["weights"].norm())
        previous = exact
        rows.append(row)
        report(f"| {index} | {row['seconds_float32']:.3f} | {row['seconds_bfloat16']:.3f} "
               f"| {row['seconds_bfloat16'] / row['seconds_float32']:.2f} | {row['loss_float32']:.4f} "
               f"| {row['loss_bfloat16']:.4f} | {similarity(row, 'weights')} | {similarity(row, 'step sizes')} "
               f"| {row['norm_ratio']:.2f} |")
    fp32, bf16 = (float(np.median([r[f"seconds_{n}"] for r in rows])) for n in PRECISIONS)
    report("")
    report(f"median: float32 {fp32:.3f} s, bfloat16 {bf16:.3f} s per outer step ({fp32 / bf16:.2f}x the steps "
           "per hour in bfloat16)")
    return rows
