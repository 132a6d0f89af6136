"""F1 by scikit-learn (f1_score, zero_division=0), 0-1: average "macro" (mean over classes) or "micro"
(pooled counts). Labels as integers or strings, or multi-label rows of 0/1 indicators. No examples score 0.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score

_KWARGS = """
Args:
    predictions (list of int | str | list of int): predicted labels.
    references (list of int | str | list of int): true labels.
    average (str): "macro" (default) or "micro".
    labels (list, optional): the classes to score (default: those present).
Returns:
    f1 (float, 0-1)
"""
FEATURES = [datasets.Features({"predictions": kind, "references": kind})
            for kind in (datasets.Value("int64"), datasets.Value("string"), datasets.Sequence(datasets.Value("int64")))]


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description=_KWARGS, features=FEATURES,
                                   reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"])

    def _compute(self, predictions, references, average="macro", labels=None):
        if average not in ("macro", "micro"):
            raise ValueError(f"average must be 'macro' or 'micro', not {average!r}")
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if not len(references):
            return {"f1": 0.0}
        return {"f1": float(f1_score(references, predictions, average=average, labels=labels, zero_division=0))}
