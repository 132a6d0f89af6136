"""GGUF files: written with the gguf package, read back with transformers' GGUF loader, held to bounds.

Tiny Llama and Qwen2 models built from configs, with the real SmolLM2 tokenizer, round-trip through
f16 and q8_0 within the default bounds of params.yaml; a file with one tensor perturbed, and a file
written without Llama's q/k permutation, fail them; architectures and tokenizers the writer does not
handle are refused by name; the Ollama Modelfile renders the training template.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tunekit import gguf_export
from tunekit.chat import BUILTIN_TEMPLATES, encode_conversation, resolve_chat_template
from tunekit.forgetting import load_probe, tokenize_probe
from tunekit.gates import evaluate_gates, failures
from tunekit.gguf_export import ExportRefused, ProbeCheck, export_gguf, gguf_gates, verify_gguf
from tunekit.modelfile import CHATML, LLAMA3, match_family, modelfile, training_system_prompt
from tunekit.params import ExportParams
from tunekit.train import collate

torch.set_num_threads(1)

DEFAULTS = ExportParams().gguf  # the bounds params.yaml ships with
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONVERSATIONS = [("What colour is the sky?", "Blue, mostly."), ("Name a prime number.", "Seven."),
                 ("Capital of Portugal?", "Lisbon."), ("Say hello.", "Hello there!")]


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(smollm2_tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return save(LlamaForCausalLM(config), smollm2_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def rows(smollm2_tokenizer) -> list[dict]:
    template = resolve_chat_template("model", smollm2_tokenizer)
    out = []
    for q, a in CONVERSATIONS:
        enc = encode_conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                  smollm2_tokenizer, template)
        out.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return out


@pytest.fixture(scope="module")
def probe(smollm2_tokenizer) -> ProbeCheck:
    return ProbeCheck(tokenize_probe(load_probe("pydoc", 8), smollm2_tokenizer, 64), smollm2_tokenizer.pad_token_id, 8)


@pytest.fixture(scope="module")
def exported(llama_dir, rows, probe, smollm2_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    results = export_gguf(llama_dir, out, ["f16", "q8_0", "q4_0"], smollm2_tokenizer.chat_template, rows, probe, "tiny")
    return out, results


def reference_logits(model_dir: Path, rows: list[dict]):
    from tunekit.models import load_causal_lm

    batch = collate(rows, 2)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return gguf_export.logits(load_causal_lm(model_dir), batch), batch


def test_tiny_llama_round_trips_through_f16_and_q8_0_within_the_default_bounds(exported, smollm2_tokenizer):
    out, results = exported
    f16, q8, q4 = results["f16"], results["q8_0"], results["q4_0"]
    assert f16["max_logit_difference"] <= DEFAULTS["f16"].max_logit_difference
    assert f16["top1_agreement"] == 1.0 and f16["positions"] > 50
    assert q8["mean_kl"] <= DEFAULTS["q8_0"].max_kl and abs(q8["perplexity_change"]) <= DEFAULTS["q8_0"].max_perplexity_change
    assert "perplexity_change" not in f16  # only quantised files are scored on the probe
    # The figures measure something: 4-bit rounding is visibly further from the model than 8-bit.
    assert q4["mean_kl"] > 3 * q8["mean_kl"] > 0 and q4["max_logit_difference"] > q8["max_logit_difference"] > f16["max_logit_difference"]
    assert f16["tokenizer_round_trip"] == 1.0 and f16["chat_template_embedded"] == 1
    assert all(verdict["verdict"] == "pass" for verdict in evaluate_gates(gguf_gates(DEFAULTS), {"gguf": results}, "merged"))

    # What llama.cpp reads: architecture, hyper-parameters, tokenizer, special tokens, template, types.
    reader = gguf.GGUFReader(out / "model-q8_0.gguf")
    field = lambda key: reader.get_field(key).contents()
    assert field("general.architecture") == "llama" and field("llama.block_count") == 2
    assert field("llama.attention.head_count_kv") == 2 and field("llama.rope.dimension_count") == 16
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smollm"
    assert len(field("tokenizer.ggml.tokens")) == len(smollm2_tokenizer) and len(field("tokenizer.ggml.merges")) > 40000
    assert field("tokenizer.ggml.tokens")[field("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert field("tokenizer.ggml.add_bos_token") is False  # training saw the template's tokens only
    assert field("tokenizer.chat_template") == smollm2_tokenizer.chat_template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert q4["bytes"] < q8["bytes"] < f16["bytes"]  # the tokenizer (~2 MB) dominates a model this small


def perturb(path: Path, tensor: str, amount: float) -> None:
    """Add `amount` to one f16 tensor of a written file, in place."""
    reader = gguf.GGUFReader(path, "r+")
    data = next(t for t in reader.tensors if t.name == tensor).data
    data[...] = (data.astype(np.float32) + amount).astype(np.float16)
    reader.data.flush()


def test_a_file_with_a_perturbed_tensor_fails_the_verification_gate(exported, llama_dir, rows, tmp_path):
    out, results = exported
    broken = tmp_path / "model-f16.gguf"
    broken.write_bytes((out / "model-f16.gguf").read_bytes())
    perturb(broken, "blk.1.ffn_down.weight", 0.1)
    reference, batch = reference_logits(llama_dir, rows)
    figures = verify_gguf(broken, reference, batch, None)
    assert figures["max_logit_difference"] > 10 * results["f16"]["max_logit_difference"]
    verdicts = evaluate_gates(gguf_gates({"f16": DEFAULTS["f16"]}), {"gguf": {"f16": {**results["f16"], **figures}}}, "merged")
    failed = failures(verdicts)
    assert [f["gate"] for f in failed] == ["gguf_f16_logits"] and failed[0]["value"] == figures["max_logit_difference"]


def test_the_reader_is_independent_of_the_writer_a_missing_rope_permutation_is_caught(llama_dir, rows, tmp_path, monkeypatch,
                                                                                     smollm2_tokenizer):
    from tunekit.models import load_causal_lm

    monkeypatch.setitem(gguf_export.ARCHITECTURES, "LlamaForCausalLM", gguf_export.Architecture("LLAMA", permute_qk=False))
    gguf_export.write_gguf(load_causal_lm(llama_dir), smollm2_tokenizer, llama_dir, tmp_path / "wrong.gguf", "f16",
                           smollm2_tokenizer.chat_template, "wrong")
    reference, batch = reference_logits(llama_dir, rows)
    assert verify_gguf(tmp_path / "wrong.gguf", reference, batch, None)["max_logit_difference"] > DEFAULTS["f16"].max_logit_difference


def test_tiny_qwen2_with_attention_biases_and_yarn_rope_round_trips(smollm2_tokenizer, rows, probe, tmp_path, monkeypatch):
    torch.manual_seed(1)
    # Qwen2.5's long-context setting: yarn, written as rope.scaling.* keys.
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    config = Qwen2Config(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.1, rope_scaling=yarn)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # non-zero biases, so a lost or misplaced bias shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model_dir = save(model, smollm2_tokenizer, tmp_path / "qwen2")
    # transformers loads SmolLM2's vocabulary in a qwen2 directory with Qwen2's pre-tokenizer: a pairing no real
    # model has, so its probe hash is in no table; name it qwen2, as Qwen2's own vocabulary is.
    from tunekit.models import load_tokenizer

    loaded = load_tokenizer(model_dir)
    digest = gguf_export.hashlib.sha256(str(loaded.encode(gguf_export.PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    monkeypatch.setitem(gguf_export.PRE_TOKENIZERS, digest, "qwen2")
    results = export_gguf(model_dir, tmp_path, ["f16"], smollm2_tokenizer.chat_template, rows, probe, "tiny-qwen2")
    assert results["f16"]["architecture"] == "qwen2" and results["f16"]["tokenizer_round_trip"] == 1.0
    assert results["f16"]["max_logit_difference"] <= DEFAULTS["f16"].max_logit_difference
    names = {t.name for t in gguf.GGUFReader(tmp_path / "model-f16.gguf").tensors}
    assert {"blk.0.attn_q.bias", "blk.1.attn_v.bias", "output.weight"} <= names
    fields = gguf_export.gguf_fields(tmp_path / "model-f16.gguf", "qwen2.rope.scaling.type", "qwen2.rope.scaling.factor",
                                     "qwen2.rope.scaling.original_context_length")
    assert list(fields.values()) == ["yarn", 4.0, 64] and results["f16"]["rope_scaling"] == "yarn"
    # transformers' reader ignores the yarn keys (plain rope): past the bound, so the match above is the file's yarn.
    from transformers import AutoModelForCausalLM

    directory = gguf_export._alone(tmp_path / "model-f16.gguf")
    plain = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    reference, batch = reference_logits(model_dir, rows)
    off = gguf_export.compare_logits(reference, gguf_export.logits(plain, batch), batch["attention_mask"])["max_logit_difference"]
    assert off > DEFAULTS["f16"].max_logit_difference and off > 10 * results["f16"]["max_logit_difference"]


def test_unsupported_architectures_rope_scaling_and_tokenizers_are_refused_by_name(smollm2_tokenizer, tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ExportRefused, match=r"supports architectures LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.*a GPT2LMHeadModel"):
        gguf_export.write_gguf(gpt2, smollm2_tokenizer, tmp_path, tmp_path / "gpt2.gguf", "f16", "", "gpt2")
    assert not (tmp_path / "gpt2.gguf").exists()

    scaled = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                                       "original_max_position_embeddings": 64})
    with pytest.raises(ExportRefused, match="rope scaling 'longrope'.*supported for llama: default, linear, yarn, llama3"):
        gguf_export.architecture_of(LlamaForCausalLM(scaled))

    with pytest.raises(ExportRefused, match="WordPiece tokenizer model is not written"):
        gguf_export.tokenizer_kind({"model": {"type": "WordPiece"}}, "bert")
    with pytest.raises(ExportRefused, match="precision 'q4_k_m'"):
        gguf_export.write_gguf(gpt2, smollm2_tokenizer, tmp_path, tmp_path / "k.gguf", "q4_k_m", "", "k")


def test_modelfile_for_chatml_carries_the_template_stops_and_the_training_system_prompt(smollm2_tokenizer):
    family, default = match_family(smollm2_tokenizer, smollm2_tokenizer.chat_template)
    assert family is CHATML and default == SMOLLM_SYSTEM  # SmolLM2's template inserts it when a chat has none
    assert match_family(smollm2_tokenizer, BUILTIN_TEMPLATES["chatml"]) == (CHATML, None)
    assert match_family(smollm2_tokenizer, BUILTIN_TEMPLATES["llama3"]) == (LLAMA3, None)
    mistral = "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    assert match_family(smollm2_tokenizer, mistral) == (None, None)

    demo_system = "Extract the order from the note."
    train = [{"messages": [{"role": "system", "content": demo_system}, {"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": "a"}]} for i in range(3)]
    assert training_system_prompt(train) == demo_system
    assert training_system_prompt(train + [{"messages": [{"role": "user", "content": "q"}]}]) is None
    assert modelfile("model-q8_0.gguf", family, demo_system) == (
        'FROM ./model-q8_0.gguf\n\n'
        'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        '{{ end }}{{- end }}<|im_start|>assistant\n"""\n\n'
        'PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\nPARAMETER temperature 0\n\n'
        f'SYSTEM """{demo_system}"""\n')
    assert "TEMPLATE" not in modelfile("model-f16.gguf", None, None)
