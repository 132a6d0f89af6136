"""Multi-task fine-tuning (`task.type: multi_task`, `task.tasks`) through the real stage functions:
params validation, ingest of several tasks from their own files, template per task, finetune with
full / head / lora on one shared encoder, save and reload, merge, evaluate per task, and the stages
that must step aside (forgetting) or explain themselves (refused methods).

The encoder is a tiny BERT built from a config with the real MiniLM (WordPiece) tokenizer; the data is
the memorisable sets of tests/tunekit/tasks/test_heads.py, written as the files a user would point task.tasks at."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from stages import evaluate, finetune, forgetting, ingest, merge, template
from tests.tunekit.tasks.test_heads import raw_examples, tiny_bert_dir
from tunekit.modeling import MultiTaskModel, one_task
from tunekit.tasks import load_tuned
from tunekit.tasks.heads import TaskSpec, load_task_model, predict
from tunekit.tasks.multi_task import load_multitask_model, multitask_meta, multitask_method
from tunekit.data import read_split
from tunekit.io import read_json, read_jsonl
from tunekit.methods import METHODS, MethodError
from tunekit.models import embedded_minilm
from tunekit.params import (EvaluateParams, FinetuneParams, ForgettingParams, IngestParams, MergeParams, ParamsError,
                            TaskParams, TemplateParams, validate_section)

KEY = {"classification": "accuracy", "token_classification": "entity_f1", "qa": "squad_f1"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(embedded_minilm()))


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory) -> Path:
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"), tokenizer)


def write_inputs(folder: Path, bad_topic_line: bool = False) -> dict[str, Path]:
    """The files task.tasks points at: classification JSONL, NER as CoNLL, SQuAD-style QA JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    strip = ("id", "task")
    topic = [json.dumps({k: v for k, v in r.items() if k not in strip}) for r in raw_examples("classification")]
    if bad_topic_line:
        topic.insert(2, json.dumps({"text": "   ", "label": "fruit"}))  # line 3: empty text
    (folder / "topic.jsonl").write_text("\n".join(topic) + "\n", encoding="utf-8")
    sentences = ["\n".join(f"{token} {tag}" for token, tag in zip(r["tokens"], r["tags"])) for r in raw_examples("token_classification")]
    (folder / "ner.conll").write_text("\n\n".join(sentences) + "\n", encoding="utf-8")
    qa = [json.dumps({k: v for k, v in r.items() if k not in strip}) for r in raw_examples("qa")]
    (folder / "qa.jsonl").write_text("\n".join(qa) + "\n", encoding="utf-8")
    return {"topic": folder / "topic.jsonl", "ner": folder / "ner.conll", "qa": folder / "qa.jsonl"}


def task_params(files: dict[str, Path], names=("topic", "ner"), **extra) -> TaskParams:
    kinds = {"topic": "classification", "ner": "token_classification", "qa": "qa"}
    tasks = {name: {"type": kinds[name], "inputs": str(files[name]), "weight": 1.0, **extra.get(name, {})} for name in names}
    return validate_section("task", {"type": "multi_task", "tasks": tasks}, TaskParams)


# ---------------------------------------------------------------- params


def test_params_errors_name_the_task_the_field_and_the_fix():
    with pytest.raises(ParamsError) as info:
        validate_section("task", {"type": "multi_task", "tasks": {
            "topic": {"type": "classification", "doc_stride": 16, "labelz": ["a"]},
            "bad-name": {"type": "qa", "inputs": "q.jsonl"},
            "ner": {"inputs": "n.conll", "weight": 0}}}, TaskParams)
    text = str(info.value)
    assert "task.tasks.topic.inputs: value None" in text and "every task needs inputs" in text
    assert "task.tasks.topic.doc_stride: value 16" in text and "applies to qa tasks" in text and "remove it" in text
    assert "task.tasks.topic.labelz: unknown key" in text
    assert "task.tasks.bad-name: value 'bad-name'" in text and "not a valid identifier" in text and "'bad_name'" in text
    assert "task.tasks.ner.type" in text and "classification, token_classification or qa" in text
    assert "task.tasks.ner.weight: value 0" in text
    with pytest.raises(ParamsError, match=r"task\.tasks: .*task\.type is classification; set task\.type: multi_task"):
        validate_section("task", {"type": "classification", "tasks": {"a": {"type": "qa", "inputs": "q"}}}, TaskParams)
    with pytest.raises(ParamsError, match=r"task\.type multi_task needs its tasks"):
        validate_section("task", {"type": "multi_task"}, TaskParams)
    with pytest.raises(ParamsError, match=r"set labels per task \(task\.tasks\.<name>\.labels\)"):
        validate_section("task", {"type": "multi_task", "labels": ["a", "b"], "tasks": {"a": {"type": "qa", "inputs": "q"}}},
                         TaskParams)
    with pytest.raises(ParamsError, match=r"task\.tasks\.train: .*torch module attribute"):
        validate_section("task", {"type": "multi_task", "tasks": {"train": {"type": "qa", "inputs": "q"}}}, TaskParams)
    # a task's own settings, else task.*'s; class_weights never reaches a qa task
    params = validate_section("task", {"type": "multi_task", "pooling": "mean", "class_weights": "balanced", "tasks": {
        "topic": {"type": "classification", "inputs": "t"}, "q": {"type": "qa", "inputs": "q", "doc_stride": 16}}}, TaskParams)
    assert (params.subtask("topic").pooling, params.subtask("topic").class_weights) == ("mean", "balanced")
    assert (params.subtask("q").type, params.subtask("q").doc_stride, params.subtask("q").class_weights) == ("qa", 16, None)
    assert TaskParams().type == "sft" and TaskParams().tasks == {}


# ---------------------------------------------------------------- ingest and template


def test_ingest_and_template_keep_each_task_apart(tokenizer, base_dir, tmp_path):
    files = write_inputs(tmp_path / "inputs", bad_topic_line=True)
    params = task_params(files, ("topic", "ner", "qa"), qa={"doc_stride": 8})
    with pytest.raises(Exception, match="set ingest.format: auto"):
        ingest.run(IngestParams(format="classification"), tmp_path / "x", params)
    with pytest.raises(Exception, match=r"task topic: ingest rejected 1 of 13 lines"):  # 7.7 % of topic's lines
        ingest.run(IngestParams(max_reject_rate=0.05, validation=0.2, test=0.2), tmp_path / "ingested", params)

    metrics = ingest.run(IngestParams(max_reject_rate=0.1, validation=0.2, test=0.2), tmp_path / "ingested", params)
    per = metrics["tasks"]
    assert (per["topic"]["lines_read"], per["topic"]["accepted"], per["topic"]["rejected"]) == (13, 12, 1)
    assert (per["ner"]["accepted"], per["qa"]["accepted"], metrics["accepted"], metrics["rejected"]) == (12, 12, 36, 1)
    assert per["ner"]["type"] == "token_classification"
    (reject,) = read_jsonl(tmp_path / "ingested" / "rejects.jsonl")
    assert (reject["file"], reject["line"], reject["reason"], reject["task"]) == (str(files["topic"]), 3, "empty_content", "topic")
    assert "text is empty" in reject["detail"]
    rows = [row for split in ("train", "validation", "test") for row in read_split(tmp_path / "ingested", split)]
    assert len(rows) == 36 and len({row["id"] for row in rows}) == 36
    assert all(row["id"].startswith(row["task"] + "-") for row in rows)
    assert {row["task"] for row in rows} == {"topic", "ner", "qa"}
    assert all("tokens" in row for row in rows if row["task"] == "ner")  # CoNLL sentences became records

    tokenized = tmp_path / "tokenized"
    stats = template.run(TemplateParams(max_length=16), base_dir, tmp_path / "ingested", tokenized, tmp_path / "preview", params)
    assert set(stats["tasks"]) == {"topic", "ner", "qa"} and stats["examples"] == 36
    assert stats["tasks"]["qa"]["truncated"] > 0  # contexts longer than a 16-token window are split
    labels = read_json(tokenized / "labels.json")
    assert labels["task"] == "multi_task"
    assert labels["tasks"]["topic"]["labels"] == ["animal", "fruit", "vehicle"]
    assert labels["tasks"]["ner"]["labels"] == ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
    assert labels["tasks"]["qa"] == {"task": "qa", "labels": [], "multi_label": False, "counts": {}}
    records = {row["id"]: row for row in rows}
    for split in ("train", "validation", "test"):
        for row in read_split(tokenized, split):
            assert "_line" not in row
            if row["task"] == "topic":
                assert labels["tasks"]["topic"]["labels"][row["labels"]] == records[row["id"]]["label"]
            elif row["task"] == "ner":  # the tag of each word on its first sub-word, -100 elsewhere
                tags = records[row["id"]]["tags"]
                firsts = {row["word_ids"].index(w) for w in range(len(tags))}
                assert [labels["tasks"]["ner"]["labels"][label] for i, label in enumerate(row["labels"]) if i in firsts] == tags
                assert all(label == -100 for i, label in enumerate(row["labels"]) if i not in firsts)
            else:  # QA windows of at most 16 tokens, named after their prefixed example id
                assert row["example_id"].startswith("qa-") and row["id"].startswith(row["example_id"] + "-")
                assert len(row["input_ids"]) <= 16
    assert {p.name for p in (tmp_path / "preview").iterdir()} >= {"mask_preview.html", "mask_preview_ner.html"}


# ---------------------------------------------------------------- finetune, save, merge, evaluate


@pytest.fixture(scope="module")
def two_tasks(tokenizer, base_dir, tmp_path_factory):
    """(task params, ingested dir, tokenised dir) of classification + NER, through ingest and template.
    Memorisable sets: everything is ingested as train, and that split is also validation and test."""
    root = tmp_path_factory.mktemp("two-tasks")
    # mean pooling: a random tiny encoder's first token says too little for a linear probe (method head)
    params = task_params(write_inputs(root / "inputs"), topic={"pooling": "mean"})
    ingest.run(IngestParams(validation=0.0, test=0.0), root / "ingested", params)
    for split in ("validation", "test"):
        shutil.rmtree(root / "ingested" / split)
        shutil.copytree(root / "ingested" / "train", root / "ingested" / split)
    template.run(TemplateParams(max_length=32), base_dir, root / "ingested", root / "tokenized", root / "preview", params)
    return params, root / "ingested", root / "tokenized"


def specs_of(tokenized: Path) -> dict[str, TaskSpec]:
    info = read_json(tokenized / "labels.json")["tasks"]
    return {name: TaskSpec(task["task"], tuple(task["labels"])) for name, task in info.items()}


@pytest.mark.parametrize("name", ["full", "head", "lora"])
def test_saved_checkpoint_reloads_with_identical_predictions(name, two_tasks, base_dir, tokenizer, tmp_path):
    _, _, tokenized = two_tasks
    specs = specs_of(tokenized)
    method = multitask_method(METHODS[name], specs)
    params = FinetuneParams(method=name, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    model = method.prepare(method.load_base(base_dir), params)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".heads.topic." in f".{n}" for n in trainable) and any(".heads.ner." in f".{n}" for n in trainable)
    if name == "head":
        assert all(n.startswith("heads.") for n in trainable)
    if name == "lora":
        assert any("lora_A" in n for n in trainable) and not any("lora" in n for n in trainable if ".heads." in n)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3)  # trained weights differ from the seeded initial ones
    finetune.write_output(tmp_path, method, model, tokenizer, params.model_dump(), base_dir, {},
                          multitask_meta(specs, {"topic": 1.0, "ner": 1.0}))
    assert read_json(tmp_path / "meta.json")["task"]["type"] == "multi_task"
    reloaded = [load_tuned(tmp_path).model]  # the base from meta.json's lineage, the adapter or the full weights
    if name != "lora":
        reloaded.append(load_multitask_model(tmp_path))  # full weights stand alone
    rows = list(read_split(tokenized, "test"))
    fresh_model = method.load_base(base_dir)
    for task, spec in specs.items():
        mine = [row for row in rows if row["task"] == task][:6]
        before, _ = predict(one_task(model, task), mine, spec, 0, 6)
        fresh, _ = predict(one_task(fresh_model, task), mine, spec, 0, 6)
        for other in reloaded:
            after, _ = predict(one_task(other, task), mine, spec, 0, 6)
            for a, b in zip(before, after):
                assert torch.allclose(torch.as_tensor(a["logits"]), torch.as_tensor(b["logits"]), atol=1e-6)
        for a, c in zip(before, fresh):
            assert not torch.allclose(torch.as_tensor(a["logits"]), torch.as_tensor(c["logits"]), atol=1e-3)


LR = {"full": 3e-3, "head": 3e-2, "lora": 1e-2}
EPOCHS = {"full": 40, "head": 40, "lora": 80}


@pytest.mark.parametrize("name", ["full", "head", "lora"])
def test_finetune_merge_evaluate_stages(name, two_tasks, base_dir, tmp_path):
    params, ingested, tokenized = two_tasks
    finetune_params = FinetuneParams(method=name, epochs=EPOCHS[name], lr=LR[name], batch_size=8, eval_every=60, checkpoint_every=1000,
                                     early_stopping_patience=None, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    out = tmp_path / "finetune"
    _, curves = finetune.run(finetune_params, 0, base_dir, tokenized, out, tmp_path / "plots", tmp_path / "ckpts", 32, params)
    meta = read_json(out / "meta.json")
    assert meta["method"] == name and meta["task"]["type"] == "multi_task"
    assert meta["task"]["weights"] == {"topic": 1.0, "ner": 1.0}
    assert meta["task"]["tasks"]["ner"]["labels"] == ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
    assert (meta["task"]["tasks"]["topic"]["pooling"], meta["task"]["tasks"]["ner"]["pooling"]) == ("mean", "cls")
    assert curves["evals"] and curves["history"][-1]["train_loss"] < curves["history"][0]["train_loss"]
    card = (out / "README.md").read_text()
    assert "pipeline_tag: token-classification" in card and "- multi-task" in card  # the first task by name: ner
    assert ("load_tuned(Path(" if name == "lora" else "load_multitask_model(Path(") in card

    merged = None
    if name != "head":
        merged = tmp_path / "merged"
        checked = merge.run(MergeParams(registered_model=None, check_examples=8), out, tokenized, merged)
        assert checked["predictions_identical"] == 1 and checked["max_logit_difference"] <= 1e-3
        assert {task: c["predictions_identical"] for task, c in checked["tasks"].items()} == {"topic": 1, "ner": 1}
        assert checked["tasks"]["ner"]["checked_examples"] == 8
        standalone = load_task_model(merged)  # the one loader: task_head.json says it is multi-task
        assert isinstance(standalone, MultiTaskModel) and not any("lora" in n for n, _ in standalone.named_parameters())
        assert "load_multitask_model(Path(" in (merged / "README.md").read_text()

    report = tmp_path / "report"
    results = evaluate.run(EvaluateParams(batch_size=8), TemplateParams(), out, ingested, tokenized, report, merged, task=params)
    assert results["task"] == "multi_task" and results["tasks"] == {"topic": "classification", "ner": "token_classification"}
    for task, kind in results["tasks"].items():
        key = KEY[kind]
        assert results["tuned"][task][key] > results["base"][task][key], (task, results)
        assert results["delta"][task][key] == pytest.approx(results["tuned"][task][key] - results["base"][task][key])
        if name != "head":  # the encoder itself learns: both tasks memorised
            assert results["tuned"][task][key] >= 0.9, (task, results)
            merged_metrics, tuned_metrics = dict(results["merged"][task]), dict(results["tuned"][task])
            assert merged_metrics.pop("loss") == pytest.approx(tuned_metrics.pop("loss"), abs=1e-5)
            assert merged_metrics == tuned_metrics  # the same predictions, so the same scores
    assert results["tuned"]["topic"]["examples"] == 12 and "confusion_matrix" not in results["tuned"]["topic"]
    text = (report / "report.md").read_text()
    assert "## topic (classification, weight 1)" in text and "## ner (token_classification, weight 1)" in text
    assert "confusion_topic_tuned.png" in text and (report / "confusion_topic_tuned.png").is_file()
    # the collapse check and the per-class scores, per task (task.collapse reaches every task)
    assert "### Collapse check (topic)" in text and "### Per-class scores (ner)" in text
    if name != "head":
        assert results["tuned"]["topic"]["collapsed"] == 0 and results["tuned"]["ner"]["collapsed"] == 0
        assert set(results["tuned"]["ner"]["per_class"]) == {"PER", "LOC"}
    csv = (report / "report.csv").read_text().splitlines()
    assert csv[0].startswith("task,model,") and sum(line.startswith("ner,") for line in csv) == (2 if name == "head" else 3)
    predictions = list(read_jsonl(report / "predictions_tuned.jsonl"))
    assert {p["task"] for p in predictions} == {"topic", "ner"} and len(predictions) == 24

    if name == "lora":  # the forgetting stage steps aside for task heads, multi-task ones too
        skipped = forgetting.run(ForgettingParams(), out, merged, tmp_path / "forgetting", tmp_path / "cache")
        assert skipped["measured"] == 0 and "multi_task" in skipped["reason"]


def test_methods_that_cannot_apply_are_refused(two_tasks, base_dir, tmp_path):
    params, _, tokenized = two_tasks
    for name, hint in (("prompt_tuning", "virtual tokens"), ("qlora", "4-bit"), ("adapter", "bottleneck")):
        with pytest.raises(MethodError) as info:
            finetune.run(FinetuneParams(method=name), 0, base_dir, tokenized, tmp_path / name, tmp_path / "p", tmp_path / "c",
                         32, params)
        message = str(info.value)
        assert f"method {name} does not apply to multi-task training" in message and hint in message
        assert "use one of full, freeze, head, lora, dora, ia3" in message
        assert not (tmp_path / name).exists()
