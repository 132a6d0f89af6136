"""Per-class scores, so imbalance is visible beside the averages (issue 16): per-label precision / recall /
F1 / support of a classifier (scikit-learn's classification_report) and per-entity-type ones of a tagger
(seqeval's classification_report, the same conlleval-compatible mode as tunekit.metrics.entity_metrics).
A leaf module: called by the task kinds, imports no other tunekit module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

AVERAGES = ("accuracy", "micro avg", "macro avg", "weighted avg", "samples avg")


def _rows(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {name: {"precision": float(row["precision"]), "recall": float(row["recall"]),
                   "f1": float(row["f1-score"]), "support": int(row["support"])}
            for name, row in report.items() if name not in AVERAGES}


def label_report(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[int],
                 names: Sequence[str]) -> dict[str, dict[str, float]]:
    """{label name: {precision, recall, f1, support}} for every label of the label set (class indices, or
    multi-hot rows for multi-label), support 0 for labels absent from the references."""
    from sklearn.metrics import classification_report

    report = classification_report(list(y_true), list(y_pred), labels=list(labels), target_names=list(names),
                                   output_dict=True, zero_division=0)
    return _rows(report)


def entity_report(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict[str, dict[str, float]]:
    """{entity type: {precision, recall, f1, support}} over BIO tag sequences (seqeval's default mode): the
    types of the references and of the predictions (a type only predicted has support 0)."""
    from seqeval.metrics import classification_report

    true, pred = [list(t) for t in y_true], [list(p) for p in y_pred]
    if not any(t != "O" for s in true + pred for t in s):
        return {}
    return _rows(classification_report(true, pred, output_dict=True, zero_division=0))
