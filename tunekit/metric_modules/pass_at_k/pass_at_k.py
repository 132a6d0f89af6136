"""Unbiased pass@k (Chen et al., 2021) from counts: per problem 1 - C(n-c, k) / C(n, k), in the paper's
numerically stable product form, averaged over problems, for every k asked.

This module only counts: it never runs code. The samples are executed in tunekit/sandbox.py, which
passes the number of samples (n) and of passing samples (c) per problem here. Every problem needs n >= k:
a smaller n is an error naming the problems, never a silently biased number.
"""

import datasets
import evaluate
import numpy as np

_CITATION = "Chen et al., 2021. Evaluating Large Language Models Trained on Code. https://arxiv.org/abs/2107.03374"
_KWARGS = """
Args:
    samples (list of int): samples drawn per problem (n).
    correct (list of int): samples that passed per problem (c).
    ks (list of int): the k of each pass@k to report.
Returns:
    "pass@<k>" (float, 0-1) for every k in ks.
"""


def pass_at_k_one(n, c, k):
    """Unbiased pass@k of one problem."""
    if not (isinstance(n, int | np.integer) and isinstance(c, int | np.integer) and isinstance(k, int | np.integer)):
        raise TypeError("n, c and k must be integers")
    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= correct <= samples, got {c} correct of {n}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


class PassAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"samples": datasets.Value("int64"), "correct": datasets.Value("int64")}))

    def _compute(self, samples, correct, ks=(1,)):
        if len(samples) != len(correct):
            raise ValueError(f"{len(samples)} sample counts for {len(correct)} correct counts")
        if not correct:
            raise ValueError("pass@k of no problems")
        result = {}
        for k in ks:
            short = [i for i, n in enumerate(samples) if n < k]
            if short:
                raise ValueError(f"pass@{k} needs at least {k} samples per problem; problem(s) {short[:10]} have "
                                 f"{[samples[i] for i in short[:10]]}")
            result[f"pass@{k}"] = sum(pass_at_k_one(n, c, k) for n, c in zip(samples, correct)) / len(correct)
        return result
