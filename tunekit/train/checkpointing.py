"""Resumable checkpoints: the trainable state, and model + optimizer + scheduler + RNG + data
position saved by rank 0 and restored, so a killed run resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunekit.train.config import TrainState
from tunekit.train.distributed import all_reduce_sum, dist_info

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


# checkpoint_every: auto. A kill loses the steps since the last checkpoint: at most CHECKPOINT_TARGET_SECONDS of
# training, or a tenth of the run when that is sooner; but a checkpoint at most every CHECKPOINT_MIN_SECONDS, since
# a full-weights one (weights + two Adam moments) takes seconds to write. The step time is measured on the steps
# after the first (which warms up), on every (re)start.
CHECKPOINT_TARGET_SECONDS, CHECKPOINT_MIN_SECONDS, CHECKPOINT_RUN_FRACTION, CHECKPOINT_TIMED_STEPS = 180, 30, 10, 3


def auto_checkpoint_interval(seconds_per_step: float, total: int) -> int:
    """Steps between checkpoints for `checkpoint_every: auto` (see the constants above)."""
    seconds_per_step = max(seconds_per_step, 1e-6)
    steps = min(CHECKPOINT_TARGET_SECONDS / seconds_per_step, total / CHECKPOINT_RUN_FRACTION)
    return max(1, math.ceil(max(steps, CHECKPOINT_MIN_SECONDS / seconds_per_step)))


class CheckpointSchedule:
    """Whether the step just finished ends with a resumable checkpoint: every `every` steps, or, for "auto",
    every `auto_checkpoint_interval` steps once the first steps are timed (the ranks of one run agree on it)."""

    def __init__(self, every: int | str, total: int, device: torch.device, world: int = 1):
        self.every = every if isinstance(every, int) else None
        self.total, self.device, self.world = total, device, world
        self._ticks: list[float] = []

    def due(self, step: int) -> bool:
        if self.every is None:
            self._time(step)
        return self.every is not None and step % self.every == 0 and step < self.total

    def _time(self, step: int) -> None:
        self._ticks.append(time.perf_counter())
        if len(self._ticks) > CHECKPOINT_TIMED_STEPS:
            seconds = (self._ticks[-1] - self._ticks[0]) / (len(self._ticks) - 1)
            if self.world > 1:  # every rank calls due() at the same step, so this collective lines up
                seconds = all_reduce_sum([seconds], self.device)[0] / self.world
            self.every = auto_checkpoint_interval(seconds, self.total)
            log.info("checkpoint_every auto: %.2f s per step -> a resumable checkpoint every %d steps (of %d)",
                     seconds, self.every, self.total)
