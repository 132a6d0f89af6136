"""Task heads (tunekit/tasks/heads.py and the kinds' modules): pooling on padded batches, the loss normalisation, each task learning a
memorisable set on a tiny model, and the finetune -> merge -> evaluate stages for every task type with
LoRA (the head trained through modules_to_save, reloaded with the adapter, merged into one standalone
model that predicts exactly what the adapter model predicts).

Tiny BERT and Llama models are built from a config here; the tokenizers are the real MiniLM (WordPiece)
and SmolLM2 ones, and the rows come from tunekit.tasks' own tokenisation and label alignment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from tunekit.modeling import PooledClassifier, pool
from tunekit.tasks.heads import (TaskObjective, TaskSpec, collate_task, load_task_base, load_task_model, predict,
                                 resolve_class_weights, score_task, task_method, tokenize_task)
from tunekit.data import read_split, write_rows
from tunekit.io import read_json, read_jsonl
from tunekit.methods import METHODS, MethodError, parameter_counts
from tunekit.models import embedded_minilm
from tunekit.params import EvaluateParams, FinetuneParams, MergeParams, TaskParams, TemplateParams
from tunekit.train import TrainConfig, accumulate_gradients, train


# ---------------------------------------------------------------- tiny models and data


@pytest.fixture(scope="session")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(str(embedded_minilm()))


def tiny_bert_dir(path: Path, tokenizer) -> Path:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_llama_dir(path: Path, tokenizer) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bert_dir(minilm_tokenizer, tmp_path_factory) -> Path:
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"), minilm_tokenizer)


@pytest.fixture(scope="session")
def llama_dir(smollm2_tokenizer, tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer)


SUBJECTS = {"fruit": ["apple", "banana", "cherry", "mango"], "vehicle": ["truck", "bicycle", "train", "boat"],
            "animal": ["horse", "rabbit", "tiger", "parrot"]}
PEOPLE = ["Alice", "Bob", "Carmen", "Dmitri", "Washington", "Ngozi"]
PLACES = ["Paris", "Lyon", "Kyoto", "Lima", "Oslo", "Accra"]


def raw_examples(task: str) -> list[dict]:
    """A small memorisable set of ingested records (the raw fields ingest keeps)."""
    rows: list[dict] = []
    if task == "classification":
        for label, words in SUBJECTS.items():
            for i, word in enumerate(words):
                rows.append({"text": f"my {word} is number {i}", "label": label})
    elif task == "token_classification":
        for person, place in zip(PEOPLE, PLACES):
            rows.append({"tokens": [person, "travelled", "to", place, "today"], "tags": ["B-PER", "O", "O", "B-LOC", "O"]})
            rows.append({"tokens": ["in", place, "we", "met", person], "tags": ["O", "B-LOC", "O", "O", "B-PER"]})
    else:
        for i, (person, place) in enumerate(zip(PEOPLE, PLACES)):
            context = f"{person} lives in {place} and owns {i + 2} cats."
            rows.append({"context": context, "question": "Where does the owner live?",
                         "answers": {"text": [place], "answer_start": [context.index(place)]}})
            rows.append({"context": context, "question": "What colour is the sky?", "answers": {"text": [], "answer_start": []}})
    return [{"id": f"{task[:3]}-{i}", "task": task, **row} for i, row in enumerate(rows)]


def tokenized(task: str, tokenizer, tmp_path: Path, max_length: int = 64, **task_fields) -> tuple[Path, Path]:
    """(ingested dir, tokenised dir) with the same memorisable records in every split."""
    ingested, out, preview = tmp_path / "ingested", tmp_path / "tokenized", tmp_path / "preview"
    for folder in (ingested, out, preview):
        folder.mkdir(parents=True, exist_ok=True)
    records = raw_examples(task)
    for split in ("train", "validation", "test"):
        write_rows(ingested / split, records)
    tokenize_task(task, TaskParams(type=task, **task_fields), max_length, tokenizer, ingested, out, preview)
    return ingested, out


# ---------------------------------------------------------------- pooling


def test_pool_picks_the_right_positions_with_left_and_right_padding():
    hidden = torch.arange(2 * 5, dtype=torch.float).view(2, 5, 1).expand(2, 5, 3).clone()  # value = flat position
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert pool(hidden, right, "last")[:, 0].tolist() == [2.0, 9.0]
    assert pool(hidden, left, "last")[:, 0].tolist() == [4.0, 9.0]
    assert pool(hidden, right, "cls")[:, 0].tolist() == [0.0, 5.0]
    assert pool(hidden, left, "cls")[:, 0].tolist() == [2.0, 5.0]
    assert pool(hidden, right, "mean")[:, 0].tolist() == [1.0, 7.0]
    assert pool(hidden, left, "mean")[:, 0].tolist() == [3.0, 7.0]


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_padding_does_not_change_a_rows_classification(arch, pooling, bert_dir, llama_dir):
    """Each row of a padded batch gets the logits it gets alone, for every pooling on both architectures."""
    model_dir = bert_dir if arch == "bert" else llama_dir
    spec = TaskSpec("classification", ("a", "b", "c"), pooling=pooling, encoder=arch == "bert")
    model = load_task_base(model_dir, spec).eval()
    rows = [{"input_ids": [101, 7, 8, 9, 10, 102], "labels": 0}, {"input_ids": [101, 11, 102], "labels": 1}]
    pad = 0
    together, _ = predict(model, rows, spec, pad, batch_size=2)
    for row, batched in zip(rows, together):
        alone, _ = predict(model, [row], spec, pad, batch_size=1)
        assert torch.allclose(torch.tensor(batched["logits"]), torch.tensor(alone[0]["logits"]), atol=1e-5)
    if arch == "llama" and pooling == "last":
        # left padding: the last real token is the last position, and the pooled vector is the same one
        batch = collate_task(rows, pad, "classification", left=True)
        hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        assert torch.equal(pool(hidden, batch["attention_mask"], "last"), hidden[:, -1])
    custom = isinstance(model, PooledClassifier)
    assert custom == (not (arch == "bert" and pooling == "cls"))  # transformers' BERT head pools [CLS] itself


# ---------------------------------------------------------------- loss normalisation


def test_token_loss_is_per_labelled_token_across_accumulation(bert_dir, minilm_tokenizer, tmp_path):
    _, data = tokenized("token_classification", minilm_tokenizer, tmp_path)
    rows = list(read_split(data, "train"))[:4]
    spec = TaskSpec("token_classification", tuple(read_json(data / "labels.json")["labels"]))
    objective = TaskObjective(spec)

    def grads(batches):
        torch.manual_seed(0)
        model = load_task_base(bert_dir, spec).eval()
        loss, count = accumulate_gradients(model, [objective.collate(b, 0) for b in batches], objective=objective)
        return loss, count, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    one = grads([rows])
    two = grads([rows[:1], rows[1:]])  # 1 + 3 rows with different numbers of labelled tokens
    assert one[1] == two[1] == sum(sum(label != -100 for label in row["labels"]) for row in rows)
    assert one[0] == pytest.approx(two[0], rel=1e-5)
    assert torch.allclose(one[2], two[2], atol=1e-6)


def test_class_weights():
    rows = [{"labels": 0}] * 6 + [{"labels": 1}] * 2
    assert resolve_class_weights("balanced", ["a", "b"], rows, False) == pytest.approx((8 / 12, 8 / 4))
    assert resolve_class_weights({"b": 3.0}, ["a", "b"], rows, False) == (1.0, 3.0)
    multi = [{"labels": [1, 0]}, {"labels": [1, 1]}, {"labels": [0, 0]}, {"labels": [1, 0]}]
    assert resolve_class_weights("balanced", ["a", "b"], multi, True) == pytest.approx((1 / 3, 3.0))
    with pytest.raises(ValueError, match=r"labels \['zz'\] that are not in the label set"):
        resolve_class_weights({"zz": 2.0}, ["a", "b"], rows, False)


# ---------------------------------------------------------------- each task learns


def _metric(task: str, metrics: dict) -> float:
    return {"classification": "accuracy", "token_classification": "entity_f1", "qa": "squad_exact_match"}[task]


CASES = [("classification", "bert", {}), ("classification", "llama", {}), ("token_classification", "bert", {}),
         ("qa", "bert", {"doc_stride": 16})]


@pytest.mark.parametrize("task,arch,fields", CASES, ids=[f"{t}-{a}" for t, a, _ in CASES])
def test_each_task_learns_a_memorisable_set(task, arch, fields, bert_dir, llama_dir, minilm_tokenizer,
                                            smollm2_tokenizer, tmp_path):
    tokenizer = minilm_tokenizer if arch == "bert" else smollm2_tokenizer
    ingested, data = tokenized(task, tokenizer, tmp_path, max_length=48 if task == "qa" else 64, **fields)
    info = read_json(data / "labels.json")
    spec = TaskSpec(task, tuple(info["labels"]), info["multi_label"], "cls" if arch == "bert" else "last",
                    encoder=arch == "bert")
    model = load_task_base(bert_dir if arch == "bert" else llama_dir, spec)
    rows, records = list(read_split(data, "train")), list(read_split(ingested, "test"))
    key = _metric(task, {})
    before, _, _ = score_task(model, spec, rows, records, tokenizer.pad_token_id, 16, "base", TaskParams(type=task))
    cfg = TrainConfig(epochs=60, lr=3e-3, batch_size=8, schedule="constant", eval_every=1000, checkpoint_every=1000,
                      objective=TaskObjective(spec))
    state = train(model, rows, [], cfg, tokenizer.pad_token_id, tmp_path / "ckpt")
    after, predictions, _ = score_task(model, spec, rows, records, tokenizer.pad_token_id, 16, "tuned", TaskParams(type=task))
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"] / 4
    assert after[key] >= 0.9 > before[key], (before, after)
    assert len(predictions) == len(records)
    if task == "qa":  # the unanswerable questions are answered with the null answer
        assert after["no_answer_exact_match"] == 1.0 and after["has_answer_exact_match"] >= 0.8


# ---------------------------------------------------------------- methods on task models


def test_adapter_method_is_refused_for_task_heads():
    with pytest.raises(MethodError, match="not a task head"):
        task_method(METHODS["adapter"], TaskSpec("classification", ("a", "b")))


@pytest.mark.parametrize("name", ["head", "lora", "ia3"])
def test_head_trains_and_is_saved_with_every_method(name, bert_dir, tmp_path):
    spec = TaskSpec("token_classification", ("O", "B-PER", "I-PER"))
    method = task_method(METHODS[name], spec)
    params = FinetuneParams(method=name, ia3={"target_modules": ["query", "value", "output.dense"],
                                              "feedforward_modules": ["output.dense"]})
    model = method.prepare(method.load_base(bert_dir), params)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable)
    if name == "head":
        assert all(n.startswith("classifier.") for n in trainable)
        assert parameter_counts(model)["trainable_parameters"] == 32 * 3 + 3
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "classifier" in n and p.requires_grad:
                p.add_(0.5)  # a trained head differs from the seeded initial one
    method.checkpoint.save(model, tmp_path)
    reloaded = method.checkpoint.load(tmp_path, lambda: method.load_base(bert_dir))
    rows = [{"input_ids": [101, 5, 6, 102], "labels": [-100, 1, 0, -100]}]
    a, _ = predict(model, rows, spec, 0, 1)
    b, _ = predict(reloaded, rows, spec, 0, 1)
    fresh, _ = predict(method.load_base(bert_dir), rows, spec, 0, 1)
    assert torch.allclose(a[0]["logits"], b[0]["logits"], atol=1e-6)
    assert not torch.allclose(a[0]["logits"], fresh[0]["logits"], atol=1e-3)


# ---------------------------------------------------------------- the stages, end to end


STAGE_CASES = [("classification", "bert", "mean"), ("classification", "llama", "auto"), ("token_classification", "bert", "auto"),
               ("qa", "bert", "auto")]


@pytest.mark.parametrize("task,arch,pooling", STAGE_CASES, ids=[f"{t}-{a}-{p}" for t, a, p in STAGE_CASES])
def test_finetune_merge_evaluate_stages_with_lora(task, arch, pooling, bert_dir, llama_dir, minilm_tokenizer,
                                                  smollm2_tokenizer, tmp_path):
    from stages import evaluate, finetune, merge

    tokenizer = minilm_tokenizer if arch == "bert" else smollm2_tokenizer
    base = bert_dir if arch == "bert" else llama_dir
    fields = {"doc_stride": 16} if task == "qa" else {}
    ingested, data = tokenized(task, tokenizer, tmp_path, max_length=48 if task == "qa" else 64, **fields)
    task_params = TaskParams(type=task, pooling=pooling, **fields)
    params = FinetuneParams(method="lora", epochs=40, lr=5e-3, batch_size=8, eval_every=10, checkpoint_every=10,
                            early_stopping_patience=None, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    out = tmp_path / "finetune"
    metrics, _ = finetune.run(params, 0, base, data, out, tmp_path / "plots", tmp_path / "ckpts", 64, task_params)
    meta = read_json(out / "meta.json")
    assert meta["task"]["type"] == task and meta["method"] == "lora"
    assert meta["task"]["pooling"] == {"mean": "mean", "auto": "cls" if arch == "bert" else "last"}[pooling]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == {"classification": "SEQ_CLS", "token_classification": "TOKEN_CLS", "qa": "QUESTION_ANS"}[task]
    assert metrics["trainable_fraction"] < 0.5

    merged = tmp_path / "merged"
    merge_metrics = merge.run(MergeParams(registered_model=None, check_examples=8), out, data, merged)
    assert merge_metrics["predictions_identical"] == 1 and merge_metrics["max_logit_difference"] <= 1e-3
    standalone = load_task_model(merged)  # no peft, no spec: the checkpoint says what it is
    tag = {"classification": "text-classification", "token_classification": "token-classification", "qa": "question-answering"}[task]
    for card, loader in (((merged / "README.md").read_text(), "load_task_model(Path("), ((out / "README.md").read_text(), "load_tuned(Path(")):
        assert f"pipeline_tag: {tag}" in card and loader in card and "AutoModelForCausalLM" not in card
    assert not any("lora" in name for name, _ in standalone.named_parameters())

    results = evaluate.run(EvaluateParams(batch_size=8), TemplateParams(), out, ingested, data, tmp_path / "report", merged,
                           task=task_params)
    key = _metric(task, {})
    # LoRA on a random 2-layer, 32-wide encoder memorises classification and tags; QA only gets better
    # (its own memorisation test with full training is test_each_task_learns_a_memorisable_set)
    assert results["tuned"][key] >= (0.9 if task != "qa" else 0.5) and results["tuned"][key] > results["base"][key], results
    assert results["merged"][key] == results["tuned"][key]
    report = tmp_path / "report"
    assert {"report.md", "report.csv", "metrics.png", "predictions_tuned.jsonl", "predictions_merged.jsonl"} <= {
        p.name for p in report.iterdir()}
    if task == "classification":
        assert (report / "confusion_tuned.png").is_file()
        assert {"accuracy", "f1_macro", "f1_micro", "roc_auc"} <= set(results["tuned"])
    first = next(read_jsonl(report / "predictions_tuned.jsonl"))
    assert {"id", "model", "reference", "prediction"} <= set(first)
    # the merged model's predictions are the tuned model's, example for example
    tuned_rows = [r["prediction"] for r in read_jsonl(report / "predictions_tuned.jsonl")]
    assert tuned_rows == [r["prediction"] for r in read_jsonl(report / "predictions_merged.jsonl")]


# ---------------------------------------------------------------- multi-task


def test_multitask_batches_follow_the_weights():
    from tunekit.tasks.multi_task import MultiTaskObjective

    specs = {"a": TaskSpec("classification", ("x", "y")), "b": TaskSpec("token_classification", ("O", "B-X"))}
    objective = MultiTaskObjective(specs, {"a": 3.0, "b": 1.0}, ["a"] * 40 + ["b"] * 40)
    drawn = [objective.row_tasks[batch[0]] for epoch in range(20) for batch in objective.epoch_batches([], 4, 0, epoch)]
    assert all(len({objective.row_tasks[i] for i in batch}) == 1 for batch in objective.epoch_batches([], 4, 0, 0))
    share = drawn.count("a") / len(drawn)
    assert 0.68 < share < 0.82  # 3:1 -> 0.75, although both tasks have as many rows


def test_multitask_shared_encoder_learns_both_tasks(bert_dir, minilm_tokenizer, tmp_path):
    from tunekit.modeling import one_task
    from tunekit.tasks.multi_task import MultiTaskObjective, load_multitask_base, load_multitask_model

    data, specs = {}, {}
    for name, task in (("topic", "classification"), ("ner", "token_classification")):
        ingested, tokenized_dir = tokenized(task, minilm_tokenizer, tmp_path / name)
        info = read_json(tokenized_dir / "labels.json")
        specs[name] = TaskSpec(task, tuple(info["labels"]))
        data[name] = (list(read_split(tokenized_dir, "train")), list(read_split(ingested, "test")))
    rows = [{**row, "task": name} for name, (task_rows, _) in data.items() for row in task_rows]
    model = load_multitask_base(bert_dir, specs)
    objective = MultiTaskObjective(specs, {"topic": 1.0, "ner": 1.0}, [row["task"] for row in rows])
    cfg = TrainConfig(epochs=40, lr=3e-3, batch_size=8, schedule="constant", eval_every=1000, checkpoint_every=1000,
                      objective=objective)
    train(model, rows, [], cfg, 0, tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "mt")
    reloaded = load_multitask_model(tmp_path / "mt")
    for name, key in (("topic", "accuracy"), ("ner", "entity_f1")):
        task_rows, records = data[name]
        metrics, _, _ = score_task(one_task(reloaded, name), specs[name], task_rows, records, 0, 16, name)
        assert metrics[key] >= 0.9, (name, metrics)
