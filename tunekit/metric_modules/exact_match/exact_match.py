"""Exact match: the share of predictions equal to their reference after trimming surrounding whitespace.

Deliberately strict: case, key order and punctuation all count (the demo task asks for one exact JSON
object). 0-1; no examples score 0.
"""

import datasets
import evaluate

_KWARGS = """
Args:
    predictions (list of str): one prediction per example.
    references (list of str): one reference per example.
Returns:
    exact_match (float, 0-1)
"""


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if not references:
            return {"exact_match": 0.0}
        hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
        return {"exact_match": hits / len(references)}
