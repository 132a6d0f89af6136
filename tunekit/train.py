"""The training loop shared by the fine-tuning stages.

What it gets right where popular trainers are often silently wrong:
- the loss is a mean over the trained tokens of a whole optimizer step, across all accumulated
  micro-batches, not a mean of per-batch means (which overweights short examples);
- the LM head and cross-entropy run only at trained positions, so prompt tokens cost no vocab-sized
  logits;
- checkpoints hold model, optimizer, scheduler, RNG and data position, so a killed run resumes to
  the same weights as an uninterrupted one;
- early stopping restores the best weights instead of keeping the last.

Optional, all off by default (finetune.* in params.yaml): discriminative learning rates by layer
depth and for new parameters (`param_groups`), an L2 pull toward the starting weights
(`l2_to_init_penalty`), replay of general-domain text inside every batch (`BatchPlan`), a
forgetting curve on a general-text probe, bf16 autocast on CUDA, and several processes
(torchrun; `dist_info`).

Several processes (torch.distributed initialised by the caller, e.g. under torchrun):
- `batch_size` is rows per process per micro-batch. The GLOBAL micro-batch is
  batch_size * world_size rows, drawn exactly as one process with that batch size would draw it
  (same `epoch_batches`, same replay rows); rank r takes rows r, r+W, r+2W, ... of it. One optimizer
  step consumes grad_accum global micro-batches: batch_size * grad_accum * world_size rows. So 2
  processes with batch_size 4 train on exactly the batches, steps and schedule of 1 process with
  batch_size 8.
- The trained-token count of the whole step is summed over ranks, each rank divides its summed loss
  by that global count, and the gradients are then summed over ranks (one flat all-reduce; no DDP
  wrapper is needed because parameters are only read between steps, and a rank whose shard is empty,
  the tail of an epoch, simply contributes zeros). The result is the gradient of the mean loss over
  every trained token of the global step, as in one process.
- Validation and probe losses are token-weighted over rank shards and summed, so every rank takes
  the same early-stopping decision; rank 0 alone writes checkpoints (with every rank's RNG state).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

log = logging.getLogger("tunekit")

IGNORE = -100


# ---------------------------------------------------------------- batches


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


# ---------------------------------------------------------------- loss


def _causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


class PackingWithVirtualTokens(ValueError):
    pass


def _uses_virtual_tokens(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _on_model_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    if all(value.device == device for value in batch.values()):
        return batch
    return {key: value.to(device) for key, value in batch.items()}


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   full_forward: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over trained positions, and how many there were.

    By default the decoder runs alone and the LM head only at trained positions. `full_forward`
    (methods whose PeftModel.forward prepends virtual tokens: prompt, prefix and p-tuning) runs the
    model's own forward and takes its logits instead; the count of trained tokens is the same.
    """
    batch = _on_model_device(batch, model)
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE
    count = int(selected.sum())
    if full_forward:
        if "position_ids" in batch:
            raise PackingWithVirtualTokens(
                "packed rows (template.packing: true) cannot be trained with virtual tokens: packing relies on "
                "restarting position_ids and no attention mask, while prompt/prefix/p-tuning prepend tokens every "
                "packed conversation would attend to. Set template.packing: false or use another method.")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        # Prompt and p-tuning prepend their virtual positions to the logits; prefix tuning (virtual keys
        # and values only) does not. Either way the last input_ids-length positions are the real tokens.
        logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:-1]
        if count == 0:
            return logits.sum() * 0.0, 0
        return F.cross_entropy(logits[selected].float(), targets[selected], reduction="sum"), count
    if _uses_virtual_tokens(model):
        raise ValueError("this model's virtual tokens live in PeftModel.forward, which the decoder-only loss path "
                         "skips: call with full_forward=True (Method.full_forward)")
    decoder, lm_head = _causal_lm_parts(model)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]
    if count == 0:
        return hidden.sum() * 0.0, 0
    if type(lm_head) is torch.nn.Linear and lm_head.bias is None:
        return linear_cross_entropy_sum(hidden[selected], lm_head.weight, targets[selected]), count
    # A head that is not a plain Linear (an adapter on lm_head, a bias): its own forward, whole logits.
    logits = lm_head(hidden[selected])
    return F.cross_entropy(logits.float(), targets[selected], reduction="sum"), count


LOSS_CHUNK = 512  # trained positions per LM-head chunk: 512 x 49152 vocab x 4 bytes = 96 MB of logits at a time


def _chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                       need_hidden: bool, need_weight: bool):
    """Summed cross-entropy of hidden @ weight.T against targets, `chunk` rows at a time, and the gradients
    asked for (d loss / d hidden, d loss / d weight in fp32), computed from each chunk's softmax."""
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        logits = (h @ weight.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        if need_hidden or need_weight:
            grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
            grad_logits = grad_logits.to(h.dtype)
            if need_hidden:
                grad_hidden[start:start + chunk] = grad_logits @ weight.to(h.dtype)
            if need_weight:
                grad_weight += (grad_logits.t() @ h).float()
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) with its gradients computed in the forward pass,
    one chunk of rows at a time (`_chunked_head_loss`): the (rows x vocab) logits, their log-softmax and
    their gradient never exist whole, and nothing vocab-sized is kept for backward (only d loss / d hidden
    and, when the head trains, d loss / d weight). Same FLOPs as the unfused head; the memory is one
    chunk's logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.weight_dtype = weight.dtype
        total, grad_hidden, grad_weight = _chunked_head_loss(hidden, weight, targets, chunk,
                                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype), None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Summed next-token cross-entropy of `hidden` (rows x d) through an LM head `weight` (vocab x d),
    chunked (`_LinearCrossEntropy`); without autograd (evaluation) the same chunks, no gradients."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    return _chunked_head_loss(hidden, weight, targets, chunk, False, False)[0]


def accumulate_gradients(model: torch.nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]],
                         full_forward: bool = False, step_tokens: int | None = None,
                         autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                         objective: Any = None) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; returns (mean loss, trained tokens).

    Each micro-batch's summed loss is divided by the trained tokens of the whole step, so the
    accumulated gradient equals that of one batch holding all of them, whatever their lengths.
    `step_tokens` overrides that count (several processes: the count over every rank's micro-batches,
    so the returned loss is this rank's share of the global mean). `autocast` wraps the forwards only.
    """
    if step_tokens is None:
        step_tokens = sum((objective.count if objective else trained_tokens)(batch) for batch in micro_batches)
    step_loss = 0.0
    for batch in micro_batches:
        with (autocast() if autocast else contextlib.nullcontext()):
            loss_sum, _ = objective.loss_sum(model, batch) if objective else token_loss_sum(model, batch, full_forward)
        (loss_sum / max(step_tokens, 1)).backward()
        step_loss += float(loss_sum.detach())
    return step_loss / max(step_tokens, 1), step_tokens


@torch.no_grad()  # no autograd graph: a validation batch would otherwise hold a training step's activations
def evaluate_loss(model: torch.nn.Module, rows: Sequence[dict[str, Any]], pad_id: int, batch_size: int,
                  full_forward: bool = False, objective: Any = None) -> dict[str, float]:
    """Mean loss over all trained tokens of `rows` (`objective`: over its units), and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = (objective.collate if objective else collate)([rows[i] for i in order[start:start + batch_size]], pad_id)
        loss, n = objective.loss_sum(model, batch) if objective else token_loss_sum(model, batch, full_forward)
        total += float(loss)
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    epochs: float
    lr: float
    batch_size: int
    grad_accum: int = 1
    max_steps: int | None = None
    schedule: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 20
    early_stopping_patience: int | None = None
    checkpoint_every: int | str = "auto"  # steps between resumable checkpoints, or "auto" (CheckpointSchedule)
    seed: int = 0
    full_forward: bool = False  # Method.full_forward: the loss runs the model's own forward
    layer_lr_decay: float | None = None  # lr * decay**depth (see param_groups); None = one rate
    head_lr: float | None = None         # peak rate of parameters the method added; None = lr
    l2_to_init: float = 0.0              # lambda of lambda * sum ||theta - theta0||^2, once per optimizer step
    replay_ratio: float = 0.0            # share of every global micro-batch taken from `replay_rows`
    forgetting_every: int | None = None  # probe loss every N steps (and at step 0); needs `probe_rows`
    precision: str = "fp32"              # fp32 | bf16 (autocast, CUDA only)
    gradient_checkpointing: bool | str = False  # True: recompute each layer in backward (~0.5x memory, ~1.45x time);
                                                # "mlp": only each layer's feed-forward block (checkpoint_mlps);
                                                # "auto": "mlp" where the model has such blocks, else nothing
    release_memory: bool = False         # glibc: large freed buffers go back to the OS (release_freed_memory): less
                                         # memory, much slower; off everywhere, kept for memory-bound runs
    # Task heads (tunekit.heads.TaskObjective): its collate / count / loss_sum replace the LM ones, so
    # the loss is normalised per example (or labelled token) of a whole step; None = causal-LM loss.
    objective: Any = None


@dataclass
class TrainState:
    """Everything beyond weights and optimizer that a resumed run needs to continue identically."""
    step: int = 0
    best_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    probes: list[dict[str, float]] = field(default_factory=list)  # forgetting curve: {"step", "probe_loss"}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ---------------------------------------------------------------- optimizer: discriminative learning rates

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


# ---------------------------------------------------------------- L2 toward the starting weights


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


# ---------------------------------------------------------------- several processes


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if dist_info()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
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
def _broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
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
    total, count = _all_reduce_sum([result["loss"] * result["tokens"], float(result["tokens"])],
                                   next(model.parameters()).device)
    return total / max(count, 1.0)


# ---------------------------------------------------------------- which rows each step trains on


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


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)


def total_steps(n_rows: int, cfg: TrainConfig, world: int = 1) -> int:
    """Optimizer steps: epochs over the task rows, each global micro-batch taking batch_size * world
    rows minus its replay rows."""
    batches_per_epoch = math.ceil(n_rows / (cfg.batch_size * world - replay_per_batch(cfg, world)))
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def _save_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, state: TrainState, best: dict | None,
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
        import time

        self._ticks.append(time.perf_counter())
        if len(self._ticks) > CHECKPOINT_TIMED_STEPS:
            seconds = (self._ticks[-1] - self._ticks[0]) / (len(self._ticks) - 1)
            if self.world > 1:  # every rank calls due() at the same step, so this collective lines up
                seconds = _all_reduce_sum([seconds], self.device)[0] / self.world
            self.every = auto_checkpoint_interval(seconds, self.total)
            log.info("checkpoint_every auto: %.2f s per step -> a resumable checkpoint every %d steps (of %d)",
                     seconds, self.every, self.total)


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(ckpt_dir.glob("step-*")) if ckpt_dir.exists() else []
    return done[-1] if done else None


def _restore(path: Path, model, optimizer, scheduler) -> tuple[TrainState, dict | None]:
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


BF16_ON_CPU = ("finetune.precision: bf16 autocasts on CUDA only. On this CPU (no AMX / AVX512-BF16 kernels) bf16 "
               "matmuls are ~500x slower than fp32, so a CPU run in bf16 would be slower, not faster: use precision: fp32")


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager] | None:
    if cfg.precision == "fp32":
        return None
    if cfg.precision != "bf16":
        raise ValueError(f"precision {cfg.precision!r}: use fp32 or bf16")
    if device.type != "cuda":
        raise ValueError(BF16_ON_CPU)
    return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def release_freed_memory() -> bool:
    """Make glibc return large freed blocks to the OS instead of keeping them in its heap.

    Training allocates activations of a different size for every batch (rows of different lengths).
    glibc serves big requests by mmap, but raises that threshold each time such a block is freed, up
    to 32 MB, after which activations come from the heap, where freed holes of the wrong size pile up:
    measured on SmolLM2-135M, 4 rows of up to 419 tokens, one step's peak RSS was 6.7 GB with glibc's
    defaults and 5.0 GB with the thresholds fixed at 128 KiB (1.5 GB against 5.1 GB with gradient
    checkpointing). The price is a page fault for every new large buffer: an epoch took 1.6x as long
    (1.8x with gradient checkpointing; bench/sft_vs_trl.py), so it is off unless TrainConfig.release_memory
    asks for it. Numerics are unchanged. Process-wide; a no-op (False) where glibc is not the libc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 128 * 1024)) and bool(mallopt(m_trim_threshold, 128 * 1024))


def _drop_count(p: float) -> int:
    """p on a grid of 1/65536: how many of the 65536 values of a 16-bit draw drop an element."""
    return round(p * 65536)


def _keep_rate(p: float) -> float:
    """The keep probability `_dropout_drop` draws with: 1 - p, with p on a grid of 1/65536."""
    return 1.0 - _drop_count(p) / 65536


def _dropout_drop(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """A dropout mask for x (True = dropped) from `seed` alone. Four 16-bit draws come out of every 64-bit
    random number, which is ~3x faster on the CPU than torch.rand or bernoulli_ (one generator call per element)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1, generator=generator)
    return bits.view(torch.int16)[:n].view(x.shape) < _drop_count(p) - 32768


class _DroppedLinear(torch.autograd.Function):
    """dropout(x, p) @ weight.T (a LoRA A matrix after LoRA dropout) that keeps x, not the dropped copy
    and its mask: backward draws the same mask again from `seed`. Inputs shared by several adapters
    (q, k and v read one normed hidden state; gate and up another) are then kept once instead of once
    per adapter, with a mask each. The 1/(1-p) scale is applied to the r-wide side of the product and
    the mask by masked_fill: no float copy of the mask, one pass over x fewer than x * mask / (1 - p)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        return F.linear(x.masked_fill(_dropout_drop(x, p, seed), 0), weight) * (1 / _keep_rate(p))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        drop = _dropout_drop(x, ctx.p, ctx.seed)
        grad = grad * (1 / _keep_rate(ctx.p))
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).masked_fill_(drop, 0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = x.masked_fill(drop, 0).to(grad.dtype)
            grad_weight = (grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_weight, None, None


def _dropped_lora_a(module: torch.nn.Linear, p: float, x: torch.Tensor) -> torch.Tensor:
    if not module.training or not torch.is_grad_enabled():
        return F.linear(x, module.weight)  # evaluation: dropout is the identity
    seed = int(torch.randint(0, 2**62, ()))  # from the global CPU stream: reproducible, repeated under checkpointing
    return _DroppedLinear.apply(x, module.weight, p, seed)


def regenerate_lora_dropout(model: torch.nn.Module) -> int:
    """Fuse LoRA dropout into each plain LoRA adapter's A matrix (`_DroppedLinear`): the same dropout
    (rate, scaling, a fresh mask per adapter and call), but backward redraws the mask instead of keeping
    the dropped copy of every adapter's input. SmolLM2-135M, LoRA r=16 on all 7 linears per layer:
    that copy and its mask are ~25 KB per token and layer. PEFT's variants (DoRA, ...) and adapters
    without dropout are left alone. Returns how many adapters it changed."""
    fused = 0
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        for key, dropout in list(dropouts.items()):
            a = lora_a[key] if key in lora_a else None
            if (not isinstance(dropout, torch.nn.Dropout) or dropout.p == 0 or key in getattr(module, "lora_variant", {})
                    or type(a) is not torch.nn.Linear or a.bias is not None):
                continue
            a.forward = functools.partial(_dropped_lora_a, a, dropout.p)
            dropouts[key] = torch.nn.Identity()
            fused += 1
    return fused


def _plain_lora_parts(layer: torch.nn.Module) -> tuple[torch.nn.Module, list[tuple]] | None:
    """(frozen base layer, [(lora_A, lora_B, dropout, scaling), ...]) when `layer` is a PEFT LoRA Linear whose
    forward is exactly base(x) + sum of lora_B(lora_A(dropout(x))) * scaling over its active adapters (no
    variant, not merged or disabled, base weight frozen); None otherwise."""
    base = getattr(layer, "base_layer", None)
    lora_a = getattr(layer, "lora_A", None)
    if (not isinstance(base, torch.nn.Linear) or base.weight.requires_grad or not isinstance(lora_a, torch.nn.ModuleDict)
            or getattr(layer, "disable_adapters", True) or getattr(layer, "merged", True)):
        return None
    parts = []
    for key in layer.active_adapters:
        if key not in lora_a:
            continue
        if key in getattr(layer, "lora_variant", {}):
            return None
        parts.append((lora_a[key], layer.lora_B[key], layer.lora_dropout[key], layer.scaling[key]))
    return base, parts


def _checkpointed_mlp(mlp: torch.nn.Module, forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`forward` (the block's own) with its activations recomputed in backward. A gated feed-forward
    (gate_proj, up_proj, act_fn, down_proj: Llama, Mistral, Qwen, ...) whose down_proj is frozen or plain
    LoRA is split so that the recomputation stops at down_proj's input: act(gate(x)) * up(x) and the LoRA A
    product of it are recomputed, the frozen down_proj matmul is not (it keeps nothing for backward), a third
    of the recomputed feed-forward FLOPs. Same operations, same results as the block's forward."""
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return forward(x, *args, **kwargs)
    down = getattr(mlp, "down_proj", None)
    if args or kwargs or not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "act_fn")):
        return checkpoint(forward, x, *args, use_reentrant=False, **kwargs)
    if isinstance(down, torch.nn.Linear) and not down.weight.requires_grad and (down.bias is None or not down.bias.requires_grad):
        base, adapters = down, []
    else:
        split = _plain_lora_parts(down)
        if split is None:
            return checkpoint(forward, x, use_reentrant=False)
        base, adapters = split

    def recomputed(x):
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        return (h, *(lora_a(dropout(down._cast_input_dtype(h, lora_a.weight.dtype))) for lora_a, _, dropout, _ in adapters))

    h, *low_rank = checkpoint(recomputed, x, use_reentrant=False)
    out = base(h)
    dtype = out.dtype
    for (_, lora_b, _, scaling), a in zip(adapters, low_rank):
        out = out + lora_b(a) * scaling
    return out.to(dtype)


def checkpoint_mlps(model: torch.nn.Module) -> int:
    """Recompute every transformer block's feed-forward (the modules named `*.mlp`) in the backward pass
    instead of keeping its activations: on a Llama-style block the MLP's four intermediate-size tensors
    are most of what a layer keeps per token, while recomputing it costs two of its three matmuls
    (`_checkpointed_mlp`). Non-reentrant, RNG state preserved (LoRA dropout inside repeats its masks).
    Returns how many blocks it wrapped."""
    wrapped = 0
    for name, module in model.named_modules():
        if name.endswith(".mlp"):
            if not getattr(module, "_tunekit_checkpointed", False):
                module.forward = functools.partial(_checkpointed_mlp, module, module.forward)
                module._tunekit_checkpointed = True
            wrapped += 1
    return wrapped


@contextlib.contextmanager
def grouped_query_sdpa(device: torch.device):
    """On the CPU, let transformers hand grouped-query attention (SmolLM2: 9 query heads, 3 key/value
    heads) to torch's SDPA with enable_gqa instead of repeating keys and values to every query head
    first: the CPU flash kernel takes masks and GQA together, so backward keeps k and v at 3 heads, not
    9 (SmolLM2, 4 rows of 419 tokens: 150 MB less; identical outputs, same speed). transformers only
    does this without a mask, because CUDA kernels then fall back to the slow math path, so the switch
    (its TRANSFORMERS_SDPA_FORCE_GQA, read at every attention call) stays off on CUDA."""
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    if device.type != "cpu" or key in os.environ:
        yield
        return
    os.environ[key] = "1"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def train(model: torch.nn.Module, train_rows: Sequence[dict[str, Any]], val_rows: Sequence[dict[str, Any]],
          cfg: TrainConfig, pad_id: int, ckpt_dir: Path,
          on_step: Callable[[TrainState], None] | None = None,
          replay_rows: Sequence[dict[str, Any]] | None = None,
          probe_rows: Sequence[dict[str, Any]] | None = None) -> TrainState:
    """Train `model` in place; resumes from the newest checkpoint in `ckpt_dir` if there is one.

    `replay_rows` (plain LM rows, `replay_lm_rows`) are mixed into every batch when cfg.replay_ratio > 0;
    `probe_rows` are scored every cfg.forgetting_every steps (state.probes). Under torch.distributed
    every rank calls this with the same arguments (see the module docstring); rank 0 alone writes.
    """
    with grouped_query_sdpa(next(model.parameters()).device):
        return _train(model, train_rows, val_rows, cfg, pad_id, ckpt_dir, on_step, replay_rows, probe_rows)


def _train(model, train_rows, val_rows, cfg, pad_id, ckpt_dir, on_step, replay_rows, probe_rows) -> TrainState:
    rank, world = dist_info()
    device = next(model.parameters()).device
    autocast = _autocast(cfg, device)
    if cfg.forgetting_every and not probe_rows:
        raise ValueError("forgetting_every is set but no probe_rows were given")
    model.train()
    if cfg.release_memory:
        release_freed_memory()
    regenerate_lora_dropout(model)
    if cfg.gradient_checkpointing == "auto":
        # The feed-forward blocks where the model has them, unless whole layers are recomputed already (QLoRA's
        # preparation turns that on): a Llama-style decoder keeps most of its per-token activations there.
        if not any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules()):
            checkpoint_mlps(model)
    elif cfg.gradient_checkpointing == "mlp":
        if not checkpoint_mlps(model):
            raise ValueError("gradient_checkpointing: mlp found no feed-forward block named `mlp` in this model (Llama-style "
                             "decoders have one per layer); use gradient_checkpointing: true to recompute whole layers")
    elif cfg.gradient_checkpointing:
        # Non-reentrant: needs no input that requires grad (LoRA leaves the embeddings frozen). transformers 5
        # renamed it activation checkpointing; the old name still works there, with a warning.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    if world > 1:
        _broadcast_parameters(trainable)  # one starting point, whatever each rank's initialisation drew
    anchors = l2_anchors(model) if cfg.l2_to_init > 0 else None  # before a resume overwrites the weights
    optimizer = make_optimizer(model, cfg)
    steps = total_steps(len(train_rows), cfg, world)
    scheduler = make_scheduler(optimizer, cfg, steps)
    state, best = TrainState(), None
    latest = _latest_checkpoint(ckpt_dir)
    if latest is not None:
        state, best = _restore(latest, model, optimizer, scheduler)
        log.info("resuming from %s (step %d of %d)", latest, state.step, steps)
    elif world > 1:
        torch.manual_seed(cfg.seed * 1000 + rank)  # each rank its own dropout stream
    barrier()  # nobody moves on (and rank 0 may soon replace checkpoints) before every rank has read them

    plan = BatchPlan([len(row["input_ids"]) for row in train_rows], cfg, world, len(replay_rows or []))
    base_lr = optimizer.param_groups[0]["initial_lr"]

    def micro_batch(index: int) -> dict[str, torch.Tensor] | None:
        picked = [train_rows[i] if kind == "task" else replay_rows[i] for kind, i in plan.shard(index, rank)]
        return (cfg.objective.collate if cfg.objective else collate)(picked, pad_id) if picked else None

    def probe() -> None:
        with (autocast() if autocast else contextlib.nullcontext()):
            loss = reduced_loss(model, probe_rows, pad_id, cfg.batch_size, cfg.full_forward)
        state.probes.append({"step": state.step, "probe_loss": loss})

    if cfg.forgetting_every and state.step == 0 and not state.probes:
        probe()  # the curve starts at the untrained model
    checkpoints = CheckpointSchedule(cfg.checkpoint_every, steps, device, world)
    bar = tqdm(total=steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=rank != 0)
    while state.step < steps and not state.stopped_early:
        micro = [micro_batch(state.step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
        micro = [batch for batch in micro if batch is not None]
        local_tokens = sum((cfg.objective.count if cfg.objective else trained_tokens)(batch) for batch in micro)
        replay_tokens = sum(sum(label != IGNORE for label in replay_rows[i]["labels"][1:]) for k in range(cfg.grad_accum)
                            for i in plan.replay_rows(state.step * cfg.grad_accum + k)) if plan.replay else 0
        step_tokens = int(_all_reduce_sum([float(local_tokens)], device)[0]) if world > 1 else local_tokens
        step_loss, _ = accumulate_gradients(model, micro, cfg.full_forward, step_tokens, autocast, cfg.objective)
        if world > 1:
            step_loss = _all_reduce_sum([step_loss], device)[0]
            _all_reduce_gradients(trainable)
        entry = {"step": state.step + 1, "train_loss": step_loss}
        if anchors is not None:
            entry["l2_penalty"] = add_l2_to_init_gradient(model, anchors, cfg.l2_to_init)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        lr = cfg.lr * scheduler.get_last_lr()[0] / base_lr  # the schedule's factor times finetune.lr
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        entry.update(lr=lr, tokens=step_tokens)
        if plan.replay:
            entry["replay_tokens"] = replay_tokens
        state.history.append(entry)

        if val_rows and (state.step % cfg.eval_every == 0 or state.step == steps):
            with (autocast() if autocast else contextlib.nullcontext()):
                val = reduced_loss(model, val_rows, pad_id, cfg.batch_size, cfg.full_forward, cfg.objective)
            state.evals.append({"step": state.step, "val_loss": val})
            if state.best_loss is None or val < state.best_loss:
                state.best_loss, state.best_step, state.evals_without_improvement = val, state.step, 0
                best = trainable_state(model)
            else:
                state.evals_without_improvement += 1
                if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
                    state.stopped_early = True
                    log.info("early stopping at step %d: no improvement for %d evaluations", state.step, state.evals_without_improvement)
            bar.set_postfix(loss=f"{state.history[-1]['train_loss']:.3f}", val=f"{val:.3f}")
        else:
            bar.set_postfix(loss=f"{state.history[-1]['train_loss']:.3f}")
        if cfg.forgetting_every and (state.step % cfg.forgetting_every == 0 or state.step == steps or state.stopped_early):
            probe()
        bar.update(1)
        if checkpoints.due(state.step):
            rank_rng = None
            if world > 1:
                rank_rng = [None] * world
                torch.distributed.all_gather_object(rank_rng, torch.get_rng_state())
            if rank == 0:
                _save_checkpoint(ckpt_dir, model, optimizer, scheduler, state, best, rank_rng)
            barrier()
        if on_step is not None:
            on_step(state)
    bar.close()

    if best is not None and state.best_step != state.step:
        log.info("restoring the best weights (step %d, validation loss %.4f)", state.best_step, state.best_loss)
        load_trainable_state(model, best)
    return state
