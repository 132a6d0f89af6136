"""Task metrics, each computed by the field's reference library (nothing is fetched at run time)."""

from __future__ import annotations

from collections.abc import Sequence


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    # sacrebleu silently ignores surplus predictions; a miscount must fail loudly everywhere.
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after trimming surrounding whitespace.

    Deliberately strict: the demo task asks for one exact JSON object, so case, key order and
    punctuation all count.
    """
    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100), one reference per prediction."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, Porter stemming), 0-1."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    if not references:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {
        "exact_match": exact_match(predictions, references),
        "bleu": bleu(predictions, references),
        "rouge_l": rouge_l(predictions, references),
    }


# ---------------------------------------------------------------- more generation metrics


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2, no word n-grams), 0-100."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 (rouge-score, Porter stemming), 0-1.

    ROUGE-Lsum treats each line as a sentence (rouge-score splits on "\\n"); put one sentence per line.
    """
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    if not references:
        return dict.fromkeys(ROUGE_TYPES, 0.0)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True, split_summaries=False)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(references) for name, total in totals.items()}


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower-case, drop punctuation, the articles a/an/the, extra whitespace."""
    import re
    import string

    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _squad_f1_one(prediction: str, reference: str) -> float:
    from collections import Counter

    pred_tokens = squad_normalize(prediction).split()
    ref_tokens = squad_normalize(reference).split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _as_reference_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    lists = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not refs for refs in lists):
        raise ValueError("every prediction needs at least one reference")
    return lists


def squad_exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """SQuAD v1.1 exact match, 0-1 (the official script's number / 100): a reference may be a list of
    acceptable answers, and the best one counts."""
    _check_lengths(predictions, references)
    if not references:
        return 0.0
    refs = _as_reference_lists(references)
    hits = [max(float(squad_normalize(p) == squad_normalize(r)) for r in rs) for p, rs in zip(predictions, refs)]
    return sum(hits) / len(hits)


def squad_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """SQuAD v1.1 token F1, 0-1, max over each prediction's references (an empty side scores 0, as in v1.1)."""
    _check_lengths(predictions, references)
    if not references:
        return 0.0
    refs = _as_reference_lists(references)
    scores = [max(_squad_f1_one(p, r) for r in rs) for p, rs in zip(predictions, refs)]
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- classification


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    from sklearn.metrics import accuracy_score

    _check_lengths(y_pred, y_true)
    return float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0


def f1(y_true: Sequence, y_pred: Sequence, average: str = "macro", labels: Sequence | None = None) -> float:
    """F1 (scikit-learn) with `average` "macro" (mean over classes) or "micro" (pooled counts)."""
    from sklearn.metrics import f1_score

    if average not in ("macro", "micro"):
        raise ValueError(f"average must be 'macro' or 'micro', not {average!r}")
    _check_lengths(y_pred, y_true)
    if not len(y_true):
        return 0.0
    return float(f1_score(y_true, y_pred, average=average, labels=labels, zero_division=0))


def roc_auc(y_true: Sequence, y_score, labels: Sequence | None = None) -> float:
    """ROC AUC (scikit-learn) from probabilities.

    Binary: `y_score` is P(positive class) per example, or an (n, 2) array of class probabilities.
    Multi-class: an (n, n_classes) array of probabilities (rows summing to 1), columns in the order of
    `labels` (default: the sorted classes); scored one-vs-rest, macro-averaged.
    """
    import numpy as np
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(y_score, dtype=float)
    if scores.shape[0] != len(y_true):
        raise ValueError(f"{scores.shape[0]} score rows for {len(y_true)} labels")
    classes = list(labels) if labels is not None else sorted(set(y_true))
    if len(set(y_true)) < 2:  # scikit-learn only warns and returns nan
        raise ValueError("ROC AUC is undefined when y_true holds a single class")
    if scores.ndim == 2 and scores.shape[1] == 2 and len(classes) <= 2:
        scores = scores[:, 1]
    if scores.ndim == 1:
        if labels is not None and len(classes) == 2:
            return float(roc_auc_score([int(y == classes[1]) for y in y_true], scores))
        return float(roc_auc_score(y_true, scores))
    if scores.shape[1] != len(classes):
        raise ValueError(f"{scores.shape[1]} score columns for {len(classes)} classes {classes}")
    order = sorted(range(len(classes)), key=lambda i: classes[i])  # scikit-learn wants labels sorted
    return float(roc_auc_score(y_true, scores[:, order], multi_class="ovr", average="macro",
                               labels=[classes[i] for i in order]))


def confusion_matrix(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None):
    """Counts (numpy array), rows = true class, columns = predicted class, in `labels` order (default sorted)."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    _check_lengths(y_pred, y_true)
    return sk_confusion_matrix(y_true, y_pred, labels=labels)


def confusion_matrix_png(path, matrix, labels: Sequence, title: str = "confusion matrix") -> None:
    """Write the matrix as a PNG heat map with its counts (matplotlib, Agg backend: no display needed)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.asarray(matrix)
    path = Path(path)
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), [str(label) for label in labels], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), [str(label) for label in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > threshold else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def classification_metrics(y_true: Sequence, y_pred: Sequence, y_score=None, labels: Sequence | None = None) -> dict:
    metrics = {"accuracy": accuracy(y_true, y_pred), "f1_macro": f1(y_true, y_pred, "macro", labels),
               "f1_micro": f1(y_true, y_pred, "micro", labels)}
    if y_score is not None:
        metrics["roc_auc"] = roc_auc(y_true, y_score, labels)
    return metrics


# ---------------------------------------------------------------- sequence labelling


def entity_metrics(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]], strict: bool = False) -> dict[str, float]:
    """Entity-level micro precision / recall / F1 (seqeval) over BIO (IOB2) tag sequences.

    Default: seqeval's conlleval-compatible mode (an I- tag after O starts an entity). `strict=True`:
    seqeval's strict IOB2 mode (an entity must start with B-; type and span must match exactly).
    """
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    _check_lengths(y_pred, y_true)
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(t)} true tags")
    if not y_true:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    kwargs = {"mode": "strict", "scheme": IOB2} if strict else {}
    true, pred = [list(t) for t in y_true], [list(p) for p in y_pred]
    return {"precision": float(precision_score(true, pred, zero_division=0, **kwargs)),
            "recall": float(recall_score(true, pred, zero_division=0, **kwargs)),
            "f1": float(f1_score(true, pred, zero_division=0, **kwargs))}


# ---------------------------------------------------------------- code


def pass_at_k_one(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem, 1 - C(n-c, k) / C(n, k), in the Codex paper's stable product form."""
    import numpy as np

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


def pass_at_k(num_samples: Sequence[int] | int, num_correct: Sequence[int], ks: Sequence[int]) -> dict[int, float]:
    """Mean unbiased pass@k over problems, for every k in `ks`.

    `num_samples` (n per problem, or one n for all) and `num_correct` (c per problem). Every problem
    needs n >= k: a smaller n is an error naming the problem, never a silently biased number.
    """
    correct = list(num_correct)
    samples = [num_samples] * len(correct) if isinstance(num_samples, int) else list(num_samples)
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
        result[k] = sum(pass_at_k_one(n, c, k) for n, c in zip(samples, correct)) / len(correct)
    return result


# ---------------------------------------------------------------- regression


def regression_metrics(y_true: Sequence[Sequence[float]], y_pred: Sequence[Sequence[float]],
                       names: Sequence[str] | None = None) -> dict[str, float]:
    """MSE and MAE (scikit-learn), Pearson and Spearman correlation (scipy) of rows of targets: averaged
    over the targets, and per target (`<name>_<metric>`) when there are several. A correlation is NaN
    when either side is constant (undefined, as scipy says)."""
    import warnings

    import numpy as np
    from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    true, pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if true.shape != pred.shape or true.ndim != 2:
        raise ValueError(f"targets {true.shape} and predictions {pred.shape} must both be [examples, targets]")
    per_target = []
    for column in range(true.shape[1]):
        t, p = true[:, column], pred[:, column]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)
            correlations = (float(pearsonr(t, p).statistic), float(spearmanr(t, p).statistic)) if len(t) > 1 \
                else (float("nan"), float("nan"))
        per_target.append({"mse": float(mean_squared_error(t, p)), "mae": float(mean_absolute_error(t, p)),
                           "pearson": correlations[0], "spearman": correlations[1]})
    metrics = {key: float(np.mean([m[key] for m in per_target])) for key in ("mse", "mae", "pearson", "spearman")}
    if len(per_target) > 1:
        for name, values in zip(names or [f"target_{i}" for i in range(len(per_target))], per_target):
            metrics.update({f"{name}_{key}": value for key, value in values.items()})
    return metrics
