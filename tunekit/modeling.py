"""Model-building pieces shared by the methods and the task kinds: pooling, the pooled head, the
multi-task model, loading a base with a new head, and introspection (which modules are heads, which
PEFT task type a model has, where its transformer layers are).

Nothing here knows a task kind by name: a head is described by its shape and size (a `HeadShape` on
the spec a task kind hands in), and the task kinds (tunekit.tasks) say which shape they need.

- `PooledClassifier`: backbone (AutoModel) -> pooling -> dropout -> linear `classifier`, for the
  pooling transformers' classes do not do (mean pooling; last-token pooling found from the attention
  mask, right for left and right padding alike, where Llama's class looks for the pad id, which for
  SmolLM2 is also its end-of-turn token; cls pooling on a decoder). Saved as the backbone's
  safetensors + config.json, plus task_head.safetensors + task_head.json (its pooling).
- `MultiTaskModel`: one shared backbone with a head per task (ModuleDict `heads`); a batch names its task.
- `load_head_base`: the base checkpoint with a new, untrained head (seeded, so every stage builds the
  same one); transformers' AutoModelFor<...> where it does what was asked, else `PooledClassifier`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("tunekit")

POOLINGS = ("cls", "mean", "last")
HEAD_WEIGHTS = "task_head.safetensors"
HEAD_CONFIG = "task_head.json"
# Names transformers (and PooledClassifier) give their task heads; PEFT keeps these in modules_to_save.
HEAD_NAMES = ("classifier", "score", "qa_outputs")
# Seed of a new head's initialisation: base, fine-tune and evaluate all build the same untrained head.
HEAD_INIT_SEED = 0
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# transformers' head classes by the suffix of their architecture name (config.json "architectures").
AUTO_CLASSES = {"ForSequenceClassification": "AutoModelForSequenceClassification",
                "ForTokenClassification": "AutoModelForTokenClassification",
                "ForQuestionAnswering": "AutoModelForQuestionAnswering"}


class TaskError(ValueError):
    """A task cannot be set up as asked; the message says what, where and how to fix it."""


@dataclass(frozen=True)
class HeadShape:
    """What a head computes: `sequence` (one vector per example, from pooled hidden states), `token`
    (one per token) or `span` (start and end logits per token)."""
    kind: str
    outputs: int
    pooling: str = "cls"


class HasHead(Protocol):
    """What the multi-task model needs of each task's spec (tunekit.tasks.TaskSpec)."""
    @property
    def shape(self) -> HeadShape: ...
    def to_meta(self) -> dict[str, Any]: ...


def is_encoder(model_dir: Path) -> bool:
    from transformers import AutoConfig

    from tunekit.models import is_encoder_config, resolve_checkpoint

    return is_encoder_config(AutoConfig.from_pretrained(str(resolve_checkpoint(model_dir))))


def resolve_pooling(pooling: str, encoder: bool) -> str:
    if pooling == "auto":
        return "cls" if encoder else "last"
    if pooling not in POOLINGS:
        raise TaskError(f"task.pooling {pooling!r}: use cls, mean, last or auto")
    return pooling


# ---------------------------------------------------------------- pooling and the custom head


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """[batch, seq, hidden] -> [batch, hidden], using only real (attention_mask == 1) positions, so it is
    right for left- and right-padded batches: cls = the first real token, last = the last real one, mean
    = the mean over real tokens."""
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.device)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "cls":
        return hidden[rows, mask.argmax(dim=1)]  # argmax: the first maximal (= first real) position
    if pooling == "last":
        width = mask.shape[1]
        return hidden[rows, width - 1 - mask.flip(1).argmax(dim=1)]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    raise TaskError(f"pooling {pooling!r}: use cls, mean or last")


class PooledClassifier(torch.nn.Module):
    """backbone (AutoModel) -> pooling -> dropout -> linear `classifier` (classes or regression targets).
    `config` is the backbone's (with id2label / label2id / problem_type set), so PEFT and transformers'
    helpers read it as usual."""

    def __init__(self, backbone: torch.nn.Module, num_labels: int, pooling: str, dropout: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise TaskError(f"pooling {pooling!r}: use cls, mean or last")
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(backbone.config.hidden_size, num_labels)
        self.config = backbone.config
        self.name_or_path = getattr(backbone, "name_or_path", "")
        self.is_loaded_in_4bit = getattr(backbone, "is_loaded_in_4bit", False)  # qlora

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                past_key_values=None, **ignored):
        from transformers.modeling_outputs import SequenceClassifierOutput

        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        if past_key_values is not None:  # prefix tuning's virtual keys and values
            extra["past_key_values"] = past_key_values
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               **extra).last_hidden_state
        if attention_mask is not None and hidden.shape[1] > attention_mask.shape[1]:
            # virtual tokens prepended by prompt / p-tuning are real positions too
            pad = torch.ones(hidden.shape[0], hidden.shape[1] - attention_mask.shape[1], dtype=attention_mask.dtype,
                             device=attention_mask.device)
            attention_mask = torch.cat([pad, attention_mask], dim=1)
        elif attention_mask is not None and hidden.shape[1] < attention_mask.shape[1]:
            attention_mask = attention_mask[:, -hidden.shape[1]:]  # prefix tuning: the mask covers its virtual keys too
        pooled = pool(hidden, attention_mask, self.pooling)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self):
        return None

    def gradient_checkpointing_enable(self, **kwargs) -> None:  # qlora's prepare_model_for_kbit_training
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def enable_input_require_grads(self) -> None:
        self.backbone.enable_input_require_grads()

    def save_pretrained(self, out: Path, safe_serialization: bool = True, **kwargs) -> None:
        """The backbone as transformers saves it (safetensors + config.json), plus the head's weights and
        its pooling; `load_pooled_classifier` reads them back."""
        if not safe_serialization:
            raise TaskError("tunekit writes safetensors only")
        out = Path(out)
        self.backbone.save_pretrained(out, safe_serialization=True, **kwargs)
        save_file({k: v.detach().contiguous() for k, v in self.classifier.state_dict().items()}, out / HEAD_WEIGHTS)
        head = {"type": "pooled_classifier", "pooling": self.pooling, "num_labels": self.classifier.out_features,
                "dropout": self.dropout.p, "hidden_size": self.classifier.in_features,
                "id2label": {str(k): v for k, v in self.config.id2label.items()},
                "problem_type": self.config.problem_type}
        (out / HEAD_CONFIG).write_text(json.dumps(head, indent=2) + "\n", encoding="utf-8")


def head_config(path: Path) -> dict[str, Any] | None:
    """task_head.json of a checkpoint with a custom head (pooled or multi-task), else None."""
    file = Path(path) / HEAD_CONFIG
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None


def load_pooled_classifier(path: Path) -> PooledClassifier:
    """A saved PooledClassifier (backbone, head weights and pooling), on the CPU."""
    from transformers import AutoModel

    head = head_config(path) or {}
    backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    model = PooledClassifier(backbone, head["num_labels"], head["pooling"], head.get("dropout", 0.0))
    missing, unexpected = model.classifier.load_state_dict(load_file(Path(path) / HEAD_WEIGHTS), strict=False)
    if missing or unexpected:
        raise TaskError(f"{Path(path) / HEAD_WEIGHTS}: head weights do not fit (missing {missing}, unexpected {unexpected}); "
                        "the checkpoint is damaged: re-run the stage that wrote it")
    return model


def load_auto_head_model(path: Path, auto_class: str | None = None) -> torch.nn.Module:
    """A saved transformers task model: `auto_class` (e.g. "AutoModelForTokenClassification"), else the
    class named by config.json's architectures."""
    import transformers

    if auto_class is None:
        config = transformers.AutoConfig.from_pretrained(str(path))
        for arch in config.architectures or []:
            auto_class = next((name for suffix, name in AUTO_CLASSES.items() if arch.endswith(suffix)), auto_class)
        if auto_class is None:
            raise TaskError(f"{path}: neither {HEAD_CONFIG} nor a task architecture in config.json "
                            f"({config.architectures}); this is not a task checkpoint (task.type sft loads it as a causal LM)")
    return getattr(transformers, auto_class).from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)


# ---------------------------------------------------------------- a base with a new head


def _dropout_of(config) -> float:
    for key in ("classifier_dropout", "hidden_dropout_prob", "hidden_dropout"):
        value = getattr(config, key, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


def _quantization(head_names: Sequence[str], device: torch.device):
    from transformers import BitsAndBytesConfig

    # The new head stays in fp32: it is trained in full (PEFT modules_to_save), not through LoRA.
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                              llm_int8_skip_modules=list(head_names))


def _no_avx512_repack(model: torch.nn.Module) -> None:
    with contextlib.suppress(ImportError):
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False  # see tunekit.methods.load_4bit


def load_head_base(model_dir: Path, auto_class: str | None, num_labels: int, pooling: str,
                   config: dict[str, Any], quantize: bool = False,
                   device: torch.device | str | None = None) -> torch.nn.Module:
    """The base checkpoint with a new, untrained head (initialised from a fixed seed, so every stage
    builds the same one), on `device` (default: `compute_device()`). `auto_class`: transformers' class
    with that head (e.g. "AutoModelForQuestionAnswering"), or None for a `PooledClassifier` with
    `num_labels` outputs and `pooling`; `config`: what the head's config must say (num_labels, id2label,
    problem_type). `quantize`: the backbone in 4-bit NF4 (qlora), the head in fp32."""
    import transformers
    from transformers import AutoModel

    from tunekit.models import compute_device, resolve_checkpoint

    path = str(resolve_checkpoint(model_dir))
    device = torch.device(device or compute_device())
    extra: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": True}
    if quantize:
        extra.update(quantization_config=_quantization(HEAD_NAMES, device), device_map={"": str(device)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_INIT_SEED)
        if auto_class is None:
            backbone = AutoModel.from_pretrained(path, **extra)
            for key, value in config.items():
                setattr(backbone.config, key, value)
            model = PooledClassifier(backbone, num_labels, pooling, _dropout_of(backbone.config))
        else:
            model, info = getattr(transformers, auto_class).from_pretrained(path, **config, **extra,
                                                                            output_loading_info=True)
            missing = [key for key in info["missing_keys"] if key.split(".")[0] not in HEAD_NAMES]
            if missing:
                # e.g. LlamaForQuestionAnswering keeps its decoder under `transformer.` while a causal-LM
                # checkpoint has `model.`: from_pretrained loads nothing and says so only in a report.
                # Put the pretrained backbone in its place instead of training from random weights.
                log.info("%s did not find its backbone weights under %r in %s (%d missing); loading them with AutoModel",
                         type(model).__name__, model.base_model_prefix, path, len(missing))
                setattr(model, model.base_model_prefix, AutoModel.from_pretrained(path, **extra))
    if getattr(model.config, "pad_token_id", None) is None:
        with contextlib.suppress(Exception):
            from tunekit.models import load_tokenizer

            model.config.pad_token_id = load_tokenizer(Path(path)).pad_token_id
    if quantize:
        _no_avx512_repack(model)
        return model.to(device) if isinstance(model, PooledClassifier) else model  # its head is built on the CPU
    return model.to(device)


# ---------------------------------------------------------------- multi-task


class MultiTaskModel(torch.nn.Module):
    """One shared backbone, one head per task (ModuleDict `heads`); a batch carries its task's name.
    Each task's spec says its head's shape (tunekit.tasks.TaskSpec.shape)."""

    def __init__(self, backbone: torch.nn.Module, specs: dict[str, HasHead]):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.specs = dict(specs)
        hidden = backbone.config.hidden_size
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, spec.shape.outputs) for name, spec in specs.items()})

    def forward(self, task: str, input_ids=None, attention_mask=None, token_type_ids=None, **ignored):
        from transformers.modeling_outputs import (
            QuestionAnsweringModelOutput,
            SequenceClassifierOutput,
            TokenClassifierOutput,
        )

        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        shape = self.specs[task].shape
        if shape.kind == "sequence":
            return SequenceClassifierOutput(logits=self.heads[task](pool(hidden, attention_mask, shape.pooling)))
        logits = self.heads[task](hidden)
        if shape.kind == "token":
            return TokenClassifierOutput(logits=logits)
        start, end = logits.unbind(-1)
        return QuestionAnsweringModelOutput(start_logits=start, end_logits=end)

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def save_pretrained(self, out: Path, safe_serialization: bool = True, **kwargs) -> None:
        out = Path(out)
        self.backbone.save_pretrained(out, safe_serialization=True, **kwargs)
        save_file({k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}, out / HEAD_WEIGHTS)
        config = {"type": "multi_task", "tasks": {name: spec.to_meta() for name, spec in self.specs.items()}}
        (out / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_multitask_backbone(model_dir: Path, specs: dict[str, HasHead], heads: Path | None = None,
                            device: torch.device | str | None = None) -> MultiTaskModel:
    """A MultiTaskModel on `model_dir`'s backbone: new heads from a fixed seed (so finetune, evaluate and
    merge build the same ones), or the saved ones of `heads` (a checkpoint's task_head.safetensors)."""
    from transformers import AutoModel

    from tunekit.models import compute_device, resolve_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_INIT_SEED)
        backbone = AutoModel.from_pretrained(str(resolve_checkpoint(model_dir)), dtype=torch.float32, use_safetensors=True)
        model = MultiTaskModel(backbone, specs)
    if heads is not None:
        model.heads.load_state_dict(load_file(heads))
    return model.to(device or compute_device())


class _OneTask(torch.nn.Module):
    """A view of a MultiTaskModel as a single-task model (for predicting and scoring one task)."""

    def __init__(self, model: MultiTaskModel, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, **inputs):
        return self.model(self.task, **inputs)


def one_task(model: MultiTaskModel, task: str) -> torch.nn.Module:
    return _OneTask(model, task)


# ---------------------------------------------------------------- introspection


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_task_model(model: torch.nn.Module) -> bool:
    inner = _inner(model)
    return isinstance(inner, (PooledClassifier, MultiTaskModel)) or type(inner).__name__.endswith(tuple(AUTO_CLASSES))


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Top-level names of the task head(s) of `model` (the parts that are new, not pretrained)."""
    inner = _inner(model)
    if isinstance(inner, MultiTaskModel):
        return ["heads"]
    return [name for name, _ in inner.named_children() if name in HEAD_NAMES]


def peft_task_type(model: torch.nn.Module):
    """The PEFT TaskType for `model`: CAUSAL_LM for generative models, else the head's type (PEFT then
    keeps the head in modules_to_save, so it trains and is saved with the adapter)."""
    from peft import TaskType

    inner = _inner(model)
    name = type(inner).__name__
    if isinstance(inner, PooledClassifier) or name.endswith("ForSequenceClassification"):
        return TaskType.SEQ_CLS
    if name.endswith("ForTokenClassification"):
        return TaskType.TOKEN_CLS
    if name.endswith("ForQuestionAnswering"):
        return TaskType.QUESTION_ANS
    if isinstance(inner, MultiTaskModel):
        return TaskType.FEATURE_EXTRACTION
    return TaskType.CAUSAL_LM


def lora_targets(model: torch.nn.Module, target_modules: str | list[str]) -> str | list[str]:
    """`all-linear` on a task model: every linear layer except the head (which trains in full through
    modules_to_save; PEFT's own `all-linear` leaves it out only for some task types)."""
    if not (isinstance(target_modules, str) and target_modules.lower() == "all-linear") or not is_task_model(model):
        return target_modules
    heads = tuple(head_module_names(model))
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and name.split(".")[0] not in heads)


def train_head_only(model: torch.nn.Module) -> torch.nn.Module:
    """Linear probing: the pretrained model frozen, only the new head trains."""
    model.requires_grad_(False)
    for name in head_module_names(model):
        getattr(model, name).requires_grad_(True)
    return model


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The stack of transformer blocks of a task model (Llama: model.layers; BERT: encoder.layer)."""
    inner = getattr(_inner(model), "backbone", _inner(model))
    core = getattr(inner, "base_model", inner)
    for attr in ("layers", "layer"):
        for owner in (core, getattr(core, "encoder", None), getattr(core, "decoder", None)):
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, torch.nn.ModuleList):
                return value
    return None


# ---------------------------------------------------------------- batches


def pad_inputs(rows: Sequence[dict[str, Any]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (and token_type_ids where rows have them) of unpadded rows, padded right
    (or left) to the longest."""
    width = max(len(row["input_ids"]) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    types = torch.zeros((n, width), dtype=torch.long) if "token_type_ids" in rows[0] else None
    for i, row in enumerate(rows):
        k = len(row["input_ids"])
        span = slice(width - k, width) if left else slice(0, k)
        input_ids[i, span] = torch.tensor(row["input_ids"])
        attention[i, span] = 1
        if types is not None:
            types[i, span] = torch.tensor(row["token_type_ids"])
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    device = next(model.parameters()).device
    config = getattr(model, "active_peft_config", None)
    if config is not None and not config.is_prompt_learning:
        # PEFT's task wrappers drop some inputs (peft 0.21's PeftModelForQuestionAnswering passes no
        # token_type_ids, so BERT would never see which tokens are the context); its tuner model runs the
        # wrapped model with the adapters active and every input as given.
        model = model.base_model
    return model(**{k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS})


def real_positions(logits: torch.Tensor, width: int) -> torch.Tensor:
    # Prompt-learning methods prepend virtual positions; the last `width` are the real tokens.
    return logits[:, logits.shape[1] - width:]
