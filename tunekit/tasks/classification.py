"""Sequence classification (`task.type: classification`): a text or a text pair -> one class, or a set
of classes (multi-label, when the train split's labels are lists).

- ingest: the `classification` format, `{"text" | "text_a" + "text_b", "label"}` (tunekit.ingest).
- template: `{"id", "input_ids", "token_type_ids"?, "labels"}`; labels is the class index, or a
  multi-hot list for multi-label data. `token_type_ids` are kept whenever the tokenizer makes them
  (BERT-style tokenizers always do; SmolLM2's does not).
- head: transformers' sequence-classification class where it pools the first token of an encoder
  (through its pooler), else tunekit.modeling.PooledClassifier (mean pooling; last-token pooling found
  from the attention mask; cls pooling on a decoder).
- loss: cross-entropy (optional class weights) or, multi-label, BCE (optional pos_weight) summed per example.
- scores: accuracy, macro and micro F1, ROC AUC, the confusion matrix (single-label).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunekit.collapse import majority_check, prior_binary_cross_entropy, prior_cross_entropy
from tunekit.per_class import label_report
from tunekit.tasks.heads import (FILE_LINE, HeadKind, TaskDataError, TaskSpec, check_known_labels, encode_texts,
                                 label_counts, record_for, records_by_id, register, sort_labels, text_of)

log = logging.getLogger("tunekit")


def _row_labels(row: dict) -> list[str]:
    label = row["label"]
    return list(label) if isinstance(label, list) else [label]


def build_labels(train_rows, task_params, train_file: str = "train.jsonl") -> tuple[list[str], bool]:
    """(labels, multi_label): task.labels checked against the train split, or its sorted labels."""
    multi = any(isinstance(row["label"], list) for row in train_rows)
    seen: set[str] = set()
    for line, row in enumerate(train_rows, start=1):
        line = row.get(FILE_LINE, line)
        if multi and not isinstance(row["label"], list):
            raise TaskDataError(
                f"{train_file}:{line} (from {row.get('source')}): label is {json.dumps(row['label'])} (one string) but "
                "other train rows are multi-label (a list); write every label as a list, e.g. "
                f"[{json.dumps(row['label'])}], or keep single-label data apart")
        seen.update(_row_labels(row))
    if task_params.labels is not None:
        return list(task_params.labels), multi
    if not seen:
        raise TaskDataError(f"{train_file} has no labels (every multi-label list is empty); label the data or fix "
                            "the label set with task.labels in params.yaml")
    return sort_labels(seen), multi


def check_labels(rows, labels: list[str], multi: bool, file: str, origin: str) -> None:
    for line, row in enumerate(rows, start=1):
        if isinstance(row["label"], list) != multi:
            kind = "a list (multi-label)" if isinstance(row["label"], list) else "one string (single-label)"
            raise TaskDataError(f"{file}:{row.get(FILE_LINE, line)} (from {row.get('source')}): label is {kind} but the "
                                f"train split is {'multi' if multi else 'single'}-label; use one kind of label in every split")
        check_known_labels([{FILE_LINE: line, **row}], labels, file, origin, _row_labels, lambda position: "label")


def encode(rows, tokenizer: Any, label2id: dict[str, int], multi: bool, task_params, max_length: int):
    out, truncated = encode_texts(rows, tokenizer, max_length)
    for encoded, row in zip(out, rows):
        if multi:
            hot = [0] * len(label2id)
            for label in row["label"]:
                hot[label2id[label]] = 1
            encoded["labels"] = hot
        else:
            encoded["labels"] = label2id[row["label"]]
    return out, {"truncated": truncated}


def encode_classification(rows, tokenizer: Any, label2id: dict[str, int], multi: bool,
                          max_length: int) -> tuple[list[dict], int]:
    """Rows for sequence classification and the number of truncated examples."""
    out, stats = encode(rows, tokenizer, label2id, multi, None, max_length)
    return out, stats["truncated"]


def preview(row: dict, tokens: list[str], labels: list[str]):
    gold = row["labels"]
    shown = ", ".join(labels[i] for i, v in enumerate(gold) if v) if isinstance(gold, list) else labels[gold]
    return [(token, "") for token in tokens], f"label: {shown}"


def head_config(spec: TaskSpec) -> dict[str, Any]:
    return {"num_labels": len(spec.labels), "id2label": dict(enumerate(spec.labels)),
            "label2id": {label: i for i, label in enumerate(spec.labels)},
            "problem_type": "multi_label_classification" if spec.multi_label else "single_label_classification"}


def custom_head(spec: TaskSpec) -> bool:
    """transformers' sequence-classification heads pool the first token (BERT-style encoders, through
    their pooler) or the last token found by pad id (decoders); everything else is our PooledClassifier."""
    return not (spec.encoder and spec.pooling == "cls")


def targets(rows, width: int, left: bool) -> dict[str, torch.Tensor]:
    labels = [row["labels"] for row in rows]
    return {"labels": torch.tensor(labels, dtype=torch.float if isinstance(labels[0], list) else torch.long)}


def loss(outputs, batch: dict[str, torch.Tensor], spec: TaskSpec) -> tuple[torch.Tensor, int]:
    weights = torch.tensor(spec.class_weights, dtype=torch.float) if spec.class_weights else None
    logits = outputs.logits.float()
    labels = batch["labels"].to(logits.device)
    if spec.multi_label:
        pos_weight = weights.to(logits.device) if weights is not None else None
        per_label = F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=pos_weight, reduction="none")
        return per_label.mean(dim=-1).sum(), labels.shape[0]
    return F.cross_entropy(logits, labels, weight=None if weights is None else weights.to(logits.device),
                           reduction="sum"), labels.shape[0]


def output(outputs, j: int, k: int, width: int, spec: TaskSpec) -> dict[str, Any]:
    logits = outputs.logits[j].float()
    probs = torch.sigmoid(logits) if spec.multi_label else torch.softmax(logits, -1)
    return {"scores": probs.tolist(), "logits": logits.tolist()}


def hard(outputs, spec: TaskSpec) -> list[Any]:
    if spec.multi_label:
        return [[int(p >= 0.5) for p in o["scores"]] for o in outputs]
    return [max(range(len(o["scores"])), key=o["scores"].__getitem__) for o in outputs]


def _label_names(value: Any, spec: TaskSpec) -> Any:
    if spec.multi_label:
        return [spec.labels[i] for i, v in enumerate(value) if v]
    return spec.labels[value]


def score(outputs, rows, records, spec: TaskSpec, label: str, settings: dict, out_dir: Path | None):
    from tunekit.metrics import classification_metrics, confusion_matrix, confusion_matrix_png, roc_auc

    y_true = [row["labels"] for row in rows]
    y_pred = hard(outputs, spec)
    scores = [o["scores"] for o in outputs]
    indices = list(range(len(spec.labels)))
    metrics = classification_metrics(y_true, y_pred, None, None if spec.multi_label else indices)
    try:  # multi-label: indicator rows, macro over labels (the roc_auc module tells the two apart)
        metrics["roc_auc"] = roc_auc(y_true, scores, None if spec.multi_label else indices)
    except ValueError as exc:
        log.info("%s: ROC AUC not reported: %s", label, exc)
    metrics["per_class"] = label_report(y_true, y_pred, indices, spec.labels)
    extra = {}
    if not spec.multi_label:
        matrix = confusion_matrix(y_true, y_pred, indices)
        extra["confusion_matrix"] = matrix.tolist()
        if out_dir is not None:
            confusion_matrix_png(out_dir / f"confusion_{label}.png", matrix, spec.labels, f"confusion matrix ({label})")
    by_id = records_by_id(records)
    predictions = []
    for i, (row, o, p) in enumerate(zip(rows, outputs, y_pred)):
        record = record_for(row, i, records, by_id)
        predictions.append({"id": row.get("id"), "model": label, "text": text_of(record),
                            "reference": _label_names(row["labels"], spec), "prediction": _label_names(p, spec),
                            "scores": dict(zip(spec.labels, [round(s, 6) for s in o["scores"]]))})
    return metrics, predictions, extra


NO_LABEL = "(none)"  # a multi-label prediction with no label set


def _label_key(value: Any) -> str:
    """One hashable label per prediction: the class, or a multi-label set as "a+b" (the empty set: (none))."""
    return ("+".join(value) or NO_LABEL) if isinstance(value, list) else str(value)


def collapse(predictions, spec: TaskSpec, params) -> dict[str, Any]:
    """Collapsed: one class (multi-label: one set of labels) for nearly every example while the references vary."""
    return majority_check([_label_key(p["reference"]) for p in predictions],
                          [_label_key(p["prediction"]) for p in predictions], params, "examples")


def prior_loss(train_rows, spec: TaskSpec) -> float | None:
    """The loss of always predicting the train label frequencies: their (class-weighted) entropy; multi-label,
    the mean per-label binary entropy (with pos_weight)."""
    counts = label_counts(train_rows, len(spec.labels), spec.multi_label)
    if spec.multi_label:
        return prior_binary_cross_entropy(counts, len(train_rows), spec.class_weights)
    return prior_cross_entropy(counts, spec.class_weights)


KIND = register(HeadKind(
    name="classification", shape="sequence", auto_class="AutoModelForSequenceClassification",
    pipeline_tag="text-classification", num_labels=lambda spec: len(spec.labels), head_config=head_config,
    custom_head=custom_head, build_labels=build_labels, check_labels=check_labels, row_labels=_row_labels,
    encode=encode, preview=preview, targets=targets, loss=loss, output=output, hard=hard, score=score,
    main_metric="accuracy", collapse=collapse, prior_loss=prior_loss,
))
