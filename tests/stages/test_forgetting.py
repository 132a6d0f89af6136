"""The forgetting stage: the probe set, zero forgetting for an untouched model, positive forgetting
after overfitting a narrow task, and the base-score cache."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model

from stages import forgetting
from tunekit.forgetting import CACHE_FILE, ProbeError, load_probe, pydoc_paragraphs
from tunekit.io import write_meta
from tunekit.models import load_causal_lm
from tunekit.params import ForgettingParams, ParamsError, validate_section
from tunekit.train import TrainConfig, train

SMALL = dict(probe_passages=12, max_length=48, batch_size=12, threads=2)


# ---------------------------------------------------------------- the probe


def test_pydoc_probe_is_deterministic_general_prose():
    first, again = load_probe("pydoc", 16), load_probe("pydoc", 16)
    assert first.passages == again.passages and first.hash == again.hash
    assert first.source == "pydoc" and len(first.passages) == 16 and first.available > 100
    assert all(len(p.split()) >= 25 and p[0].isupper() and p.endswith(".") and "\n" not in p for p in first.passages)
    # Selection by hash: a smaller probe is a prefix of a larger one, a larger count adds passages.
    assert load_probe("pydoc", 8).passages == first.passages[:8]
    assert set(first.passages) <= set(pydoc_paragraphs())


def test_user_probe_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "probe.txt"
    txt.write_bytes(b"First paragraph,\nstill the first.\r\n\r\nSecond one.\n  \nThird.\n\n\n")
    probe = load_probe(str(txt), 10)
    assert sorted(probe.passages) == ["First paragraph,\nstill the first.", "Second one.", "Third."]
    assert probe.source == str(txt) and probe.available == 3
    assert len(load_probe(str(txt), 2).passages) == 2

    jsonl = tmp_path / "probe.jsonl"
    jsonl.write_text('{"text": "alpha beta"}\n\n{"text": "gamma delta", "id": 2}\n{"text": "  "}\n', encoding="utf-8")
    assert sorted(load_probe(str(jsonl), 10).passages) == ["alpha beta", "gamma delta"]


def test_unusable_probes_fail_naming_the_file_and_the_param(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(ProbeError, match=rf"forgetting\.probe: probe file {missing} does not exist"):
        load_probe(str(missing), 8)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ProbeError, match=rf"forgetting\.probe: probe file {empty}: no text found"):
        load_probe(str(empty), 8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text key"}\n', encoding="utf-8")
    with pytest.raises(ProbeError, match=rf"forgetting\.probe: probe file {bad}:2: each line must be an object with a \"text\" key"):
        load_probe(str(bad), 8)
    with pytest.raises(ParamsError, match=r"forgetting: .*'probe.csv' must be 'pydoc', a \.txt file"):
        validate_section("forgetting", {"probe": "probe.csv"}, ForgettingParams)


# ---------------------------------------------------------------- the stage on tiny models


def adapter_checkpoint(model, base_dir, tokenizer, out):
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_meta(out, "finetune", {}, parent=base_dir, extra={"method": "lora", "mergeable": True, "saves_adapter": True})
    return out


def test_untouched_models_show_zero_forgetting_and_base_scores_are_cached(tiny_model_dir, smollm2_tokenizer, tmp_path):
    # Default LoRA init: B = 0, so the adapter changes nothing.
    torch.manual_seed(0)
    lora = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    adapter = adapter_checkpoint(lora, tiny_model_dir, smollm2_tokenizer, tmp_path / "adapter")
    # The base itself as a full fine-tuned checkpoint (saves_adapter: false), loaded without peft.
    full = tmp_path / "full"
    shutil.copytree(tiny_model_dir, full)
    write_meta(full, "finetune", {}, parent=tiny_model_dir, extra={"method": "full", "mergeable": False, "saves_adapter": False})

    merged = tmp_path / "merged"
    lora.merge_and_unload().save_pretrained(merged, safe_serialization=True)
    write_meta(merged, "merge", {}, parent=adapter)
    params, cache = ForgettingParams(**SMALL), tmp_path / "cache"

    first = forgetting.run(params, adapter, merged, tmp_path / "out1", cache)
    assert first["base_cached"] is False and (cache / CACHE_FILE).is_file()
    assert set(first) == {"base", "tuned", "merged", "base_cached", "probe", "probe_hash"}
    assert abs(first["merged"]["loss_delta"]) <= 1e-6
    assert first["probe"]["passages"] == 12 and first["tuned"]["tokens"] == first["base"]["tokens"] > 12 * 20
    assert first["base"]["loss"] > 5  # a random tiny model knows no English
    assert abs(first["tuned"]["loss_delta"]) <= 1e-6 and abs(first["tuned"]["relative_loss_change"]) <= 1e-6
    assert first["tuned"]["perplexity_ratio"] == pytest.approx(1, abs=1e-6)

    refused = tmp_path / "refused"  # what the merge stage writes for a method that cannot merge
    refused.mkdir()
    write_meta(refused, "merge", {}, parent=adapter, extra={"merged": False, "reason": "adapter cannot be merged"})
    second = forgetting.run(params, full, refused, tmp_path / "out2", cache)
    assert second["base_cached"] is True and second["base"] == first["base"]
    assert abs(second["tuned"]["loss_delta"]) <= 1e-6 and "merged" not in second
    assert "came from the cache" in (tmp_path / "out2" / "report.md").read_text()

    # A different truncation is a different measurement: the cache misses.
    third = forgetting.run(ForgettingParams(**{**SMALL, "max_length": 32}), full, None, tmp_path / "out3", cache)
    assert third["base_cached"] is False and third["base"]["tokens"] < first["base"]["tokens"]
    assert len(json.loads((cache / CACHE_FILE).read_text())) == 2


def test_overfitting_a_narrow_task_shows_forgetting(tiny_model_dir, smollm2_tokenizer, tmp_path):
    # A full fine-tune (saves_adapter: false): LoRA on a random 32-wide model can barely move its
    # near-uniform outputs, a full copy overfits in a few dozen steps.
    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_dir)
    narrow = [smollm2_tokenizer(f"ship {n} umbrellas to Porto, ship {n} umbrellas to Porto.")["input_ids"] for n in range(2, 10)]
    rows = [{"input_ids": ids, "labels": list(ids)} for ids in narrow]
    cfg = TrainConfig(epochs=1, max_steps=30, lr=1e-2, batch_size=8, schedule="constant", eval_every=1000, checkpoint_every=1000)
    state = train(model, rows, [], cfg, smollm2_tokenizer.pad_token_id, tmp_path / "ckpt")
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"] - 5  # it did learn the narrow text
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(tuned)
    write_meta(tuned, "finetune", {}, parent=tiny_model_dir, extra={"method": "full", "mergeable": False, "saves_adapter": False})

    out = tmp_path / "out"
    metrics = forgetting.run(ForgettingParams(**SMALL), tuned, None, out, tmp_path / "cache")
    tuned_scores, base = metrics["tuned"], metrics["base"]
    assert tuned_scores["loss_delta"] > 0.5, tuned_scores
    assert tuned_scores["relative_loss_change"] == pytest.approx(tuned_scores["loss_delta"] / base["loss"])
    assert tuned_scores["perplexity_ratio"] == pytest.approx(tuned_scores["perplexity"] / base["perplexity"]) and tuned_scores["perplexity_ratio"] > 1
    report = (out / "report.md").read_text()
    assert "| base |" in report and "| tuned |" in report and "pydoc_data.topics" in report
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_refuses_a_missing_probe_before_loading_models(tiny_model_dir, smollm2_tokenizer, tmp_path):
    lora = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    adapter = adapter_checkpoint(lora, tiny_model_dir, smollm2_tokenizer, tmp_path / "adapter")
    with pytest.raises(SystemExit, match=r"forgetting\.probe: probe file .*missing\.txt does not exist"):
        forgetting.run(ForgettingParams(probe=str(tmp_path / "missing.txt")), adapter, None, tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_general_ability_probe_scores_humaneval_for_each_model_in_the_sandbox(tiny_model_dir, smollm2_tokenizer, tmp_path):
    torch.manual_seed(0)
    lora = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    adapter = adapter_checkpoint(lora, tiny_model_dir, smollm2_tokenizer, tmp_path / "adapter")
    code = {"enabled": True, "problems": 2, "max_new_tokens": 6, "timeout": 5}
    params, cache = ForgettingParams(**SMALL, code=code), tmp_path / "cache"
    metrics = forgetting.run(params, adapter, None, tmp_path / "out", cache)
    assert set(metrics["code"]) == {"base", "tuned"}
    for name in ("base", "tuned"):
        result = metrics["code"][name]
        # A random tiny model writes no working function: every completion ran in the sandbox and failed.
        assert result["problems"] == 2 and result["samples"] == 2 and result["passed"] == 0 and result["pass_at_1"] == 0
        assert sum(result["reasons"].values()) == 2 and "passed" not in result["reasons"]
    assert metrics["code"]["tuned"]["pass_at_1_delta"] == 0
    assert "## General ability: HumanEval" in (tmp_path / "out" / "report.md").read_text()
    entries = json.loads((cache / CACHE_FILE).read_text())
    assert [e["probe"] for e in entries.values()].count("humaneval") == 1  # the base's pass@1 is cached


def test_task_head_checkpoints_are_reported_as_not_measured(tiny_model_dir, tmp_path):
    tuned = tmp_path / "classifier"
    tuned.mkdir()
    write_meta(tuned, "finetune", {}, parent=tiny_model_dir, extra={"method": "full", "task": "classification"})
    metrics = forgetting.run(ForgettingParams(**SMALL), tuned, None, tmp_path / "out", tmp_path / "cache")
    assert metrics["measured"] == 0 and "task 'classification'" in metrics["reason"]
    assert "Not measured" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "cache").exists()  # nothing was scored
