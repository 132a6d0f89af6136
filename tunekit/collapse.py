"""Guards against a task head that learned the label frequencies and nothing else (issue 16): a model that
predicts one label (or `O`, or the empty answer) for (almost) everything while the references are not
like that, and a validation loss that never fell below the loss of always predicting the train split's
label frequencies.

The task kinds (tunekit/tasks) decide what they compare (their labels, tags, entities, answers or
values) and call the primitives here; the thresholds are `task.collapse` (tunekit.params.CollapseParams).
A leaf module: no torch, no other tunekit module.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any


def distribution(values: Sequence[Hashable]) -> dict[str, float]:
    """Each value's share of `values`, most frequent first (ties by name)."""
    counts = Counter(str(v) for v in values)
    total = sum(counts.values()) or 1
    return {k: c / total for k, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def majority_check(references: Sequence[Hashable], predictions: Sequence[Hashable], params: Any,
                   what: str = "examples") -> dict[str, Any]:
    """Whether the most predicted label takes at least `params.prediction_share` of the predictions while
    it holds less than `params.reference_share` of the references. Returns {"collapsed": 0 | 1,
    "reason": str | None, "label", "prediction_share", "reference_share", "predicted": {label: share},
    "reference": {label: share}}."""
    predicted, reference = distribution(predictions), distribution(references)
    label, share = next(iter(predicted.items()), (None, 0.0))
    ref_share = reference.get(label, 0.0) if label is not None else 0.0
    collapsed = bool(predictions) and share >= params.prediction_share and ref_share < params.reference_share
    reason = (f"predicts {label!r} for {share:.0%} of {len(predictions)} {what}, while {label!r} is {ref_share:.0%} of "
              f"the references (task.collapse: prediction_share {params.prediction_share:g}, reference_share "
              f"{params.reference_share:g})") if collapsed else None
    return {"collapsed": int(collapsed), "reason": reason, "label": label, "prediction_share": share,
            "reference_share": ref_share, "predicted": predicted, "reference": reference}


def count_check(reference_count: int, predicted_count: int, ratio: float, what: str, setting: str) -> str | None:
    """Why a model is collapsed when it predicts fewer than `ratio` times the references' `what` (None: it is not)."""
    if reference_count and predicted_count < ratio * reference_count:
        return (f"predicts {predicted_count} {what} where the references hold {reference_count} "
                f"(below task.collapse.{setting} {ratio:g} times as many)")
    return None


def spread_check(references: Sequence[float], predictions: Sequence[float], ratio: float, name: str = "") -> str | None:
    """Why predictions are (nearly) constant: their standard deviation below `ratio` times the references' (None: not)."""
    ref_std, pred_std = std(references), std(predictions)
    if ref_std > 0 and pred_std < ratio * ref_std:
        return (f"predictions{f' of {name}' if name else ''} spread {pred_std:.4g} (standard deviation) against "
                f"{ref_std:.4g} for the targets (below task.collapse.std_ratio {ratio:g} of it): nearly one value "
                f"({sum(predictions) / len(predictions):.4g}) for every example")
    return None


def std(values: Sequence[float]) -> float:
    """Population standard deviation (0 for no values)."""
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


# ---------------------------------------------------------------- the label prior's loss


def prior_cross_entropy(counts: Sequence[float], weights: Sequence[float] | None = None) -> float | None:
    """The per-unit cross-entropy of always predicting the best constant distribution for these label
    counts: their entropy, and with class weights w (a loss of sum w_y * -log q_y over the units, divided
    by the units) the weighted version, whose best constant is q_c proportional to count_c * w_c.
    None when there are no labels."""
    total = float(sum(counts))
    if total <= 0:
        return None
    weights = list(weights) if weights else [1.0] * len(counts)
    mass = [c / total * w for c, w in zip(counts, weights)]
    norm = sum(mass)
    return float(sum(m * -math.log(m / norm) for m in mass if m > 0))


def prior_binary_cross_entropy(positives: Sequence[float], examples: int,
                               pos_weight: Sequence[float] | None = None) -> float | None:
    """Multi-label: the mean over labels of the BCE of always predicting the best constant probability
    (with pos_weight w: q = w p / (w p + 1 - p) for a positive share p). None without examples."""
    if examples <= 0 or not positives:
        return None
    weights = list(pos_weight) if pos_weight else [1.0] * len(positives)
    total = 0.0
    for count, w in zip(positives, weights):
        p = count / examples
        if 0 < p < 1:
            q = w * p / (w * p + 1 - p)
            total += -(w * p * math.log(q) + (1 - p) * math.log(1 - q))
    return total / len(positives)


def prior_check(evals: Sequence[dict[str, float]], planned_steps: int, prior: float | None, params: Any) -> dict[str, Any]:
    """Whether the validation loss fell below the label prior's loss by `params.check_after` of the planned
    steps. {"checked": 0 | 1, "below": 0 | 1, "prior", "best", "step", "best_final", "reason"}; `reason` is
    the warning (None when fine or not checked)."""
    if prior is None or params.check_after is None:
        return {"checked": 0, "reason": None}
    if not evals:
        return {"checked": 0, "reason": None, "prior": prior,
                "skipped": "no validation loss was computed (an empty validation split?)"}
    point = math.ceil(params.check_after * planned_steps)
    seen = [e for e in evals if e["step"] <= point] or [evals[0]]  # the first evaluation when none came by then
    best = min(e["val_loss"] for e in seen)
    step = seen[-1]["step"]
    final = min(e["val_loss"] for e in evals)
    threshold = prior * (1 - params.loss_margin)
    below = best < threshold
    reason = None if below else (
        f"the validation loss was {best:.4g} at best by step {step} of {planned_steps} ({step / max(planned_steps, 1):.0%} "
        f"of training; task.collapse.check_after {params.check_after:g}), not below {prior:.4g}, the loss of always "
        f"predicting the train split's label frequencies (minus task.collapse.loss_margin {params.loss_margin:g}: "
        f"{threshold:.4g}); best by the end: {final:.4g}. The head has learned little beyond the label prior and may "
        "predict the majority label (O for NER) for everything. Levers: task.class_weights: balanced (rare labels "
        "weigh more); more steps (finetune.epochs) or warmup; another learning rate (finetune.lr, and finetune.head_lr "
        "for what the method adds: LoRA factors and the new head); finetune.method: full at a low finetune.lr "
        "(e.g. 5e-5). See docs/tasks.md, \"Collapse\"")
    return {"checked": 1, "below": int(below), "prior": prior, "best": best, "step": step, "best_final": final,
            "reason": reason}
