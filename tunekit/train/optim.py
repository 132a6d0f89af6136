"""The optimizer: parameter groups (layer-wise learning-rate decay, a rate of their own for the
parameters a method added), AdamW, the L2 pull towards the starting weights and the schedule."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch

from tunekit.train.config import TrainConfig

log = logging.getLogger("tunekit")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Whole modules a method adds (not deltas of one base weight): bottleneck adapters, PEFT's virtual-token
# encoders and its trainable copies of heads (modules_to_save).


_NEW_MODULES = (".bottleneck.", "prompt_encoder.", "modules_to_save.")


def _added_by_method(model: torch.nn.Module) -> Callable[[str], bool]:
    """Whether a parameter name belongs to something the fine-tuning method added to the base."""
    markers = list(_NEW_MODULES)
    if hasattr(model, "peft_config"):
        prefix = getattr(getattr(model, "base_model", None), "prefix", None)  # lora_, ia3_, hada_, ...
        if isinstance(prefix, str) and prefix:
            markers.append(prefix)
    return lambda name: any(marker in name for marker in markers)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay only on matrices (ndim >= 2), and per-parameter peak rates.

    With neither `layer_lr_decay` nor `head_lr` set: two groups at `lr` (decay / no decay), as always.
    Otherwise a parameter's peak rate is base * layer_lr_decay ** depth, where
    - base is `head_lr` (when set) for parameters the method ADDED: LoRA/DoRA factors and magnitudes,
      IA3 vectors, other PEFT tuner weights, our bottleneck adapters, virtual-token encoders, PEFT
      modules_to_save heads; and `lr` for the base model's own weights (full, freeze, head);
    - depth counts transformer layers down from the top: a parameter inside layer i of L has depth
      L-1-i (LoRA factors and bottleneck adapters live in their layer, so they decay with it); the
      input embeddings (and a head tied to them) have depth L; the final norm, an untied output head
      and virtual tokens (which sit outside the layers: they are what is being trained, not a layer
      to be protected) have depth 0.
    Groups are keyed by (rate, weight decay) and named for inspection ("name": e.g. "layer 3/decay").
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if cfg.layer_lr_decay is None and cfg.head_lr is None:
        # Norms and biases are not decayed: decaying a scale toward zero is not regularisation.
        decay = [p for _, p in trainable if p.ndim >= 2]
        no_decay = [p for _, p in trainable if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "name": "no_decay"}]
        return [g for g in groups if g["params"]]
    layer_ids = [int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER.search(name))]
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    added = _added_by_method(model)
    factor = cfg.layer_lr_decay if cfg.layer_lr_decay is not None else 1.0
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in trainable:
        new = added(name)
        match = _LAYER.search(name)
        if match:
            depth, where = n_layers - 1 - int(match.group(1)), f"layer {match.group(1)}"
        elif "embed" in name and not new:
            depth, where = n_layers, "embeddings"
        else:
            depth, where = 0, "top"
        base = cfg.head_lr if new and cfg.head_lr is not None else cfg.lr
        rate = base * factor ** depth
        wd = cfg.weight_decay if p.ndim >= 2 else 0.0
        label = f"{'new ' if new else ''}{where}/{'decay' if p.ndim >= 2 else 'no_decay'}"
        group = groups.setdefault((rate, wd), {"params": [], "weight_decay": wd, "lr": rate, "name": label})
        group["params"].append(p)
        if label not in group["name"].split(", "):
            group["name"] += ", " + label
    return list(groups.values())


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)


def l2_anchors(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """The starting values of the TRAINABLE parameters only (frozen ones cannot move). Tensors that
    start at zero (LoRA B, the up-projection of bottleneck adapters) are recorded as None: their pull
    is toward zero and costs no copy. For LoRA/DoRA/IA3/adapters/virtual tokens this is a copy of
    the small adapter; for `full` it is a copy of every weight (one extra model in memory), for
    `freeze` a copy of the unfrozen top layers only."""
    return {name: (p.detach().clone() if p.detach().any() else None)
            for name, p in model.named_parameters() if p.requires_grad}


def l2_to_init_penalty(model: torch.nn.Module, anchors: dict[str, torch.Tensor | None], lam: float) -> torch.Tensor:
    """lam * sum over trainable parameters of ||theta - theta0||^2, differentiable."""
    params = dict(model.named_parameters())
    total = sum(((params[name] - anchor) if anchor is not None else params[name]).pow(2).sum()
                for name, anchor in anchors.items())
    return lam * total


@torch.no_grad()
def add_l2_to_init_gradient(model: torch.nn.Module, anchors: dict[str, torch.Tensor | None], lam: float) -> float:
    """Add the penalty's gradient 2 * lam * (theta - theta0) to .grad, once per optimizer step (after the
    micro-batches are accumulated and reduced over ranks, whose parameters are identical), so
    accumulation and several processes stay exact. Returns the penalty's value."""
    params = dict(model.named_parameters())
    total = 0.0
    for name, anchor in anchors.items():
        p = params[name]
        diff = p.detach() - anchor if anchor is not None else p.detach()
        if p.grad is None:
            p.grad = (2 * lam) * diff
        else:
            p.grad.add_(diff, alpha=2 * lam)
        total += float(diff.double().pow(2).sum())
    return lam * total


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)
