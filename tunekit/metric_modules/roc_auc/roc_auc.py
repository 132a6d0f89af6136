"""ROC AUC by scikit-learn (roc_auc_score) from probabilities, 0-1.

- Binary: `prediction_scores` is P(positive class) per example, or rows of the two class probabilities.
- Multi-class: rows of class probabilities (summing to 1), columns in the order of `labels` (default: the
  sorted classes); scored one-vs-rest, macro-averaged.
- Multi-label: `references` are rows of 0/1 indicators, `prediction_scores` rows of per-label
  probabilities; macro-averaged over labels.

Undefined (an error, where scikit-learn would only warn and give NaN) when the references hold one class.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import roc_auc_score

_KWARGS = """
Args:
    references (list of int | str | list of int): true labels (list of 0/1 per example: multi-label).
    prediction_scores (list of float | list of list of float): probabilities.
    labels (list, optional): the classes, in the column order of prediction_scores.
Returns:
    roc_auc (float, 0-1)
"""
_SCALAR, _ROW = datasets.Value("float64"), datasets.Sequence(datasets.Value("float64"))
FEATURES = [datasets.Features({"references": reference, "prediction_scores": scores})
            for reference, scores in ((datasets.Value("int64"), _SCALAR), (datasets.Value("int64"), _ROW),
                                      (datasets.Value("string"), _SCALAR), (datasets.Value("string"), _ROW),
                                      (datasets.Sequence(datasets.Value("int64")), _ROW))]


class RocAuc(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description=_KWARGS, features=FEATURES,
                                   reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.roc_auc_score.html"])

    def _compute(self, references, prediction_scores, labels=None):
        scores = np.asarray(prediction_scores, dtype=float)
        if scores.shape[0] != len(references):
            raise ValueError(f"{scores.shape[0]} score rows for {len(references)} labels")
        if references and isinstance(references[0], list):  # multi-label indicator rows
            return {"roc_auc": float(roc_auc_score(references, scores, average="macro"))}
        classes = list(labels) if labels is not None else sorted(set(references))
        if len(set(references)) < 2:
            raise ValueError("ROC AUC is undefined when y_true holds a single class")
        if scores.ndim == 2 and scores.shape[1] == 2 and len(classes) <= 2:
            scores = scores[:, 1]
        if scores.ndim == 1:
            if labels is not None and len(classes) == 2:
                return {"roc_auc": float(roc_auc_score([int(y == classes[1]) for y in references], scores))}
            return {"roc_auc": float(roc_auc_score(references, scores))}
        if scores.shape[1] != len(classes):
            raise ValueError(f"{scores.shape[1]} score columns for {len(classes)} classes {classes}")
        order = sorted(range(len(classes)), key=lambda i: classes[i])  # scikit-learn wants the labels sorted
        return {"roc_auc": float(roc_auc_score(references, scores[:, order], multi_class="ovr", average="macro",
                                               labels=[classes[i] for i in order]))}
