"""Task metrics beyond the demo's: each one against the field's reference implementation on fixed
inputs (sacrebleu, rouge-score, the official SQuAD v1.1 script, scikit-learn, seqeval, math.comb)."""

import collections
import math
import re
import string

import numpy as np
import pytest
import sacrebleu
import sklearn.metrics as skm
from rouge_score import rouge_scorer
from seqeval import metrics as seqeval_metrics
from seqeval.scheme import IOB2

from tunekit.metrics import (accuracy, chrf, classification_metrics, confusion_matrix, confusion_matrix_png,
                             entity_metrics, f1, pass_at_k, pass_at_k_one, roc_auc, rouge, squad_exact_match,
                             squad_f1, squad_normalize)

PREDICTIONS = [
    "The order ships on Monday.\nIt arrives on Friday.",
    "the cat sat on the mat",
    '{"status": "refunded", "amount": 12.5}',
    "Café crème costs 3 €, naïve price",
    "",
    "completely different words here",
]
REFERENCES = [
    "The order will ship on Monday.\nIt should arrive Friday.",
    "the cat is sitting on the mat",
    '{"status": "refunded", "amount": 12.5}',
    "Café crème costs 4 €, a naïve price",
    "an answer was expected",
    "nothing in common at all",
]


# ---------------------------------------------------------------- the official SQuAD v1.1 evaluation script
# (https://rajpurkar.github.io/SQuAD-explorer/, evaluate-v1.1.py), its functions copied verbatim.

def ref_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def ref_f1_score(prediction, ground_truth):
    prediction_tokens = ref_normalize_answer(prediction).split()
    ground_truth_tokens = ref_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def ref_exact_match_score(prediction, ground_truth):
    return (ref_normalize_answer(prediction) == ref_normalize_answer(ground_truth))


def ref_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


SQUAD_PREDICTIONS = ["Denver Broncos", "the Broncos!", "Santa Clara, California", "", "Ünïcode  Straße",
                     "an apple a day", "Levi's Stadium", "1,000 people", "A"]
SQUAD_REFERENCES = [["Denver Broncos", "The Denver Broncos"], ["Denver Broncos"], ["Levi's Stadium", "Santa Clara"],
                    ["nothing"], ["ünïcode straße"], ["apple day", "an orange"], ["Levi’s Stadium"],
                    ["1000 people", "thousand people"], ["the"]]


def squad_reference(predictions, references):
    em = [ref_metric_max_over_ground_truths(ref_exact_match_score, p, r) for p, r in zip(predictions, references)]
    f1s = [ref_metric_max_over_ground_truths(ref_f1_score, p, r) for p, r in zip(predictions, references)]
    return sum(em) / len(em), sum(f1s) / len(f1s)


# ---------------------------------------------------------------- generation


def test_chrf_is_sacrebleu_corpus_chrf():
    expected = sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score
    assert 0 < expected < 100
    assert chrf(PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-9)
    unicode = "Grüße aus Köln: naïve café, déjà vu — 東京 ok"
    assert chrf([unicode], [unicode]) == pytest.approx(100.0)
    assert chrf([""], ["an answer"]) == 0.0
    assert chrf(["", unicode], ["x", unicode]) == pytest.approx(sacrebleu.corpus_chrf(["", unicode], [["x", unicode]]).score)
    assert chrf([], []) == 0.0
    with pytest.raises(ValueError):
        chrf(["a", "b"], ["a"])


def test_rouge_is_rouge_score_with_stemming_and_lsum_splits_on_newlines():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    per_pair = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES)]
    scores = rouge(PREDICTIONS, REFERENCES)
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert scores[name] == pytest.approx(sum(s[name].fmeasure for s in per_pair) / len(per_pair), abs=1e-12)
        assert 0 < scores[name] < 1
    # Lsum: the LCS is taken per line (sentence) and unioned, so with lines in swapped order it differs from L.
    pred, ref = "the cat sat on the mat\na dog ran in the park", "a dog ran in the park\nthe cat sat on the mat"
    two = rouge([pred], [ref])
    assert two["rougeLsum"] == pytest.approx(1.0)
    assert two["rougeL"] < 0.75
    assert rouge([pred.replace("\n", " ")], [ref.replace("\n", " ")])["rougeLsum"] == pytest.approx(two["rougeL"])
    # Stemming, unicode, empty prediction.
    assert rouge(["running dogs"], ["run dog"])["rouge1"] == pytest.approx(1.0)
    assert rouge(["Grüße aus Köln naïve café"], ["Grüße aus Köln naïve café"])["rouge2"] == pytest.approx(1.0)
    assert rouge([""], ["an answer"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    assert rouge([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}


def test_squad_metrics_match_the_official_v1_1_script():
    expected_em, expected_f1 = squad_reference(SQUAD_PREDICTIONS, SQUAD_REFERENCES)
    assert 0 < expected_em < 1 and 0 < expected_f1 < 1 and expected_f1 > expected_em
    assert squad_exact_match(SQUAD_PREDICTIONS, SQUAD_REFERENCES) == pytest.approx(expected_em, abs=1e-12)
    assert squad_f1(SQUAD_PREDICTIONS, SQUAD_REFERENCES) == pytest.approx(expected_f1, abs=1e-12)
    for text in SQUAD_PREDICTIONS + [r for refs in SQUAD_REFERENCES for r in refs] + ["  The  AN a.  ", "thermal theatre"]:
        assert squad_normalize(text) == ref_normalize_answer(text)


def test_squad_metrics_take_the_best_reference_and_handle_edge_cases():
    # Multiple references: the max over them, not the mean or the first.
    assert squad_exact_match(["Denver Broncos"], [["Broncos", "the denver broncos."]]) == 1.0
    assert squad_f1(["Denver"], [["Denver Broncos", "Denver"]]) == 1.0
    assert squad_f1(["Denver"], [["Denver Broncos"]]) == pytest.approx(2 / 3)
    # A plain string is one reference; articles, case, punctuation and spacing do not count.
    assert squad_exact_match(["  THE Eiffel-Tower!! "], ["eiffeltower"]) == 1.0
    # Empty prediction (and one that normalises to nothing) scores 0, as in the v1.1 script.
    assert squad_exact_match([""], ["an answer"]) == 0.0 and squad_f1([""], ["an answer"]) == 0.0
    assert squad_f1(["the"], ["a"]) == ref_f1_score("the", "a") == 0
    assert squad_exact_match(["the"], ["a"]) == 1.0 == ref_exact_match_score("the", "a")
    assert squad_exact_match(["Straße"], ["STRASSE"]) == 0.0  # lower(), not casefold(), like the script
    assert squad_exact_match([], []) == 0.0 and squad_f1([], []) == 0.0
    with pytest.raises(ValueError):
        squad_f1(["a"], [[]])
    with pytest.raises(ValueError):
        squad_exact_match(["a", "b"], [["a"]])


# ---------------------------------------------------------------- classification

Y_TRUE = ["cat", "dog", "bird", "cat", "dog", "dog", "bird", "cat", "cat", "dog"]
Y_PRED = ["cat", "dog", "cat", "cat", "bird", "dog", "bird", "dog", "cat", "dog"]


def test_accuracy_and_f1_are_scikit_learns():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(skm.accuracy_score(Y_TRUE, Y_PRED)) == pytest.approx(0.7)
    macro, micro = f1(Y_TRUE, Y_PRED, "macro"), f1(Y_TRUE, Y_PRED, "micro")
    assert macro == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, average="macro"))
    assert micro == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, average="micro"))
    assert macro != pytest.approx(micro)  # macro weighs the rare class "bird" as much as the others
    assert micro == pytest.approx(accuracy(Y_TRUE, Y_PRED))  # single-label micro F1 is accuracy
    assert classification_metrics(Y_TRUE, Y_PRED) == {"accuracy": accuracy(Y_TRUE, Y_PRED), "f1_macro": macro,
                                                      "f1_micro": micro}
    # A class never predicted counts as F1 0 in the macro mean, without a warning turning into an error.
    assert f1([0, 1, 2], [0, 1, 1], "macro") == pytest.approx(skm.f1_score([0, 1, 2], [0, 1, 1], average="macro", zero_division=0))
    with pytest.raises(ValueError):
        f1(Y_TRUE, Y_PRED, "weighted")
    with pytest.raises(ValueError):
        accuracy([1, 2], [1])


def test_roc_auc_binary_and_multiclass_one_vs_rest():
    y = [0, 1, 1, 0, 1, 0, 0, 1]
    p = [0.1, 0.8, 0.35, 0.4, 0.9, 0.2, 0.7, 0.6]
    expected = skm.roc_auc_score(y, p)
    assert 0.5 < expected < 1
    assert roc_auc(y, p) == pytest.approx(expected)
    assert roc_auc(y, np.column_stack([1 - np.array(p), p])) == pytest.approx(expected)  # (n, 2) probabilities
    assert roc_auc(["neg", "pos", "pos", "neg"], [0.2, 0.9, 0.8, 0.1]) == 1.0  # string labels, sorted order
    # Multi-class from probabilities: macro one-vs-rest, columns in sorted class order.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=40)
    logits = rng.normal(size=(40, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert 0.5 < expected < 1
    assert roc_auc(labels, probs) == pytest.approx(expected)
    assert classification_metrics(labels, probs.argmax(axis=1), probs)["roc_auc"] == pytest.approx(expected)
    # Columns follow `labels` when given.
    names = np.array(["b", "a", "c"])[labels]
    assert roc_auc(names, probs, labels=["b", "a", "c"]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="single class"):  # scikit-learn only warns and returns nan
        roc_auc([1, 1, 1], [0.2, 0.5, 0.9])


def test_confusion_matrix_array_and_png(tmp_path):
    labels = ["bird", "cat", "dog"]
    matrix = confusion_matrix(Y_TRUE, Y_PRED, labels)
    assert np.array_equal(matrix, skm.confusion_matrix(Y_TRUE, Y_PRED, labels=labels))
    assert matrix.tolist() == [[1, 1, 0], [0, 3, 1], [1, 0, 3]]
    assert matrix.sum() == len(Y_TRUE) and np.trace(matrix) == 7
    path = tmp_path / "plots" / "confusion.png"
    confusion_matrix_png(path, matrix, labels, title="animals")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000
    import matplotlib.image
    assert matplotlib.image.imread(path).ndim == 3


# ---------------------------------------------------------------- sequence labelling

TAGS_TRUE = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["O", "B-ORG", "I-ORG", "I-ORG", "O", "B-PER"], ["O", "O"],
             ["B-LOC", "B-LOC", "O"]]
TAGS_PRED = [["B-PER", "I-PER", "O", "B-ORG", "O"], ["O", "I-ORG", "I-ORG", "I-ORG", "O", "B-PER"], ["O", "B-MISC"],
             ["B-LOC", "I-LOC", "O"]]


def test_entity_metrics_are_seqeval():
    default = entity_metrics(TAGS_TRUE, TAGS_PRED)
    assert default == pytest.approx({"precision": seqeval_metrics.precision_score(TAGS_TRUE, TAGS_PRED),
                                     "recall": seqeval_metrics.recall_score(TAGS_TRUE, TAGS_PRED),
                                     "f1": seqeval_metrics.f1_score(TAGS_TRUE, TAGS_PRED)})
    strict = entity_metrics(TAGS_TRUE, TAGS_PRED, strict=True)
    kwargs = {"mode": "strict", "scheme": IOB2}
    assert strict == pytest.approx({"precision": seqeval_metrics.precision_score(TAGS_TRUE, TAGS_PRED, **kwargs),
                                    "recall": seqeval_metrics.recall_score(TAGS_TRUE, TAGS_PRED, **kwargs),
                                    "f1": seqeval_metrics.f1_score(TAGS_TRUE, TAGS_PRED, **kwargs)})
    # Counted by hand: 6 true entities; default mode finds the I-ORG-started span, strict IOB2 does not.
    assert default["recall"] == pytest.approx(3 / 6) and default["precision"] == pytest.approx(3 / 6)
    assert strict["recall"] == pytest.approx(2 / 6) and strict["precision"] == pytest.approx(2 / 5)


def test_entity_metrics_edge_cases():
    perfect = entity_metrics(TAGS_TRUE, TAGS_TRUE)
    assert perfect == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    nothing = [["O"] * len(s) for s in TAGS_TRUE]
    assert entity_metrics(TAGS_TRUE, nothing) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert entity_metrics([["B-ÉTÉ", "I-ÉTÉ"]], [["B-ÉTÉ", "I-ÉTÉ"]])["f1"] == 1.0  # unicode entity types
    assert entity_metrics([], []) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match="sentence 0"):
        entity_metrics([["O", "B-PER"]], [["O"]])


# ---------------------------------------------------------------- pass@k


def closed_form(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_equals_the_closed_form_on_small_cases():
    for n in range(1, 13):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                assert pass_at_k_one(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values_and_mean_over_problems():
    assert pass_at_k_one(10, 0, 1) == 0.0 and pass_at_k_one(10, 0, 10) == 0.0  # c = 0
    assert pass_at_k_one(10, 10, 1) == 1.0 and pass_at_k_one(7, 7, 7) == 1.0  # c = n
    assert pass_at_k_one(5, 1, 5) == 1.0 and pass_at_k_one(5, 0, 5) == 0.0  # n = k: 1 if any correct
    assert pass_at_k_one(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    result = pass_at_k([10, 10, 10], [0, 3, 10], [1, 5, 10])
    assert result[1] == pytest.approx((0 + 0.3 + 1) / 3)
    assert result[5] == pytest.approx((0 + closed_form(10, 3, 5) + 1) / 3)
    assert result[10] == pytest.approx(2 / 3)
    assert pass_at_k(4, [1, 2], [2]) == {2: pytest.approx((closed_form(4, 1, 2) + closed_form(4, 2, 2)) / 2)}
    # Stable where the binomials overflow floats: n = 2000 (C(2000, 1000) ~ 1e600).
    assert pass_at_k_one(2000, 1, 1000) == pytest.approx(0.5)
    assert pass_at_k_one(2000, 100, 1000) == pytest.approx(closed_form(2000, 100, 1000), abs=1e-12)


def test_pass_at_k_refuses_too_few_samples_and_bad_counts():
    with pytest.raises(ValueError, match=r"pass@5 needs at least 5 samples per problem; problem\(s\) \[1\]"):
        pass_at_k([5, 3, 8], [1, 1, 1], [1, 5])
    with pytest.raises(ValueError):
        pass_at_k_one(3, 4, 1)  # more correct than samples
    with pytest.raises(ValueError):
        pass_at_k_one(3, 1, 0)
    with pytest.raises(ValueError):
        pass_at_k([], [], [1])
    with pytest.raises(ValueError):
        pass_at_k([2, 2], [1], [1])
