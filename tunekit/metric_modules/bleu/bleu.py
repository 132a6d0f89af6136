"""Corpus BLEU by sacrebleu (0-100, sacrebleu's default 13a tokenisation), one reference per prediction.

Corpus BLEU pools the n-gram counts of all examples; it is not the mean of sentence BLEUs. No examples
score 0.
"""

import datasets
import evaluate
import sacrebleu

_CITATION = "Post, 2018. A Call for Clarity in Reporting BLEU Scores. WMT. https://aclanthology.org/W18-6319"
_KWARGS = """
Args:
    predictions (list of str): one prediction per example.
    references (list of str): one reference per example.
Returns:
    bleu (float, 0-100): sacrebleu.corpus_bleu(predictions, [references]).score
"""


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            codebase_urls=["https://github.com/mjpost/sacrebleu"])

    def _compute(self, predictions, references):
        if len(predictions) != len(references):  # sacrebleu silently ignores surplus predictions
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if not references:
            return {"bleu": 0.0}
        return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}
