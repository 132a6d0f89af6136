"""The evaluate stage on a tiny model: metrics chosen by params, few-shot prompts from train only,
HumanEval scored through the sandbox, the lineage (dapt, merged) side by side, predictions and report."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from stages import evaluate
from tests.conftest import REPO
from tunekit.chat import encode_conversation, resolve_chat_template
from tunekit.generate import choose_demonstrations, code_scores, cut_at_stops, few_shot_records, prompts_from_conversations
from tunekit.data import write_rows
from tunekit.io import read_jsonl, write_meta
from tunekit.models import load_causal_lm
from tunekit.params import CodeTaskParams, EvaluateParams, TemplateParams
from tunekit.sandbox import load_humaneval

SYSTEM = "Answer with the word in capitals."


def conversation(i: int, split: str) -> dict:
    return {"id": f"{split}-{i}", "messages": [{"role": "system", "content": SYSTEM},
                                               {"role": "user", "content": f"{split} word {i}"},
                                               {"role": "assistant", "content": f"{split.upper()} {i}"}]}


@pytest.fixture(scope="module")
def project(tiny_model_dir, smollm2_tokenizer, tmp_path_factory):
    """A LoRA adapter on the tiny base with meta.json lineage, a merged copy of it, ingested and tokenised splits."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapter = root / "finetune"
    model.save_pretrained(adapter)
    smollm2_tokenizer.save_pretrained(adapter)
    write_meta(adapter, "finetune", {}, parent=tiny_model_dir, extra={"method": "lora", "mergeable": True, "saves_adapter": True})
    merged = root / "merged"
    model.merge_and_unload().save_pretrained(merged, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(merged)

    data, tokenized = root / "ingested", root / "tokenized"
    data.mkdir()
    tokenized.mkdir()
    template = resolve_chat_template("model", smollm2_tokenizer)
    splits = {"train": [conversation(i, "train") for i in range(10)], "test": [conversation(i, "test") for i in range(3)]}
    for split, records in splits.items():
        write_rows(data / split, records)
        rows = []
        for r in records:
            enc = encode_conversation(r["messages"], smollm2_tokenizer, template)
            rows.append({"id": r["id"], "input_ids": enc.input_ids, "labels": enc.labels})
        write_rows(tokenized / split, rows)
    return {"adapter": adapter, "merged": merged, "data": data, "tokenized": tokenized, "root": root, "splits": splits}


def test_metrics_chosen_by_params_for_every_model_and_files_written(project, tmp_path):
    params = EvaluateParams(max_new_tokens=6, metrics=["exact_match", "chrf", "squad"], few_shot={"k": 2})
    out = tmp_path / "report"
    results = evaluate.run(params, TemplateParams(), project["adapter"], project["data"], project["tokenized"], out,
                           merged_dir=project["merged"], seed=3)

    assert [m for m in results if m in evaluate.MODEL_ORDER] == ["base", "few_shot", "tuned", "merged"]  # no dapt in this lineage
    for model in ("base", "few_shot", "tuned", "merged"):
        assert set(results[model]) == {"exact_match", "chrf", "squad_exact_match", "squad_f1", "loss", "perplexity",
                                       "examples"} | ({"demonstrations"} if model == "few_shot" else set())
        assert results[model]["examples"] == 3 and results[model]["loss"] > 0
    assert "bleu" not in results["delta"] and "rouge_l" not in results["tuned"]
    assert set(results["delta_over_few_shot"]) >= {"exact_match", "chrf", "loss"}
    # The merged model is the adapter's weights folded in: same greedy answers, same loss.
    assert results["merged"]["loss"] == pytest.approx(results["tuned"]["loss"], rel=1e-4)
    # Few-shot loss scores the same answers with demonstrations before them: a different number.
    assert results["few_shot"]["loss"] != pytest.approx(results["base"]["loss"])
    assert results["checkpoints"]["merged"] == str(project["merged"])

    rows = list(read_jsonl(out / "predictions_tuned.jsonl"))
    assert [r["id"] for r in rows] == ["test-0", "test-1", "test-2"]
    for row in rows:
        assert set(row) >= {"prompt", "reference", "prediction", "predictions", "scores"}
        assert row["predictions"][0] == row["prediction"] and len(row["scores"]) == 1
        assert set(row["scores"][0]) == {"exact_match", "chrf", "squad_exact_match", "squad_f1"}
    few = list(read_jsonl(out / "predictions_few_shot.jsonl"))
    assert all(len(r["demonstrations"]) == 2 for r in few)

    report = (out / "report.md").read_text()
    for model in ("base", "few_shot", "tuned", "merged"):
        assert f"| {model} |" in report
    assert "chrf" in report and "bleu" not in report.split("\n\n")[1]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.csv").read_text().splitlines()[0].startswith("model,exact_match,chrf")


def test_samples_and_stop_sequences(project, tmp_path, smollm2_tokenizer):
    params = EvaluateParams(max_new_tokens=5, do_sample=True, samples=3, stop=["\n"], metrics=["rouge"], few_shot=None)
    results = evaluate.run(params, TemplateParams(), project["adapter"], project["data"], project["tokenized"],
                           tmp_path / "r", seed=1)
    assert "few_shot" not in results and "merged" not in results
    assert set(results["base"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "loss", "perplexity", "examples"}
    rows = list(read_jsonl(tmp_path / "r" / "predictions_base.jsonl"))
    assert all(len(r["predictions"]) == 3 and len(r["scores"]) == 3 for r in rows)
    assert all("\n" not in p for r in rows for p in r["predictions"])
    assert cut_at_stops("a\ndef f():\nclass X", ["\nclass ", "\ndef "]) == "a"
    with pytest.raises(ValueError, match="identical"):
        EvaluateParams(samples=2)


def test_few_shot_prompt_holds_k_train_demonstrations_and_nothing_from_test(project, smollm2_tokenizer):
    train, test = project["splits"]["train"], project["splits"]["test"]
    template = resolve_chat_template("model", smollm2_tokenizer)
    shots = few_shot_records(test, train, 3, seed=5)
    assert shots == few_shot_records(test, train, 3, seed=5)  # deterministic
    assert [s["demonstrations"] for s in shots] != [s["demonstrations"] for s in few_shot_records(test, train, 3, seed=6)]
    prompts = prompts_from_conversations(shots, smollm2_tokenizer, template)
    for shot, prompt, record in zip(shots, prompts, test):
        demos = [d for d in train if d["id"] in shot["demonstrations"]]
        assert len(demos) == 3 == len(set(shot["demonstrations"]))
        for demo in demos:  # each demonstration is an earlier user/assistant turn pair
            assert f"user\n{demo['messages'][1]['content']}<|im_end|>" in prompt.text
            assert f"assistant\n{demo['messages'][2]['content']}<|im_end|>" in prompt.text
        assert prompt.text.count("train word") == 3 and prompt.text.count("TRAIN ") == 3
        assert prompt.text.count("test word") == 1 and "TEST" not in prompt.text  # only its own question, no answer
        assert prompt.text.count(SYSTEM) == 1 and prompt.reference == record["messages"][-1]["content"]
        assert prompt.text.endswith(f"user\n{record['messages'][1]['content']}<|im_end|>\n<|im_start|>assistant\n")
    assert prompts_from_conversations(few_shot_records(test, train, 0, 5), smollm2_tokenizer, template) == \
        prompts_from_conversations(test, smollm2_tokenizer, template)  # k=0: zero-shot
    assert choose_demonstrations(train, "x", 10, 1) and pytest.raises(ValueError, choose_demonstrations, train, "x", 11, 1)  # noqa: RUF061


def test_canonical_solutions_pass_through_the_same_scoring(tmp_path):
    problems = load_humaneval(3)
    code = CodeTaskParams(ks=[1], samples=1, do_sample=False)
    metrics, rows = code_scores(problems, [[p["canonical_solution"]] for p in problems], code, "oracle")
    assert metrics["pass_at_1"] == 1.0 and metrics["passed"] == 3 and metrics["reasons"] == {"passed": 3}
    assert [r["results"][0]["reason"] for r in rows] == ["passed"] * 3
    metrics, rows = code_scores(problems, [["    return None\n"]] * 3, code)
    assert metrics["pass_at_1"] == 0.0 and all(r["results"][0]["reason"].startswith("failed") for r in rows)


def test_code_task_on_the_tiny_model_goes_through_the_sandbox_for_every_model(project, tmp_path):
    params = EvaluateParams(max_new_tokens=2, max_examples=1, metrics=["exact_match"], few_shot=None,
                            code={"enabled": True, "problems": 2, "ks": [1, 2], "samples": 2, "max_new_tokens": 12,
                                  "timeout": 5})
    out = tmp_path / "r"
    results = evaluate.run(params, TemplateParams(), project["adapter"], project["data"], project["tokenized"], out,
                           merged_dir=project["merged"], seed=0)
    for model in ("base", "tuned", "merged"):
        code = results[model]["code"]
        assert code["pass_at_1"] == 0.0 and code["pass_at_2"] == 0.0
        assert code["problems"] == 2 and code["samples"] == 4 and code["passed"] == 0
        assert sum(code["reasons"].values()) == 4 and "passed" not in code["reasons"]
        rows = list(read_jsonl(out / f"code_{model}.jsonl"))
        assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
        for row in rows:
            assert len(row["completions"]) == 2 and len(row["results"]) == 2
            assert all(not r["passed"] and r["reason"] for r in row["results"])
    assert "code.pass_at_1" in (out / "report.md").read_text()


def test_real_dapt_parent_is_scored_and_passthrough_is_not(project, tiny_model_dir, smollm2_tokenizer, tmp_path):
    from tunekit.tasks.sft import dapt_checkpoint

    dapt = tmp_path / "dapt"
    load_causal_lm(tiny_model_dir).save_pretrained(dapt, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(dapt)
    write_meta(dapt, "dapt", {}, parent=tiny_model_dir)
    tuned = tmp_path / "finetune"
    tuned.mkdir()
    for f in project["adapter"].iterdir():
        if f.name != "meta.json":
            (tuned / f.name).write_bytes(f.read_bytes())
    write_meta(tuned, "finetune", {}, parent=dapt, extra={"method": "lora", "mergeable": True, "saves_adapter": True})
    assert dapt_checkpoint(tuned) == (dapt, tiny_model_dir)
    assert dapt_checkpoint(project["adapter"]) == (None, None)

    results = evaluate.run(EvaluateParams(max_new_tokens=2, metrics=["exact_match"], few_shot=None), TemplateParams(),
                           tuned, project["data"], project["tokenized"], tmp_path / "r")
    assert [m for m in results if m in evaluate.MODEL_ORDER] == ["base", "dapt", "tuned"]
    assert results["checkpoints"]["dapt"] == str(dapt) and results["checkpoints"]["base"] == str(tiny_model_dir)
    assert results["dapt"]["loss"] == pytest.approx(results["base"]["loss"], rel=1e-5)  # same weights here

    passthrough = tmp_path / "dapt-off"
    passthrough.mkdir()
    write_meta(passthrough, "dapt", {}, parent=tiny_model_dir, extra={"passthrough": str(tiny_model_dir)})
    write_meta(tuned, "finetune", {}, parent=passthrough, extra={"method": "lora", "mergeable": True, "saves_adapter": True})
    assert dapt_checkpoint(tuned) == (None, None)
    json.loads((tuned / "meta.json").read_text())


# ---------------------------------------------------------------- users' evaluate modules


FIXTURE_MODULES = REPO / "tests" / "fixtures" / "metric_modules"


def test_a_users_metric_module_named_in_params_is_scored_and_reported_for_every_model(project, tmp_path):
    from tunekit.params import validate_section

    params = validate_section("evaluate", {"max_new_tokens": 4, "few_shot": False,
                                           "metrics": ["exact_match", str(FIXTURE_MODULES / "overlap.py")]},
                              EvaluateParams)
    out = tmp_path / "report"
    results = evaluate.run(params, TemplateParams(), project["adapter"], project["data"], project["tokenized"], out,
                           merged_dir=project["merged"], seed=3)
    for model in ("base", "tuned", "merged"):
        assert {"exact_match", "overlap", "overlap_length_ratio"} <= set(results[model])
        assert 0.0 <= results[model]["overlap"] <= 1.0
    assert results["delta"]["overlap"] == pytest.approx(results["tuned"]["overlap"] - results["base"]["overlap"])
    rows = list(read_jsonl(out / "predictions_tuned.jsonl"))
    overlap = []
    for row in rows:  # per sample: the user's module on that one pair, by the module's own rule
        words = set(row["reference"].lower().split())
        overlap.append(len(words & set(row["prediction"].lower().split())) / len(words))
        assert row["scores"][0]["overlap"] == pytest.approx(overlap[-1])
    assert results["tuned"]["overlap"] == pytest.approx(sum(overlap) / len(overlap))
    assert "overlap_length_ratio" in (out / "report.md").read_text()
    assert "overlap" in (out / "report.csv").read_text().splitlines()[0].split(",")


def test_a_bad_users_module_stops_the_stage_naming_the_params_key_and_the_file(project, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import evaluate\nimport not_a_package_anyone_installed\n")

    def run(metrics):
        params = EvaluateParams(max_new_tokens=2, few_shot=None, metrics=metrics)
        evaluate.run(params, TemplateParams(), project["adapter"], project["data"], project["tokenized"],
                     tmp_path / "r", seed=0)

    # Fails on loading, before any model generates.
    with pytest.raises(SystemExit, match=r"evaluate.metrics\[1\] = '.*broken.py' \(.*broken.py\): cannot load .*"
                                         r"not_a_package_anyone_installed"):
        run(["bleu", str(broken)])
    with pytest.raises(SystemExit, match=r"evaluate \(base\): params.yaml: evaluate.metrics\[0\] = '.*wordy.py' "
                                         r"\(.*wordy.py\): compute returned non-numeric value\(s\) \{'verdict': 'str'\}"):
        run([str(FIXTURE_MODULES / "wordy.py")])
    with pytest.raises(SystemExit, match=r"evaluate.metrics\[0\] = '.*raises' \(.*raises.py\): compute\(.*\) on 3 "
                                         r"example\(s\) raised ZeroDivisionError"):
        run([str(FIXTURE_MODULES / "raises")])
