"""Resumable checkpoints: the trainable state, and model + optimizer + scheduler + RNG + data
position saved by rank 0 and restored, so a killed run resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunekit.train.config import TrainState
from tunekit.train.distributed import dist_info

log = logging.getLogger("tunekit")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, state: TrainState, best: dict | None,
                     rank_rng: list[torch.Tensor] | None = None) -> None:
    final = ckpt_dir / f"step-{state.step:07d}"
    tmp = ckpt_dir / f".step-{state.step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    if best is not None:
        save_file(best, tmp / "best.safetensors")
    blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
    if rank_rng is not None:
        blob["rank_rng"] = rank_rng  # several processes: every rank's CPU generator (dropout), in rank order
    torch.save(blob, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({
        "state": state.__dict__, "python_rng": random.getstate(),
    }), encoding="utf-8")
    tmp.rename(final)  # atomic: a directory named step-N is always complete
    for old in ckpt_dir.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(ckpt_dir.glob("step-*")) if ckpt_dir.exists() else []
    return done[-1] if done else None


def restore_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[TrainState, dict | None]:
    load_trainable_state(model, load_file(path / "trainable.safetensors"))
    # Our own file, written by _save_checkpoint; weights_only refuses anything but tensors and plain data.
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    rank, world = dist_info()
    rank_rng = blob.get("rank_rng")
    torch.set_rng_state(rank_rng[rank] if rank_rng is not None and len(rank_rng) == world else blob["torch_rng"])
    saved = json.loads((path / "state.json").read_text(encoding="utf-8"))
    version, internal, gauss = saved["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    best_path = path / "best.safetensors"
    return TrainState(**saved["state"]), (load_file(best_path) if best_path.exists() else None)
