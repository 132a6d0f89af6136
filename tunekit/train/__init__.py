"""The training loop shared by the fine-tuning stages, one module per concern: config (TrainConfig,
TrainState), batches, loss, optim, memory (the levers), distributed, checkpointing, and loop (`train`).

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

from tunekit.train.batches import (IGNORE, BatchPlan, collate, epoch_batches, replay_lm_rows, replay_per_batch,
                                   total_steps, trained_tokens)
from tunekit.train.checkpointing import (CHECKPOINT_MIN_SECONDS, CHECKPOINT_TARGET_SECONDS, CheckpointSchedule,
                                         auto_checkpoint_interval, load_trainable_state, trainable_state)
from tunekit.train.config import BF16_ON_CPU, TrainConfig, TrainState
from tunekit.train.distributed import barrier, dist_info, reduced_loss
from tunekit.train.loop import train
from tunekit.train.loss import (LOSS_CHUNK, LanguageModeling, PackingWithVirtualTokens, accumulate_gradients,
                                evaluate_loss, linear_cross_entropy_sum, objective_of, token_loss_sum)
from tunekit.train.memory import checkpoint_mlps, grouped_query_sdpa, regenerate_lora_dropout, release_freed_memory
from tunekit.train.optim import (add_l2_to_init_gradient, l2_anchors, l2_to_init_penalty, make_optimizer,
                                 make_scheduler, param_groups)

__all__ = [
                                   "BF16_ON_CPU",
                                   "CHECKPOINT_MIN_SECONDS",
                                   "CHECKPOINT_TARGET_SECONDS",
                                   "IGNORE",
                                   "LOSS_CHUNK",
                                   "BatchPlan",
                                   "CheckpointSchedule",
                                   "LanguageModeling",
                                   "PackingWithVirtualTokens",
                                   "TrainConfig",
                                   "TrainState",
                                   "accumulate_gradients",
                                   "add_l2_to_init_gradient",
                                   "auto_checkpoint_interval",
                                   "barrier",
                                   "checkpoint_mlps",
                                   "collate",
                                   "dist_info",
                                   "epoch_batches",
                                   "evaluate_loss",
                                   "grouped_query_sdpa",
                                   "l2_anchors",
                                   "l2_to_init_penalty",
                                   "linear_cross_entropy_sum",
                                   "load_trainable_state",
                                   "make_optimizer",
                                   "make_scheduler",
                                   "objective_of",
                                   "param_groups",
                                   "reduced_loss",
                                   "regenerate_lora_dropout",
                                   "release_freed_memory",
                                   "replay_lm_rows",
                                   "replay_per_batch",
                                   "token_loss_sum",
                                   "total_steps",
                                   "train",
                                   "trainable_state",
                                   "trained_tokens",
]
