"""Baseline B.(ii): the same SIREN pre-trained on all training shapes by plain optimisation,
then used as an initialisation (adapted at test time with Adam).

Each step fits the network to target points of a batch of shapes in their canonical frames
(placed exactly as for meta-learning, so the comparison is fair). The result is a prior file the
engine loads; its model card says it is a pre-trained, not meta-learned, initialisation.
"""

import os
import time

import numpy as np
import torch
from MetaShapeReconLib.prior import load_prior, save_prior
from MetaShapeReconLib.siren import logits, reconstruction_loss

from .config import check_prior_matches_config
from .data import TaskSampler
from .logs import CsvLog
from .maml import average_gradients_across_processes, make_run_folder, new_prior, resume_state, save_optimizer, start_run
from .progress import progress_bar
from .validate import validate


def train_pretrain(config: dict, out_dir: str, resume: bool = False, shapes=None, val_shapes=None) -> str:
    settings = config["pretrain"]
    rank, device, shapes, val_shapes = start_run(config, out_dir, shapes, val_shapes)
    checkpoint = os.path.join(out_dir, "checkpoint")
    resuming = resume and os.path.isfile(checkpoint + ".safetensors")
    prior = load_prior(checkpoint + ".safetensors") if resuming else new_prior(config)
    if resuming:
        check_prior_matches_config(prior, config, checkpoint + ".safetensors", "resume it")
    model = prior.model.to(device)
    params = {k: v.detach().clone().to(device).requires_grad_(True) for k, v in prior.params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=float(settings["lr"]))
    start, elapsed = 0, 0.0
    if resuming:
        start, _ = resume_state(checkpoint, optimizer)
        elapsed = float(prior.card.get("training", {}).get("seconds", 0))
    task_seed = int(config["seed"]) + start + 100003 * rank  # each process draws its own shapes
    sampler = TaskSampler(config, seed=task_seed)
    rng = np.random.default_rng(task_seed)
    weight_decay = float(config["loss"]["weight_decay"])
    if rank == 0:
        make_run_folder(out_dir)
    keep = start if resume else None  # rows after the checkpoint are written again
    log = CsvLog(os.path.join(out_dir, "log.csv"), ["iteration", "loss", "seconds"], enabled=rank == 0, keep_until=keep)
    val_log = CsvLog(os.path.join(out_dir, "validation.csv"), ["iteration", "setting", "steps", "dice", "seconds"],
                     enabled=rank == 0, keep_until=keep)
    iterations = int(settings["iterations"])
    bar = progress_bar(total=iterations, initial=start, disable=rank > 0, desc="pretrain", unit="it")
    started = time.perf_counter() - elapsed

    def save(iteration):
        prior.params = {k: v.detach().clone() for k, v in params.items()}
        prior.card["training"] = {"method": "pretrain", "iterations": iteration, "device": str(device),
                                  "seconds": time.perf_counter() - started}
        prior.card["adaptation"]["optimizer"] = "adam"
        save_prior(prior, checkpoint + ".safetensors")
        save_optimizer(optimizer, checkpoint + ".optimizer.safetensors",
                       {"iteration": iteration, "seconds": time.perf_counter() - started})

    for iteration in range(start, iterations):
        chosen = [shapes[i] for i in rng.choice(len(shapes), size=int(settings["batch_shapes"]))]
        batch = sampler.batch(chosen, context=False)
        x = torch.as_tensor(batch["target_x"], device=device)
        y = torch.as_tensor(batch["target_y"], device=device)
        loss = torch.stack([reconstruction_loss(logits(model, params, x[i]), y[i], params, weight_decay)
                            for i in range(len(x))]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients_across_processes(optimizer)
        optimizer.step()
        log.write(iteration=iteration + 1, loss=float(loss.detach()), seconds=time.perf_counter() - started)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)  # drawn at the bar's mininterval
        bar.update(1)
        done = iteration + 1
        every = int(config["validation"]["every"])
        if rank == 0 and val_shapes and every and (done % every == 0 or done == iterations):
            # the initialisation itself (0 steps): what pre-training learns is a mean shape
            prior.params = {k: v.detach().clone() for k, v in params.items()}
            rows = validate(prior, val_shapes, config["validation"]["slices"], [0], seed=int(config["seed"]),
                            precision=str(config["precision"]))
            for row in rows:
                val_log.write(iteration=done, seconds=time.perf_counter() - started, **row)
            bar.write(f"iteration {done}: validation Dice at 0 steps {np.mean([r['dice'] for r in rows]):.3f}")
        if rank == 0 and (done % int(config["checkpoint"]["every"]) == 0 or done == iterations):
            save(done)
    bar.close()
    return checkpoint + ".safetensors"
