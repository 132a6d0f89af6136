"""GGUF export of the Llama family beyond byte-level BPE: SentencePiece vocabularies, rope scaling, Mistral and Qwen2.

Everything is built in the test, nothing is downloaded: `sentencepiece` trains a Llama-2-style BPE model (byte
fallback, dummy prefix) on Python's documentation text, transformers converts it to a fast tokenizer (legacy=True:
Llama 2 / Mistral v0.1; legacy=False: Mistral v0.3 style), and tiny Llama, Mistral and Qwen2 models are built from
configs. Each is exported to f16 and read back with transformers' GGUF loading (AutoTokenizer and
AutoModelForCausalLM with gguf_file=), an implementation independent of the writer:
- the read-back tokenizer encodes strings with spaces, newlines, tabs, unicode and byte-fallback characters to the
  checkpoint tokenizer's ids, and so does llama.cpp's SentencePiece rule applied to the file (LlamaCppSentencePiece),
  with the differences that rule has from transformers' Metaspace pinned by name;
- the logits on held-out conversations are within the f16 bound;
- rope scaling: Llama 3.1's llama3 type is written as rope_freqs.weight, equal to what transformers' own llama3 rope
  computes; linear and yarn as rope.scaling.* keys. transformers' GGUF reader ignores both for llama and qwen2
  (it builds plain rope), so the read-back model gets its frequencies from the file (apply_file_rope); without
  that the logits are off by whole units, which shows the scaling is in the file and matters;
- Mistral's sliding window caps the context written; unsupported rope types, tokenizers and biases are refused
  by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
import sentencepiece
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from tests.conftest import train_sentencepiece
from tunekit import gguf_export
from tunekit.chat import encode_conversation, render
from tunekit.gguf_export import ExportRefused, LlamaCppSentencePiece, ProbeCheck, export_gguf, read_back_tokenizer
from tunekit.models import load_causal_lm, load_tokenizer
from tunekit.params import ExportParams
from tunekit.train import collate

torch.set_num_threads(1)

F16_BOUND = ExportParams().gguf["f16"].max_logit_difference
# Llama 2's chat template, shortened: <s> opens every user turn, answers end with </s>.
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'].strip() + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
CONVERSATIONS = [("What does the return statement do?", "It leaves the function with a value."),
                 ("Name a built-in type.", "The int type, for 123 and 4567."),
                 ("Is ünïcode fine?", "Yes: 日本 and ✅ fall back to bytes.")]
# (Qwen2, with yarn rope scaling and attention biases: tests/tunekit/test_gguf_export.py, with a byte-level BPE tokenizer.)
# Text without special tokens: spaces (leading, runs), newlines, tabs, digits, accents, CJK, emoji (byte fallback).
PLAIN = ["Hello world", "The function returns None.", "two  spaces and   three", "line one\nline two\n\n\tindented",
         "digits 0123456789 and 3.14", "café naïve résumé", "日本語のテキスト", "emoji 🦙🚀 and ✅", "a\u00a0b\u200dc"]
LEADING_SPACE = ["  starts with two spaces", " one"]
CHAT = ["<s>[INST] What is it? [/INST] It is. </s><s>[INST] And\nthen? [/INST]", "<s>[INST] 日本 🦙 [/INST] ok </s>"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    # Llama 2's settings, its identity normalisation included
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model", normalization_rule_name="identity")


def spm_tokenizer(sp_model: Path, directory: Path, legacy: bool):
    """A fast tokenizer converted from the SentencePiece model."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(sp_model, directory / "tokenizer.model")
    tokenizer = LlamaTokenizerFast.from_pretrained(directory, legacy=legacy, add_prefix_space=True)
    tokenizer.chat_template = LLAMA2
    return tokenizer


def save(model, tokenizer, path: Path) -> Path:
    """The checkpoint as the pipeline writes one, without tokenizer.model (the export reads the fast tokenizer).
    save_pretrained does not record `legacy`, and transformers 5 rebuilds a loaded Llama tokenizer's prefix rule
    from tokenizer_config.json: written here, as Llama 2's and Mistral's checkpoints state it."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "tokenizer.model").unlink(missing_ok=True)
    if getattr(tokenizer, "legacy", None) is not None:
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": tokenizer.legacy}))
    return path


def texts_for(tokenizer) -> list[str]:
    return [render([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenizer, LLAMA2, False)
            for q, a in CONVERSATIONS]


def rows_for(tokenizer) -> list[dict]:
    out = []
    for q, a in CONVERSATIONS:
        enc = encode_conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenizer, LLAMA2)
        out.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return out


def probe(tokenizer) -> ProbeCheck:
    return ProbeCheck([], tokenizer.pad_token_id or 0, 8)  # f16 only: the probe is scored for quantised files


def export_f16(model, tokenizer, directory: Path) -> tuple[Path, dict]:
    model_dir = save(model, tokenizer, directory / "checkpoint")
    out = directory / "gguf"
    out.mkdir()
    loaded = load_tokenizer(model_dir)
    results = export_gguf(model_dir, out, ["f16"], LLAMA2, rows_for(loaded), probe(loaded), "tiny", texts_for(loaded))
    return out / "model-f16.gguf", results["f16"]


def llama_config(vocab_size: int, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                       initializer_range=0.1, bos_token_id=1, eos_token_id=2, **extra)


def fields(path: Path, *keys: str) -> dict:
    return gguf_export.gguf_fields(path, *keys)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-llama2", "metaspace-first-mistral-v03"])
def test_sentencepiece_llama_round_trips_tokenizer_and_logits(sp_model, tmp_path, legacy):
    tokenizer = spm_tokenizer(sp_model, tmp_path / "tok", legacy)
    torch.manual_seed(0)
    path, result = export_f16(LlamaForCausalLM(llama_config(len(tokenizer), tie_word_embeddings=True)), tokenizer, tmp_path)

    # What llama.cpp reads: a SentencePiece vocabulary with scores and types, no merges, no BOS added on top.
    f = fields(path, "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
               "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.add_space_prefix",
               "tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
               "tokenizer.ggml.unknown_token_id")
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default" and f["tokenizer.ggml.merges"] is None
    tokens, types, scores = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"]
    assert len(tokens) == len(scores) == len(types) == 1000
    assert [tokens[i] for i in (f["tokenizer.ggml.unknown_token_id"], f["tokenizer.ggml.bos_token_id"],
                                f["tokenizer.ggml.eos_token_id"])] == ["<unk>", "<s>", "</s>"]
    kind = gguf.TokenType
    assert (types[0], types[1], types[2]) == (kind.UNKNOWN, kind.CONTROL, kind.CONTROL)
    assert tokens[3 + 0x0A] == "<0x0A>" and types[3 + 0x0A] == kind.BYTE and types.count(kind.BYTE) == 256
    assert types.count(kind.NORMAL) == 1000 - 3 - 256
    # Merged pieces score by merge order, so llama.cpp's highest-score-first merging follows the tokenizer's ranks.
    merged = json.loads((tmp_path / "checkpoint" / "tokenizer.json").read_text())["model"]["merges"]
    first = "".join(merged[0]) if isinstance(merged[0], list) else merged[0].replace(" ", "")
    assert scores[tokens.index(first)] == 0.0 > scores[tokens.index("".join(merged[1]) if isinstance(merged[1], list) else merged[1].replace(" ", ""))]
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_space_prefix"] is legacy
    assert result["prefix_rule"] == ("Metaspace prepend_scheme 'always'" if legacy else "Metaspace prepend_scheme 'first'")

    source = load_tokenizer(tmp_path / "checkpoint")
    ids = lambda t: source.encode(t, add_special_tokens=False)
    read_back, llama_cpp = read_back_tokenizer(path), LlamaCppSentencePiece(path)
    # The strings exercise byte fallback (emoji, CJK, a no-break space are not pieces of this small vocabulary).
    assert sum(len(ids(t)) for t in PLAIN) > 100
    assert sum(token.startswith("<0x") for t in PLAIN for token in source.convert_ids_to_tokens(ids(t))) > 20
    # transformers' tokenizer from the file: the same ids on every plain string (its Metaspace is "first").
    for text in PLAIN + LEADING_SPACE:
        assert read_back.encode(text, add_special_tokens=False) == ids(text), text
    # llama.cpp's rule on the chat texts training produced (they open with <s>): the same ids, with either prefix flag.
    for text in CHAT:
        assert llama_cpp.encode(text) == ids(text), text
    if legacy:  # "always" == add_space_prefix: plain text the same, except that llama.cpp adds a "▁" before a leading space
        assert all(llama_cpp.encode(t) == ids(t) for t in PLAIN)
        assert all(llama_cpp.encode(t) != ids(t) for t in LEADING_SPACE)
        # An independent reference for llama.cpp's rule and the scores: llama.cpp's SentencePiece tokenizer reproduces
        # sentencepiece's own encoding (dummy prefix on every text, merges by score, byte fallback), and so does the
        # rule applied to the file, on every string, the leading-space ones where transformers differs included.
        reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
        for text in PLAIN + LEADING_SPACE:
            assert llama_cpp.encode(text) == reference.encode(text), text
    else:  # "first" -> no prefix: plain text then lacks the "▁" the tokenizer puts at its very start
        assert all(llama_cpp.encode(t) != ids(t) for t in PLAIN if not t.startswith(" "))
        assert all(llama_cpp.encode(t) == ids(t) for t in LEADING_SPACE)

    # The export's own figures: the held-out conversations tokenise the same (llama.cpp's rule), logits within f16.
    assert result["tokenizer_round_trip"] == 1.0 and result["chat_template_embedded"] == 1
    assert result["max_logit_difference"] <= F16_BOUND and result["top1_agreement"] == 1.0 and result["positions"] > 60


def test_mistral_with_gqa_untied_and_a_sliding_window(sp_model, tmp_path):
    tokenizer = spm_tokenizer(sp_model, tmp_path / "tok", legacy=True)
    torch.manual_seed(1)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           sliding_window=128, tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1,
                           eos_token_id=2)
    path, result = export_f16(MistralForCausalLM(config), tokenizer, tmp_path)
    assert result["architecture"] == "llama" and result["context_length"] == 128 and result["context_capped_to_sliding_window"]
    f = fields(path, "llama.context_length", "llama.attention.head_count", "llama.attention.head_count_kv",
               "llama.attention.key_length", "llama.rope.dimension_count")
    assert list(f.values()) == [128, 8, 2, 16, 16]
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" in names and "rope_freqs.weight" not in names
    assert max(len(r["input_ids"]) for r in rows_for(load_tokenizer(tmp_path / "checkpoint"))) < 128  # inside the window
    assert result["max_logit_difference"] <= F16_BOUND and result["tokenizer_round_trip"] == 1.0


def reference_and_read_back(path: Path, model_dir: Path):
    tokenizer = load_tokenizer(model_dir)
    batch = collate(rows_for(tokenizer), tokenizer.pad_token_id)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return gguf_export.logits(load_causal_lm(model_dir), batch), batch


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_llama_rope_scaling_is_written_and_read_back(sp_model, tmp_path, rope):
    tokenizer = spm_tokenizer(sp_model, tmp_path / "tok", legacy=True)
    torch.manual_seed(2)
    model = LlamaForCausalLM(llama_config(len(tokenizer), rope_scaling=rope, rope_theta=10000.0))
    path, result = export_f16(model, tokenizer, tmp_path)
    assert result["rope_scaling"] == rope["rope_type"] and result["max_logit_difference"] <= F16_BOUND

    reader = gguf.GGUFReader(path)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    scaling = reader.get_field("llama.rope.scaling.type")
    if rope["rope_type"] == "llama3":
        # The factors llama.cpp divides its frequencies by are transformers' own llama3 rope, computed independently.
        default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        expected = default / model.model.rotary_emb.inv_freq
        assert freqs is not None and freqs.tensor_type.name == "F32" and scaling is None
        assert torch.allclose(torch.from_numpy(freqs.data.copy()), expected, rtol=1e-5)
        assert expected[0] == 1.0 and expected[-1] == 8.0 and 1.0 < expected[1] < 8.0  # all three bands are exercised
    else:
        assert freqs is None and scaling.contents() == "linear" and reader.get_field("llama.rope.scaling.factor").contents() == 4.0

    # transformers' reader alone builds plain rope: far off, so the scaling in the file is what makes the match.
    reference, batch = reference_and_read_back(path, tmp_path / "checkpoint")
    directory = gguf_export._alone(path)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=path.name, dtype=torch.float32).eval()
    assert gguf_export.compare_logits(reference, gguf_export.logits(plain, batch), batch["attention_mask"])[
        "max_logit_difference"] > 4 * F16_BOUND


def test_unsupported_rope_tokenizers_and_biases_are_refused_by_name(sp_model, tmp_path):
    dynamic = LlamaForCausalLM(llama_config(300, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ExportRefused, match=r"rope scaling 'dynamic'.*supported for llama: default, linear, yarn, llama3"):
        gguf_export.architecture_of(dynamic)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, rope_scaling={
                                            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
    with pytest.raises(ExportRefused, match=r"rope scaling 'llama3'.*supported for qwen2: default, linear, yarn"):
        gguf_export.architecture_of(qwen)
    with pytest.raises(ExportRefused, match="attention_bias: true"):
        gguf_export.architecture_of(LlamaForCausalLM(llama_config(300, attention_bias=True)))

    tokenizer = spm_tokenizer(sp_model, tmp_path / "tok", legacy=True)
    data = gguf_export.backend_json(tokenizer, tmp_path)
    for name, change in [("unigram", lambda d: d["model"].update(type="Unigram")),
                         ("split", lambda d: d["pre_tokenizer"].update(split=True)),
                         ("nfkc", lambda d: d.update(normalizer={"type": "NFKC"}))]:
        changed = json.loads(json.dumps(data))
        change(changed)
        with pytest.raises(ExportRefused, match="Unigram tokenizer model" if name == "unigram" else "not one llama.cpp"):
            gguf_export.tokenizer_kind(changed, name)
    assert gguf_export.tokenizer_kind(data, "metaspace").add_space_prefix is True  # legacy: prepend_scheme 'always'
    # Llama 2's own tokenizer.json form (normalizer Prepend + Replace, no pre-tokenizer) is the exact one.
    data.update(pre_tokenizer=None, normalizer={"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})
    assert gguf_export.tokenizer_kind(data, "llama2-form") == gguf_export.TokenizerKind(
        "llama", True, "normalizer Prepend('▁') + Replace(' ', '▁')")
    with pytest.raises(ExportRefused, match="slow .*fast tokenizer"):
        gguf_export.backend_json(object(), tmp_path)
