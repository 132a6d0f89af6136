"""Confusion matrix by scikit-learn: counts, rows = true class, columns = predicted class, in the order of
`labels` (default: the sorted classes)."""

import datasets
import evaluate
from sklearn.metrics import confusion_matrix

_KWARGS = """
Args:
    predictions (list of int | str): predicted labels.
    references (list of int | str): true labels.
    labels (list, optional): the classes, in row/column order.
Returns:
    confusion_matrix (numpy array of int)
"""
FEATURES = [datasets.Features({"predictions": kind, "references": kind})
            for kind in (datasets.Value("int64"), datasets.Value("string"))]


class ConfusionMatrix(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description=_KWARGS, features=FEATURES,
                                   reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.confusion_matrix.html"])

    def _compute(self, predictions, references, labels=None):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        return {"confusion_matrix": confusion_matrix(references, predictions, labels=labels)}
