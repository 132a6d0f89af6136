"""The base stage: every kind of `base.model` becomes a local safetensors checkpoint, or a clear error."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import base
from tunekit.models import ModelSourceError, classify_source, embedded_gguf
from tunekit.params import BaseModelParams


def test_local_directory_becomes_a_checkpoint_with_tokenizer_template_and_lineage(tiny_model_dir, tmp_path):
    out = tmp_path / "base"
    metrics = base.run(BaseModelParams(model=str(tiny_model_dir)), out)

    assert metrics["layers"] == 2 and metrics["vocab_size"] == 49152
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["kind"] == "local" and meta["hash"] and meta["versions"]["torch"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.chat_template
    original, copy = (AutoModelForCausalLM.from_pretrained(p) for p in (tiny_model_dir, out))
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(copy(ids).logits, original(ids).logits)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.gguf", "does not exist"),
    (lambda d: (d / "nocfg").mkdir() or d / "nocfg", "no config.json"),
    (lambda d: ((d / "pickled").mkdir(), (d / "pickled/config.json").write_text("{}"),
                (d / "pickled/pytorch_model.bin").write_bytes(b"x")) and d / "pickled", "pickled .bin weights are refused"),
    (lambda d: "not a model", "neither"),
])
def test_bad_sources_are_refused_with_the_reason(tmp_path, make, message):
    with pytest.raises(ModelSourceError, match=message):
        classify_source(str(make(tmp_path)))


def test_hub_ids_are_recognised_but_not_fetched_here():
    assert classify_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.real_model
def test_embedded_smollm2_converts_and_answers_in_its_chat_format(tmp_path):
    out = tmp_path / "base"
    metrics = base.run(BaseModelParams(), out)
    assert metrics["parameters"] > 100_000_000
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert json.loads((out / "meta.json").read_text())["source"]["location"] == str(embedded_gguf())
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    answer = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids["input_ids"].shape[1]:])
