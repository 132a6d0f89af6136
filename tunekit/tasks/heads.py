"""What every single-head task kind (classification, token classification, QA, regression) shares:
the spec of a head checkpoint, the generic steps each kind fills in (`HeadKind`), and the stage-facing
entry they make together (`head_task(kind)`).

The steps, for a kind's `HeadKind`:
- template: the train split's label set (`build_labels`), every split's labels checked against it
  (`check_labels`), rows tokenised and aligned in batches (`encode`), per-split extras (`split_stats`)
  and a token/label table per example (`preview`); rows are unpadded, so the tokenizer's padding side
  does not matter. labels.json records the label set.
- finetune: the spec from labels.json + task.* + the base's architecture (`task_spec`), the model built
  by `load_task_base` (transformers' AutoModelFor<...> where the architecture has the head and it does
  what was asked, else tunekit.modeling.PooledClassifier), the methods registry's entry re-targeted
  (`task_method`: the PEFT task type puts the head in modules_to_save), and the objective handed to
  tunekit.train.train (`TaskObjective`: the kind's `targets` in the batch, `loss` summed per example
  or labelled token; the loop divides by the units of the whole optimizer step).
- merge: the merged model must predict exactly what the adapter model predicts (`hard`) with logits
  within merge.atol.
- evaluate: base (the untrained head), tuned and merged scored on the test split by the kind's `score`.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tunekit.constants import IGNORE_INDEX, LABELS_FILE, SPLITS
from tunekit.data import map_rows, num_proc, read_split, remove_work_dir, save_dataset, write_rows
from tunekit.io import read_json
from tunekit.modeling import (HEAD_CONFIG, HEAD_WEIGHTS, HeadShape, MultiTaskModel, TaskError, forward,
                              head_config, is_encoder, load_auto_head_model, load_head_base, load_multitask_backbone,
                              load_pooled_classifier, pad_inputs, resolve_pooling)

log = logging.getLogger("tunekit")

FILE_LINE = "_line"  # multi-task: a row's line in its split file, kept while its task's rows are checked apart
_BATCH = 256  # examples per tokenizer call


class TaskDataError(Exception):
    """The ingested data cannot be tokenised for the task; the message names file, line, field and fix."""


# ---------------------------------------------------------------- the spec of a head checkpoint


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task checkpoint needs to be rebuilt; stored in meta.json under "task"."""
    type: str
    labels: tuple[str, ...] = ()  # class names, tags, or the names of regression targets
    multi_label: bool = False
    pooling: str = "cls"  # resolved (never "auto"); used by sequence-level heads only
    class_weights: tuple[float, ...] | None = None
    encoder: bool = True
    loss: str | None = None  # regression: mse | huber
    # regression: the train split's mean and standard deviation per target; the head predicts standardised values
    target_mean: tuple[float, ...] | None = None
    target_std: tuple[float, ...] | None = None

    @property
    def kind(self) -> HeadKind:
        return head_kind(self.type)

    @property
    def num_labels(self) -> int:
        return self.kind.num_labels(self)

    @property
    def shape(self) -> HeadShape:
        return HeadShape(self.kind.shape, self.num_labels, self.pooling)

    def to_meta(self) -> dict[str, Any]:
        meta = {**dataclasses.asdict(self), "labels": list(self.labels),
                "class_weights": list(self.class_weights) if self.class_weights else None}
        for key in ("loss", "target_mean", "target_std"):
            if meta[key] is None:
                del meta[key]  # the kinds without them keep their meta.json as it was
            elif key != "loss":
                meta[key] = list(meta[key])
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TaskSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in meta.items() if k in fields}
        data["labels"] = tuple(data.get("labels") or ())
        for key in ("class_weights", "target_mean", "target_std"):
            data[key] = tuple(data[key]) if data.get(key) else None
        return cls(**data)


Rows = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class HeadKind:
    """One single-head task kind: the steps the shared code (this module) asks of it."""
    name: str
    shape: str  # tunekit.modeling.HeadShape.kind: sequence | token | span
    auto_class: str  # transformers' class with this head
    pipeline_tag: str  # the hub's pipeline tag, for model cards
    num_labels: Callable[[TaskSpec], int]
    head_config: Callable[[TaskSpec], dict[str, Any]]  # what the head's config says (num_labels, id2label, problem_type)
    custom_head: Callable[[TaskSpec], bool]  # PooledClassifier instead of transformers' class
    # template: (labels, multi_label) of the train split; every split checked; rows encoded
    build_labels: Callable[[Rows, Any, str], tuple[list[str], bool]]
    check_labels: Callable[[Rows, list[str], bool, str, str], None]
    row_labels: Callable[[dict], list[str]]  # label names of one ingested row (labels.json counts)
    encode: Callable[[Rows, Any, dict[str, int], bool, Any, int], tuple[list[dict], dict[str, int]]]
    preview: Callable[[dict, list[str], list[str]], tuple[list[tuple[str, str]], str]]
    # training: batch targets, units, summed loss
    targets: Callable[[Rows, int, bool], dict[str, torch.Tensor]]
    loss: Callable[[Any, dict[str, torch.Tensor], TaskSpec], tuple[torch.Tensor, int]]
    # prediction and scoring
    output: Callable[[Any, int, int, int, TaskSpec], dict[str, Any]]  # (outputs, j, row length, width, spec)
    hard: Callable[[Sequence[dict], TaskSpec], list[Any]]
    score: Callable[..., tuple[dict, list[dict], dict]]  # (outputs, rows, records, spec, label, settings, out_dir)
    main_metric: str  # the evaluate metric (higher is better) the default export gate holds the tuned head to
    count: Callable[[dict[str, torch.Tensor]], int] = lambda batch: int(batch["input_ids"].shape[0])
    split_stats: Callable[[Rows, list[dict], dict], None] = lambda rows, out, stats: None
    finish_metrics: Callable[[dict], None] = lambda metrics: None
    # evaluate's per-kind settings from task.* and the ingested records (qa: n_best, null answers)
    score_settings: Callable[[Any, Rows | None], dict[str, Any]] = lambda task_params, records: {}
    labelled: bool = True  # has a label set (>= 2 labels); qa has none
    class_weights: bool = True  # task.class_weights applies
    # more TaskSpec fields from task.* and labels.json
    spec_extra: Callable[[Any, dict[str, Any]], dict[str, Any]] = lambda task_params, labels_info: {}
    # more labels.json facts from the train split's rows (regression: the targets' mean and spread)
    label_info: Callable[[Rows], dict[str, Any]] = lambda train_rows: {}
    # merge check: whether two models' hard predictions are the same (continuous values: within a tolerance)
    agree: Callable[[list[Any], list[Any]], bool] = lambda a, b: a == b
    # evaluate: whether one model's predictions (score's rows: "reference", "prediction") collapsed onto one label
    # (tunekit.collapse; task.collapse the thresholds) -> {"collapsed": 0 | 1, "reason": str | None, ...}; None: no check
    collapse: Callable[[Sequence[dict], TaskSpec, Any], dict[str, Any]] | None = None
    # finetune: the per-unit loss of always predicting the train split's label frequencies (tokenised rows), the
    # figure the validation loss must fall below (tunekit.collapse.prior_check); None: no such figure (qa)
    prior_loss: Callable[[Rows, TaskSpec], float | None] = lambda train_rows, spec: None


_KINDS: dict[str, HeadKind] = {}


def register(kind: HeadKind) -> HeadKind:
    """Called once by each kind's module; tunekit.tasks imports them all, so lookups find every kind."""
    _KINDS[kind.name] = kind
    return kind


def head_kind(name: str) -> HeadKind:
    if name not in _KINDS:
        raise TaskError(f"task type {name!r}: use one of {', '.join(_KINDS)}")
    return _KINDS[name]


# ---------------------------------------------------------------- labels


def sort_labels(labels: set[str]) -> list[str]:
    """Sorted; integer class ids ("0", "2", "10") in numeric order."""
    if labels and all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def load_labels(tokenized_dir: Path) -> dict[str, Any]:
    """labels.json of a tokenised task data directory: {"task", "labels", "multi_label", ...}."""
    path = Path(tokenized_dir) / LABELS_FILE
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist: {tokenized_dir} was not written by the template stage for a "
                            "task (task.type sft writes no label file); set task.type and run `dvc repro template`")
    return read_json(path)


def label_counts(rows: Sequence[dict], n: int, multi_label: bool) -> list[float]:
    counts = [0.0] * n
    for row in rows:
        labels = row["labels"]
        if multi_label:
            for i, v in enumerate(labels):
                counts[i] += float(v)
        elif isinstance(labels, list):  # token classification: every labelled token
            for v in labels:
                if v != IGNORE_INDEX:
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
        counts = label_counts(train_rows, n, multi_label)
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
    kind = head_kind(task_params.type)
    if labels_info.get("task") != task_params.type:
        raise TaskError(f"labels.json says task {labels_info.get('task')!r} but params.yaml task.type is "
                        f"{task_params.type!r}: re-run the template stage (dvc repro template)")
    encoder = is_encoder(model_dir)
    labels = tuple(labels_info.get("labels") or ())
    multi_label = bool(labels_info.get("multi_label", False))
    if kind.labelled and len(labels) < 2 and not multi_label:
        raise TaskError(f"task {task_params.type}: {len(labels)} label(s) {list(labels)} in labels.json; a classifier "
                        "needs at least 2 (check task.labels or the train split)")
    weights = None
    if kind.class_weights:
        weights = resolve_class_weights(task_params.class_weights, labels, train_rows, multi_label)
    elif task_params.class_weights is not None:
        raise TaskError(f"task.class_weights applies to classification and token_classification, not {kind.name}; "
                        "set it to null")
    return TaskSpec(task_params.type, labels, multi_label, resolve_pooling(task_params.pooling, encoder), weights, encoder,
                    **kind.spec_extra(task_params, labels_info))


# ---------------------------------------------------------------- models


def load_task_base(model_dir: Path, spec: TaskSpec, quantize: bool = False,
                   device: torch.device | str | None = None) -> torch.nn.Module:
    """The base checkpoint with a new, untrained head for `spec` (initialised from a fixed seed, so every
    stage builds the same one), on `device` (default: `compute_device()`). `quantize`: the backbone in
    4-bit NF4 (qlora), the head in fp32."""
    kind = spec.kind
    auto_class = None if kind.custom_head(spec) else kind.auto_class
    return load_head_base(model_dir, auto_class, spec.num_labels, spec.pooling, kind.head_config(spec), quantize, device)


def load_task_model(model_dir: Path, spec: TaskSpec | None = None,
                    device: torch.device | str | None = None) -> torch.nn.Module:
    """A saved task model with its trained head(s): a custom head (task_head.json beside the backbone: a
    pooled head, or a multi-task model), or a transformers task class (named in config.json's
    architectures), on `device` (default: `compute_device()`). The one loader for finetune's full
    checkpoints, merged checkpoints and anything a user wants to serve."""
    from tunekit.models import compute_device, resolve_checkpoint

    path = Path(resolve_checkpoint(model_dir))
    head = head_config(path)
    if head is not None and head.get("type") == "multi_task":
        model = load_multitask_model(path, device="cpu")
    elif head is not None:
        model = load_pooled_classifier(path)
    else:
        model = load_auto_head_model(path, spec.kind.auto_class if spec is not None else None)
    return model.to(device or compute_device())


def load_multitask_model(model_dir: Path, device: torch.device | str | None = None) -> MultiTaskModel:
    """A saved multi-task checkpoint (finetune's full weights or a merged one): backbone, every head and
    the task specs from task_head.json, on `device` (default: `compute_device()`)."""
    path = Path(model_dir)
    config = read_json(path / HEAD_CONFIG)
    if config.get("type") != "multi_task":
        raise TaskError(f"{path / HEAD_CONFIG} is not a multi-task head (type {config.get('type')!r})")
    specs = {name: TaskSpec.from_meta(meta) for name, meta in config["tasks"].items()}
    return load_multitask_backbone(path, specs, heads=path / HEAD_WEIGHTS, device=device)


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
    """Pad task rows (right by default, `left=True` for left padding) into tensors, with the kind's targets."""
    batch = pad_inputs(rows, pad_id, left)
    batch.update(head_kind(task_type).targets(rows, batch["input_ids"].shape[1], left))
    return batch


def loss_from_outputs(outputs, batch: dict[str, torch.Tensor], spec: TaskSpec) -> tuple[torch.Tensor, int]:
    """(summed loss, count): per example for sequence-level kinds and qa, per labelled token for token
    classification. The training loop divides by the count of the whole optimizer step."""
    return spec.kind.loss(outputs, batch, spec)


@dataclass(frozen=True)
class TaskObjective:
    """What tunekit.train.train needs for a task: how rows become a batch, how many units a batch
    holds (examples or labelled tokens) and the summed loss over them."""
    spec: TaskSpec

    def collate(self, rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_task(rows, pad_id, self.spec.type)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return self.spec.kind.count(batch)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return loss_from_outputs(forward(model, batch), batch, self.spec)


# ---------------------------------------------------------------- predictions and scores


@torch.no_grad()
def predict(model: torch.nn.Module, rows: Sequence[dict[str, Any]], spec: TaskSpec, pad_id: int, batch_size: int,
            desc: str = "predict") -> tuple[list[dict[str, Any]], float]:
    """One output per row as the kind makes it (always with its "logits"), and the mean loss (per example
    or labelled token)."""
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
            out[i] = spec.kind.output(outputs, j, len(rows[i]["input_ids"]), width, spec)
    model.train(was_training)
    return out, total / max(count, 1)


def max_logit_difference(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> float:
    """Largest |a - b| over every logit of two `predict` outputs of the same rows."""
    worst = 0.0
    for x, y in zip(a, b):
        worst = max(worst, float((torch.as_tensor(x["logits"]) - torch.as_tensor(y["logits"])).abs().max()))
    return worst


def predicted_classes(outputs: Sequence[dict[str, Any]], spec: TaskSpec) -> list[Any]:
    """Hard predictions of `predict` outputs (class index, multi-hot list, tag ids, (start, end), values)."""
    return spec.kind.hard(outputs, spec)


def score_task(model: torch.nn.Module, spec: TaskSpec, rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
               pad_id: int, batch_size: int, label: str, task_params=None, out_dir: Path | None = None,
               allow_null: bool | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(metrics, one prediction row per example, extras such as the confusion matrix) for one model.
    `task_params`: the kind's settings (task.*); `allow_null` (qa): whether the empty answer may win."""
    outputs, loss = predict(model, rows, spec, pad_id, batch_size, desc=f"predict ({label})")
    settings = spec.kind.score_settings(task_params, None)
    if allow_null is not None:
        settings["allow_null"] = allow_null
    metrics, predictions, extra = spec.kind.score(outputs, rows, records, spec, label, settings, out_dir)
    metrics.update({"loss": loss, "examples": len(predictions)})
    if spec.kind.collapse is not None:
        check_collapse(metrics, predictions, spec, label, getattr(task_params, "collapse", None))
    return metrics, predictions, extra


def check_collapse(metrics: dict[str, Any], predictions: Sequence[dict[str, Any]], spec: TaskSpec, label: str,
                   params: Any = None) -> None:
    """Add metrics["collapsed"] (0 | 1) and metrics["collapse"] (the predicted and reference label shares,
    the reason) from the kind's check; a collapsed trained model is a warning in the log, the untrained
    head (`base`, which often predicts one label) an info line."""
    from tunekit.params import CollapseParams

    check = dict(spec.kind.collapse(predictions, spec, params or CollapseParams()))
    metrics["collapsed"] = int(check.pop("collapsed"))
    metrics["collapse"] = check
    if metrics["collapsed"]:
        if label == "base":
            log.info("%s (the untrained %s head) %s: collapsed, as an untrained head often is", label, spec.type,
                     check["reason"])
        else:
            log.warning("COLLAPSED: the %s %s model %s. Its scores are those of a constant; see the collapse "
                        "section of the evaluate report and docs/tasks.md (\"Collapse\")", label, spec.type,
                        check["reason"])


def records_by_id(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(r["id"]): r for r in records if "id" in r}


def record_for(row: dict[str, Any], index: int, records: Sequence[dict[str, Any]], by_id: dict[str, dict]) -> dict:
    key = str(row.get("example_id", row.get("id")))
    if key in by_id:
        return by_id[key]
    if index < len(records):
        return records[index]
    raise TaskError(f"tokenised row {key!r} has no ingested test record (ids differ and row {index} is past the "
                    f"{len(records)} records): re-run ingest and template together")


def select_test_rows(max_examples: int | None, rows: list[dict], records: list[dict]) -> tuple[list[dict], list[dict]]:
    """The test rows and records scored: all, or the first `max_examples` records (and every row of them:
    QA windows name their example)."""
    if max_examples:
        records = records[:max_examples]
        if rows and "example_id" in rows[0]:
            kept = {str(r.get("id")) for r in records}
            rows = [r for r in rows if str(r.get("example_id", r.get("id"))) in kept]
        else:
            rows = rows[:max_examples]
    return rows, records


# ---------------------------------------------------------------- the template stage for heads


def _tokens_of(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def preview_html(task: str, rows: list[dict], tokenizer: Any, labels: list[str], n: int = 8) -> str:
    """A small HTML table per example: each token with its label (or its answer role for QA)."""
    kind = head_kind(task)
    sections = []
    for row in rows[:n]:
        cells, caption = kind.preview(row, _tokens_of(tokenizer, row["input_ids"]), labels)
        body = "".join(f"<tr><td>{html.escape(repr(token))}</td><td>{html.escape(label)}</td></tr>"
                       for token, label in cells)
        sections.append(f"<h2>{html.escape(row['id'])}</h2><p>{html.escape(caption)}</p>"
                        f"<table><tr><th>token</th><th>label</th></tr>{body}</table>")
    return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Task data preview</title><style>'
            "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin-bottom:1.5em}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-family:monospace}</style></head><body>"
            f"<h1>{html.escape(task)} preview</h1><p>First {min(n, len(rows))} training rows; -100 labels are blank.</p>"
            f'{"".join(sections)}</body></html>\n')


def _check_rows(rows: Rows, task: str, file: Path) -> None:
    for line, found in enumerate(rows.column("task") if "task" in rows.columns else ["sft"] * len(rows), start=1):
        found = found or "sft"
        if found != task:
            raise TaskDataError(
                f"{file} row {line}: the row is {found} data but task.type is {task}; the ingested data is stale or from "
                f"other inputs: run the ingest stage again with task.type: {task} (dvc repro ingest)")


def tokenize_task(task: str, task_params: Any, max_length: int, tokenizer: Any, data_dir: Path, out_dir: Path,
                  preview_dir: Path, preview_examples: int = 8, processes: int = 0) -> dict:
    """Tokenise the splits of data_dir (`datasets` directories) for `task` into out_dir (a dataset per split
    + labels.json) and write the preview into preview_dir. Both directories must exist (the caller's atomic
    temporaries). Returns the metrics: per split examples, tokens, truncated, and per task extras."""
    from tunekit.io import write_json

    if task not in _KINDS:
        raise TaskDataError(f"task.type {task!r} is not a head task; use one of {', '.join(_KINDS)}")
    data = {split: read_split(data_dir, split) for split in SPLITS}
    for split in SPLITS:
        _check_rows(data[split], task, Path(data_dir) / split)
    work = Path(out_dir) / ".work"
    try:
        out, info, metrics = tokenize_splits(task, task_params, max_length, tokenizer, data, Path(data_dir), work,
                                             processes)
        for split in SPLITS:
            save_dataset(out[split].dataset, Path(out_dir) / split)
    finally:
        remove_work_dir(work)
    write_json(Path(out_dir) / LABELS_FILE, info)
    (Path(preview_dir) / "mask_preview.html").write_text(
        preview_html(task, out["train"][:preview_examples], tokenizer, info["labels"], preview_examples), encoding="utf-8")
    return metrics


def tokenize_splits(task: str, task_params: Any, max_length: int, tokenizer: Any, data: dict[str, Rows],
                    data_dir: Path, work: Path, processes: int = 0
                    ) -> tuple[dict[str, Rows], dict[str, Any], dict[str, Any]]:
    """(tokenised rows per split, the labels.json content, metrics) of one task's ingested rows. The rows
    are tokenised with Dataset.map over the memory-mapped splits (`processes`: template.num_proc) and
    written as they come into datasets under `work` (returned as memory-mapped `Rows`): memory does not
    grow with the data, and the output does not depend on the number of processes."""
    kind = head_kind(task)
    if not data["train"]:
        raise TaskDataError(f"{data_dir / 'train'} is empty: nothing to train on")
    labels, multi = kind.build_labels(data["train"], task_params, str(data_dir / "train"))
    origin = "task.labels in params.yaml" if task_params.labels is not None else "read from the train split"
    label2id = {label: i for i, label in enumerate(labels)}
    counts: Counter[str] = Counter()
    metrics: dict[str, Any] = {}
    out: dict[str, Rows] = {}
    for split in SPLITS:
        rows = data[split]
        kind.check_labels(rows, labels, multi, str(data_dir / split), origin)
        if split == "train":
            for row in rows:
                counts.update(kind.row_labels(row))
        stats: dict[str, Any] = {"examples": len(rows), "truncated": 0}
        encoded = _encoded_rows(kind, rows, stats, f"template {task} ({split})", Path(work) / f"{task}-{split}",
                                processes, tokenizer, label2id, multi, task_params, max_length)
        write_rows(Path(work) / task / split, encoded, Path(work))
        out_rows = read_split(Path(work) / task, split)
        stats["tokens"] = sum(out_rows.lengths())
        kind.split_stats(rows, out_rows, stats)
        out[split] = out_rows
        metrics[split] = stats
    info = {"task": task, "labels": labels, "multi_label": multi,
            "counts": {label: counts.get(label, 0) for label in labels}, **kind.label_info(data["train"])}
    metrics["task"] = task
    metrics["labels"] = len(labels)
    metrics["truncated"] = sum(metrics[s]["truncated"] for s in SPLITS)
    metrics["examples"] = sum(metrics[s]["examples"] for s in SPLITS)
    kind.finish_metrics(metrics)
    return out, info, metrics


def _map_encode(kind: HeadKind, encode_args: tuple) -> Callable[[list[dict]], dict[str, list]]:
    """The Dataset.map function of a head kind: `kind.encode` on a batch of rows; each output row as JSON
    text (its columns differ by kind and may hold nulls, e.g. QA offsets), its length, and the batch's
    stats on the batch's first output row."""
    def encode(rows: list[dict]) -> dict[str, list]:
        encoded, batch_stats = kind.encode(rows, *encode_args)
        if rows and not encoded:
            raise TaskDataError(f"{kind.name}: a batch of {len(rows)} rows was encoded into no rows")
        return {"row": [json.dumps(row, ensure_ascii=False) for row in encoded],
                "length": [len(row["input_ids"]) for row in encoded],
                "stats": [json.dumps(batch_stats)] + [None] * (len(encoded) - 1)}
    return encode


def _encoded_rows(kind: HeadKind, rows: Rows, stats: dict[str, Any], desc: str, work: Path, processes: int,
                  *encode_args) -> Iterator[dict]:
    """The kind's encoding of `rows` through Dataset.map (_BATCH rows a call, `processes` processes, the cache
    file in `work`), each row with its `length`, in input order; the batches' stats added into `stats`."""
    if not len(rows):
        return
    from datasets import Features, Value

    features = Features({"row": Value("string"), "length": Value("int32"), "stats": Value("string")})
    mapped = map_rows(rows.dataset, _map_encode(kind, encode_args), work, work.name,
                      processes=num_proc(processes, len(rows)), batch_size=_BATCH, desc=desc, features=features)
    for text in mapped.data.column("stats").to_pylist():
        for key, value in json.loads(text or "{}").items():
            stats[key] = stats.get(key, 0) + value
    for batch in mapped.iter(batch_size=1000):
        for text, length in zip(batch["row"], batch["length"]):
            yield {**json.loads(text), "length": length}


def check_known_labels(rows: Sequence[dict], labels: list[str], file: str, origin: str,
                       row_labels: Callable[[dict], list[str]], where: Callable[[int], str]) -> None:
    """Every label of `rows` must be in the label set; the error names the file, line and label."""
    known = set(labels)
    for line, row in enumerate(rows, start=1):
        line = row.get(FILE_LINE, line)
        for position, label in enumerate(row_labels(row)):
            if label not in known:
                raise TaskDataError(
                    f"{file}:{line} (from {row.get('source')}): {where(position)} {_quoted(label)} is not in the label set "
                    f"{labels} ({origin}); fix the label in the data, add it to task.labels in params.yaml, or make "
                    "sure the train split contains it")


def _quoted(label: str) -> str:
    return json.dumps(label)


def trim_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrink a character span so it neither starts nor ends on whitespace (byte-level BPE pieces carry
    their leading space)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def encoding_fields(tokenizer: Any) -> tuple[str, ...]:
    return ("input_ids", "token_type_ids") if "token_type_ids" in tokenizer.model_input_names else ("input_ids",)


def encode_texts(rows: Sequence[dict], tokenizer: Any, max_length: int) -> tuple[list[dict], int]:
    """{"id", "input_ids", "token_type_ids"?} of each row's "text" (or "text_a" + "text_b" pair), and the
    number of truncated examples: the sequence-level kinds' encoding."""
    pairs = bool(rows) and "text_a" in rows[0]
    fields = encoding_fields(tokenizer)
    for row in rows:
        if ("text_a" in row) != pairs:
            raise TaskDataError(f"{row.get('source')}: mixes single texts and text pairs in one split; keep one kind")
    firsts = [row["text_a"] if pairs else row["text"] for row in rows]
    seconds = [row["text_b"] for row in rows] if pairs else None
    full = tokenizer(firsts, seconds, truncation=False, verbose=False)
    long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    truncated = 0
    if long:
        cut = tokenizer([firsts[i] for i in long], [seconds[i] for i in long] if pairs else None,
                        truncation="longest_first" if pairs else True, max_length=max_length)
        for key in fields:
            for position, i in enumerate(long):
                full[key][i] = cut[key][position]
        truncated = len(long)
    return [{"id": row["id"], **{key: list(full[key][i]) for key in fields}} for i, row in enumerate(rows)], truncated


def text_of(record: dict[str, Any]) -> Any:
    """A sequence-level record's input as shown in predictions: the text, or [text_a, text_b]."""
    return record.get("text") if "text" in record else [record.get("text_a"), record.get("text_b")]
