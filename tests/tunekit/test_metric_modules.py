"""The metrics as `evaluate` modules: each built-in module, loaded by path with plain `evaluate.load`,
gives what its reference library gives when called directly; tunekit loads them offline into a private
directory outside the project (a read-only copy of the code works); users' modules and hub names in
`evaluate.metrics` are validated with errors naming the key and the file."""

import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import evaluate
import numpy as np
import pytest
import sacrebleu
import sklearn.metrics as skm
import yaml
from rouge_score import rouge_scorer
from scipy.stats import pearsonr, spearmanr
from seqeval import metrics as seqeval_metrics

from tunekit import metric_modules, metrics
from tunekit.generate import score_generations
from tunekit.metric_modules import BUILTIN, MetricModuleError, builtin_path
from tunekit.params import EvaluateParams, ParamsError, validate_section

from tests.conftest import REPO
FIXTURES = REPO / "tests" / "fixtures" / "metric_modules"

PREDICTIONS = ["The order ships on Monday.\nIt arrives Friday.", "the cat sat on the mat", '{"a": 1}',
               "Café crème costs 3 €", "", "completely different words"]
REFERENCES = ["The order will ship on Monday.\nIt should arrive Friday.", "the cat is sitting on the mat", '{"a": 1}',
              "Café crème costs 4 €, a naïve price", "an answer was expected", "nothing in common at all"]
Y_TRUE = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1]
Y_PRED = [0, 2, 2, 2, 1, 0, 1, 2, 0, 1]
TAGS_TRUE = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"], ["I-LOC", "O"]]
TAGS_PRED = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "I-ORG"], ["B-LOC", "O"]]


def rouge_reference(types):
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES)]
    return {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in types}


def regression_reference(t, p):
    t, p = np.asarray(t, dtype=float)[:, 0], np.asarray(p, dtype=float)[:, 0]
    return {"mse": skm.mean_squared_error(t, p), "mae": skm.mean_absolute_error(t, p),
            "pearson": pearsonr(t, p).statistic, "spearman": spearmanr(t, p).statistic}


# (module, compute inputs, what the reference library gives called directly)
CASES = {
    "exact_match": ({"predictions": PREDICTIONS, "references": REFERENCES},
                    {"exact_match": sum(p.strip() == r.strip() for p, r in zip(PREDICTIONS, REFERENCES)) / 6}),
    "bleu": ({"predictions": PREDICTIONS, "references": REFERENCES},
             {"bleu": sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score}),
    "chrf": ({"predictions": PREDICTIONS, "references": REFERENCES},
             {"chrf": sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score}),
    "rouge": ({"predictions": PREDICTIONS, "references": REFERENCES},
              rouge_reference(("rouge1", "rouge2", "rougeL", "rougeLsum"))),
    "accuracy": ({"predictions": Y_PRED, "references": Y_TRUE}, {"accuracy": skm.accuracy_score(Y_TRUE, Y_PRED)}),
    "f1": ({"predictions": Y_PRED, "references": Y_TRUE, "average": "micro"},
           {"f1": skm.f1_score(Y_TRUE, Y_PRED, average="micro")}),
    "roc_auc": ({"references": [0, 1, 1, 0, 1, 0], "prediction_scores": [0.1, 0.8, 0.4, 0.35, 0.9, 0.6]},
                {"roc_auc": skm.roc_auc_score([0, 1, 1, 0, 1, 0], [0.1, 0.8, 0.4, 0.35, 0.9, 0.6])}),
    "seqeval": ({"predictions": TAGS_PRED, "references": TAGS_TRUE},
                {"precision": seqeval_metrics.precision_score(TAGS_TRUE, TAGS_PRED),
                 "recall": seqeval_metrics.recall_score(TAGS_TRUE, TAGS_PRED),
                 "f1": seqeval_metrics.f1_score(TAGS_TRUE, TAGS_PRED)}),
    "regression": ({"predictions": [[0.9], [2.2], [2.8], [4.5]], "references": [[1.0], [2.0], [3.0], [4.0]]},
                   regression_reference([[1.0], [2.0], [3.0], [4.0]], [[0.9], [2.2], [2.8], [4.5]])),
    "pass_at_k": ({"samples": [10, 10, 4], "correct": [0, 3, 4], "ks": [1, 2]},
                  {"pass@1": (0 + 0.3 + 1) / 3, "pass@2": (0 + (1 - 21 / 45) + 1) / 3}),
}


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    # One directory for the whole module: Python imports evaluate's `evaluate_modules` package once per
    # process, from the first directory it is created in.
    return tmp_path_factory.mktemp("hf-modules")


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_module_loaded_by_path_with_evaluate_load_is_its_reference_library(name, modules_cache, tmp_path,
                                                                                monkeypatch):
    # A user's own `evaluate.load(path)` (evaluate's default directories, pointed away from the project).
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", modules_cache)
    inputs, expected = CASES[name]
    module = evaluate.load(str(builtin_path(name)), cache_dir=str(tmp_path / "data"))
    result = module.compute(**inputs)
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(float(value), abs=1e-12), key
    # The same module through tunekit's loader (private directory, in memory) gives the same numbers.
    assert metric_modules.compute(name, **inputs) == pytest.approx(result, abs=1e-12)


def test_squad_and_confusion_matrix_modules_are_the_reference():
    squad = metric_modules.compute("squad", predictions=["The Cat!", "a dog", "x"],
                                   references=[["cat", "the cat sat"], ["dog"], ["y z"]])
    assert squad == {"exact_match": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3)}
    matrix = metric_modules.compute("confusion_matrix", predictions=Y_PRED, references=Y_TRUE, labels=[2, 1, 0])
    assert (matrix["confusion_matrix"] == skm.confusion_matrix(Y_TRUE, Y_PRED, labels=[2, 1, 0])).all()
    # Multi-label ROC AUC goes through the same module: indicator rows in, macro over labels out.
    rows, scores = [[1, 0], [0, 1], [1, 1], [0, 0]], [[0.9, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.1]]
    assert metrics.roc_auc(rows, scores) == pytest.approx(skm.roc_auc_score(rows, scores, average="macro"))


def test_every_built_in_is_a_module_file_with_one_import_per_line():
    for name in BUILTIN:
        source = builtin_path(name).read_text(encoding="utf-8")
        imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
        assert imports and all("," not in line for line in imports), name  # evaluate's loader parses each line
        assert "subprocess" not in source and "exec(" not in source and "tunekit" not in source.split('"""', 2)[2]


@pytest.mark.skipif(bool(os.environ.get("HF_MODULES_CACHE")), reason="HF_MODULES_CACHE set: the user chose the directory")
def test_modules_load_outside_the_project_and_are_cached_per_process():
    first, _ = metric_modules.load("bleu")
    assert metric_modules.load("bleu")[0] is first and metric_modules.load(builtin_path("bleu"))[0] is first
    copied = Path(sys.modules[type(first).__module__].__file__).resolve()
    assert REPO not in copied.parents and copied.name == "bleu.py"
    # <private>/modules/tunekit_evaluate_modules/metrics/bleu/<hash>/bleu.py, <private> made by mkdtemp
    assert copied.parents[5].name.startswith("tunekit-evaluate-") and copied.parents[5].stat().st_mode & 0o077 == 0


def test_threads_share_the_loaded_modules_safely():
    pairs = [(PREDICTIONS[i:] + PREDICTIONS[:i], REFERENCES) for i in range(6)]
    expected = [sacrebleu.corpus_bleu(p, [r]).score for p, r in pairs] * 4
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda pr: metrics.bleu(*pr), pairs * 4))
    assert got == pytest.approx(expected, abs=1e-9)


def test_a_read_only_copy_of_the_code_scores_offline_and_writes_nothing_into_it(tmp_path):
    code = tmp_path / "clone"
    shutil.copytree(REPO / "tunekit", code / "tunekit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(FIXTURES / "overlap.py", code / "overlap.py")
    home = tmp_path / "home"
    home.mkdir()
    for path in [code, *code.rglob("*"), home]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    script = textwrap.dedent("""
        from tunekit.generate import score_generations
        from tunekit.metrics import bleu, pass_at_k
        print(round(bleu(["a b c d e"], ["a b c d e"]), 6), pass_at_k([4], [2], [1])[1])
        corpus, _ = score_generations([["the cat sat"]], ["the cat"], ["exact_match", "overlap.py"])
        print(corpus["overlap"], corpus["overlap_length_ratio"])
    """)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(code),
           "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=code, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split() == ["100.0", "0.5", "1.0", "1.5"]
        assert sorted(p.name for p in code.iterdir()) == ["overlap.py", "tunekit"]
        assert not list(home.iterdir())
    finally:
        for path in [code, *code.rglob("*"), home]:
            path.chmod(0o755 if path.is_dir() else 0o644)


# ---------------------------------------------------------------- users' modules and hub names


def test_a_users_module_file_scores_beside_the_built_ins():
    corpus, per_sample = score_generations([["the cat sat"], ["on a mat"]], ["the cat", "on the mat"],
                                           ["exact_match", str(FIXTURES / "overlap.py")])
    assert corpus == {"exact_match": 0.0, "overlap": pytest.approx((1 + 2 / 3) / 2),
                      "overlap_length_ratio": pytest.approx((3 / 2 + 1) / 2)}
    assert per_sample[0][0] == {"exact_match": 0.0, "overlap": 1.0, "overlap_length_ratio": 1.5}
    # A directory holding <dir>.py names the module too (evaluate's rule).
    with pytest.raises(MetricModuleError, match=r"evaluate.metrics\[1\] = '.*raises' \(.*raises/raises.py\): .*"
                                                r"ZeroDivisionError: the user's bug"):
        score_generations([["a"]], ["a"], ["bleu", str(FIXTURES / "raises")])


def test_a_users_module_with_a_non_numeric_result_is_refused_naming_key_and_file():
    with pytest.raises(MetricModuleError, match=r"params.yaml: evaluate.metrics\[0\] = '.*wordy.py' \(.*wordy.py\): "
                                                r"compute returned non-numeric value\(s\) \{'verdict': 'str'\}"):
        score_generations([["a"]], ["a"], [str(FIXTURES / "wordy.py")])


def test_a_hub_metric_offline_is_a_clear_error_pointing_to_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert EvaluateParams(metrics=["hub:meteor"]).metrics == ["hub:meteor"]  # valid params: online it loads
    with pytest.raises(MetricModuleError, match=r"hub:meteor is a Hugging Face Hub metric, and this process is "
                                                r"offline \(HF_HUB_OFFLINE.*\).*name that file instead"):
        metric_modules.load("hub:meteor")


def test_params_accept_module_files_and_refuse_bad_entries_naming_the_key(tmp_path, monkeypatch):
    user = tmp_path / "metrics_user"
    user.mkdir()
    shutil.copy(FIXTURES / "overlap.py", user / "overlap.py")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"metrics": ["bleu", "metrics_user/overlap.py"]}}))
    monkeypatch.chdir(tmp_path)  # stages run from the project root: relative paths are the project's
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())["evaluate"]
    assert validate_section("evaluate", raw, EvaluateParams).metrics == ["bleu", "metrics_user/overlap.py"]
    corpus, _ = score_generations([["x y"]], ["x"], validate_section("evaluate", raw, EvaluateParams).metrics)
    assert corpus["overlap"] == 1.0 and corpus["overlap_length_ratio"] == 2.0

    with pytest.raises(ParamsError) as info:
        validate_section("evaluate", {"metrics": ["rogue_l", "metrics_user/missing.py", "metrics_user", "hub:"]},
                         EvaluateParams)
    message = str(info.value)
    assert "4 problem(s)" in message
    assert "evaluate.metrics.0: value 'rogue_l': Value error, unknown metric 'rogue_l'; did you mean rouge_l?" in message
    assert ("evaluate.metrics.1: value 'metrics_user/missing.py': Value error, no metric module file "
            f"metrics_user/missing.py (from {tmp_path})") in message
    assert "evaluate.metrics.2: value 'metrics_user'" in message and "metrics_user/metrics_user.py" in message
    assert "evaluate.metrics.3: value 'hub:'" in message and "hub:meteor" in message


def test_per_sample_scores_without_the_arrow_round_trip_are_the_same_numbers():
    names = ["exact_match", "bleu", "rouge_l", "chrf", "rouge", "squad", str(FIXTURES / "overlap.py")]
    _, per_sample = score_generations([[p] for p in PREDICTIONS], REFERENCES, names)
    for (p, r), scores in zip(zip(PREDICTIONS, REFERENCES), per_sample):
        corpus, _ = score_generations([[p]], [r], names)  # compute through evaluate on the one pair
        assert scores[0] == pytest.approx(corpus, abs=1e-12)
        assert scores[0]["bleu"] == pytest.approx(sacrebleu.corpus_bleu([p], [[r]]).score, abs=1e-9)


def test_multi_label_rows_score_as_scikit_learn_scores_indicator_arrays():
    true, pred = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 1]]
    scores = [[0.9, 0.2, 0.4], [0.1, 0.8, 0.3], [0.7, 0.45, 0.2], [0.3, 0.6, 0.9]]
    got = metrics.classification_metrics(true, pred, scores)
    assert got == pytest.approx({"accuracy": skm.accuracy_score(true, pred),
                                 "f1_macro": skm.f1_score(true, pred, average="macro", zero_division=0),
                                 "f1_micro": skm.f1_score(true, pred, average="micro", zero_division=0),
                                 "roc_auc": skm.roc_auc_score(true, scores, average="macro")}, abs=1e-12)
    assert got["accuracy"] == 0.25  # subset accuracy: only the second row is right throughout
