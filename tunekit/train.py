"""The training loop shared by the fine-tuning stages.

What it gets right where popular trainers are often silently wrong:
- the loss is a mean over the trained tokens of a whole optimizer step, across all accumulated
  micro-batches, not a mean of per-batch means (which overweights short examples);
- the LM head and cross-entropy run only at trained positions, so prompt tokens cost no vocab-sized
  logits;
- checkpoints hold model, optimizer, scheduler, RNG and data position, so a killed run resumes to
  the same weights as an uninterrupted one;
- early stopping restores the best weights instead of keeping the last.
"""

from __future__ import annotations

import json
import logging
import math
import random
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
    so little compute goes to padding, then the batch order shuffled again."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    window = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        group = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches.extend(group[j:j + batch_size] for j in range(0, len(group), batch_size))
    shuffled = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffled]


# ---------------------------------------------------------------- loss


def _causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


class PackingWithVirtualTokens(ValueError):
    pass


def _uses_virtual_tokens(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   full_forward: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over trained positions, and how many there were.

    By default the decoder runs alone and the LM head only at trained positions. `full_forward`
    (methods whose PeftModel.forward prepends virtual tokens: prompt, prefix and p-tuning) runs the
    model's own forward and takes its logits instead; the count of trained tokens is the same.
    """
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
    logits = lm_head(hidden[selected])
    return F.cross_entropy(logits.float(), targets[selected], reduction="sum"), count


def accumulate_gradients(model: torch.nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]],
                         full_forward: bool = False) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; returns (mean loss, trained tokens).

    Each micro-batch's summed loss is divided by the trained tokens of the whole step, so the
    accumulated gradient equals that of one batch holding all of them, whatever their lengths.
    """
    step_tokens = sum(trained_tokens(batch) for batch in micro_batches)
    step_loss = 0.0
    for batch in micro_batches:
        loss_sum, _ = token_loss_sum(model, batch, full_forward)
        (loss_sum / max(step_tokens, 1)).backward()
        step_loss += float(loss_sum.detach())
    return step_loss / max(step_tokens, 1), step_tokens


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, rows: Sequence[dict[str, Any]], pad_id: int, batch_size: int,
                  full_forward: bool = False) -> dict[str, float]:
    """Mean loss over all trained tokens of `rows`, and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([rows[i] for i in order[start:start + batch_size]], pad_id)
        loss, n = token_loss_sum(model, batch, full_forward)
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
    checkpoint_every: int = 20
    seed: int = 0
    full_forward: bool = False  # Method.full_forward: the loss runs the model's own forward


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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Norms and biases are not decayed: decaying a scale toward zero is not regularisation.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)


def total_steps(n_rows: int, cfg: TrainConfig) -> int:
    batches_per_epoch = math.ceil(n_rows / cfg.batch_size)
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def _save_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, state: TrainState, best: dict | None) -> None:
    final = ckpt_dir / f"step-{state.step:07d}"
    tmp = ckpt_dir / f".step-{state.step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    if best is not None:
        save_file(best, tmp / "best.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({
        "state": state.__dict__, "python_rng": random.getstate(),
    }), encoding="utf-8")
    tmp.rename(final)  # atomic: a directory named step-N is always complete
    for old in ckpt_dir.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(ckpt_dir.glob("step-*")) if ckpt_dir.exists() else []
    return done[-1] if done else None


def _restore(path: Path, model, optimizer, scheduler) -> tuple[TrainState, dict | None]:
    load_trainable_state(model, load_file(path / "trainable.safetensors"))
    # Our own file, written by _save_checkpoint; weights_only refuses anything but tensors and plain data.
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    saved = json.loads((path / "state.json").read_text(encoding="utf-8"))
    version, internal, gauss = saved["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    best_path = path / "best.safetensors"
    return TrainState(**saved["state"]), (load_file(best_path) if best_path.exists() else None)


def train(model: torch.nn.Module, train_rows: Sequence[dict[str, Any]], val_rows: Sequence[dict[str, Any]],
          cfg: TrainConfig, pad_id: int, ckpt_dir: Path,
          on_step: Callable[[TrainState], None] | None = None) -> TrainState:
    """Train `model` in place; resumes from the newest checkpoint in `ckpt_dir` if there is one."""
    model.train()
    optimizer = make_optimizer(model, cfg)
    steps = total_steps(len(train_rows), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    state, best = TrainState(), None
    latest = _latest_checkpoint(ckpt_dir)
    if latest is not None:
        state, best = _restore(latest, model, optimizer, scheduler)
        log.info("resuming from %s (step %d of %d)", latest, state.step, steps)

    lengths = [len(row["input_ids"]) for row in train_rows]
    per_epoch: dict[int, list[list[int]]] = {}

    def micro_batch(index: int) -> dict[str, torch.Tensor]:
        n = math.ceil(len(train_rows) / cfg.batch_size)
        epoch, position = divmod(index, n)
        if epoch not in per_epoch:
            per_epoch.clear()
            per_epoch[epoch] = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        return collate([train_rows[i] for i in per_epoch[epoch][position]], pad_id)

    bar = tqdm(total=steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    while state.step < steps and not state.stopped_early:
        micro = [micro_batch(state.step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
        step_loss, step_tokens = accumulate_gradients(model, micro, cfg.full_forward)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.history.append({"step": state.step, "train_loss": step_loss, "lr": lr, "tokens": step_tokens})

        if val_rows and (state.step % cfg.eval_every == 0 or state.step == steps):
            val = evaluate_loss(model, val_rows, pad_id, cfg.batch_size, cfg.full_forward)["loss"]
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
        bar.update(1)
        if state.step % cfg.checkpoint_every == 0 and state.step < steps:
            _save_checkpoint(ckpt_dir, model, optimizer, scheduler, state, best)
        if on_step is not None:
            on_step(state)
    bar.close()

    if best is not None and state.best_step != state.step:
        log.info("restoring the best weights (step %d, validation loss %.4f)", state.best_step, state.best_loss)
        load_trainable_state(model, best)
    return state
