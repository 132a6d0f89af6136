"""SQuAD v1.1 exact match and token F1, 0-1 (the official script's numbers / 100).

Answers are normalised as the official evaluation script does: lower-case, punctuation removed, the
articles a/an/the removed, whitespace collapsed. Each prediction may have several acceptable answers;
the best one counts. An empty side scores 0 F1, as in v1.1. No examples score 0.
"""

import re
import string
from collections import Counter

import datasets
import evaluate

_CITATION = "Rajpurkar et al., 2016. SQuAD: 100,000+ Questions for Machine Comprehension of Text. EMNLP. https://arxiv.org/abs/1606.05250"
_KWARGS = """
Args:
    predictions (list of str): one answer per question.
    references (list of list of str): the acceptable answers of each question (at least one).
Returns:
    exact_match (float, 0-1), f1 (float, 0-1)
"""
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text):
    """Lower-case, drop punctuation, the articles a/an/the and extra whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_one(prediction, reference):
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"])

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if any(not answers for answers in references):
            raise ValueError("every prediction needs at least one reference")
        if not references:
            return {"exact_match": 0.0, "f1": 0.0}
        em = [max(float(normalize_answer(p) == normalize_answer(r)) for r in rs) for p, rs in zip(predictions, references)]
        f1 = [max(f1_one(p, r) for r in rs) for p, rs in zip(predictions, references)]
        return {"exact_match": sum(em) / len(em), "f1": sum(f1) / len(f1)}
