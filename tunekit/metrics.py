"""Task metrics, each computed by a Hugging Face `evaluate` module kept in the repo
(tunekit/metric_modules/<name>/<name>.py) that wraps the field's reference library; nothing is fetched
at run time. These functions are thin wrappers over the loaded modules (loaded once per process, safe to
call from several threads): their signatures and values are the ones callers have always had."""

from __future__ import annotations

from collections.abc import Sequence

from tunekit.metric_modules import compute, python_module


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    # sacrebleu silently ignores surplus predictions; a miscount must fail loudly everywhere.
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def _texts(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[str]]:
    _check_lengths(predictions, references)
    return {"predictions": list(predictions), "references": list(references)}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after trimming surrounding whitespace.

    Deliberately strict: the demo task asks for one exact JSON object, so case, key order and
    punctuation all count.
    """
    return compute("exact_match", **_texts(predictions, references))["exact_match"]


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100), one reference per prediction."""
    return compute("bleu", **_texts(predictions, references))["bleu"]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, Porter stemming), 0-1."""
    return compute("rouge", **_texts(predictions, references), rouge_types=["rougeL"])["rougeL"]


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {
        "exact_match": exact_match(predictions, references),
        "bleu": bleu(predictions, references),
        "rouge_l": rouge_l(predictions, references),
    }


# ---------------------------------------------------------------- more generation metrics


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2, no word n-grams), 0-100."""
    return compute("chrf", **_texts(predictions, references))["chrf"]


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 (rouge-score, Porter stemming), 0-1.

    ROUGE-Lsum treats each line as a sentence (rouge-score splits on "\\n"); put one sentence per line.
    """
    return compute("rouge", **_texts(predictions, references), rouge_types=list(ROUGE_TYPES))


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower-case, drop punctuation, the articles a/an/the, extra whitespace."""
    return python_module("squad").normalize_answer(text)


def _as_reference_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    lists = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not refs for refs in lists):
        raise ValueError("every prediction needs at least one reference")
    return lists


def squad(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and token F1 (0-1) at once: {"exact_match": ..., "f1": ...}."""
    _check_lengths(predictions, references)
    if not references:
        return {"exact_match": 0.0, "f1": 0.0}
    return compute("squad", predictions=list(predictions), references=_as_reference_lists(references))


def squad_exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """SQuAD v1.1 exact match, 0-1 (the official script's number / 100): a reference may be a list of
    acceptable answers, and the best one counts."""
    return squad(predictions, references)["exact_match"]


def squad_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """SQuAD v1.1 token F1, 0-1, max over each prediction's references (an empty side scores 0, as in v1.1)."""
    return squad(predictions, references)["f1"]


# ---------------------------------------------------------------- classification


def _labels(values: Sequence) -> list:
    """Plain Python labels (numpy scalars and arrays become ints and lists) for the modules' Arrow features."""
    import numpy as np

    values = values.tolist() if isinstance(values, np.ndarray) else list(values)
    return [v.tolist() if isinstance(v, np.ndarray | np.generic) else list(v) if isinstance(v, tuple) else v
            for v in values]


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    _check_lengths(y_pred, y_true)
    if not len(y_true):
        return 0.0
    return compute("accuracy", predictions=_labels(y_pred), references=_labels(y_true))["accuracy"]


def f1(y_true: Sequence, y_pred: Sequence, average: str = "macro", labels: Sequence | None = None) -> float:
    """F1 (scikit-learn) with `average` "macro" (mean over classes) or "micro" (pooled counts)."""
    if average not in ("macro", "micro"):
        raise ValueError(f"average must be 'macro' or 'micro', not {average!r}")
    _check_lengths(y_pred, y_true)
    if not len(y_true):
        return 0.0
    return compute("f1", predictions=_labels(y_pred), references=_labels(y_true), average=average,
                   labels=None if labels is None else _labels(labels))["f1"]


def roc_auc(y_true: Sequence, y_score, labels: Sequence | None = None) -> float:
    """ROC AUC (scikit-learn) from probabilities.

    Binary: `y_score` is P(positive class) per example, or an (n, 2) array of class probabilities.
    Multi-class: an (n, n_classes) array of probabilities (rows summing to 1), columns in the order of
    `labels` (default: the sorted classes); scored one-vs-rest, macro-averaged. Multi-label: `y_true`
    rows of 0/1 indicators and `y_score` rows of per-label probabilities, macro-averaged.
    """
    import numpy as np

    scores = np.asarray(y_score, dtype=float)
    if scores.shape[0] != len(y_true):
        raise ValueError(f"{scores.shape[0]} score rows for {len(y_true)} labels")
    if not len(y_true):
        raise ValueError("ROC AUC is undefined when y_true holds a single class")
    return compute("roc_auc", references=_labels(y_true), prediction_scores=scores.tolist(),
                   labels=None if labels is None else _labels(labels))["roc_auc"]


def confusion_matrix(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None):
    """Counts (numpy array), rows = true class, columns = predicted class, in `labels` order (default sorted)."""
    import numpy as np

    _check_lengths(y_pred, y_true)
    if not len(y_true):
        size = 0 if labels is None else len(labels)
        return np.zeros((size, size), dtype=np.int64)
    return compute("confusion_matrix", predictions=_labels(y_pred), references=_labels(y_true),
                   labels=None if labels is None else _labels(labels))["confusion_matrix"]


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
    _check_lengths(y_pred, y_true)
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(t)} true tags")
    if not y_true:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    return compute("seqeval", predictions=[list(p) for p in y_pred], references=[list(t) for t in y_true],
                   strict=strict)


# ---------------------------------------------------------------- code


def pass_at_k_one(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem, 1 - C(n-c, k) / C(n, k), in the Codex paper's stable product form."""
    return python_module("pass_at_k").pass_at_k_one(n, c, k)


def pass_at_k(num_samples: Sequence[int] | int, num_correct: Sequence[int], ks: Sequence[int]) -> dict[int, float]:
    """Mean unbiased pass@k over problems, for every k in `ks`.

    `num_samples` (n per problem, or one n for all) and `num_correct` (c per problem). Every problem
    needs n >= k: a smaller n is an error naming the problem, never a silently biased number.
    """
    correct = list(num_correct)
    samples = [num_samples] * len(correct) if isinstance(num_samples, int) else list(num_samples)
    if len(samples) != len(correct):
        raise ValueError(f"{len(samples)} sample counts for {len(correct)} correct counts")
    for value in (*samples, *correct):  # the module's int64 features would truncate a float
        if not isinstance(value, int):
            import numpy as np

            if not isinstance(value, np.integer):
                raise TypeError(f"sample and correct counts must be integers, got {value!r}")
    result = compute("pass_at_k", samples=[int(n) for n in samples], correct=[int(c) for c in correct], ks=list(ks))
    return {k: result[f"pass@{k}"] for k in ks}


# ---------------------------------------------------------------- regression


def regression_metrics(y_true: Sequence[Sequence[float]], y_pred: Sequence[Sequence[float]],
                       names: Sequence[str] | None = None) -> dict[str, float]:
    """MSE and MAE (scikit-learn), Pearson and Spearman correlation (scipy) of rows of targets: averaged
    over the targets, and per target (`<name>_<metric>`) when there are several. A correlation is NaN
    when either side is constant (undefined, as scipy says)."""
    import numpy as np

    true, pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if true.shape != pred.shape or true.ndim != 2:
        raise ValueError(f"targets {true.shape} and predictions {pred.shape} must both be [examples, targets]")
    if not len(true):
        raise ValueError("regression metrics of no examples")
    return compute("regression", predictions=pred.tolist(), references=true.tolist(),
                   names=None if names is None else list(names))
