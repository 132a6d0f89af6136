"""`train`: the loop that composes the pieces of this package (batches, loss, optimizer, memory
levers, distributed reductions, checkpoints)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tunekit.data import lengths_of
from tunekit.train.batches import IGNORE, BatchPlan, total_steps
from tunekit.train.checkpointing import (CheckpointSchedule, latest_checkpoint, load_trainable_state, restore_checkpoint,
                                         save_checkpoint, trainable_state)
from tunekit.train.config import TrainConfig, TrainState
from tunekit.train.distributed import (all_reduce_gradients, all_reduce_sum, barrier, broadcast_parameters, dist_info,
                                       reduced_loss)
from tunekit.train.loss import accumulate_gradients, objective_of
from tunekit.train.memory import (autocast_for, checkpoint_mlps, grouped_query_sdpa, regenerate_lora_dropout,
                                  release_freed_memory)
from tunekit.train.optim import add_l2_to_init_gradient, l2_anchors, make_optimizer, make_scheduler

log = logging.getLogger("tunekit")


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
    autocast = autocast_for(cfg, device)
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
        broadcast_parameters(trainable)  # one starting point, whatever each rank's initialisation drew
    anchors = l2_anchors(model) if cfg.l2_to_init > 0 else None  # before a resume overwrites the weights
    optimizer = make_optimizer(model, cfg)
    steps = total_steps(len(train_rows), cfg, world)
    scheduler = make_scheduler(optimizer, cfg, steps)
    state, best = TrainState(), None
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        state, best = restore_checkpoint(latest, model, optimizer, scheduler)
        log.info("resuming from %s (step %d of %d)", latest, state.step, steps)
    elif world > 1:
        torch.manual_seed(cfg.seed * 1000 + rank)  # each rank its own dropout stream
    barrier()  # nobody moves on (and rank 0 may soon replace checkpoints) before every rank has read them

    objective = objective_of(cfg.objective, cfg.full_forward)
    plan = BatchPlan(lengths_of(train_rows), cfg, world, len(replay_rows or []))
    base_lr = optimizer.param_groups[0]["initial_lr"]

    def micro_batch(index: int) -> dict[str, torch.Tensor] | None:
        picked = [train_rows[i] if kind == "task" else replay_rows[i] for kind, i in plan.shard(index, rank)]
        return objective.collate(picked, pad_id) if picked else None

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
        local_tokens = sum(objective.count(batch) for batch in micro)
        replay_tokens = sum(sum(label != IGNORE for label in replay_rows[i]["labels"][1:]) for k in range(cfg.grad_accum)
                            for i in plan.replay_rows(state.step * cfg.grad_accum + k)) if plan.replay else 0
        step_tokens = int(all_reduce_sum([float(local_tokens)], device)[0]) if world > 1 else local_tokens
        step_loss, _ = accumulate_gradients(model, micro, cfg.full_forward, step_tokens, autocast, objective)
        if world > 1:
            step_loss = all_reduce_sum([step_loss], device)[0]
            all_reduce_gradients(trainable)
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
                val = reduced_loss(model, val_rows, pad_id, cfg.batch_size, cfg.full_forward, objective)
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
                save_checkpoint(ckpt_dir, model, optimizer, scheduler, state, best, rank_rng)
            barrier()
        if on_step is not None:
            on_step(state)
    bar.close()

    if best is not None and state.best_step != state.step:
        log.info("restoring the best weights (step %d, validation loss %.4f)", state.best_step, state.best_loss)
        load_trainable_state(model, best)
    return state
