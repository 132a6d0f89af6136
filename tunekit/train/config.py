"""What the training loop is asked to do (`TrainConfig`) and what a resumed run needs to continue
identically (`TrainState`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("tunekit")


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
    # What is trained: an object with collate / count / loss_sum, e.g. tunekit.train.loss.LanguageModeling (SFT, dapt:
    # the loss per trained token) or a task head's tunekit.tasks.heads.TaskObjective (per example or labelled token
    # of a whole step); None = LanguageModeling(full_forward).
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


BF16_ON_CPU = ("finetune.precision: bf16 autocasts on CUDA only. On this CPU (no AMX / AVX512-BF16 kernels) bf16 "
               "matmuls are ~500x slower than fp32, so a CPU run in bf16 would be slower, not faster: use precision: fp32")
