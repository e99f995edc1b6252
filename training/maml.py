"""Meta-learning a prior with MAML (Meta-SGD step sizes, second order, multi-step loss).

The inner loop is the engine's `inner_step`, vmapped over the tasks of a meta-batch; the outer
loop differentiates through it. Checkpoints are prior files plus the optimiser state, both
safetensors, so `--resume` continues where a run stopped.
"""

import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from MetaShapeReconLib.adaptation import inner_step
from MetaShapeReconLib.pipeline import precision_name, resolve_precision
from MetaShapeReconLib.prior import DEFAULT_ADAPTATION, Prior, initial_prior, load_prior, save_prior
from MetaShapeReconLib.siren import logits, reconstruction_loss

from .config import check_prior_matches_config
from .data import Shape, TaskSampler, load_shapes, load_split
from .files import read_json
from .logs import CsvLog
from .progress import progress_bar
from .validate import validate


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def card_meta_steps(config: dict, inner_steps: int) -> int:
    """The card's steps with learned sizes: as many as the run's inner loop unrolled, unless
    `adaptation.meta_steps` sets them (a phase that trained the first step alone keeps the shared
    sizes of earlier phases for the next ones)."""
    steps = config["adaptation"].get("meta_steps")
    return int(inner_steps if steps is None else steps)


def card_adaptation(config: dict) -> dict:
    """Reconstruction settings for the card of a prior this run trains: validation reconstructs as
    the product will (context points and sampling, the steps with learned sizes), whatever the card
    of a `maml.init` prior said."""
    return dict(config["adaptation"], weight_decay=config["loss"]["weight_decay"],
                meta_steps=card_meta_steps(config, config["maml"]["inner_steps"]),
                auto=dict(DEFAULT_ADAPTATION["auto"], **config["adaptation"]["auto"]))


def new_prior(config: dict) -> Prior:
    model = config["model"]
    return initial_prior(config["name"], config["frame"]["extent_mm"], omega_0=model["omega_0"],
                         hidden_features=model["hidden_features"], linear_layers=model["linear_layers"],
                         inner_lr=config["maml"]["inner_lr"], seed=config["seed"],
                         adaptation=card_adaptation(config), anatomy=config.get("anatomy", ""))


def save_optimizer(optimizer: torch.optim.Optimizer, path: str, extra: Dict[str, float]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().float().cpu().reshape(-1) \
                if key == "step" else value.detach().cpu().contiguous()
    save_file(tensors, path + ".tmp", metadata={k: str(v) for k, v in extra.items()})
    os.replace(path + ".tmp", path)


def load_optimizer(optimizer: torch.optim.Optimizer, path: str) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    state = optimizer.state_dict()
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        entry = state["state"].setdefault(int(index), {})
        entry[name] = value.reshape(()) if name == "step" else value
    optimizer.load_state_dict(state)
    return metadata


def distributed() -> Tuple[int, int]:
    """(rank, world size): under `torchrun`, join the process group (NCCL on GPUs, Gloo on CPUs)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def start_run(config: dict, out_dir: str, shapes: Optional[List[Shape]], val_shapes: Optional[List[Shape]]):
    """What every training method does first: the process group under torchrun, the device,
    the seed (the same initial weights on every process) and the training and validation shapes.
    Returns (rank, device, shapes, val_shapes). The run folder is made later, by `make_run_folder`,
    once the run's inputs have loaded (a refused run leaves nothing behind)."""
    rank, world = distributed()
    device = resolve_device(config["device"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(int(config["seed"]))
    if shapes is None:
        split = load_split(config)
        boundary = float(config["tasks"]["boundary_mm"])
        shapes = load_shapes(config["data"]["cache"], split["train"], boundary)
        val_shapes = load_shapes(config["data"]["cache"], split["val"], boundary,
                                 limit=int(config["validation"]["cases"]))
    if not shapes:
        raise SystemExit("no training shapes: check the cache and the split")
    return rank, device, shapes, val_shapes


def make_run_folder(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)


def resume_state(checkpoint: str, optimizer: torch.optim.Optimizer) -> Tuple[int, Dict[str, str]]:
    """(iteration, optimiser metadata) of a checkpoint: the iteration the weights' card records,
    which the optimiser state, written after them, may trail by one checkpoint if a run was killed
    in between (its Adam moments are then a little older: harmless); no optimiser file: a fresh one."""

    card = read_json(checkpoint + ".json", "checkpoint card", "restore it, or train into another --out")
    state = {}
    if os.path.isfile(checkpoint + ".optimizer.safetensors"):
        try:
            state = load_optimizer(optimizer, checkpoint + ".optimizer.safetensors")
        except Exception as error:  # safetensors' own error types, a shape from another run
            raise SystemExit(f"optimiser state {checkpoint}.optimizer.safetensors is damaged ({error}): delete it "
                             "to resume with fresh Adam moments") from None
    iteration = int(card.get("training", {}).get("iterations", state.get("iteration", 0)))
    return iteration, state


def best_so_far(out_dir: str, dice: float) -> float:
    """The best validation Dice of a resumed run: the checkpoint's, or best.json's when it is
    higher (a better prior saved after the last checkpoint stays unless beaten)."""
    import json

    path = os.path.join(out_dir, "best.json")
    if os.path.isfile(path):
        with open(path) as handle:
            dice = max(dice, float(json.load(handle).get("training", {}).get("validation_dice_1_step", -1)))
    return dice


def meta_training_settings(config: dict, first_step_lr: Optional[bool] = None) -> dict:
    """The settings a prior was meta-trained with, recorded in its card (export copies them).
    `first_step_lr`: whether the run learned the first step's own sizes (None: as the config says)."""
    maml, tasks = config["maml"], config["tasks"]
    settings = {k: maml[k] for k in ("inner_steps", "inner_lr", "learn_inner_lr", "multi_step_loss", "outer_lr",
                                     "meta_batch", "first_order_iterations")}
    settings["warmup_iterations"] = int(maml.get("warmup_iterations") or 0)
    settings["first_step_lr"] = bool(maml.get("first_step_lr")) if first_step_lr is None else first_step_lr
    settings["first_step_loss_weight"] = float(maml.get("first_step_loss_weight", 1.0))
    settings["freeze_weights"] = bool(maml.get("freeze_weights"))
    settings.update(context_points=tasks["context_points"], target_points=tasks["target_points"],
                    planes=tasks["planes"], context_sampling=config["adaptation"].get("context_sampling", "uniform"))
    return settings


def average_gradients_across_processes(optimizer: torch.optim.Optimizer) -> None:
    """Data parallelism as DistributedDataParallel does it: every process meta-learns on its own
    tasks, gradients are averaged before the (identical) optimiser step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad /= dist.get_world_size()


def step_loss_weights(maml: dict, count: int) -> torch.Tensor:
    """Weights of the per-step target losses, summing to 1: equal, but with `first_step_loss_weight`
    times the weight on the first step when every step is trained (`multi_step_loss`). Training all
    steps equally pulls a prior made for one step back towards the later ones."""
    weights = torch.ones(count)
    if count > 1:
        first = float(maml.get("first_step_loss_weight", 1.0))
        if not first > 0:
            raise SystemExit(f"maml.first_step_loss_weight {first!r}: expected a number > 0")
        weights[0] = first
    return weights / weights.sum()


class MetaLearner:
    """Holds theta_0, the step sizes and the outer optimiser.

    With `maml.first_step_lr` (or a prior that has them) the first inner step learns step sizes
    of its own, starting from the shared ones times `maml.first_step_lr_init`: the first step
    starts from the prior, the later ones refine, and one size serves both poorly."""

    def __init__(self, prior: Prior, config: dict, device: torch.device):
        self.config = config
        maml = config["maml"]
        self.device = device
        self.model = prior.model.to(device)
        self.card = prior.card
        learn_lr = bool(maml["learn_inner_lr"])
        frozen = bool(maml.get("freeze_weights"))
        if frozen and not learn_lr:
            raise SystemExit("maml.freeze_weights with maml.learn_inner_lr false: nothing left to train")
        self.params = {k: v.detach().clone().to(device).requires_grad_(not frozen) for k, v in prior.params.items()}
        self.inner_lr = {k: v.detach().clone().to(device).requires_grad_(learn_lr) for k, v in prior.inner_lr.items()}
        first = prior.first_step_lr
        if first is None and maml.get("first_step_lr"):
            first = {k: v * float(maml["first_step_lr_init"]) for k, v in prior.inner_lr.items()}
        self.first_step_lr = None if first is None else {
            k: v.detach().clone().to(device).requires_grad_(learn_lr) for k, v in first.items()}
        trainable = [] if frozen else list(self.params.values())
        if learn_lr:
            trainable += list(self.inner_lr.values()) + list((self.first_step_lr or {}).values())
        self.optimizer = torch.optim.Adam(trainable, lr=float(maml["outer_lr"]))
        self.weight_decay = float(config["loss"]["weight_decay"])
        self.precision = resolve_precision(str(maml["precision"]), device)

    def set_outer_lr(self, iteration: int) -> float:
        """The outer step for this iteration: `maml.outer_lr`, ramped up linearly over the run's
        first `maml.warmup_iterations`. A fresh Adam moves every weight by about its whole step in
        its first iterations, whatever the gradient (its moment estimates hold one sample): on a
        trained prior, whose hidden weights are a few thousandths, that undoes training first."""
        maml = self.config["maml"]
        rate = float(maml["outer_lr"])
        warmup = int(maml.get("warmup_iterations") or 0)
        if warmup > 0:
            rate *= min(1.0, (iteration + 1) / warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        return rate

    def prior(self) -> Prior:
        first = None if self.first_step_lr is None else {k: v.detach().clone() for k, v in self.first_step_lr.items()}
        return Prior(self.model, {k: v.detach().clone() for k, v in self.params.items()},
                     {k: v.detach().clone() for k, v in self.inner_lr.items()}, self.card, first_step_lr=first)

    def meta_gradient(self, batch: Dict[str, np.ndarray], first_order: bool) -> torch.Tensor:
        """Sets every trainable tensor's .grad to the meta-gradient of the batch (averaged over
        processes, before clipping); returns the per-task, per-step target losses."""
        maml = self.config["maml"]
        steps = int(maml["inner_steps"])
        multi_step = bool(maml["multi_step_loss"])
        tensors = {k: torch.as_tensor(v, device=self.device) for k, v in batch.items()}
        model, weight_decay, precision = self.model, self.weight_decay, self.precision

        first_sizes = self.inner_lr if self.first_step_lr is None else self.first_step_lr

        def task_loss(context_x, context_y, target_x, target_y):
            params = self.params
            step_losses = []
            for step in range(steps):
                sizes = first_sizes if step == 0 else self.inner_lr
                params, _ = inner_step(model, params, sizes, context_x, context_y, weight_decay, first_order,
                                       precision)
                if multi_step or step == steps - 1:
                    step_losses.append(reconstruction_loss(logits(model, params, target_x, precision), target_y,
                                                           params, weight_decay))
            return torch.stack(step_losses)

        losses = torch.vmap(task_loss)(tensors["context_x"], tensors["context_y"],
                                       tensors["target_x"], tensors["target_y"])  # (tasks, steps)
        objective = (losses * step_loss_weights(maml, losses.shape[1]).to(losses.device)).sum(dim=1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        average_gradients_across_processes(self.optimizer)
        return losses.detach()

    def outer_step(self, batch: Dict[str, np.ndarray], first_order: bool) -> Dict[str, float]:
        maml = self.config["maml"]
        losses = self.meta_gradient(batch, first_order)
        if maml.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           float(maml["grad_clip"]))
        self.optimizer.step()
        per_step = losses.mean(dim=0).cpu().numpy()
        return {"loss": float(losses.mean()), "loss_first_step": float(per_step[0]), "loss_last_step": float(per_step[-1])}


def draw_shapes(shapes: List[Shape], rng: np.random.Generator, count: int) -> List[Shape]:
    """The shapes of one meta-batch (with replacement only when there are fewer than `count`)."""
    return [shapes[i] for i in rng.choice(len(shapes), size=count, replace=len(shapes) < count)]


def train_maml(config: dict, out_dir: str, resume: bool = False, shapes: Optional[List[Shape]] = None,
               val_shapes: Optional[List[Shape]] = None) -> str:
    """Meta-train; returns the path of the best prior (by validation Dice after one step)."""
    maml = config["maml"]
    rank, device, shapes, val_shapes = start_run(config, out_dir, shapes, val_shapes)

    checkpoint = os.path.join(out_dir, "checkpoint")
    start = 0
    if resume and os.path.isfile(checkpoint + ".safetensors"):
        earlier = load_prior(checkpoint + ".safetensors")
        check_prior_matches_config(earlier, config, checkpoint + ".safetensors", "resume it")
        learner = MetaLearner(earlier, config, device)
        start, state = resume_state(checkpoint, learner.optimizer)
        best_dice = best_so_far(out_dir, float(state.get("best_dice", -1)))
        elapsed = float(learner.card.get("training", {}).get("seconds", state.get("seconds", 0)))
    else:  # a new run: from scratch, or continuing an earlier prior (e.g. with a smaller outer step)
        if maml.get("init"):
            initial = load_prior(maml["init"])
            check_prior_matches_config(initial, config, maml["init"], "continue it")
            earlier = dict(initial.card.get("training", {}))
            initial.card["training"] = {"initialised_from": dict(earlier, path=maml["init"])}
            initial.card["adaptation"] = dict(initial.card.get("adaptation", {}), **card_adaptation(config))
        else:
            initial = new_prior(config)
        learner = MetaLearner(initial, config, device)
        best_dice, elapsed = (best_so_far(out_dir, -1.0) if resume else -1.0), 0.0
    learner.card.setdefault("training", {})
    run_settings = dict(meta_training_settings(config, learner.first_step_lr is not None),
                        precision=precision_name(learner.precision))

    task_seed = int(config["seed"]) + start + 100003 * rank  # each process draws its own tasks
    rng = np.random.default_rng(task_seed)
    sampler = TaskSampler(config, seed=task_seed)
    if rank > 0:  # one process writes logs and checkpoints
        return _follow(learner, config, shapes, rng, sampler, start)
    make_run_folder(out_dir)
    keep = start if resume else None  # rows after the checkpoint are written again
    log = CsvLog(os.path.join(out_dir, "log.csv"), ["iteration", "loss", "loss_first_step", "loss_last_step",
                                                     "seconds", "first_order"], keep_until=keep)
    val_log = CsvLog(os.path.join(out_dir, "validation.csv"), ["iteration", "setting", "steps", "dice", "seconds"],
                     keep_until=keep)
    iterations = int(maml["iterations"])
    bar = progress_bar(total=iterations, initial=start, desc="maml", unit="it")
    started = time.perf_counter() - elapsed

    def save(iteration: int) -> None:
        prior = learner.prior()
        prior.card["training"].update(method="maml", iterations=iteration, seconds=time.perf_counter() - started,
                                      device=str(device), settings=run_settings)
        save_prior(prior, checkpoint + ".safetensors")
        save_optimizer(learner.optimizer, checkpoint + ".optimizer.safetensors",
                       {"iteration": iteration, "best_dice": best_dice, "seconds": time.perf_counter() - started})

    for iteration in range(start, iterations):
        first_order = iteration < int(maml["first_order_iterations"])
        learner.set_outer_lr(iteration)
        values = learner.outer_step(sampler.batch(draw_shapes(shapes, rng, int(maml["meta_batch"]))), first_order)
        log.write(iteration=iteration + 1, seconds=time.perf_counter() - started, first_order=int(first_order), **values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", first=f"{values['loss_first_step']:.3f}",
                        refresh=False)  # the bar's mininterval decides when it is drawn
        bar.update(1)
        done = iteration + 1
        every = int(config["validation"]["every"])
        if val_shapes and every and (done % every == 0 or done == iterations):
            results = validate(learner.prior(), val_shapes, config["validation"]["slices"],
                               [1, int(config["adaptation"]["steps"])], seed=int(config["seed"]),
                               precision=str(config["precision"]))
            for row in results:
                val_log.write(iteration=done, seconds=time.perf_counter() - started, **row)
            one_step = np.mean([r["dice"] for r in results if r["steps"] == 1])
            bar.write(f"iteration {done}: validation Dice " + ", ".join(
                f"{r['steps']} step(s) {r['dice']:.3f}" for r in _mean_by_steps(results)))
            if one_step > best_dice:
                best_dice = float(one_step)
                best = learner.prior()
                best.card["training"].update(method="maml", iterations=done, seconds=time.perf_counter() - started,
                                             device=str(device), validation_dice_1_step=best_dice,
                                             settings=run_settings)
                save_prior(best, os.path.join(out_dir, "best.safetensors"))
        if done % int(config["checkpoint"]["every"]) == 0 or done == iterations:
            save(done)
    bar.close()
    best_path = os.path.join(out_dir, "best.safetensors")
    return best_path if os.path.isfile(best_path) else checkpoint + ".safetensors"


def _mean_by_steps(results: List[dict]) -> List[dict]:
    steps = sorted({r["steps"] for r in results})
    return [{"steps": s, "dice": float(np.mean([r["dice"] for r in results if r["steps"] == s]))} for s in steps]


def _follow(learner: "MetaLearner", config: dict, shapes: List[Shape], rng, sampler, start: int) -> str:
    """The outer loop of a process other than rank 0: same steps, no files."""
    maml = config["maml"]
    for iteration in range(start, int(maml["iterations"])):
        learner.set_outer_lr(iteration)
        learner.outer_step(sampler.batch(draw_shapes(shapes, rng, int(maml["meta_batch"]))),
                           iteration < int(maml["first_order_iterations"]))
    return ""
