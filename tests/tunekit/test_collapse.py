"""The guards against a collapsed task head (issue 16; tunekit/collapse.py and each kind's `collapse` and
`prior_loss`), class-weighted token classification, and per-class scores (tunekit/per_class.py).

Tiny BERT models are built from a config (tests/tunekit/tasks/test_heads.py); a collapsed model is one whose classifier
bias is set so that one label wins everywhere; a good one is trained on the memorisable sets."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from seqeval.metrics import classification_report as seqeval_report
from sklearn.metrics import classification_report as sklearn_report
from sklearn.utils.class_weight import compute_class_weight

from tests.tunekit.tasks import test_heads
from tunekit.collapse import prior_check, prior_cross_entropy
from tunekit.data import read_split
from tunekit.io import read_json
from tunekit.params import CollapseParams, ParamsError, EvaluateParams, FinetuneParams, TaskParams, TemplateParams, validate_section
from tunekit.tasks import qa, regression, token_classification
from tunekit.tasks.heads import (TaskObjective, TaskSpec, collate_task, load_task_base, resolve_class_weights, score_task,
                                 task_spec)
from tunekit.modeling import forward
from tunekit.train import TrainConfig, train

PARAMS = CollapseParams()
bert_dir, minilm_tokenizer, tokenized = test_heads.bert_dir, test_heads.minilm_tokenizer, test_heads.tokenized  # fixtures


def _spec(data, task: str, **fields) -> TaskSpec:
    info = read_json(data / "labels.json")
    return TaskSpec(task, tuple(info["labels"]), info["multi_label"], **fields)


def _force(model: torch.nn.Module, spec: TaskSpec, label: str) -> torch.nn.Module:
    """The head made to predict `label` for every input: zero weights, a bias that picks it."""
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[spec.labels.index(label)] = 10.0
    return model


def _train(model, spec, rows, pad_id, tmp_path, epochs=60):
    cfg = TrainConfig(epochs=epochs, lr=3e-3, batch_size=8, schedule="constant", eval_every=1000, checkpoint_every=1000,
                      objective=TaskObjective(spec))
    train(model, rows, [], cfg, pad_id, tmp_path / "ckpt")
    return model


# ---------------------------------------------------------------- evaluate: the collapse check


@pytest.mark.parametrize("task,label", [("classification", "fruit"), ("token_classification", "O"),
                                        ("token_classification", "B-LOC")])
def test_collapse_fires_on_a_collapsed_model_and_stays_quiet_on_a_trained_one(task, label, bert_dir, minilm_tokenizer,
                                                                               tmp_path, caplog):
    ingested, data = tokenized(task, minilm_tokenizer, tmp_path)
    spec = _spec(data, task)
    rows, records = list(read_split(data, "test")), list(read_split(ingested, "test"))
    pad = minilm_tokenizer.pad_token_id
    collapsed = _force(load_task_base(bert_dir, spec), spec, label)
    with caplog.at_level(logging.INFO, logger="tunekit"):
        metrics, _, _ = score_task(collapsed, spec, rows, records, pad, 16, "tuned", TaskParams(type=task))
    assert metrics["collapsed"] == 1, metrics["collapse"]
    check = metrics["collapse"]
    assert check["label"] == label and check["prediction_share"] == 1.0
    assert check["predicted"] == {label: 1.0}
    assert label in check["reason"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "COLLAPSED" in r.getMessage()]
    assert len(warnings) == 1 and label in warnings[0].getMessage()
    if task == "token_classification":
        assert check["reference_entities"] == 24 and check["predicted_entities"] == (0 if label == "O" else 60)
        if label == "O":  # O is 60 % of the words: both rules fire, and the reason names the missing entities
            assert "predicts 0 entities where the references hold 24" in check["reason"]

    # the untrained head scored as `base`: the same finding, told as an info line (untrained heads often are)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunekit"):
        base, _, _ = score_task(collapsed, spec, rows, records, pad, 16, "base", TaskParams(type=task))
    assert base["collapsed"] == 1 and not [r for r in caplog.records if r.levelno >= logging.WARNING]

    good = _train(load_task_base(bert_dir, spec), spec, list(read_split(data, "train")), pad, tmp_path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunekit"):
        metrics, _, _ = score_task(good, spec, rows, records, pad, 16, "tuned", TaskParams(type=task))
    assert metrics["collapsed"] == 0 and metrics["collapse"]["reason"] is None, metrics["collapse"]
    assert metrics["collapse"]["prediction_share"] < 0.95
    assert not [r for r in caplog.records if "COLLAPSED" in r.getMessage()]


def test_token_classification_share_rule_and_entity_rule_on_skewed_references():
    """94 % O in the references (issue 16's data): predicting O everywhere passes the share rule (O is over
    reference_share of the references) but fails the entity rule; a model finding most entities passes both."""
    reference = [["O"] * 15 + ["B-PER"]] * 50  # 50 sentences, 16 words, one entity each: O is 94 %
    rows = [{"reference": r, "prediction": ["O"] * 16} for r in reference]
    check = token_classification.collapse(rows, None, PARAMS)
    assert check["collapsed"] == 1 and check["reference_share"] == pytest.approx(15 / 16)
    assert check["reference_entities"] == 50 and check["predicted_entities"] == 0
    assert check["reason"].startswith("predicts 0 entities where the references hold 50")
    found = [{"reference": r, "prediction": r if i % 5 else ["O"] * 16} for i, r in enumerate(reference)]  # 80 % found
    assert token_classification.collapse(found, None, PARAMS)["collapsed"] == 0
    # the threshold is a knob: at entity_ratio 0.9 finding 80 % of the entities is not enough
    assert token_classification.collapse(found, None, CollapseParams(entity_ratio=0.9))["collapsed"] == 1


def test_qa_and_regression_collapse():
    answers = [{"reference": ["Lyon"] if i % 4 else [], "prediction": ""} for i in range(40)]  # 75 % answerable
    check = qa.collapse(answers, None, PARAMS)
    assert check["collapsed"] == 1 and check["label"] == qa.NO_ANSWER and "(no answer)" in check["reason"]
    answered = [{**row, "prediction": "Lyon"} for row in answers]
    assert qa.collapse(answered, None, PARAMS)["collapsed"] == 0  # always answering is not the null collapse

    spec = TaskSpec("regression", ("rating",))
    targets = [1.0 + (i % 5) for i in range(30)]
    constant = [{"reference": t, "prediction": 3.03 + 0.001 * (i % 2)} for i, t in enumerate(targets)]
    check = regression.collapse(constant, spec, PARAMS)
    assert check["collapsed"] == 1 and "3.03" in check["reason"]
    assert check["spread"]["rating"]["reference_std"] == pytest.approx(math.sqrt(2.0))
    tracking = [{"reference": t, "prediction": 0.9 * t + 0.3} for t in targets]
    assert regression.collapse(tracking, spec, PARAMS)["collapsed"] == 0


def test_collapse_params_are_validated():
    with pytest.raises(ParamsError, match="prediction_share 0.7 must be above reference_share 0.8"):
        validate_section("task", {"type": "classification", "collapse": {"prediction_share": 0.7}}, TaskParams)
    params = validate_section("task", {"type": "multi_task", "collapse": {"entity_ratio": 0.2}, "tasks": {
        "ner": {"type": "token_classification", "inputs": "x.conll"}}}, TaskParams)
    assert params.subtask("ner").collapse.entity_ratio == 0.2  # every task of a multi-task run gets task.collapse


# ---------------------------------------------------------------- the stages: evaluate's report, metrics and MLflow


def test_evaluate_stage_reports_a_collapsed_checkpoint(bert_dir, minilm_tokenizer, tmp_path):
    from stages import evaluate, finetune

    ingested, data = tokenized("token_classification", minilm_tokenizer, tmp_path)
    task = TaskParams(type="token_classification")
    params = FinetuneParams(method="full", epochs=1, lr=1e-6, batch_size=8, eval_every=10, checkpoint_every=10)
    out = tmp_path / "finetune"
    finetune.run(params, 0, bert_dir, data, out, tmp_path / "plots", tmp_path / "ckpts", 64, task)
    weights = load_file(out / "model.safetensors")
    labels = read_json(out / "meta.json")["task"]["labels"]
    weights["classifier.weight"].zero_()
    weights["classifier.bias"].zero_()
    weights["classifier.bias"][labels.index("O")] = 10.0  # the tuned model predicts O for every word
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})

    report = tmp_path / "report"
    results = evaluate.run(EvaluateParams(batch_size=8), TemplateParams(), out, ingested, data, report, None, task=task)
    assert results["tuned"]["collapsed"] == 1 and results["tuned"]["entity_f1"] == 0.0
    assert results["tuned"]["collapse"]["predicted"] == {"O": 1.0}
    assert evaluate.collapsed_models(results) == ["tuned"]  # the MLflow tag: trained models only
    text = (report / "report.md").read_text()
    assert ("> **Warning: the tuned model collapsed**: it predicts 'O' for 100% of 60 words, while 'O' is 60% of the "
            "references") in text and "it predicts 0 entities where the references hold 24" in text
    assert "## Collapse check" in text and "| tuned | **yes** | O | 100.0% | 60.0% | O 100%" in text
    assert "## Per-class scores" in text and "| PER |" in text and "| LOC |" in text
    assert "collapsed" not in results["delta"]  # a flag, not a score to subtract

    import mlflow

    from tunekit.tracking import log_metrics

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("collapse")  # not an experiment id left active by an earlier test's store
    with mlflow.start_run() as run:
        log_metrics(mlflow, {k: v for k, v in results.items() if k != "checkpoints"})
        mlflow.set_tag("collapsed", ", ".join(evaluate.collapsed_models(results)) or "none")
    logged = mlflow.get_run(run.info.run_id).data
    assert logged.metrics["tuned.collapsed"] == 1.0 and logged.tags["collapsed"] == "tuned"
    assert logged.metrics["tuned.collapse.predicted.O"] == 1.0
    assert logged.metrics["tuned.per_class.PER.support"] == 12.0
    assert logged.metrics["tuned.collapse.prediction_share"] == 1.0


def test_log_metrics_makes_label_names_valid_mlflow_names(tmp_path):
    import mlflow

    from tunekit.tracking import log_metrics, metric_name

    assert metric_name("tuned.per_class.ship?.f1") == "tuned.per_class.ship_.f1"
    assert metric_name("tuned.collapse.predicted.a+b") == "tuned.collapse.predicted.a_b"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("collapse")  # not an experiment id left active by an earlier test's store
    with mlflow.start_run() as run:
        log_metrics(mlflow, {"tuned": {"per_class": {"où?": {"f1": 0.5}, "..": {"f1": 0.25}}}})
    assert mlflow.get_run(run.info.run_id).data.metrics == {"tuned.per_class.où_.f1": 0.5, "tuned.per_class._.f1": 0.25}


# ---------------------------------------------------------------- finetune: the label-prior warning


def test_prior_cross_entropy_is_the_loss_of_the_best_constant_prediction():
    counts = [60.0, 30.0, 10.0]
    entropy = -sum(c / 100 * math.log(c / 100) for c in counts)
    assert prior_cross_entropy(counts) == pytest.approx(entropy)
    # with class weights: the weighted CE (sum w_y * -log q_y / units) of the best constant q, found numerically
    weights = [0.5, 1.0, 4.0]
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    logits = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits.expand(100, 3), labels, weight=torch.tensor(weights),
                                                 reduction="sum") / 100
        loss.backward()
        return loss

    optimizer.step(closure)
    assert prior_cross_entropy(counts, weights) == pytest.approx(float(closure().detach()), rel=1e-4)


def test_prior_check_semantics():
    evals = [{"step": 10, "val_loss": 0.40}, {"step": 20, "val_loss": 0.38}, {"step": 40, "val_loss": 0.20}]
    late = prior_check(evals, 40, 0.38, PARAMS)  # below only after half of training
    assert late["checked"] == 1 and late["below"] == 0 and late["step"] == 20 and late["best_final"] == 0.20
    assert "0.38 at best by step 20 of 40 (50% of training" in late["reason"] and "task.class_weights" in late["reason"]
    assert prior_check(evals, 40, 0.38, CollapseParams(check_after=1.0))["below"] == 1
    assert prior_check(evals, 40, 0.38, CollapseParams(check_after=None))["checked"] == 0
    assert prior_check([], 40, 0.38, PARAMS)["checked"] == 0


@pytest.mark.parametrize("lr,below", [(1e-7, 0), (5e-3, 1)])
def test_finetune_warns_when_val_loss_stays_at_the_label_prior(lr, below, bert_dir, minilm_tokenizer, tmp_path, caplog):
    from stages import finetune

    _, data = tokenized("token_classification", minilm_tokenizer, tmp_path)
    train_rows = list(read_split(data, "train"))
    labels = read_json(data / "labels.json")["labels"]
    counts = [0] * len(labels)
    for row in train_rows:
        for label in row["labels"]:
            if label != -100:
                counts[label] += 1
    prior = -sum(c / sum(counts) * math.log(c / sum(counts)) for c in counts if c)
    params = FinetuneParams(method="lora", epochs=30, lr=lr, batch_size=8, eval_every=5, checkpoint_every=100,
                            early_stopping_patience=None, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    with caplog.at_level(logging.INFO, logger="tunekit"):
        metrics, curves = finetune.run(params, 0, bert_dir, data, tmp_path / "out", tmp_path / "plots", tmp_path / "ckpts",
                                       64, TaskParams(type="token_classification"))
    assert metrics["label_prior_loss"] == pytest.approx(prior)
    assert metrics["below_label_prior"] == below, (metrics, curves["evals"])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "label frequencies" in r.getMessage()]
    if below:
        assert not warned and metrics["val_loss_at_prior_check"] < prior
    else:
        assert len(warned) == 1 and f"not below {prior:.4g}" in warned[0] and "step 30 of 60" in warned[0]


# ---------------------------------------------------------------- class-weighted token classification


def test_token_class_weights_match_torch_cross_entropy(bert_dir, minilm_tokenizer, tmp_path):
    _, data = tokenized("token_classification", minilm_tokenizer, tmp_path)
    rows = list(read_split(data, "train"))
    info = read_json(data / "labels.json")
    labels = info["labels"]
    tokens = [label for row in rows for label in row["labels"] if label != -100]  # -100 never counts
    balanced = resolve_class_weights("balanced", labels, rows, False)
    present = sorted(set(tokens))
    expected = compute_class_weight("balanced", classes=np.array(present), y=np.array(tokens))
    assert [balanced[i] for i in present] == pytest.approx(list(expected))
    assert all(balanced[i] == 1.0 for i in range(len(labels)) if i not in present)  # unseen tags weigh 1

    # the params path: task.class_weights on a token_classification task, balanced or by tag
    spec = task_spec(TaskParams(type="token_classification", class_weights="balanced"), info, bert_dir, rows)
    assert spec.class_weights == pytest.approx(balanced)
    explicit = task_spec(TaskParams(type="token_classification", class_weights={"B-PER": 3.0}), info, bert_dir, rows)
    assert explicit.class_weights == tuple(3.0 if label == "B-PER" else 1.0 for label in labels)

    plain = TaskSpec("token_classification", tuple(labels))
    model = load_task_base(bert_dir, plain).eval()
    batch = collate_task(rows, minilm_tokenizer.pad_token_id, "token_classification")
    with torch.no_grad():
        outputs = forward(model, batch)
    logits, targets = outputs.logits.reshape(-1, len(labels)), batch["labels"].reshape(-1)
    for weighted in (spec, explicit):
        loss, n = weighted.kind.loss(outputs, batch, weighted)
        reference = torch.nn.CrossEntropyLoss(weight=torch.tensor(weighted.class_weights), ignore_index=-100,
                                              reduction="sum")(logits, targets)
        assert n == len(tokens) and float(loss) == pytest.approx(float(reference), rel=1e-5)
    # the expected direction: weight 3 on B-PER adds 2x the B-PER tokens' loss to the unweighted sum
    unweighted, _ = plain.kind.loss(outputs, batch, plain)
    per_token = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    b_per = float(per_token[targets == labels.index("B-PER")].sum())
    weighted_loss, _ = explicit.kind.loss(outputs, batch, explicit)
    assert float(weighted_loss) == pytest.approx(float(unweighted) + 2 * b_per, rel=1e-5)
    # the label prior's loss follows the weights too
    assert token_classification.prior_loss(rows, spec) == pytest.approx(
        prior_cross_entropy([tokens.count(i) for i in range(len(labels))], spec.class_weights))


# ---------------------------------------------------------------- per-class scores


@pytest.mark.parametrize("task", ["classification", "token_classification"])
def test_per_class_scores_equal_the_libraries(task, bert_dir, minilm_tokenizer, tmp_path):
    ingested, data = tokenized(task, minilm_tokenizer, tmp_path)
    spec = _spec(data, task)
    rows, records = list(read_split(data, "test")), list(read_split(ingested, "test"))
    model = _train(load_task_base(bert_dir, spec), spec, list(read_split(data, "train")),
                   minilm_tokenizer.pad_token_id, tmp_path, epochs=8)  # part-trained: scores between 0 and 1
    metrics, predictions, _ = score_task(model, spec, rows, records, minilm_tokenizer.pad_token_id, 16, "tuned",
                                         TaskParams(type=task))
    true, pred = [p["reference"] for p in predictions], [p["prediction"] for p in predictions]
    if task == "classification":
        expected = sklearn_report(true, pred, labels=list(spec.labels), output_dict=True, zero_division=0)
        assert set(metrics["per_class"]) == set(spec.labels)
    else:
        expected = seqeval_report(true, pred, output_dict=True, zero_division=0)
        assert {"PER", "LOC"} <= set(metrics["per_class"])
    for name, row in metrics["per_class"].items():
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (expected[name]["precision"], expected[name]["recall"], expected[name]["f1-score"], expected[name]["support"]))
    assert any(0 < row["f1"] < 1 for row in metrics["per_class"].values()) or metrics[
        "accuracy" if task == "classification" else "entity_f1"] in (0.0, 1.0)
