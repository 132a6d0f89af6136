"""The causal-LM loss summed over trained tokens (the LM head and cross-entropy fused and chunked, run
only at trained positions), its accumulation over the micro-batches of one optimizer step, and the
evaluation loss. An objective (`LanguageModeling` here; a task kind's in tunekit.tasks: `TrainConfig.objective`)
says how rows are batched, what the loss is averaged over and what the loss is."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunekit.data import lengths_of
from tunekit.train.batches import IGNORE, collate, trained_tokens

log = logging.getLogger("tunekit")


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


@dataclass(frozen=True)
class LanguageModeling:
    """The causal-LM objective of SFT and dapt: next-token cross-entropy summed over the trained tokens (labels not
    IGNORE). A task kind's objective (tunekit.tasks.heads.TaskObjective) has the same three functions."""
    full_forward: bool = False  # Method.full_forward: the model's own forward (virtual tokens), see token_loss_sum

    def collate(self, rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(rows, pad_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return trained_tokens(batch)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return token_loss_sum(model, batch, self.full_forward)


def objective_of(objective: Any, full_forward: bool = False) -> Any:
    """`objective`, or the causal-LM objective where none is given (TrainConfig's default)."""
    return objective if objective is not None else LanguageModeling(full_forward)


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
    objective = objective_of(objective, full_forward)
    if step_tokens is None:
        step_tokens = sum(objective.count(batch) for batch in micro_batches)
    step_loss = 0.0
    for batch in micro_batches:
        with (autocast() if autocast else contextlib.nullcontext()):
            loss_sum, _ = objective.loss_sum(model, batch)
        (loss_sum / max(step_tokens, 1)).backward()
        step_loss += float(loss_sum.detach())
    return step_loss / max(step_tokens, 1), step_tokens


@torch.no_grad()  # no autograd graph: a validation batch would otherwise hold a training step's activations
def evaluate_loss(model: torch.nn.Module, rows: Sequence[dict[str, Any]], pad_id: int, batch_size: int,
                  full_forward: bool = False, objective: Any = None) -> dict[str, float]:
    """Mean loss over all trained tokens of `rows` (`objective`: over its units), and its perplexity."""
    objective = objective_of(objective, full_forward)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    lengths = lengths_of(rows)
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        batch = objective.collate([rows[i] for i in order[start:start + batch_size]], pad_id)
        loss, n = objective.loss_sum(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}
