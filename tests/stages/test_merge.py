"""The merge stage: the standalone checkpoint reproduces the adapter model."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from stages import merge
from tunekit.chat import encode_conversation, resolve_chat_template
from tunekit.data import write_rows
from tunekit.io import NOT_MERGED, is_merged, write_meta
from tunekit.models import load_causal_lm
from tunekit.params import MergeParams
from tunekit.train import collate


@pytest.fixture()
def adapter_and_data(tiny_model_dir, smollm2_tokenizer, tmp_path):
    torch.manual_seed(0)
    # init_lora_weights=False gives a non-zero update, so merging visibly changes the weights.
    model = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapter = tmp_path / "finetune"
    model.save_pretrained(adapter)
    smollm2_tokenizer.save_pretrained(adapter)
    write_meta(adapter, "finetune", {}, parent=tiny_model_dir, extra={"method": "lora", "mergeable": True, "saves_adapter": True})
    template = resolve_chat_template("model", smollm2_tokenizer)
    rows = []
    for i in range(4):
        enc = encode_conversation([{"role": "user", "content": f"hello {i} " * (i + 1)},
                                   {"role": "assistant", "content": f"reply {i}"}], smollm2_tokenizer, template)
        rows.append({"id": str(i), "input_ids": enc.input_ids, "labels": enc.labels})
    data = tmp_path / "tokenized"
    data.mkdir()
    write_rows(data / "test", rows)
    return adapter, data, rows


def test_merged_checkpoint_matches_adapter_logits_and_loads_without_peft(adapter_and_data, tiny_model_dir, smollm2_tokenizer, tmp_path):
    adapter, data, rows = adapter_and_data
    out = tmp_path / "merged"
    metrics = merge.run(MergeParams(atol=1e-4), adapter, data, out)

    assert metrics["checked_examples"] == 4
    assert 0 <= metrics["max_logit_difference"] <= 1e-4
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "meta.json").read_text())["parent"]["path"] == str(adapter)
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert not hasattr(merged, "peft_config")
    batch = collate(rows, smollm2_tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base_logits = load_causal_lm(tiny_model_dir).eval()(**inputs).logits
        merged_logits = merged.eval()(**inputs).logits
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter's update is in the weights


def test_merge_refuses_a_checkpoint_its_method_cannot_merge(adapter_and_data, tiny_model_dir, tmp_path):
    adapter, data, _ = adapter_and_data
    write_meta(adapter, "finetune", {}, parent=tiny_model_dir, extra={"method": "adapter", "mergeable": False})
    assert merge.run(MergeParams(), adapter, data, tmp_path / "merged") == {"merged": 0}
    assert not is_merged(tmp_path / "merged") and not list((tmp_path / "merged").glob("*.safetensors"))
    assert "cannot be merged" in (tmp_path / "merged" / NOT_MERGED).read_text()
    assert not is_merged(tmp_path / "missing")
