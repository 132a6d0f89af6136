"""Accuracy by scikit-learn (accuracy_score), 0-1: labels as integers or strings, or multi-label rows of
0/1 indicators (then subset accuracy: a row counts only when all of it is right). No examples score 0.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_KWARGS = """
Args:
    predictions (list of int | str | list of int): predicted labels.
    references (list of int | str | list of int): true labels.
Returns:
    accuracy (float, 0-1)
"""
FEATURES = [datasets.Features({"predictions": kind, "references": kind})
            for kind in (datasets.Value("int64"), datasets.Value("string"), datasets.Sequence(datasets.Value("int64")))]


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description=_KWARGS, features=FEATURES,
                                   reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html#accuracy-score"])

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        return {"accuracy": float(accuracy_score(references, predictions)) if len(references) else 0.0}
