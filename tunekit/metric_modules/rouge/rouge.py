"""Mean ROUGE F1 by rouge-score (Porter stemming by default), 0-1: ROUGE-1, ROUGE-2, ROUGE-L, ROUGE-Lsum.

ROUGE-Lsum treats each line as a sentence (rouge-score splits on newlines): put one sentence per line.
No examples score 0.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_CITATION = "Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries. https://aclanthology.org/W04-1013"
_KWARGS = """
Args:
    predictions (list of str): one prediction per example.
    references (list of str): one reference per example.
    rouge_types (list of str, optional): of rouge1, rouge2, rougeL, rougeLsum (default: all four).
    use_stemmer (bool, optional): Porter stemming (default True).
Returns:
    one float per rouge type: the mean over examples of rouge_score's F1 (fmeasure).
"""


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"])

    def _compute(self, predictions, references, rouge_types=ROUGE_TYPES, use_stemmer=True):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        unknown = [t for t in rouge_types if t not in ROUGE_TYPES]
        if unknown:
            raise ValueError(f"unknown rouge types {unknown}; valid: {', '.join(ROUGE_TYPES)}")
        if not references:
            return dict.fromkeys(rouge_types, 0.0)
        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer, split_summaries=False)
        totals = dict.fromkeys(rouge_types, 0.0)
        for prediction, reference in zip(predictions, references):
            scores = scorer.score(reference, prediction)  # rouge-score's order: target, then prediction
            for name in rouge_types:
                totals[name] += scores[name].fmeasure
        return {name: total / len(references) for name, total in totals.items()}
