"""Exported checkpoints: model cards beside the weights, and the QLoRA merge drift.

A tiny Llama (wide enough for bitsandbytes' 4-bit layers) is trained with the finetune stage's own
`run` for a few steps (qlora and lora), merged by the merge stage's `run`, and then:
- the drift the merge stage reports between the QLoRA model as trained (adapter on the 4-bit NF4 base)
  and the merged full-precision checkpoint is recomputed here independently and must match;
- both checkpoints carry a README.md card with method, params, data hashes, metrics, lineage and how to
  load them, and merging the same adapter twice writes byte-identical cards (reproducible DVC outputs).
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from stages import evaluate, export, finetune, forgetting, merge
from tests.conftest import tiny_llama
from tunekit.card import CARD_FILE, render_card
from tunekit.chat import encode_conversation, resolve_chat_template
from tunekit.io import read_jsonl, read_meta, write_json, write_jsonl
from tunekit.methods import load_tuned
from tunekit.params import EvaluateParams, FinetuneParams, ForgettingParams, MergeParams, TemplateParams
from tunekit.train import collate

torch.set_num_threads(1)

CONVERSATIONS = [("What colour is the sky?", "Blue, mostly."), ("Name a prime number.", "Seven."),
                 ("Capital of Portugal?", "Lisbon."), ("Say hello.", "Hello there!")]


@pytest.fixture(scope="module")
def data_dir(smollm2_tokenizer, tmp_path_factory) -> Path:
    template = resolve_chat_template("chatml", smollm2_tokenizer)
    rows = []
    for i, (q, a) in enumerate(CONVERSATIONS):
        enc = encode_conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                  smollm2_tokenizer, template)
        rows.append({"id": str(i), "input_ids": enc.input_ids, "labels": enc.labels})
    path = tmp_path_factory.mktemp("tokenized")
    for split in ("train", "validation", "test"):
        write_jsonl(path / f"{split}.jsonl", rows)
    return path


@pytest.fixture(scope="module")
def base_dir(smollm2_tokenizer, tmp_path_factory) -> Path:
    config = tiny_llama(len(smollm2_tokenizer)).config
    config.hidden_size, config.head_dim, config.intermediate_size, config.initializer_range = 64, 16, 128, 0.1
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-64")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(path)
    return path


def tuned(method: str, base_dir: Path, data_dir: Path, root: Path) -> tuple[Path, dict]:
    params = FinetuneParams(method=method, lora={"r": 4, "alpha": 8, "dropout": 0.0}, lr=3e-2, max_steps=4,
                            batch_size=4, eval_every=2, checkpoint_every=100, schedule="constant", threads=1)
    out = root / f"finetune-{method}"
    metrics, _ = finetune.run(params, 0, base_dir, data_dir, out, root / f"plots-{method}", root / "ckpt")
    return out, metrics


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_qlora_merge_reports_the_drift_from_the_model_as_trained(base_dir, data_dir, smollm2_tokenizer, tmp_path):
    adapter_dir, _ = tuned("qlora", base_dir, data_dir, tmp_path)
    metrics = merge.run(MergeParams(atol=1e-4), adapter_dir, data_dir, tmp_path / "merged")
    drift = metrics["qlora_drift"]
    assert set(drift) == {"max_logit_difference", "mean_logit_difference", "loss_quantised", "loss_merged", "loss_difference"}

    # Recompute: the adapter on the 4-bit base as evaluate loads it, against the merged checkpoint from disk.
    batch = collate(list(read_jsonl(data_dir / "test.jsonl")), smollm2_tokenizer.pad_token_id)
    as_trained = load_tuned(adapter_dir)
    assert getattr(as_trained.model.base_model.model, "is_loaded_in_4bit", False)
    quantised = logits(as_trained.model, batch)
    merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", use_safetensors=True), batch)
    difference = (quantised - merged).abs()[batch["attention_mask"].bool()]
    assert drift["max_logit_difference"] == pytest.approx(float(difference.max()), rel=1e-4)
    assert drift["mean_logit_difference"] == pytest.approx(float(difference.mean()), rel=1e-4)
    assert 0 < drift["mean_logit_difference"] < drift["max_logit_difference"]  # NF4 rounding is real, and uneven

    targets = batch["labels"][:, 1:]
    mask = targets != -100
    loss = {name: float(torch.nn.functional.cross_entropy(values[:, :-1][mask], targets[mask]))
            for name, values in (("quantised", quantised), ("merged", merged))}
    assert drift["loss_quantised"] == pytest.approx(loss["quantised"], rel=1e-4)
    assert drift["loss_merged"] == pytest.approx(loss["merged"], rel=1e-4)
    assert drift["loss_difference"] == pytest.approx(loss["merged"] - loss["quantised"], abs=1e-5)
    assert drift["loss_difference"] != 0

    card = (tmp_path / "merged" / CARD_FILE).read_text()
    assert "### QLoRA merge drift" in card and f"| `mean_logit_difference` | {drift['mean_logit_difference']:.4g} |" in card
    assert "`qlora`" in card


def test_cards_beside_both_checkpoints_are_complete_and_reproducible(base_dir, data_dir, tmp_path):
    adapter_dir, finetune_metrics = tuned("lora", base_dir, data_dir, tmp_path)
    card = (adapter_dir / CARD_FILE).read_text()
    meta = read_meta(adapter_dir)
    assert "Model Card for Model ID" not in card  # peft's empty template is replaced
    for expected in ("# Model card: finetune checkpoint (lora, adapter)", "library_name: peft", '"r": 4',
                     f"| `finetune.train` | {meta['data']['train'][:16]} |",
                     f"| `trainable_parameters` | {finetune_metrics['trainable_parameters']} |",
                     "| `steps` | 4 |", "`best_val_loss`", "PeftModel.from_pretrained", "## Forgetting", "## Evaluation",
                     # the tiny base has no meta.json: the lineage ends with what finetune recorded about it
                     f"| `{base_dir}` | `{meta['parent']['hash'][:16]}` |"):
        assert expected in card, expected
    assert "train_seconds" not in card and "threads" not in card.split("## Training")[1].split("##")[0]

    first = merge.run(MergeParams(atol=1e-4), adapter_dir, data_dir, tmp_path / "merged-a")
    merge.run(MergeParams(atol=1e-4), adapter_dir, data_dir, tmp_path / "merged-b")
    card_a = (tmp_path / "merged-a" / CARD_FILE).read_bytes()
    assert card_a == (tmp_path / "merged-b" / CARD_FILE).read_bytes()
    text = card_a.decode()
    assert "qlora_drift" not in first and "QLoRA merge drift" not in text
    assert "# Model card: merge checkpoint (lora, merged checkpoint" in text and "library_name: transformers" in text
    assert f"| `max_logit_difference` | {first['max_logit_difference']:.4g} |" in text
    assert "| finetune |" in text and "AutoModelForCausalLM.from_pretrained" in text
    assert f"| `finetune.validation` | {meta['data']['validation'][:16]} |" in text  # data hashes from the lineage

    # The complete card (what the flow logs to MLflow) adds evaluation and forgetting numbers.
    full = render_card(tmp_path / "merged-a", {"evaluate": {"merged": {"exact_match": 0.5}},
                                               "forgetting": {"merged": {"relative_loss_change": 0.049}}})
    assert "| `merged.exact_match` | 0.5 |" in full and "| `merged.relative_loss_change` | 0.049 |" in full


def test_export_ships_the_merged_weights_with_evaluation_and_forgetting_in_the_card(base_dir, data_dir, tmp_path):
    adapter_dir, finetune_metrics = tuned("lora", base_dir, data_dir, tmp_path)
    merged_dir = tmp_path / "merged"
    metrics = {"finetune": finetune_metrics, "merge": merge.run(MergeParams(atol=1e-4), adapter_dir, data_dir, merged_dir)}
    ingested = tmp_path / "ingested"  # the evaluate stage scores generations against the ingested conversations
    ingested.mkdir()
    write_jsonl(ingested / "test.jsonl", [{"id": str(i), "messages": [{"role": "user", "content": q},
                                                                      {"role": "assistant", "content": a}]}
                                          for i, (q, a) in enumerate(CONVERSATIONS)])
    metrics["evaluate"] = evaluate.run(EvaluateParams(max_new_tokens=4, metrics=["exact_match"], few_shot=None),
                                       TemplateParams(), adapter_dir, ingested, data_dir, tmp_path / "report",
                                       merged_dir=merged_dir)
    metrics["forgetting"] = forgetting.run(ForgettingParams(probe_passages=8, max_length=32, batch_size=8), adapter_dir,
                                           merged_dir, tmp_path / "forgetting", tmp_path / "cache")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    for stage, values in metrics.items():
        write_json(metrics_dir / f"{stage}.json", values)

    out = tmp_path / "export"
    result = export.run(adapter_dir, merged_dir, metrics_dir, out)
    assert result["merged"] and result["source"] == str(merged_dir)
    assert result["card_sections"] == ["evaluate", "finetune", "forgetting", "merge"]
    shipped = sorted(p.name for p in out.iterdir())
    assert shipped == sorted(p.name for p in merged_dir.iterdir())  # every file, README.md replaced
    assert (out / "model.safetensors").stat().st_ino == (merged_dir / "model.safetensors").stat().st_ino  # linked
    card = (out / CARD_FILE).read_text()
    assert card != (merged_dir / CARD_FILE).read_text() and "Scored downstream" not in card
    for expected in (f"| `tuned.exact_match` | {metrics['evaluate']['tuned']['exact_match']:.4g} |",
                     f"| `merged.loss` | {metrics['forgetting']['merged']['loss']:.4g} |",
                     f"| `max_logit_difference` | {metrics['merge']['max_logit_difference']:.4g} |",
                     "# Model card: merge checkpoint (lora, merged checkpoint", "AutoModelForCausalLM.from_pretrained"):
        assert expected in card, expected
    batch = collate(list(read_jsonl(data_dir / "test.jsonl")), 0)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out, use_safetensors=True), batch),
                               logits(AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True), batch))

    # A method that cannot merge: the adapter itself is exported, and the card says how to serve it.
    bottleneck_dir, _ = tuned("adapter", base_dir, data_dir, tmp_path)
    refused = tmp_path / "refused"
    merge.run(MergeParams(), bottleneck_dir, data_dir, refused)
    result = export.run(bottleneck_dir, refused, metrics_dir, tmp_path / "export-adapter")
    assert not result["merged"] and result["source"] == str(bottleneck_dir) and "merge" not in result["card_sections"]
    card = (tmp_path / "export-adapter" / CARD_FILE).read_text()
    assert "(adapter, adapter)" in card and "load_tuned" in card and "## Merge check" not in card

    with pytest.raises(SystemExit, match="meta.json is missing"):
        export.run(tmp_path / "nowhere", None, metrics_dir, tmp_path / "export-none")
    assert not (tmp_path / "export-none").exists()
