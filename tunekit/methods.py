"""Fine-tuning methods: one registry entry each, selected by `finetune.method`.

An entry turns a loaded base model into the model to train (setting what is trainable) and says
whether its result can be merged back into standalone weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunekit.params import FinetuneParams


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable[[torch.nn.Module, FinetuneParams], torch.nn.Module]
    mergeable: bool
    saves_adapter: bool  # the output is an adapter on top of the base, not full weights


def _lora(model: torch.nn.Module, params: FinetuneParams) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=params.lora.target_modules,
    )
    return get_peft_model(model, config)


METHODS: dict[str, Method] = {
    "lora": Method("lora", _lora, mergeable=True, saves_adapter=True),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"finetune.method {name!r} is not known; valid: {', '.join(METHODS)}")
    return METHODS[name]


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_parameters": trainable, "total_parameters": total, "trainable_fraction": trainable / max(total, 1)}
