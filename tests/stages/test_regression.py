"""Sequence regression (tunekit/tasks/regression.py), the task kind added through the registry alone:
ingest of numeric targets (and the rejects of everything else), template, the metrics against scipy
and scikit-learn, and finetune -> merge -> evaluate through the real stage functions on tiny BERT and
Llama models with the real MiniLM and SmolLM2 tokenizers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics as skm

from stages import evaluate, finetune, forgetting, merge
from tests.tunekit.tasks.test_heads import bert_dir, llama_dir, minilm_tokenizer  # noqa: F401 (fixtures)
from tunekit.demo import generate_regression
from tunekit.ingest import Reject, TaskRecord, ingest, read_file
from tunekit.data import read_split, write_rows
from tunekit.io import read_json, read_jsonl
from tunekit.metrics import regression_metrics
from tunekit.params import EvaluateParams, FinetuneParams, ForgettingParams, MergeParams, TaskParams, TemplateParams
from tunekit.tasks.heads import TaskDataError, tokenize_task


def lines(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def test_ingest_keeps_numbers_and_rejects_every_other_target(tmp_path):
    path = lines(tmp_path / "scores.jsonl", [
        {"text": "fine", "target": 3},
        {"text_a": "a cat", "text_b": "a kitten", "target": 4.5},
        {"text": "two outputs", "target": [1.0, -2]},
        {"text": "quoted", "target": "4.0"},
        {"text": "yes", "target": True},
        {"text": "none", "target": None},
        '{"text": "not a number", "target": NaN}',
        {"text": "empty", "target": []},
        {"text": "one bad of two", "target": [1.0, "x"]},
    ])
    items = list(read_file(path, task="regression"))
    kept = [item for item in items if isinstance(item, TaskRecord)]
    assert [item.fields["target"] for item in kept] == [3.0, 4.5, [1.0, -2.0]]
    assert kept[1].fields["text_a"] == "a cat" and all(item.task == "regression" for item in kept)
    rejects = {item.line: (item.reason, item.detail) for item in items if isinstance(item, Reject)}
    assert rejects[4][0] == "not_a_number" and "without quotes" in rejects[4][1]
    assert [rejects[n][0] for n in (5, 6, 7, 8, 9)] == ["not_a_number", "not_a_number", "not_a_number", "empty_content",
                                                        "not_a_number"]
    assert "target[1]" in rejects[9][1] and "finite" in rejects[7][1]
    with pytest.raises(Exception, match="set task.type: regression"):  # regression data is no classification data
        ingest(path, tmp_path / "out", task="classification")


def test_demo_regression_data_ingests_and_tokenises(minilm_tokenizer, tmp_path):  # noqa: F811
    rows = generate_regression(60, 7)
    assert rows == generate_regression(60, 7) and len({r["target"] for r in rows}) >= 5
    assert all(1.0 <= r["target"] <= 5.0 for r in rows)
    metrics = ingest(lines(tmp_path / "raw.jsonl", rows), tmp_path / "ingested", task="regression")
    assert metrics["rejected"] == 0 and metrics["accepted"] == 60
    for folder in ("tokenized", "preview"):
        (tmp_path / folder).mkdir()
    stats = tokenize_task("regression", TaskParams(type="regression", labels=["rating"]), 32, minilm_tokenizer,
                          tmp_path / "ingested", tmp_path / "tokenized", tmp_path / "preview")
    assert read_json(tmp_path / "tokenized" / "labels.json")["labels"] == ["rating"]
    assert stats["task"] == "regression" and 1.0 <= stats["train"]["target_mean"] <= 5.0
    records = {r["id"]: r for r in read_split(tmp_path / "ingested", "train")}
    for row in read_split(tmp_path / "tokenized", "train"):
        assert row["labels"] == [records[row["id"]]["target"]] and "token_type_ids" in row
    assert "target: rating" in (tmp_path / "preview" / "mask_preview.html").read_text()


def test_rows_must_have_the_train_splits_number_of_targets(minilm_tokenizer, tmp_path):  # noqa: F811
    data = tmp_path / "ingested"
    data.mkdir()
    write_rows(data / "train", [{"id": "a", "task": "regression", "text": "x", "target": [1.0, 2.0]}])
    write_rows(data / "validation", [{"id": "b", "task": "regression", "text": "y", "target": 1.0, "source": "raw:4"}])
    write_rows(data / "test", [])
    for folder in ("out", "preview"):
        (tmp_path / folder).mkdir()
    with pytest.raises(TaskDataError, match=r"validation:1 \(from raw:4\): target has 1 value\(s\) but the targets "
                                            r"are \['target_0', 'target_1'\]"):
        tokenize_task("regression", TaskParams(type="regression"), 32, minilm_tokenizer, data, tmp_path / "out",
                      tmp_path / "preview")
    with pytest.raises(TaskDataError, match=r"task.labels \['a'\] names 1 target\(s\) but the rows"):
        tokenize_task("regression", TaskParams(type="regression", labels=["a"]), 32, minilm_tokenizer, data,
                      tmp_path / "out", tmp_path / "preview")


def test_metrics_are_scipys_and_scikit_learns():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(50, 2))
    pred = true + rng.normal(scale=0.5, size=(50, 2))
    metrics = regression_metrics(true.tolist(), pred.tolist(), ["a", "b"])
    for i, name in enumerate("ab"):
        assert metrics[f"{name}_mse"] == pytest.approx(skm.mean_squared_error(true[:, i], pred[:, i]))
        assert metrics[f"{name}_mae"] == pytest.approx(np.abs(true[:, i] - pred[:, i]).mean())
        assert metrics[f"{name}_pearson"] == pytest.approx(np.corrcoef(true[:, i], pred[:, i])[0, 1])
        assert metrics[f"{name}_spearman"] == pytest.approx(scipy.stats.spearmanr(true[:, i], pred[:, i]).statistic)
    assert metrics["mse"] == pytest.approx((metrics["a_mse"] + metrics["b_mse"]) / 2)
    one = regression_metrics([[1.0], [2.0], [3.0]], [[1.0], [2.0], [2.0]])
    assert set(one) == {"mse", "mae", "pearson", "spearman"} and one["mse"] == pytest.approx(1 / 3)
    assert math.isnan(regression_metrics([[1.0], [2.0]], [[0.0], [0.0]])["pearson"])  # constant: undefined


def scored_rows(tokenizer, tmp_path: Path) -> tuple[Path, Path]:
    """A memorisable set in every split: a word's number is its target."""
    records = [{"id": f"reg-{i}", "task": "regression", "text": f"the {word} costs", "target": float(value)}
               for i, (word, value) in enumerate([("apple", 1), ("truck", 4), ("horse", 2), ("mango", 5), ("boat", 3),
                                                  ("tiger", 1.5), ("train", 4.5), ("rabbit", 2.5)])]
    ingested, out, preview = tmp_path / "ingested", tmp_path / "tokenized", tmp_path / "preview"
    for folder in (ingested, out, preview):
        folder.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        write_rows(ingested / split, records)
    tokenize_task("regression", TaskParams(type="regression"), 32, tokenizer, ingested, out, preview)
    return ingested, out


CASES = [("bert", "mse", "lora"), ("llama", "huber", "lora"), ("bert", "mse", "full")]


@pytest.mark.parametrize("arch,loss,method", CASES, ids=["-".join(case) for case in CASES])
def test_finetune_merge_evaluate_stages(arch, loss, method, bert_dir, llama_dir, minilm_tokenizer, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    base = bert_dir if arch == "bert" else llama_dir
    tokenizer = minilm_tokenizer if arch == "bert" else AutoTokenizer.from_pretrained(str(llama_dir))  # SmolLM2's, saved beside it
    ingested, data = scored_rows(tokenizer, tmp_path)
    # mean pooling on the random tiny BERT: its first token says too little for a regression on one word
    task = TaskParams(type="regression", loss=loss, pooling="mean" if arch == "bert" else "auto")
    params = FinetuneParams(method=method, epochs=60, lr=1e-2 if method == "lora" else 3e-3, batch_size=8, eval_every=20,
                            checkpoint_every=1000, early_stopping_patience=None, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    out = tmp_path / "finetune"
    metrics, curves = finetune.run(params, 0, base, data, out, tmp_path / "plots", tmp_path / "ckpts", 32, task)
    meta = read_json(out / "meta.json")
    assert meta["task"]["type"] == "regression" and meta["task"]["loss"] == loss and meta["task"]["labels"] == ["target"]
    assert meta["task"]["pooling"] == ("mean" if arch == "bert" else "last")
    assert curves["history"][-1]["train_loss"] < curves["history"][0]["train_loss"] / 4
    assert "trained_loss_units" in metrics

    merged = tmp_path / "merged"
    checked = merge.run(MergeParams(registered_model=None, check_examples=8), out, data, merged)
    assert checked["merged"] == 1 and checked["predictions_identical"] == 1 and checked["max_logit_difference"] <= 1e-3
    card = (merged / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "load_task_model(Path(" in card

    results = evaluate.run(EvaluateParams(batch_size=8), TemplateParams(), out, ingested, data, tmp_path / "report",
                           merged, task=task)
    assert results["task"] == "regression" and set(results) >= {"base", "tuned", "merged", "delta"}
    assert results["tuned"]["mse"] < results["base"]["mse"] / 4 and results["tuned"]["pearson"] > 0.9, results
    assert results["merged"]["mse"] == pytest.approx(results["tuned"]["mse"], abs=1e-4)
    first = next(read_jsonl(tmp_path / "report" / "predictions_tuned.jsonl"))
    assert isinstance(first["prediction"], float) and isinstance(first["reference"], float)
    skipped = forgetting.run(ForgettingParams(), out, merged, tmp_path / "forgetting", tmp_path / "cache")
    assert skipped["measured"] == 0 and "regression" in skipped["reason"]


def test_general_text_is_refused_for_regression(bert_dir, minilm_tokenizer, tmp_path):  # noqa: F811
    _, data = scored_rows(minilm_tokenizer, tmp_path)
    with pytest.raises(SystemExit, match="task.type regression: .*set finetune.replay.ratio: 0"):
        finetune.run(FinetuneParams(replay={"ratio": 0.2}), 0, bert_dir, data, tmp_path / "out", tmp_path / "p",
                     tmp_path / "c", 32, TaskParams(type="regression"))
