"""Baseline B.(i): the auto-decoder of Amiranashvili et al. (2022).

A latent code per training shape and a conditioned ReLU MLP (latent 128, 8 x 128, the
coordinates and latent fed at layers 0 and 4) trained jointly; at test time only the latent code
is optimised, with Adam, on the observed voxels. Shapes are placed in the same canonical frame as
for the meta-learned prior. Saved as safetensors + JSON (a baseline, not an engine prior).
"""

import json
import os
import time
from contextlib import ExitStack
from typing import Tuple

import numpy as np
import torch
from MetaShapeReconLib.labelmap_io import atomic_output
from MetaShapeReconLib.siren import reconstruction_loss
from torch import nn

from .data import TaskSampler
from .files import read_json
from .logs import CsvLog
from .maml import average_gradients_across_processes, make_run_folder, resume_state, save_optimizer, start_run
from .progress import progress_bar


class AutoDecoder(nn.Module):
    def __init__(self, latent_size: int = 128, hidden: int = 128, layers: int = 8, skip: int = 4):
        super().__init__()
        self.latent_size, self.hidden, self.skip = latent_size, hidden, skip
        widths_in = [latent_size + 3] + [hidden] * (layers - 1)
        widths_in[skip] = hidden + latent_size + 3
        self.layers = nn.ModuleList(nn.Linear(w, hidden) for w in widths_in)
        self.output = nn.Linear(hidden, 1)

    def forward(self, latent: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """latent (..., L) broadcast against coords (..., N, 3) -> logits (..., N)."""
        latent = latent.unsqueeze(-2).expand(*coords.shape[:-1], self.latent_size)
        conditioning = torch.cat([latent, coords], dim=-1)
        h = conditioning
        for index, layer in enumerate(self.layers):
            if index == self.skip:
                h = torch.cat([h, conditioning], dim=-1)
            h = torch.relu(layer(h))
        return self.output(h).squeeze(-1)

    def architecture(self) -> dict:
        return {"type": "autodecoder", "latent_size": self.latent_size, "hidden_features": self.hidden,
                "layers": len(self.layers), "skip": self.skip}


class LatentField:
    """Occupancy of one latent code, with the interface the engine's grid evaluation uses."""

    def __init__(self, model: AutoDecoder, latent: torch.Tensor, chunk: int = 1 << 15):
        self.model, self.latent, self.chunk, self.evaluated = model, latent.detach(), chunk, 0

    @torch.no_grad()
    def probabilities(self, canonical: np.ndarray) -> np.ndarray:
        canonical = np.asarray(canonical, np.float32).reshape(-1, 3)
        result = np.zeros(len(canonical), np.float32)
        inside = np.nonzero(np.all(np.abs(canonical) <= 1.0, axis=1))[0]
        device = self.latent.device
        for start in range(0, len(inside), self.chunk):
            rows = inside[start:start + self.chunk]
            coords = torch.from_numpy(canonical[rows]).to(device)
            result[rows] = torch.sigmoid(self.model(self.latent, coords)).cpu().numpy()
        self.evaluated += len(inside)
        return result


def fit_latent(model: AutoDecoder, coords: torch.Tensor, target: torch.Tensor, steps: int, lr: float,
               latent_prior: float, callback=None) -> torch.Tensor:
    """Test-time optimisation of the latent code (the network stays fixed).

    `callback(step, latent, loss)` after each step; returning True stops early."""
    latent = torch.zeros(model.latent_size, device=coords.device, requires_grad=True)
    optimizer = torch.optim.Adam([latent], lr=lr)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = reconstruction_loss(model(latent, coords), target, {}, 0.0) + latent_prior * (latent ** 2).sum()
        loss.backward()
        optimizer.step()
        if callback is not None and callback(step + 1, latent.detach(), float(loss.detach())):
            break
    return latent.detach()


def save_autodecoder(path: str, model: AutoDecoder, latents: torch.Tensor, card: dict) -> None:
    """Both files through temporary ones, as `save_prior`: a kill while saving keeps the earlier pair."""
    from safetensors.torch import save_file

    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    tensors = {f"weights.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["latents"] = latents.detach().cpu().contiguous()
    with ExitStack() as outputs:
        save_file(tensors, outputs.enter_context(atomic_output(stem + ".safetensors")))
        with open(outputs.enter_context(atomic_output(stem + ".json")), "w") as handle:
            json.dump(dict(card, architecture=model.architecture()), handle, indent=2)


def load_autodecoder(path: str, device="cpu") -> Tuple[AutoDecoder, dict]:
    from safetensors.torch import load_file

    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    card = read_json(stem + ".json", "auto-decoder card", "pass the .safetensors of a `train --method autodecoder` run")
    a = card.get("architecture") if isinstance(card, dict) else None
    if not isinstance(a, dict) or not {"latent_size", "hidden_features", "layers", "skip"} <= set(a):
        kind = a.get("type") if isinstance(a, dict) else None
        raise SystemExit(f"{path} is not an auto-decoder (its architecture: {kind or 'none'}): pass the "
                         ".safetensors of a `train --method autodecoder` run")
    model = AutoDecoder(a["latent_size"], a["hidden_features"], a["layers"], a["skip"])
    tensors = load_file(stem + ".safetensors")
    model.load_state_dict({k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")})
    return model.to(device).requires_grad_(False), card


def train_autodecoder(config: dict, out_dir: str, resume: bool = False, shapes=None, val_shapes=None) -> str:
    settings = config["autodecoder"]
    rank, device, shapes, _ = start_run(config, out_dir, shapes, val_shapes)
    model = AutoDecoder(int(settings["latent_size"]), int(settings["hidden_features"]), int(settings["layers"])).to(device)
    latents = torch.nn.Parameter(0.01 * torch.randn(len(shapes), int(settings["latent_size"]), device=device))
    optimizer = torch.optim.Adam([{"params": model.parameters(), "lr": float(settings["lr"])},
                                  {"params": [latents], "lr": float(settings["latent_lr"])}])
    checkpoint = os.path.join(out_dir, "checkpoint")
    start, elapsed = 0, 0.0
    if resume and os.path.isfile(checkpoint + ".safetensors"):
        from safetensors.torch import load_file

        stored, stored_card = load_autodecoder(checkpoint + ".safetensors", device)
        model.load_state_dict(stored.state_dict())
        latents.data.copy_(load_file(checkpoint + ".safetensors")["latents"].to(device))
        start, _ = resume_state(checkpoint, optimizer)
        elapsed = float(stored_card.get("training", {}).get("seconds", 0))
    model.requires_grad_(True)
    task_seed = int(config["seed"]) + start + 100003 * rank  # each process draws its own shapes
    sampler = TaskSampler(config, seed=task_seed)
    rng = np.random.default_rng(task_seed)
    if rank == 0:
        make_run_folder(out_dir)
    log = CsvLog(os.path.join(out_dir, "log.csv"), ["iteration", "loss", "seconds"], enabled=rank == 0,
                 keep_until=start if resume else None)  # rows after the checkpoint are written again
    iterations = int(settings["iterations"])
    bar = progress_bar(total=iterations, initial=start, disable=rank > 0, desc="autodecoder", unit="it")
    started = time.perf_counter() - elapsed
    card = {"format": "metashaperecon-autodecoder", "name": config["name"] + "_autodecoder",
            "frame": {"extent_mm": config["frame"]["extent_mm"]},
            "test_time": {"optimizer": "adam", "lr": float(settings["test_lr"]),
                          "latent_prior": float(settings["latent_prior"])}}
    for iteration in range(start, iterations):
        chosen = rng.choice(len(shapes), size=min(int(settings["batch_shapes"]), len(shapes)), replace=False)
        batch = sampler.batch([shapes[i] for i in chosen], context=False)
        x = torch.as_tensor(batch["target_x"], device=device)
        y = torch.as_tensor(batch["target_y"], device=device)
        codes = latents[torch.as_tensor(chosen, device=device)]
        predicted = model(codes, x)
        loss = torch.stack([reconstruction_loss(predicted[i], y[i], {}, 0.0) for i in range(len(chosen))]).mean()
        loss = loss + float(settings["latent_prior"]) * (codes ** 2).sum(dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients_across_processes(optimizer)  # under torchrun: one model, trained on every process's shapes
        optimizer.step()
        log.write(iteration=iteration + 1, loss=float(loss.detach()), seconds=time.perf_counter() - started)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)  # drawn at the bar's mininterval
        bar.update(1)
        if rank == 0 and ((iteration + 1) % int(config["checkpoint"]["every"]) == 0 or iteration + 1 == iterations):
            card["training"] = {"method": "autodecoder", "iterations": iteration + 1, "device": str(device),
                                "seconds": time.perf_counter() - started, "shapes": len(shapes)}
            save_autodecoder(checkpoint + ".safetensors", model, latents, card)
            save_optimizer(optimizer, checkpoint + ".optimizer.safetensors",
                           {"iteration": iteration + 1, "seconds": time.perf_counter() - started})
    bar.close()
    return checkpoint + ".safetensors"

