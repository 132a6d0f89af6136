"""Task heads: sequence classification, token classification (NER) and extractive QA on any base.

One place decides, for `task.type` != sft:
- which model a base checkpoint becomes (`load_task_base`): transformers' own AutoModelFor{Sequence,
  Token}Classification / AutoModelForQuestionAnswering where the architecture has the head and it
  does what was asked, else `PooledClassifier`, our small head over AutoModel for the pooling
  transformers' class does not do (mean pooling; last-token pooling found from the attention mask,
  right for left and right padding alike, where Llama's class looks for the pad id, which for SmolLM2
  is also its end-of-turn token; cls pooling on a decoder);
- how rows become batches and what the loss is (`TaskObjective`, given to tunekit.train.train):
  cross-entropy (single-label, optional class weights) or BCE (multi-label, optional pos_weight) summed
  per example, token cross-entropy summed per labelled token, QA (start CE + end CE) / 2 per window;
  the loop divides by the examples (or labelled tokens) of the whole optimizer step;
- how a checkpoint is saved and read back (`PooledClassifier.save_pretrained`, `load_task_model`):
  safetensors + config.json always; a custom head adds task_head.safetensors + task_head.json (its
  pooling), and `load_task_model(dir)` is the one function that loads any of them;
- what the methods registry needs to know (`task_method`, `head_module_names`, `peft_task_type`,
  `lora_targets`): the PEFT task type (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) puts the head in
  modules_to_save so it trains and is saved with the adapter;
- how a model is scored (`score_task`): accuracy / macro and micro F1 / ROC AUC / confusion matrix,
  seqeval entity P/R/F1 on word-level tags, SQuAD EM/F1 with n-best post-processing and the null answer.

Multi-task (`task.type: multi_task`, `task.tasks`): `MultiTaskModel`, one shared backbone with a head
per task, trained on batches each drawn from one task with probability proportional to its weight
(`MultiTaskObjective`); `multitask_method` re-targets full / freeze / head / lora / dora / ia3 at it (the
heads in PEFT's modules_to_save) and refuses the rest; meta.json's "task" is `multitask_meta`;
`load_multitask_model(dir)` (or `load_task_model(dir)`) reads a full or merged checkpoint back and
`one_task(model, name)` is one task's model for `predict` / `score_task`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

log = logging.getLogger("tunekit")

IGNORE = -100
TASK_TYPES = ("classification", "token_classification", "qa")
POOLINGS = ("cls", "mean", "last")
HEAD_WEIGHTS = "task_head.safetensors"
HEAD_CONFIG = "task_head.json"
# Names transformers (and PooledClassifier) give their task heads; PEFT keeps these in modules_to_save.
HEAD_NAMES = ("classifier", "score", "qa_outputs")
# Seed of a new head's initialisation: base, fine-tune and evaluate all build the same untrained head.
HEAD_INIT_SEED = 0


class TaskError(ValueError):
    """A task cannot be set up as asked; the message says what, where and how to fix it."""


# ---------------------------------------------------------------- what the task is


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task checkpoint needs to be rebuilt; stored in meta.json under "task"."""
    type: str
    labels: tuple[str, ...] = ()
    multi_label: bool = False
    pooling: str = "cls"  # resolved (never "auto"); used by classification only
    class_weights: tuple[float, ...] | None = None
    encoder: bool = True

    @property
    def num_labels(self) -> int:
        return 2 if self.type == "qa" else len(self.labels)

    def to_meta(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "labels": list(self.labels),
                "class_weights": list(self.class_weights) if self.class_weights else None}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TaskSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in meta.items() if k in fields}
        data["labels"] = tuple(data.get("labels") or ())
        data["class_weights"] = tuple(data["class_weights"]) if data.get("class_weights") else None
        return cls(**data)


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


def _label_counts(rows: Sequence[dict], n: int, multi_label: bool) -> list[float]:
    counts = [0.0] * n
    for row in rows:
        labels = row["labels"]
        if multi_label:
            for i, v in enumerate(labels):
                counts[i] += float(v)
        elif isinstance(labels, list):  # token classification: every labelled token
            for v in labels:
                if v != IGNORE:
                    counts[v] += 1
        else:
            counts[labels] += 1
    return counts


def resolve_class_weights(setting: Any, labels: Sequence[str], train_rows: Sequence[dict],
                          multi_label: bool) -> tuple[float, ...] | None:
    """task.class_weights -> one weight per label (label order), or None.

    `balanced`: n / (k * count) per class (scikit-learn's rule) for single-label classes and tags; for
    multi-label, BCE's pos_weight = negatives / positives per label. A mapping gives weights by label
    name (labels left out weigh 1.0)."""
    if setting is None:
        return None
    n = len(labels)
    if setting == "balanced":
        counts = _label_counts(train_rows, n, multi_label)
        if multi_label:
            total = len(train_rows)
            return tuple((total - c) / c if c else 1.0 for c in counts)
        total = sum(counts)
        present = sum(1 for c in counts if c)
        return tuple(total / (present * c) if c else 1.0 for c in counts)
    if isinstance(setting, dict):
        unknown = sorted(set(setting) - set(labels))
        if unknown:
            raise TaskError(f"task.class_weights names labels {unknown} that are not in the label set {list(labels)}")
        bad = {k: v for k, v in setting.items() if not v > 0}
        if bad:
            raise TaskError(f"task.class_weights {bad}: weights must be > 0")
        return tuple(float(setting.get(label, 1.0)) for label in labels)
    raise TaskError(f"task.class_weights {setting!r}: use null, balanced or a mapping {{label: weight}}")


def task_spec(task_params, labels_info: dict[str, Any], model_dir: Path, train_rows: Sequence[dict] = ()) -> TaskSpec:
    """The spec of a run: task.* params + data/tokenized/labels.json + the base's architecture."""
    if labels_info.get("task") != task_params.type:
        raise TaskError(f"labels.json says task {labels_info.get('task')!r} but params.yaml task.type is "
                        f"{task_params.type!r}: re-run the template stage (dvc repro template)")
    encoder = is_encoder(model_dir)
    labels = tuple(labels_info.get("labels") or ())
    multi_label = bool(labels_info.get("multi_label", False))
    if task_params.type != "qa" and len(labels) < 2 and not multi_label:
        raise TaskError(f"task {task_params.type}: {len(labels)} label(s) {list(labels)} in labels.json; a classifier "
                        "needs at least 2 (check task.labels or the train split)")
    weights = None
    if task_params.type != "qa":
        weights = resolve_class_weights(task_params.class_weights, labels, train_rows, multi_label)
    elif task_params.class_weights is not None:
        raise TaskError("task.class_weights applies to classification and token_classification, not qa; set it to null")
    return TaskSpec(task_params.type, labels, multi_label, resolve_pooling(task_params.pooling, encoder), weights, encoder)


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
    """backbone (AutoModel) -> pooling -> dropout -> linear `classifier`. `config` is the backbone's
    (with id2label / label2id / problem_type set), so PEFT and transformers' helpers read it as usual."""

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
        its pooling; `load_task_model` reads them back."""
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


# ---------------------------------------------------------------- loading


def _auto_class(task_type: str):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoModelForTokenClassification

    return {"classification": AutoModelForSequenceClassification, "token_classification": AutoModelForTokenClassification,
            "qa": AutoModelForQuestionAnswering}[task_type]


def uses_custom_head(spec: TaskSpec) -> bool:
    """transformers' sequence-classification heads pool the first token (BERT-style encoders, through
    their pooler) or the last token found by pad id (decoders); everything else is our PooledClassifier."""
    return spec.type == "classification" and not (spec.encoder and spec.pooling == "cls")


def _label_kwargs(spec: TaskSpec) -> dict[str, Any]:
    if spec.type == "qa":
        return {}
    kwargs: dict[str, Any] = {"num_labels": spec.num_labels, "id2label": dict(enumerate(spec.labels)),
                              "label2id": {label: i for i, label in enumerate(spec.labels)}}
    if spec.type == "classification":
        kwargs["problem_type"] = "multi_label_classification" if spec.multi_label else "single_label_classification"
    return kwargs


def _dropout_of(config) -> float:
    for key in ("classifier_dropout", "hidden_dropout_prob", "hidden_dropout"):
        value = getattr(config, key, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


def _quantization(head_names: Sequence[str], device: torch.device):
    from transformers import BitsAndBytesConfig

    # The new head stays in fp32: it is trained in full (PEFT modules_to_save), not through LoRA.
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32  # as tunekit.methods.load_4bit
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                              llm_int8_skip_modules=list(head_names))


def _no_avx512_repack(model: torch.nn.Module) -> None:
    with contextlib.suppress(ImportError):
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False  # see tunekit.methods.load_4bit


def load_task_base(model_dir: Path, spec: TaskSpec, quantize: bool = False,
                   device: torch.device | str | None = None) -> torch.nn.Module:
    """The base checkpoint with a new, untrained head for `spec` (initialised from a fixed seed, so every
    stage builds the same one), on `device` (default: `compute_device()`). `quantize`: the backbone in
    4-bit NF4 (qlora), the head in fp32."""
    from transformers import AutoModel

    from tunekit.models import compute_device, resolve_checkpoint

    path = str(resolve_checkpoint(model_dir))
    device = torch.device(device or compute_device())
    extra: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": True}
    if quantize:
        extra.update(quantization_config=_quantization(HEAD_NAMES, device), device_map={"": str(device)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_INIT_SEED)
        if uses_custom_head(spec):
            backbone = AutoModel.from_pretrained(path, **extra)
            for key, value in _label_kwargs(spec).items():
                setattr(backbone.config, key, value)
            model = PooledClassifier(backbone, spec.num_labels, spec.pooling, _dropout_of(backbone.config))
        else:
            model, info = _auto_class(spec.type).from_pretrained(path, **_label_kwargs(spec), **extra,
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


def load_task_model(model_dir: Path, spec: TaskSpec | None = None,
                    device: torch.device | str | None = None) -> torch.nn.Module:
    """A saved task model with its trained head: a custom head (task_head.json beside the backbone) or a
    transformers task class (named in config.json's architectures), on `device` (default:
    `compute_device()`). The one loader for finetune's full checkpoints, merged checkpoints and anything
    a user wants to serve."""
    from tunekit.models import compute_device

    return _load_task_model(model_dir, spec).to(device or compute_device())


def _load_task_model(model_dir: Path, spec: TaskSpec | None) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    from tunekit.models import resolve_checkpoint

    path = Path(resolve_checkpoint(model_dir))
    if (path / HEAD_CONFIG).is_file():
        head = json.loads((path / HEAD_CONFIG).read_text(encoding="utf-8"))
        if head.get("type") == "multi_task":
            return load_multitask_model(path, device="cpu")
        backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
        model = PooledClassifier(backbone, head["num_labels"], head["pooling"], head.get("dropout", 0.0))
        weights = load_file(path / HEAD_WEIGHTS)
        missing, unexpected = model.classifier.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise TaskError(f"{path / HEAD_WEIGHTS}: head weights do not fit (missing {missing}, unexpected {unexpected}); "
                            "the checkpoint is damaged: re-run the stage that wrote it")
        return model
    config = AutoConfig.from_pretrained(str(path))
    task_type = spec.type if spec is not None else None
    if task_type is None:
        for arch in config.architectures or []:
            for suffix, kind in (("ForSequenceClassification", "classification"),
                                 ("ForTokenClassification", "token_classification"), ("ForQuestionAnswering", "qa")):
                if arch.endswith(suffix):
                    task_type = kind
    if task_type is None:
        raise TaskError(f"{path}: neither {HEAD_CONFIG} nor a task architecture in config.json "
                        f"({config.architectures}); this is not a task checkpoint (task.type sft loads it as a causal LM)")
    return _auto_class(task_type).from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)


def is_task_model(model: torch.nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(inner, (PooledClassifier, MultiTaskModel)) or type(inner).__name__.endswith(
        ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"))


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Top-level names of the task head(s) of `model` (the parts that are new, not pretrained)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(inner, MultiTaskModel):
        return ["heads"]
    return [name for name, _ in inner.named_children() if name in HEAD_NAMES]


def peft_task_type(model: torch.nn.Module):
    """The PEFT TaskType for `model`: CAUSAL_LM for generative models, else the head's type (PEFT then
    keeps the head in modules_to_save, so it trains and is saved with the adapter)."""
    from peft import TaskType

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
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
                  if isinstance(module, torch.nn.Linear) and not name.split(".")[0] in heads)


def train_head_only(model: torch.nn.Module) -> torch.nn.Module:
    """Linear probing: the pretrained model frozen, only the new head trains."""
    model.requires_grad_(False)
    for name in head_module_names(model):
        getattr(model, name).requires_grad_(True)
    return model


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The stack of transformer blocks of a task model (Llama: model.layers; BERT: encoder.layer)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "backbone", inner)
    core = getattr(inner, "base_model", inner)
    for attr in ("layers", "layer"):
        for owner in (core, getattr(core, "encoder", None), getattr(core, "decoder", None)):
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, torch.nn.ModuleList):
                return value
    return None


def task_method(method, spec: TaskSpec):
    """The registry entry re-targeted at task models: its base loader builds the task model (4-bit
    backbone for qlora) and full checkpoints load through `load_task_model`."""
    from tunekit.methods import FULL_WEIGHTS, MethodError

    quantize = method.name == "qlora"
    if method.name == "adapter":
        raise MethodError("method adapter (bottleneck adapters) saves only the adapters, built for Llama-style decoder "
                          "blocks, not a task head; for task heads use lora, dora, ia3, qlora, full, freeze or head")

    def load_base(path: Path, device: torch.device | str | None = None) -> torch.nn.Module:
        return load_task_base(path, spec, quantize=quantize, device=device)

    checkpoint = method.checkpoint
    if checkpoint is FULL_WEIGHTS or not checkpoint.saves_adapter:
        checkpoint = dataclasses.replace(checkpoint, load=lambda tuned_dir, base: load_task_model(tuned_dir, spec))
    return dataclasses.replace(method, load_base=load_base, checkpoint=checkpoint)


# ---------------------------------------------------------------- batches and loss


def collate_task(rows: Sequence[dict[str, Any]], pad_id: int, task_type: str, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad task rows (right by default, `left=True` for left padding) into tensors."""
    width = max(len(row["input_ids"]) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    types = torch.zeros((n, width), dtype=torch.long) if "token_type_ids" in rows[0] else None
    token_labels = torch.full((n, width), IGNORE, dtype=torch.long) if task_type == "token_classification" else None
    for i, row in enumerate(rows):
        k = len(row["input_ids"])
        span = slice(width - k, width) if left else slice(0, k)
        input_ids[i, span] = torch.tensor(row["input_ids"])
        attention[i, span] = 1
        if types is not None:
            types[i, span] = torch.tensor(row["token_type_ids"])
        if token_labels is not None:
            token_labels[i, span] = torch.tensor(row["labels"])
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if types is not None:
        batch["token_type_ids"] = types
    if task_type == "classification":
        labels = [row["labels"] for row in rows]
        batch["labels"] = torch.tensor(labels, dtype=torch.float if isinstance(labels[0], list) else torch.long)
    elif task_type == "token_classification":
        batch["labels"] = token_labels
    elif task_type == "qa":
        shift = [width - len(row["input_ids"]) if left else 0 for row in rows]
        batch["start_positions"] = torch.tensor([row["start_positions"] + s for row, s in zip(rows, shift)])
        batch["end_positions"] = torch.tensor([row["end_positions"] + s for row, s in zip(rows, shift)])
    return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    device = next(model.parameters()).device
    config = getattr(model, "active_peft_config", None)
    if config is not None and not config.is_prompt_learning:
        # PEFT's task wrappers drop some inputs (peft 0.21's PeftModelForQuestionAnswering passes no
        # token_type_ids, so BERT would never see which tokens are the context); its tuner model runs the
        # wrapped model with the adapters active and every input as given.
        model = model.base_model
    return model(**{k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS})


def _real_positions(logits: torch.Tensor, width: int) -> torch.Tensor:
    # Prompt-learning methods prepend virtual positions; the last `width` are the real tokens.
    return logits[:, logits.shape[1] - width:]


def loss_from_outputs(outputs, batch: dict[str, torch.Tensor], spec: TaskSpec) -> tuple[torch.Tensor, int]:
    """(summed loss, count): per example for classification and qa, per labelled token for token
    classification. The training loop divides by the count of the whole optimizer step."""
    width = batch["input_ids"].shape[1]
    weights = None
    if spec.class_weights:
        weights = torch.tensor(spec.class_weights, dtype=torch.float)
    if spec.type == "classification":
        logits = outputs.logits.float()
        labels = batch["labels"].to(logits.device)
        if spec.multi_label:
            pos_weight = weights.to(logits.device) if weights is not None else None
            per_label = F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=pos_weight, reduction="none")
            return per_label.mean(dim=-1).sum(), labels.shape[0]
        return F.cross_entropy(logits, labels, weight=None if weights is None else weights.to(logits.device),
                               reduction="sum"), labels.shape[0]
    if spec.type == "token_classification":
        logits = _real_positions(outputs.logits, width).float()
        labels = batch["labels"].to(logits.device)
        selected = labels != IGNORE
        count = int(selected.sum())
        if count == 0:
            return logits.sum() * 0.0, 0
        return F.cross_entropy(logits[selected], labels[selected],
                               weight=None if weights is None else weights.to(logits.device), reduction="sum"), count
    if spec.type == "qa":
        start = _real_positions(outputs.start_logits.unsqueeze(-1), width).squeeze(-1).float()
        end = _real_positions(outputs.end_logits.unsqueeze(-1), width).squeeze(-1).float()
        sp = batch["start_positions"].to(start.device).clamp(0, width - 1)
        ep = batch["end_positions"].to(start.device).clamp(0, width - 1)
        loss = (F.cross_entropy(start, sp, reduction="sum") + F.cross_entropy(end, ep, reduction="sum")) / 2
        return loss, sp.shape[0]
    raise TaskError(f"task type {spec.type!r}: use one of {', '.join(TASK_TYPES)}")


@dataclass(frozen=True)
class TaskObjective:
    """What tunekit.train.train needs for a task: how rows become a batch, how many units a batch
    holds (examples or labelled tokens) and the summed loss over them."""
    spec: TaskSpec

    def collate(self, rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_task(rows, pad_id, self.spec.type)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        if self.spec.type == "token_classification":
            return int((batch["labels"] != IGNORE).sum())
        return int(batch["input_ids"].shape[0])

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return loss_from_outputs(forward(model, batch), batch, self.spec)


# ---------------------------------------------------------------- predictions


@torch.no_grad()
def predict(model: torch.nn.Module, rows: Sequence[dict[str, Any]], spec: TaskSpec, pad_id: int, batch_size: int,
            desc: str = "predict") -> tuple[list[dict[str, Any]], float]:
    """Per row: classification {"scores": probabilities}; token_classification {"pred_ids": per token};
    qa {"start_logits", "end_logits"}. Also the mean loss (per example or labelled token)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    out: list[dict[str, Any] | None] = [None] * len(rows)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        chosen = order[start:start + batch_size]
        batch = collate_task([rows[i] for i in chosen], pad_id, spec.type)
        outputs = forward(model, batch)
        loss, n = loss_from_outputs(outputs, batch, spec)
        total, count = total + float(loss), count + n
        width = batch["input_ids"].shape[1]
        for j, i in enumerate(chosen):
            k = len(rows[i]["input_ids"])
            if spec.type == "classification":
                logits = outputs.logits[j].float()
                probs = torch.sigmoid(logits) if spec.multi_label else torch.softmax(logits, -1)
                out[i] = {"scores": probs.tolist(), "logits": logits.tolist()}
            elif spec.type == "token_classification":
                logits = _real_positions(outputs.logits, width)[j, :k].float()
                out[i] = {"pred_ids": logits.argmax(-1).tolist(), "logits": logits.cpu()}
            else:
                start_logits = _real_positions(outputs.start_logits.unsqueeze(-1), width).squeeze(-1)[j, :k].float()
                end_logits = _real_positions(outputs.end_logits.unsqueeze(-1), width).squeeze(-1)[j, :k].float()
                out[i] = {"start_logits": start_logits.tolist(), "end_logits": end_logits.tolist(),
                          "logits": torch.stack([start_logits, end_logits]).cpu()}
    model.train(was_training)
    return out, total / max(count, 1)


def max_logit_difference(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> float:
    """Largest |a - b| over every logit of two `predict` outputs of the same rows."""
    worst = 0.0
    for x, y in zip(a, b):
        worst = max(worst, float((torch.as_tensor(x["logits"]) - torch.as_tensor(y["logits"])).abs().max()))
    return worst


def predicted_classes(outputs: Sequence[dict[str, Any]], spec: TaskSpec) -> list[Any]:
    """Hard predictions of `predict` outputs: class index, multi-hot list, or per-token tag ids / (start, end)."""
    if spec.type == "classification":
        if spec.multi_label:
            return [[int(p >= 0.5) for p in o["scores"]] for o in outputs]
        return [max(range(len(o["scores"])), key=o["scores"].__getitem__) for o in outputs]
    if spec.type == "token_classification":
        return [o["pred_ids"] for o in outputs]
    return [(max(range(len(o["start_logits"])), key=o["start_logits"].__getitem__),
             max(range(len(o["end_logits"])), key=o["end_logits"].__getitem__)) for o in outputs]


# ---------------------------------------------------------------- scoring


def _by_id(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(r["id"]): r for r in records if "id" in r}


def _record_for(row: dict[str, Any], index: int, records: Sequence[dict[str, Any]], by_id: dict[str, dict]) -> dict:
    key = str(row.get("example_id", row.get("id")))
    if key in by_id:
        return by_id[key]
    if index < len(records):
        return records[index]
    raise TaskError(f"tokenised row {key!r} has no ingested test record (ids differ and row {index} is past the "
                    f"{len(records)} records): re-run ingest and template together")


def _label_names(value: Any, spec: TaskSpec) -> Any:
    if spec.multi_label:
        return [spec.labels[i] for i, v in enumerate(value) if v]
    return spec.labels[value]


def score_classification(outputs, rows, records, spec: TaskSpec, label: str, out_dir: Path | None):
    from tunekit.metrics import classification_metrics, confusion_matrix, confusion_matrix_png, roc_auc

    y_true = [row["labels"] for row in rows]
    y_pred = predicted_classes(outputs, spec)
    scores = [o["scores"] for o in outputs]
    indices = list(range(len(spec.labels)))
    metrics = classification_metrics(y_true, y_pred, None, None if spec.multi_label else indices)
    try:
        if spec.multi_label:
            from sklearn.metrics import roc_auc_score

            metrics["roc_auc"] = float(roc_auc_score(y_true, scores, average="macro"))
        else:
            metrics["roc_auc"] = roc_auc(y_true, scores, indices)
    except ValueError as exc:
        log.info("%s: ROC AUC not reported: %s", label, exc)
    extra = {}
    if not spec.multi_label:
        matrix = confusion_matrix(y_true, y_pred, indices)
        extra["confusion_matrix"] = matrix.tolist()
        if out_dir is not None:
            confusion_matrix_png(out_dir / f"confusion_{label}.png", matrix, spec.labels, f"confusion matrix ({label})")
    by_id = _by_id(records)
    predictions = []
    for i, (row, o, p) in enumerate(zip(rows, outputs, y_pred)):
        record = _record_for(row, i, records, by_id)
        text = record.get("text") if "text" in record else [record.get("text_a"), record.get("text_b")]
        predictions.append({"id": row.get("id"), "model": label, "text": text,
                            "reference": _label_names(row["labels"], spec), "prediction": _label_names(p, spec),
                            "scores": dict(zip(spec.labels, [round(s, 6) for s in o["scores"]]))})
    return metrics, predictions, extra


def score_token_classification(outputs, rows, records, spec: TaskSpec, label: str):
    from tunekit.metrics import accuracy, entity_metrics
    from tunekit.tasks import word_predictions

    id2label = dict(enumerate(spec.labels))
    by_id = _by_id(records)
    true_tags, pred_tags, predictions, cut = [], [], [], 0
    for i, (row, o) in enumerate(zip(rows, outputs)):
        record = _record_for(row, i, records, by_id)
        reference = list(record["tags"])
        predicted = list(word_predictions(row["word_ids"], o["pred_ids"], id2label, row.get("n_words")))[:len(reference)]
        if len(predicted) < len(reference):  # words past template.max_length were never seen: predicted O
            cut += len(reference) - len(predicted)
            predicted += ["O"] * (len(reference) - len(predicted))
        true_tags.append(reference)
        pred_tags.append(predicted)
        predictions.append({"id": row.get("id"), "model": label, "tokens": record.get("tokens"),
                            "reference": reference, "prediction": predicted})
    metrics = {f"entity_{k}": v for k, v in entity_metrics(true_tags, pred_tags).items()}
    metrics["tag_accuracy"] = accuracy([t for s in true_tags for t in s], [t for s in pred_tags for t in s])
    metrics["truncated_words"] = float(cut)
    return metrics, predictions, {}


def score_qa(outputs, rows, records, spec: TaskSpec, label: str, n_best: int, max_answer_length: int, allow_null: bool):
    from tunekit.metrics import squad_exact_match, squad_f1
    from tunekit.tasks import qa_postprocess

    by_id = _by_id(records)
    windows: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        windows.setdefault(str(row["example_id"]), []).append(i)
    em, f1, has_answer, predictions = [], [], [], []
    for example_id, indices in windows.items():
        record = by_id.get(example_id)
        if record is None:
            raise TaskError(f"QA window of example {example_id!r} has no ingested test record with that id: "
                            "re-run ingest and template together")
        text, score = qa_postprocess(record, [rows[i] for i in indices], [outputs[i]["start_logits"] for i in indices],
                                     [outputs[i]["end_logits"] for i in indices], n_best, max_answer_length, allow_null)
        answers = [a for a in record["answers"]["text"] if a.strip()]
        if answers:
            em.append(squad_exact_match([text], [answers]))
            f1.append(squad_f1([text], [answers]))
        else:  # SQuAD 2.0: an unanswerable question scores 1 only for the empty answer
            em.append(float(not text.strip()))
            f1.append(float(not text.strip()))
        has_answer.append(bool(answers))
        predictions.append({"id": example_id, "model": label, "question": record.get("question"),
                            "reference": answers, "prediction": text, "score": float(score), "windows": len(indices)})
    n = max(len(em), 1)
    metrics = {"squad_exact_match": sum(em) / n, "squad_f1": sum(f1) / n}
    for name, keep in (("has_answer", True), ("no_answer", False)):
        picked = [i for i, h in enumerate(has_answer) if h == keep]
        if picked and len(picked) < len(has_answer):
            metrics[f"{name}_exact_match"] = sum(em[i] for i in picked) / len(picked)
            metrics[f"{name}_f1"] = sum(f1[i] for i in picked) / len(picked)
    return metrics, predictions, {}


def score_task(model: torch.nn.Module, spec: TaskSpec, rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
               pad_id: int, batch_size: int, label: str, task_params=None, out_dir: Path | None = None,
               allow_null: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(metrics, one prediction row per example, extras such as the confusion matrix) for one model."""
    outputs, loss = predict(model, rows, spec, pad_id, batch_size, desc=f"predict ({label})")
    if spec.type == "classification":
        metrics, predictions, extra = score_classification(outputs, rows, records, spec, label, out_dir)
    elif spec.type == "token_classification":
        metrics, predictions, extra = score_token_classification(outputs, rows, records, spec, label)
    else:
        n_best = getattr(task_params, "n_best", 20)
        max_len = getattr(task_params, "max_answer_length", 30)
        metrics, predictions, extra = score_qa(outputs, rows, records, spec, label, n_best, max_len, allow_null)
    metrics.update({"loss": loss, "examples": len(predictions)})
    return metrics, predictions, extra


# ---------------------------------------------------------------- multi-task


class MultiTaskModel(torch.nn.Module):
    """One shared backbone, one head per task (ModuleDict `heads`); a batch carries its task's name."""

    def __init__(self, backbone: torch.nn.Module, specs: dict[str, TaskSpec]):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.specs = dict(specs)
        hidden = backbone.config.hidden_size
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, spec.num_labels) for name, spec in specs.items()})

    def forward(self, task: str, input_ids=None, attention_mask=None, token_type_ids=None, **ignored):
        from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput, TokenClassifierOutput

        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        spec = self.specs[task]
        if spec.type == "classification":
            return SequenceClassifierOutput(logits=self.heads[task](pool(hidden, attention_mask, spec.pooling)))
        logits = self.heads[task](hidden)
        if spec.type == "token_classification":
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


def load_multitask_base(model_dir: Path, specs: dict[str, TaskSpec],
                        device: torch.device | str | None = None) -> MultiTaskModel:
    """The base checkpoint as the shared backbone with a new, untrained head per task (initialised from a
    fixed seed, so finetune, evaluate and merge build the same ones), on `device` (default: `compute_device()`)."""
    from transformers import AutoModel

    from tunekit.models import compute_device, resolve_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_INIT_SEED)
        backbone = AutoModel.from_pretrained(str(resolve_checkpoint(model_dir)), dtype=torch.float32, use_safetensors=True)
        return MultiTaskModel(backbone, specs).to(device or compute_device())


def load_multitask_model(model_dir: Path, device: torch.device | str | None = None) -> MultiTaskModel:
    """A saved multi-task checkpoint (finetune's full weights or a merged one): backbone, every head and
    the task specs from task_head.json, on `device` (default: `compute_device()`)."""
    from transformers import AutoModel

    from tunekit.models import compute_device

    path = Path(model_dir)
    config = json.loads((path / HEAD_CONFIG).read_text(encoding="utf-8"))
    if config.get("type") != "multi_task":
        raise TaskError(f"{path / HEAD_CONFIG} is not a multi-task head (type {config.get('type')!r})")
    specs = {name: TaskSpec.from_meta(meta) for name, meta in config["tasks"].items()}
    model = MultiTaskModel(AutoModel.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True), specs)
    model.heads.load_state_dict(load_file(path / HEAD_WEIGHTS))
    return model.to(device or compute_device())


class _OneTask(torch.nn.Module):
    """A view of a MultiTaskModel as a single-task model (for `predict` / `score_task`)."""

    def __init__(self, model: MultiTaskModel, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, **inputs):
        return self.model(self.task, **inputs)


def one_task(model: MultiTaskModel, task: str) -> torch.nn.Module:
    return _OneTask(model, task)


class MultiTaskObjective:
    """Rows carry "task" (their task's name); every micro-batch holds rows of one task. An epoch has as
    many batches as the tasks' rows fill (sum over tasks of ceil(rows / batch_size)); each batch's task is
    drawn with probability weight / sum(weights) (`task.tasks.<name>.weight`), and takes the next batch
    of that task's rows, reshuffled whenever they run out, so a task weighted 2 is trained on twice as
    often as a task weighted 1 whatever their sizes. Give it to TrainConfig.objective; tunekit.train's
    BatchPlan asks it for each epoch's batches (`epoch_batches`)."""

    def __init__(self, specs: dict[str, TaskSpec], weights: dict[str, float], row_tasks: Sequence[str]):
        unknown = sorted(set(row_tasks) - set(specs))
        if unknown:
            raise TaskError(f"rows of tasks {unknown} that task.tasks does not define ({sorted(specs)})")
        self.specs, self.weights, self.row_tasks = specs, weights, list(row_tasks)

    def collate(self, rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        """Rows of one task -> that task's batch (training batches always are: `epoch_batches`). Rows of
        several tasks (the validation loss takes rows in length order) -> {"parts": a batch per task},
        which `count` and `loss_sum` add up."""
        tasks = sorted({row["task"] for row in rows})
        if len(tasks) > 1:
            return {"parts": [self.collate([row for row in rows if row["task"] == task], pad_id) for task in tasks]}
        batch = collate_task(rows, pad_id, self.specs[tasks[0]].type)
        batch["task"] = tasks[0]
        return batch

    def count(self, batch: dict[str, Any]) -> int:
        if "parts" in batch:
            return sum(self.count(part) for part in batch["parts"])
        return TaskObjective(self.specs[batch["task"]]).count(batch)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        if "parts" in batch:
            losses = [self.loss_sum(model, part) for part in batch["parts"]]
            return sum(loss for loss, _ in losses), sum(n for _, n in losses)
        device = next(model.parameters()).device
        outputs = model(batch["task"], **{k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS})
        return loss_from_outputs(outputs, batch, self.specs[batch["task"]])

    def epoch_batches(self, lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        members = {t: [i for i, task in enumerate(self.row_tasks) if task == t] for t in self.specs}
        live = [t for t in self.specs if members[t]]
        queues: dict[str, list[list[int]]] = {t: [] for t in live}

        def refill(task: str) -> None:
            order = [members[task][j] for j in torch.randperm(len(members[task]), generator=gen).tolist()]
            queues[task] = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]

        n_batches = sum(-(-len(members[t]) // batch_size) for t in live)
        weights = torch.tensor([float(self.weights.get(t, 1.0)) for t in live])
        batches = []
        for _ in range(n_batches):
            task = live[int(torch.multinomial(weights, 1, generator=gen))]
            if not queues[task]:
                refill(task)
            batches.append(queues[task].pop(0))
        return batches


# ---------------------------------------------------------------- multi-task: methods and meta.json

# What a multi-task model can be trained with: full checkpoints (MultiTaskModel.save_pretrained) and
# PEFT adapters on the backbone with every head in modules_to_save (trained in full, saved with the adapter).
MULTITASK_METHODS = ("full", "freeze", "head", "lora", "dora", "ia3")


def multitask_meta(specs: dict[str, TaskSpec], weights: dict[str, float]) -> dict[str, Any]:
    """meta.json "task" of a multi-task checkpoint: every task's spec and its sampling weight."""
    return {"type": "multi_task", "tasks": {name: spec.to_meta() for name, spec in specs.items()},
            "weights": {name: float(weights[name]) for name in specs}}


def multitask_specs(meta: dict[str, Any]) -> dict[str, TaskSpec]:
    return {name: TaskSpec.from_meta(task) for name, task in meta["tasks"].items()}


def _multitask_peft(name: str):
    def prepare(model: torch.nn.Module, params) -> torch.nn.Module:
        from peft import IA3Config, LoraConfig, get_peft_model

        from tunekit.methods import MethodError

        keep = [f"heads.{task}" for task in model.specs]  # each head trains in full and is saved with the adapter
        if name == "ia3":
            config = IA3Config(target_modules=params.ia3.target_modules, feedforward_modules=params.ia3.feedforward_modules,
                               modules_to_save=keep)
        else:
            config = LoraConfig(r=params.lora.r, lora_alpha=params.lora.alpha, lora_dropout=params.lora.dropout,
                                target_modules=lora_targets(model, params.lora.target_modules), use_dora=name == "dora",
                                modules_to_save=keep)
        try:
            # No PEFT task type: the plain PeftModel passes the task name through to MultiTaskModel.forward.
            return get_peft_model(model, config)
        except ValueError as exc:
            raise MethodError(f"method {name} cannot be applied to the multi-task backbone: {exc}. Module names differ "
                              "between architectures (BERT: query, key, value, dense): set finetune.<method>.target_modules "
                              "for this model") from exc
    return prepare


def multitask_method(method, specs: dict[str, TaskSpec]):
    """The registry entry re-targeted at a MultiTaskModel: its base loader builds the shared backbone with
    a new head per task, full checkpoints load through `load_multitask_model`, and lora / dora / ia3 adapt
    the backbone with every head in modules_to_save. Other methods are refused, saying what to use."""
    from tunekit.methods import FULL_WEIGHTS, MethodError

    if method.name not in MULTITASK_METHODS:
        why = {"qlora": "the shared backbone is not loaded in 4-bit", "adapter": "bottleneck adapters are built for "
               "Llama-style decoder blocks and save no head"}.get(method.name, "virtual tokens or other PEFT types need "
                                                                              "a PEFT task model around the forward")
        raise MethodError(f"method {method.name} does not apply to multi-task training (task.type multi_task): {why}; "
                          f"use one of {', '.join(MULTITASK_METHODS)} (lora for an adapter, head for linear probing)")

    def load_base(path: Path, device: torch.device | str | None = None) -> torch.nn.Module:
        return load_multitask_base(path, specs, device=device)

    checkpoint = method.checkpoint
    if checkpoint is FULL_WEIGHTS:
        checkpoint = dataclasses.replace(checkpoint, load=lambda tuned_dir, base: load_multitask_model(tuned_dir))
        return dataclasses.replace(method, load_base=load_base, checkpoint=checkpoint)
    return dataclasses.replace(method, load_base=load_base, prepare=_multitask_peft(method.name))


def task_method_for(method, task_meta: dict[str, Any]):
    """The registry entry re-targeted at the task checkpoint meta.json's "task" describes: one head
    (`task_method`) or several on a shared backbone (`multitask_method`)."""
    if task_meta.get("type") == "multi_task":
        return multitask_method(method, multitask_specs(task_meta))
    return task_method(method, TaskSpec.from_meta(task_meta))
