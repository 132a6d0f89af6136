"""Sequence regression (`task.type: regression`): a text or a text pair -> one or more numbers.

- ingest: the `regression` format, `{"text" | "text_a" + "text_b", "target": number | [numbers]}`;
  a target that is not a finite number (a string, a bool, null, NaN) is rejected with its line
  (tunekit.ingest).
- template: `{"id", "input_ids", "token_type_ids"?, "labels": [float, ...]}`, one value per target;
  every row must have as many targets as the train split's first row. labels.json names the targets
  (`task.labels`, else "target", or target_0, target_1, ... for several).
- head: a pooled head with one output per target (problem_type regression): transformers' sequence
  class where it pools the first token of an encoder, else tunekit.modeling.PooledClassifier (mean
  pooling; last-token pooling on decoders found from the attention mask).
- loss: `task.loss` mse (mean squared error over the targets) or huber (delta 1.0), summed per example,
  on the targets standardised with the train split's mean and standard deviation (labels.json and
  meta.json record them; predictions are mapped back), so the head starts near a loss of 1 whatever
  the targets' scale.
- scores: MSE, MAE, Pearson and Spearman correlation (tunekit.metrics.regression_metrics).
- merge: the merged model's values must match the adapter model's within merge.atol.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunekit.tasks.classification import custom_head
from tunekit.tasks.heads import (FILE_LINE, HeadKind, TaskDataError, TaskSpec, encode_texts, record_for, records_by_id,
                                 register, text_of)

AGREE = 1e-3  # merge check: values "identical" when within this of each other (they are continuous)


def _values(row: dict) -> list[float]:
    target = row["target"]
    return list(target) if isinstance(target, list) else [target]


def build_labels(train_rows, task_params, train_file: str = "train.jsonl") -> tuple[list[str], bool]:
    """The targets' names: task.labels (one per target) or target / target_<i>."""
    count = len(_values(train_rows[0]))
    if task_params.labels is not None:
        if len(task_params.labels) != count:
            raise TaskDataError(f"task.labels {list(task_params.labels)} names {len(task_params.labels)} target(s) but the "
                                f"rows of {train_file} have {count}; give one name per target, or task.labels: null")
        return list(task_params.labels), False
    return (["target"] if count == 1 else [f"target_{i}" for i in range(count)]), False


def check_labels(rows, labels: list[str], multi: bool, file: str, origin: str) -> None:
    for line, row in enumerate(rows, start=1):
        found = len(_values(row))
        if found != len(labels):
            raise TaskDataError(f"{file}:{row.get(FILE_LINE, line)} (from {row.get('source')}): target has {found} value(s) "
                                f"but the targets are {labels} ({origin}); give every row the same number of targets")


def encode(rows, tokenizer: Any, label2id: dict[str, int], multi: bool, task_params, max_length: int):
    out, truncated = encode_texts(rows, tokenizer, max_length)
    for encoded, row in zip(out, rows):
        encoded["labels"] = _values(row)
    return out, {"truncated": truncated}


def label_info(train_rows) -> dict[str, Any]:
    """The train split's mean and standard deviation of each target (1.0 where a target is constant)."""
    columns = list(zip(*(_values(row) for row in train_rows)))
    means = [sum(column) / len(column) for column in columns]
    stds = [math.sqrt(sum((v - m) ** 2 for v in column) / len(column)) or 1.0 for column, m in zip(columns, means)]
    return {"target_mean": means, "target_std": stds}


def spec_extra(task_params, labels_info: dict[str, Any]) -> dict[str, Any]:
    count = len(labels_info.get("labels") or ())
    return {"loss": task_params.loss, "target_mean": tuple(labels_info.get("target_mean") or [0.0] * count),
            "target_std": tuple(labels_info.get("target_std") or [1.0] * count)}


def _scale(spec: TaskSpec, device) -> tuple[torch.Tensor, torch.Tensor]:
    count = len(spec.labels)
    mean = torch.tensor(spec.target_mean or [0.0] * count, dtype=torch.float, device=device)
    std = torch.tensor(spec.target_std or [1.0] * count, dtype=torch.float, device=device)
    return mean, std


def split_stats(rows, out_rows: list[dict], stats: dict) -> None:
    values = [v for row in rows for v in _values(row)]
    if values:
        mean = sum(values) / len(values)
        stats.update(target_mean=mean, target_std=math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))


def preview(row: dict, tokens: list[str], labels: list[str]):
    shown = ", ".join(f"{name} {value:g}" for name, value in zip(labels, row["labels"]))
    return [(token, "") for token in tokens], f"target: {shown}"


def head_config(spec: TaskSpec) -> dict[str, Any]:
    return {"num_labels": len(spec.labels), "id2label": dict(enumerate(spec.labels)),
            "label2id": {label: i for i, label in enumerate(spec.labels)}, "problem_type": "regression"}


def targets(rows, width: int, left: bool) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor([row["labels"] for row in rows], dtype=torch.float)}


def loss(outputs, batch: dict[str, torch.Tensor], spec: TaskSpec) -> tuple[torch.Tensor, int]:
    predicted = outputs.logits.float()
    mean, std = _scale(spec, predicted.device)
    # the head predicts standardised targets: a loss near 1 at the start whatever the targets' scale
    wanted = (batch["labels"].to(predicted.device).view_as(predicted) - mean) / std
    if spec.loss == "huber":
        per_target = F.huber_loss(predicted, wanted, reduction="none", delta=1.0)
    else:
        per_target = F.mse_loss(predicted, wanted, reduction="none")
    return per_target.mean(dim=-1).sum(), predicted.shape[0]


def output(outputs, j: int, k: int, width: int, spec: TaskSpec) -> dict[str, Any]:
    logits = outputs.logits[j].float()
    mean, std = _scale(spec, logits.device)
    return {"values": (logits * std + mean).tolist(), "logits": logits.tolist()}


def hard(outputs, spec: TaskSpec) -> list[Any]:
    return [o["values"] for o in outputs]


def agree(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=AGREE) for u, v in zip(a, b) for x, y in zip(u, v))


def score(outputs, rows, records, spec: TaskSpec, label: str, settings: dict, out_dir: Path | None):
    from tunekit.metrics import regression_metrics

    y_true = [row["labels"] for row in rows]
    y_pred = hard(outputs, spec)
    metrics = regression_metrics(y_true, y_pred, spec.labels)
    by_id = records_by_id(records)
    predictions = []
    for i, (row, values) in enumerate(zip(rows, y_pred)):
        record = record_for(row, i, records, by_id)
        one = len(values) == 1
        predictions.append({"id": row.get("id"), "model": label, "text": text_of(record),
                            "reference": row["labels"][0] if one else row["labels"],
                            "prediction": round(values[0], 6) if one else [round(v, 6) for v in values]})
    return metrics, predictions, {}


def collapse(predictions, spec: TaskSpec, params) -> dict[str, Any]:
    """Collapsed: predictions (nearly) constant for a target the references vary on (task.collapse.std_ratio)."""
    from tunekit.collapse import spread_check, std

    def column(rows, key, i):
        return [row[key] if len(spec.labels) == 1 else row[key][i] for row in rows]

    reasons, spread = [], {}
    for i, name in enumerate(spec.labels):
        true, pred = column(predictions, "reference", i), column(predictions, "prediction", i)
        why = spread_check(true, pred, params.std_ratio, name if len(spec.labels) > 1 else "")
        spread[name] = {"prediction_std": std(pred), "reference_std": std(true)}
        if why:
            reasons.append(why)
    return {"collapsed": int(bool(reasons)), "reason": "; ".join(reasons) or None, "spread": spread}


def prior_loss(train_rows, spec: TaskSpec) -> float | None:
    """The loss of always predicting the train split's mean (0 on the standardised targets the head predicts)."""
    if not train_rows:
        return None
    mean = spec.target_mean or [0.0] * len(spec.labels)
    std = spec.target_std or [1.0] * len(spec.labels)
    total = 0.0
    for row in train_rows:
        z = [(v - m) / (s or 1.0) for v, m, s in zip(row["labels"], mean, std)]
        per_target = [min(abs(x), 1.0) * (abs(x) - 0.5 * min(abs(x), 1.0)) if spec.loss == "huber" else x * x for x in z]
        total += sum(per_target) / len(per_target)
    return total / len(train_rows)


KIND = register(HeadKind(
    name="regression", shape="sequence", auto_class="AutoModelForSequenceClassification",
    pipeline_tag="text-classification", num_labels=lambda spec: len(spec.labels), head_config=head_config,
    custom_head=custom_head, build_labels=build_labels, check_labels=check_labels, row_labels=lambda row: [],
    encode=encode, preview=preview, targets=targets, loss=loss, output=output, hard=hard, score=score,
    main_metric="pearson", split_stats=split_stats, labelled=False, class_weights=False, agree=agree,
    spec_extra=spec_extra, label_info=label_info, collapse=collapse, prior_loss=prior_loss,
))
