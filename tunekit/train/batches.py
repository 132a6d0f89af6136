"""Rows to batches: padding with the causal-LM labels, the length-sorted epoch order, the replay mix
inside every global micro-batch and the per-epoch plan (`BatchPlan`); the step count of a run."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from tunekit.constants import IGNORE_INDEX
from tunekit.train.config import TrainConfig

log = logging.getLogger("tunekit")


IGNORE = IGNORE_INDEX


def collate(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into tensors. Packed rows carry position_ids and get no attention_mask, which
    is what lets transformers build block-diagonal attention from the restarting positions."""
    width = max(len(row["input_ids"]) for row in rows)
    packed = "position_ids" in rows[0]
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(row["position_ids"])
            # The padding tail becomes one more "sequence" of its own; it is never trained.
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = attention
    return batch


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of positions that contribute to the loss (a label exists for the next token)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic batches for one epoch: shuffled, then grouped by length within large windows
    so little compute goes to padding, then the batch order shuffled again, except that the batch
    with the most padded tokens goes first. An out-of-memory then shows in the first step, and the
    allocator sizes its heap for the biggest activations at once: later, smaller batches reuse those
    blocks, where growing into them step by step leaves freed blocks of the wrong sizes behind
    (glibc keeps them resident)."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    window = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        group = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches.extend(group[j:j + batch_size] for j in range(0, len(group), batch_size))
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    if shuffled:
        biggest = max(range(len(shuffled)), key=lambda b: len(shuffled[b]) * max(lengths[i] for i in shuffled[b]))
        shuffled.insert(0, shuffled.pop(biggest))
    return shuffled


def replay_per_batch(cfg: TrainConfig, world: int = 1) -> int:
    """Replay rows in each global micro-batch of batch_size * world rows."""
    if cfg.replay_ratio <= 0:
        return 0
    size = cfg.batch_size * world
    n = round(cfg.replay_ratio * size)
    if n < 1 or n >= size:
        raise ValueError(f"finetune.replay.ratio {cfg.replay_ratio} of a batch of {size} rows gives {n} replay rows: "
                         f"choose a ratio that leaves at least 1 replay row and at least 1 task row "
                         f"(between {0.5 / size:.3g} and {(size - 0.5) / size:.3g})")
    return n


class BatchPlan:
    """The rows of every global micro-batch, a pure function of (data, config, world size, index).

    Each global micro-batch holds batch_size * world rows: `replay_per_batch` replay rows (chosen
    without replacement by a generator seeded from (seed, micro-batch index), so a resumed run draws
    the same ones) and the rest task rows from `epoch_batches`. Rank r trains rows r, r+W, ... of it.
    """

    def __init__(self, lengths: Sequence[int], cfg: TrainConfig, world: int = 1, n_replay_rows: int = 0):
        self.lengths, self.cfg, self.world, self.n_replay_rows = list(lengths), cfg, world, n_replay_rows
        self.replay = replay_per_batch(cfg, world)
        if self.replay and not n_replay_rows:
            raise ValueError("finetune.replay.ratio > 0 but there are no replay rows to mix in")
        self.task_size = cfg.batch_size * world - self.replay
        self.per_epoch = math.ceil(len(self.lengths) / self.task_size)
        self._cache: dict[int, list[list[int]]] = {}

    def task_rows(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.per_epoch)
        if epoch not in self._cache:
            self._cache.clear()
            batches = getattr(self.cfg.objective, "epoch_batches", None) or epoch_batches  # multi-task: its own mix
            self._cache[epoch] = batches(self.lengths, self.task_size, self.cfg.seed, epoch)
        return self._cache[epoch][position]

    def replay_rows(self, index: int) -> list[int]:
        if not self.replay:
            return []
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + index + 17)
        if self.n_replay_rows >= self.replay:
            return torch.randperm(self.n_replay_rows, generator=gen)[:self.replay].tolist()
        return torch.randint(self.n_replay_rows, (self.replay,), generator=gen).tolist()

    def global_rows(self, index: int) -> list[tuple[str, int]]:
        return [("task", i) for i in self.task_rows(index)] + [("replay", i) for i in self.replay_rows(index)]

    def shard(self, index: int, rank: int) -> list[tuple[str, int]]:
        return self.global_rows(index)[rank::self.world]


def replay_lm_rows(token_ids: Sequence[Sequence[int]], max_length: int) -> list[dict[str, list[int]]]:
    """Plain language-modelling rows: every token is a label (the shift leaves out only the first)."""
    rows = []
    for ids in token_ids:
        ids = list(ids)[:max_length]
        if len(ids) >= 2:
            rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def total_steps(n_rows: int, cfg: TrainConfig, world: int = 1) -> int:
    """Optimizer steps: epochs over the task rows, each global micro-batch taking batch_size * world
    rows minus its replay rows."""
    batches_per_epoch = math.ceil(n_rows / (cfg.batch_size * world - replay_per_batch(cfg, world)))
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))
