"""Corpus chrF by sacrebleu (its defaults: character 6-grams, beta 2, no word n-grams), 0-100.

No examples score 0.
"""

import datasets
import evaluate
import sacrebleu

_CITATION = "Popović, 2015. chrF: character n-gram F-score for automatic MT evaluation. WMT. https://aclanthology.org/W15-3049"
_KWARGS = """
Args:
    predictions (list of str): one prediction per example.
    references (list of str): one reference per example.
Returns:
    chrf (float, 0-100): sacrebleu.corpus_chrf(predictions, [references]).score
"""


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            codebase_urls=["https://github.com/mjpost/sacrebleu"])

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if not references:
            return {"chrf": 0.0}
        return {"chrf": float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)}
