"""Several processes (torch.distributed initialised by the caller): rank and world size, barriers,
the all-reduces of token counts and gradients, and the token-weighted loss over rank shards."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from tunekit.train.loss import evaluate_loss

log = logging.getLogger("tunekit")


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if dist_info()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every trainable gradient over ranks in one flat buffer (missing gradients count as zero)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


@torch.no_grad()
def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        torch.distributed.broadcast(p.data, 0)


def reduced_loss(model: torch.nn.Module, rows: Sequence[dict[str, Any]], pad_id: int, batch_size: int,
                 full_forward: bool = False, objective: Any = None) -> float:
    """evaluate_loss's mean over all trained tokens of `rows`; with several processes each rank scores
    rows rank, rank+W, ... and the token-weighted sums are added up, so every rank gets the same number."""
    rank, world = dist_info()
    if world == 1:
        return evaluate_loss(model, rows, pad_id, batch_size, full_forward, objective)["loss"]
    part = list(rows[rank::world])
    result = evaluate_loss(model, part, pad_id, batch_size, full_forward, objective) if part else {"loss": 0.0, "tokens": 0}
    total, count = all_reduce_sum([result["loss"] * result["tokens"], float(result["tokens"])],
                                   next(model.parameters()).device)
    return total / max(count, 1.0)
