"""Exported checkpoints: model cards beside the weights, and the QLoRA merge drift.

A tiny Llama (wide enough for bitsandbytes' 4-bit layers) is trained with the finetune stage's own
`run` for a few steps (qlora and lora), merged by the merge stage's `run`, and then:
- the drift the merge stage reports between the QLoRA model as trained (adapter on the 4-bit NF4 base)
  and the merged full-precision checkpoint is recomputed here independently and must match;
- both checkpoints carry a README.md card with method, params, data hashes, metrics, lineage and how to
  load them, and merging the same adapter twice writes byte-identical cards (reproducible DVC outputs);
- the export stage ships the merged weights with GGUF files checked against them, an Ollama Modelfile and
  the complete card; the default quality gates stop the tiny model (it learned nothing in 4 steps) and
  publish nothing, unless forced; a method that cannot merge ships its adapter and says why no GGUF.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from stages import evaluate, export, finetune, forgetting, merge
from tests.conftest import tiny_llama
from tunekit.card import CARD_FILE, render_card
from tunekit.chat import encode_conversation, resolve_chat_template
from tunekit.data import read_split, write_rows
from tunekit.io import read_meta, write_json
from tunekit.methods import load_tuned
from tunekit.params import EvaluateParams, ExportParams, FinetuneParams, ForgettingParams, MergeParams, TemplateParams
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
        write_rows(path / split, rows)
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
    batch = collate(list(read_split(data_dir, "test")), smollm2_tokenizer.pad_token_id)
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


FORGETTING = ForgettingParams(probe_passages=8, max_length=32, batch_size=8)
F16_ONLY = {"f16": {"max_logit_difference": 0.05}}


@pytest.fixture(scope="module")
def pipeline(base_dir, data_dir, tmp_path_factory) -> dict:
    """A tiny LoRA run through finetune, merge, evaluate and forgetting, with every stage's metrics file."""
    root = tmp_path_factory.mktemp("pipeline")
    adapter_dir, finetune_metrics = tuned("lora", base_dir, data_dir, root)
    merged_dir = root / "merged"
    metrics = {"finetune": finetune_metrics, "merge": merge.run(MergeParams(atol=1e-4), adapter_dir, data_dir, merged_dir)}
    ingested = root / "ingested"  # the evaluate stage scores generations against the ingested conversations
    ingested.mkdir()
    for split in ("train", "test"):
        write_rows(ingested / split, [{"id": str(i), "messages": [{"role": "user", "content": q},
                                                                              {"role": "assistant", "content": a}]}
                                                  for i, (q, a) in enumerate(CONVERSATIONS)])
    metrics["evaluate"] = evaluate.run(EvaluateParams(max_new_tokens=4, metrics=["exact_match"], few_shot=None),
                                       TemplateParams(), adapter_dir, ingested, data_dir, root / "report",
                                       merged_dir=merged_dir)
    metrics["forgetting"] = forgetting.run(FORGETTING, adapter_dir, merged_dir, root / "forgetting", root / "cache")
    metrics_dir = root / "metrics"
    metrics_dir.mkdir()
    for stage, values in metrics.items():
        write_json(metrics_dir / f"{stage}.json", values)
    return {"adapter": adapter_dir, "merged": merged_dir, "ingested": ingested, "metrics_dir": metrics_dir, "metrics": metrics}


def export_run(pipeline, data_dir, out, finetune_dir=None, merged_dir=None, **params) -> dict:
    return export.run(ExportParams(**{"write_gguf": True, **params}), TemplateParams(), FORGETTING, finetune_dir or pipeline["adapter"],
                      merged_dir or pipeline["merged"], pipeline["metrics_dir"], data_dir, pipeline["ingested"], out)


def test_export_ships_the_merged_weights_gguf_files_and_modelfile_with_everything_in_the_card(pipeline, data_dir, tmp_path):
    metrics, merged_dir = pipeline["metrics"], pipeline["merged"]
    out = tmp_path / "export"
    # The tiny model learned nothing: gate it on the GGUF files alone here (the default gates: next test).
    result = export_run(pipeline, data_dir, out, gates={})
    assert result["merged"] and result["source"] == str(merged_dir) and result["passed"] and not result["forced"]
    assert result["card_sections"] == ["evaluate", "finetune", "forgetting", "merge"]
    shipped = sorted(p.name for p in out.iterdir())
    assert shipped == sorted([p.name for p in merged_dir.iterdir()] + ["model-f16.gguf", "model-q8_0.gguf", "Modelfile"])
    assert (out / "model.safetensors").stat().st_ino == (merged_dir / "model.safetensors").stat().st_ino  # linked
    f16, q8 = result["gguf"]["f16"], result["gguf"]["q8_0"]
    assert f16["max_logit_difference"] <= 0.05 and q8["mean_kl"] <= 0.01 and abs(q8["perplexity_change"]) <= 0.02
    assert {g["gate"] for g in result["gates"]} == {"gguf_f16_logits", "gguf_q8_0_kl", "gguf_q8_0_perplexity",
                                                     "gguf_tokenizer", "gguf_chat_template"}
    assert result["modelfile"] == {"from": "model-q8_0.gguf", "template": "chatml",
                                   "system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}
    assert (out / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf\n\nTEMPLATE \"\"\"{{- if .System }}<|im_start|>system")

    card = (out / CARD_FILE).read_text()
    assert card != (merged_dir / CARD_FILE).read_text() and "Scored downstream" not in card
    for expected in (f"| `tuned.exact_match` | {metrics['evaluate']['tuned']['exact_match']:.4g} |",
                     f"| `merged.loss` | {metrics['forgetting']['merged']['loss']:.4g} |",
                     f"| `max_logit_difference` | {metrics['merge']['max_logit_difference']:.4g} |",
                     "# Model card: merge checkpoint (lora, merged checkpoint", "AutoModelForCausalLM.from_pretrained",
                     "## Quality gates", "| gguf_q8_0_kl | `gguf.q8_0.mean_kl <= 0.01` |", "## GGUF files",
                     f"| `model-q8_0.gguf` | {q8['bytes']} |", "ollama create my-model -f Modelfile"):
        assert expected in card, expected
    batch = collate(list(read_split(data_dir, "test")), 0)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out, use_safetensors=True), batch),
                               logits(AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True), batch))

    with pytest.raises(SystemExit, match="meta.json is missing"):
        export_run(pipeline, data_dir, tmp_path / "export-none", finetune_dir=tmp_path / "nowhere",
                   merged_dir=tmp_path / "nowhere")
    assert not (tmp_path / "export-none").exists()


def test_a_model_that_did_not_learn_is_stopped_by_the_default_gates_unless_forced(pipeline, data_dir, tmp_path):
    assert pipeline["metrics"]["evaluate"]["merged"]["exact_match"] == pipeline["metrics"]["evaluate"]["base"]["exact_match"]
    out = tmp_path / "export"
    (out / "stale").mkdir(parents=True)  # an earlier model's export must not stay behind as if it were this one
    with pytest.raises(export.GatesFailed) as failed:
        export_run(pipeline, data_dir, out, gguf=F16_ONLY, modelfile_from=None)
    assert not out.exists() and not list(tmp_path.glob(".export.tmp-*"))
    message = str(failed.value)
    assert "learned: evaluate.merged.exact_match >= evaluate.base.exact_match + 0.2: 0 >= 0.2 is false" in message
    assert "beats_few_shot" in message and "not measured (no evaluate.few_shot.exact_match" in message  # few-shot was off
    assert "forgetting:" not in message and "gguf_f16_logits" not in message  # those passed
    result = failed.value.result
    assert not result["passed"] and result["gguf"]["f16"]["max_logit_difference"] <= 0.05  # figures kept for the metrics

    forced = export_run(pipeline, data_dir, out, gguf=F16_ONLY, modelfile_from=None, force=True)
    assert forced["forced"] and not forced["passed"] and (out / "model-f16.gguf").is_file()
    assert "**Exported with `export.force: true` although gates failed.**" in (out / CARD_FILE).read_text()


def test_a_method_that_cannot_merge_ships_its_adapter_and_says_why_there_is_no_gguf(pipeline, base_dir, data_dir, tmp_path):
    bottleneck_dir, _ = tuned("adapter", base_dir, data_dir, tmp_path)
    refused = tmp_path / "refused"
    merge.run(MergeParams(), bottleneck_dir, data_dir, refused)
    result = export_run(pipeline, data_dir, tmp_path / "export-adapter", finetune_dir=bottleneck_dir, merged_dir=refused,
                        gates={})
    assert not result["merged"] and result["source"] == str(bottleneck_dir) and "merge" not in result["card_sections"]
    assert result["shipped"] == "tuned" and "gguf" not in result
    assert "method 'adapter' is not merged" in result["gguf_skipped"] and "LoRA adapters only" in result["gguf_skipped"]
    card = (tmp_path / "export-adapter" / CARD_FILE).read_text()
    assert "(adapter, adapter)" in card and "load_tuned" in card and "## Merge check" not in card
    assert "No GGUF files: method 'adapter' is not merged" in card
    assert not list((tmp_path / "export-adapter").glob("*.gguf"))
