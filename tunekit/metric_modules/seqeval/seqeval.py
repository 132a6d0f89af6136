"""Entity-level micro precision, recall and F1 by seqeval over BIO (IOB2) tag sequences, 0-1.

Default: seqeval's conlleval-compatible mode (an I- tag after O starts an entity). `strict=True`:
seqeval's strict IOB2 mode (an entity must start with B-; type and span must match exactly). No
sentences score 0.
"""

import datasets
import evaluate
from seqeval.metrics import f1_score
from seqeval.metrics import precision_score
from seqeval.metrics import recall_score
from seqeval.scheme import IOB2

_CITATION = "Nakayama, 2018. seqeval: a Python framework for sequence labeling evaluation. https://github.com/chakki-works/seqeval"
_KWARGS = """
Args:
    predictions (list of list of str): predicted tags per sentence.
    references (list of list of str): true tags per sentence (the same lengths).
    strict (bool, optional): strict IOB2 mode (default False).
Returns:
    precision, recall, f1 (floats, 0-1)
"""


class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
            codebase_urls=["https://github.com/chakki-works/seqeval"])

    def _compute(self, predictions, references, strict=False):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        for i, (true, pred) in enumerate(zip(references, predictions)):
            if len(true) != len(pred):
                raise ValueError(f"sentence {i}: {len(pred)} predicted tags for {len(true)} true tags")
        if not references:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        kwargs = {"mode": "strict", "scheme": IOB2} if strict else {}
        true, pred = [list(t) for t in references], [list(p) for p in predictions]
        return {"precision": float(precision_score(true, pred, zero_division=0, **kwargs)),
                "recall": float(recall_score(true, pred, zero_division=0, **kwargs)),
                "f1": float(f1_score(true, pred, zero_division=0, **kwargs))}
