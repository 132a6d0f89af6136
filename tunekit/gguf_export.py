"""GGUF files for llama.cpp, Ollama and LM Studio, written with the `gguf` package and read back to check them.

Writing (`write_gguf`): the weights of a Hugging Face causal LM checkpoint, named by the gguf package's
own tensor-name map (`gguf.get_tensor_name_map`), converted to one precision, with the hyper-parameters
llama.cpp reads, the tokenizer and the chat template the model was trained with, so a runtime renders
prompts the way training did. No llama.cpp checkout is built or run. Tokenizers, read from the fast
tokenizer as the checkpoint loads it (never from tokenizer.model):
- byte-level BPE (SmolLM2, Llama 3, Qwen2): tokenizer.ggml.model "gpt2", tokens, types, merges and the
  pre-tokenizer name llama.cpp knows for the vocabulary (found by a probe text's ids);
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B, TinyLlama): "llama", tokens, scores
  (from the merge ranks), types (normal, unknown, control, user-defined, byte) and add_space_prefix (from
  the tokenizer's own prefix rule; `sentencepiece_prefix` says which rules map exactly).

What differs from the Hugging Face layout, and why:
- Llama-family q and k projections are re-ordered per head: Hugging Face's rotary embedding rotates
  the two halves of each head (rotate_half), llama.cpp's LLAMA graph rotates adjacent pairs; permuting
  the rows of q and k makes the two compute the same attention. Qwen2 uses llama.cpp's NEOX rope,
  which is rotate_half already: no permutation.
- 1-D tensors (norms, biases) stay float32 in every precision, as llama.cpp's own converter keeps them;
  a matrix whose rows are not a whole number of quantisation blocks falls back to float16.
- Tied output embeddings are not written twice: llama.cpp uses token_embd when `output` is missing.
- Rope scaling: linear and yarn as rope.scaling.* keys; Llama 3.1's llama3 type as the rope_freqs.weight
  tensor of per-frequency divisors, as llama.cpp's converter writes it. Other types are refused.
- A sliding attention window (Mistral 7B v0.1) caps the context length written: llama.cpp's llama and
  qwen2 graphs attend over everything, which is the same computation only up to the window.

Reading back (`load_gguf_model`) uses transformers' GGUF loader, an implementation independent of the
writer (its own de-quantisation, its own inverse permutation), so a wrong permutation, name or scale
shows up as a difference against the checkpoint; `compare_logits` and `probe_perplexity` give the
figures the export stage gates on. Where that reader falls short it is completed from the file itself:
its Llama and Qwen2 loaders build plain rope, so the rotary frequencies are set from the file's scaling
keys or rope_freqs tensor (`apply_file_rope`); its SentencePiece tokenizer prefixes text the Metaspace way,
so the tokenizer check applies llama.cpp's prefix rule to the vocabulary it read (`LlamaCppSentencePiece`).
"""

from __future__ import annotations

import hashlib
import math
import time
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunekit.params import GGUF_PRECISIONS as PRECISIONS
from tunekit.params import GGUF_UNQUANTISED as UNQUANTISED

log = logging.getLogger("tunekit")


class ExportRefused(Exception):
    """The checkpoint cannot be written as a GGUF by this exporter; the message says why and what is supported."""


@dataclass(frozen=True)
class Architecture:
    gguf_arch: str       # gguf.MODEL_ARCH member name
    permute_qk: bool     # HF rotate-half rope -> llama.cpp's interleaved LLAMA rope


# config.architectures[0] -> how it is written. Mistral's dense models are Llama to llama.cpp.
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("LLAMA", permute_qk=True),
    "MistralForCausalLM": Architecture("LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": Architecture("QWEN2", permute_qk=False),
}


# tokenizer.ggml.pre: llama.cpp picks its pre-tokenizer regex by this name. llama.cpp's converter names it
# from the sha256 of the token ids of one probe text (below); these are the byte-level BPE families whose
# names it records for those hashes. An unknown hash is refused: a wrong name splits text differently.
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
    "it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",       # Qwen1.5, Qwen2, Qwen2.5
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",      # Mistral Nemo
}


def supported() -> str:
    return (f"architectures {', '.join(ARCHITECTURES)} with a byte-level BPE tokenizer "
            f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))} pre-tokenizers) or a SentencePiece-style BPE "
            "tokenizer with byte fallback (Llama 2, Mistral 7B, TinyLlama) in a fast tokenizer's tokenizer.json")


def architecture_of(model: torch.nn.Module) -> Architecture:
    """How this model is written, or ExportRefused naming what is supported."""
    config = model.config
    name = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise ExportRefused(f"GGUF export supports {supported()}; this checkpoint is a {name} "
                            f"({config.model_type}). Convert it with llama.cpp's convert_hf_to_gguf.py, or set "
                            "export.write_gguf: false to export without GGUF files")
    rope_type = rope_parameters(config)["rope_type"]
    supported_rope = ROPE_TYPES[arch.gguf_arch]
    if rope_type not in supported_rope:
        raise ExportRefused(f"{name}: rope scaling {rope_type!r} is not written by this exporter; supported for "
                            f"{arch.gguf_arch.lower()}: {', '.join(supported_rope)}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportRefused(f"{name}: hidden_act {config.hidden_act!r}; llama.cpp's {arch.gguf_arch.lower()} graph "
                            "computes silu only")
    # llama.cpp's LLAMA graph takes optional biases, but transformers' GGUF reader builds a Llama without them, so
    # a file with biases could not be verified: refused rather than shipped unchecked. (Qwen2's q/k/v biases are
    # part of both.)
    for flag in ("attention_bias", "mlp_bias"):
        if arch.gguf_arch == "LLAMA" and getattr(config, flag, False):
            raise ExportRefused(f"{name}: {flag}: true is not exported (transformers' GGUF reader, the check, "
                                "builds a Llama without biases, so the file could not be verified)")
    return arch


# rope_type values each architecture is written with: 'default' plain rope; 'linear' and 'yarn' as
# rope.scaling.* keys; 'llama3' (Llama 3.1+) as the per-frequency factors tensor rope_freqs.weight, which
# llama.cpp's LLAMA graph divides its frequencies by (as llama.cpp's converter does).
ROPE_TYPES = {"LLAMA": ("default", "linear", "yarn", "llama3"), "QWEN2": ("default", "linear", "yarn")}


def rope_parameters(config) -> dict[str, Any]:
    """rope_theta, rope_type and the scaling keys, from transformers 5's `rope_parameters` or the older flat keys."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    merged = {**scaling, **params}
    merged["rope_theta"] = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    merged["rope_type"] = merged.get("rope_type", merged.get("type")) or "default"
    return merged


def llama3_rope_factors(rope: dict[str, Any], dim: int) -> np.ndarray:
    """Llama 3.1's per-frequency divisors: 1 for short wavelengths, `factor` for long ones, smoothed between."""
    base, factor = rope["rope_theta"], float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_context / high, 1.0,
                       np.where(wavelen > old_context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def add_rope(writer, config, arch: Architecture) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """Rope base and scaling keys; (facts, extra tensors)."""
    import gguf

    rope = rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    kind, extra = rope["rope_type"], []
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):
            if rope.get(key) is not None:
                add(float(rope[key]))
    elif kind == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        extra.append((name, llama3_rope_factors(rope, head_dim(config))))
    return {"rope_scaling": kind}, extra


def attention_window(config) -> int | None:
    """The sliding window a model attends over (Mistral v0.1's 4096; Qwen2 with use_sliding_window), or None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if config.model_type == "qwen2":
        return window if getattr(config, "use_sliding_window", False) else None
    return window


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def permute_for_llama_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from [first half, second half] to interleaved pairs (rows or bias)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# ---------------------------------------------------------------- tokenizer


def pre_tokenizer(tokenizer) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        raise ExportRefused(f"the tokenizer's pre-tokenizer is not one llama.cpp is known to implement (probe hash "
                            f"{digest[:16]}...); GGUF export supports {supported()}")
    return name


@dataclass(frozen=True)
class TokenizerKind:
    model: str                        # tokenizer.ggml.model: 'gpt2' (byte-level BPE) or 'llama' (SentencePiece)
    add_space_prefix: bool | None     # 'llama' only: llama.cpp's dummy prefix
    prefix_rule: str | None = None    # what in tokenizer.json decided it


def _is_metaspace(step: dict | None) -> bool:
    return bool(step) and step.get("type") == "Metaspace" and step.get("replacement") == "\u2581"


def _spaces_to_metaspace(step: dict | None) -> bool:
    return (bool(step) and step.get("type") == "Replace" and step.get("pattern") == {"String": " "}
            and step.get("content") == "\u2581")


def sentencepiece_prefix(data: dict, path: str) -> tuple[bool, str]:
    """(tokenizer.ggml.add_space_prefix, the rule) for a SentencePiece-style tokenizer.json, or ExportRefused.

    llama.cpp's SentencePiece tokenizer writes spaces as "\u2581" and, with add_space_prefix, puts one "\u2581" in
    front of the text and of every stretch of text that follows a special token, even one that starts with a
    space. The forms transformers writes:
    - normalizer Prepend("\u2581") + Replace(" ", "\u2581") (Llama 2's own tokenizer.json): the same rule, exactly;
    - Metaspace pre-tokenizer, prepend_scheme "always" (legacy=True): the same, except that a stretch which already
      starts with a space gets no second "\u2581" -> add_space_prefix true;
    - Metaspace "first" (legacy=False): one "\u2581" at the very start of the text only, and none when the text starts
      with a special token, as chat templates that open with <s> do -> add_space_prefix false, which is exact for
      every text that starts with a special token (it differs on plain text, where llama.cpp adds no "\u2581");
    - Metaspace "never", or Replace alone: no prefix -> false, exactly.
    The export checks the held-out conversations with llama.cpp's rule (tokenizer_round_trip): a text where
    the rules part fails the gate."""
    normalizer, pre = data.get("normalizer"), data.get("pre_tokenizer")
    steps = normalizer.get("normalizers", [normalizer]) if normalizer and normalizer.get("type") == "Sequence" else (
        [normalizer] if normalizer else [])
    if pre is None and steps and _spaces_to_metaspace(steps[-1]):
        head = steps[:-1]
        if not head:
            return False, "normalizer Replace(' ', '\u2581')"
        if len(head) == 1 and head[0].get("type") == "Prepend" and head[0].get("prepend") == "\u2581":
            return True, "normalizer Prepend('\u2581') + Replace(' ', '\u2581')"
    if not steps and _is_metaspace(pre) and not pre.get("split", False):
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        return scheme == "always", f"Metaspace prepend_scheme {scheme!r}"
    raise ExportRefused(f"{path}: a SentencePiece-style tokenizer with normalizer {normalizer!r} and pre-tokenizer "
                        f"{pre!r} is not one llama.cpp's SentencePiece tokenizer reproduces; supported: no normalizer "
                        "and a Metaspace('\u2581', split=false) pre-tokenizer, or Llama 2's normalizer "
                        "(Prepend '\u2581', Replace ' ' -> '\u2581') and no pre-tokenizer")


def backend_json(tokenizer, model_dir: Path) -> dict:
    """The fast tokenizer's pipeline as the checkpoint's tokenizer runs it (training's), not tokenizer.json as
    written: transformers 5 rebuilds a Llama tokenizer's pre-tokenizer from tokenizer_config.json (`legacy`,
    `add_prefix_space`), so the file on disk can say prepend_scheme 'always' while the loaded tokenizer does 'first'."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportRefused(f"{model_dir}: the tokenizer is a slow ({type(tokenizer).__name__}) one; GGUF export reads a "
                            "fast tokenizer (save one with tokenizer.json; a SentencePiece tokenizer.model alone is "
                            "converted by transformers only where sentencepiece and protobuf are installed)")
    return json.loads(backend.to_str())


def tokenizer_kind(data: dict, where: str) -> TokenizerKind:
    """Byte-level BPE (SmolLM2, Llama 3, Qwen2) -> 'gpt2'; BPE with byte fallback, SentencePiece style (Llama 2,
    Mistral 7B, TinyLlama) -> 'llama'; anything else is refused. `data`: the tokenizer's pipeline (backend_json)."""
    model = data.get("model") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback", False):
        return TokenizerKind("gpt2", None)
    if model.get("type") == "BPE":
        if not model.get("merges"):
            raise ExportRefused(f"{where} has no BPE merges: the token scores llama.cpp merges by come from them")
        prefix, rule = sentencepiece_prefix(data, where)
        return TokenizerKind("llama", prefix, rule)
    raise ExportRefused(f"{where}: a {model.get('type')} tokenizer model is not written by this exporter (llama.cpp "
                        f"reads Unigram vocabularies as T5's, which these architectures do not use); GGUF export "
                        f"supports {supported()}")


def sentencepiece_vocab(data: dict, by_id: dict[int, str], vocab_size: int, unknown: str | None
                        ) -> tuple[list[str], list[float], list]:
    """Tokens, scores and types in llama.cpp's SentencePiece layout, from tokenizer.json.

    llama.cpp merges the adjacent pair whose joined text has the highest score; the tokenizer merges by the rank
    of its merge rules. A token's score is minus the rank of the first rule that makes it, so the two orders are
    the same. Tokens no rule makes (single characters) score below every merged one. As in SentencePiece:
    the unknown token UNKNOWN, <0x..> BYTE, special added tokens CONTROL, other added tokens USER_DEFINED;
    embedding rows past the tokenizer [PADn] UNUSED."""
    import gguf

    merges = data["model"]["merges"]
    rank: dict[str, int] = {}
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    added = {token["id"]: token for token in data.get("added_tokens", [])}
    unknown = data["model"].get("unk_token") or unknown
    tokens, scores, types = [], [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            scores.append(-10000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if token == unknown:
            scores.append(0.0)
            types.append(gguf.TokenType.UNKNOWN)
        elif index in added:
            special = added[index].get("special", False)
            scores.append(0.0 if special else -1000.0)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            scores.append(0.0)
            types.append(gguf.TokenType.BYTE)
        else:
            scores.append(-float(rank[token]) if token in rank else -float(len(merges) + index))
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def add_tokenizer(writer, tokenizer, model_dir: Path, vocab_size: int, chat_template: str) -> dict[str, Any]:
    """Tokens, types, merges or scores, special ids and the chat template: what llama.cpp needs to tokenise and stop."""
    import gguf

    data = backend_json(tokenizer, model_dir)
    kind = tokenizer_kind(data, f"{model_dir}'s tokenizer")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportRefused(f"{model_dir}: the tokenizer has ids up to {max(vocab.values())} but the model only "
                            f"{vocab_size} embedding rows; resize the embeddings before exporting")
    by_id = {index: token for token, index in vocab.items()}
    facts: dict[str, Any] = {"tokenizer": kind.model}
    if kind.model == "llama":
        tokens, scores, types = sentencepiece_vocab(data, by_id, vocab_size, tokenizer.unk_token)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(bool(kind.add_space_prefix))
        facts.update(add_space_prefix=kind.add_space_prefix, prefix_rule=kind.prefix_rule)
        special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size)
    else:
        pre = pre_tokenizer(tokenizer)
        added = tokenizer.get_added_vocab()
        decoder = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for index in range(vocab_size):
            token = by_id.get(index)
            if token is None:  # embedding rows past the tokenizer (padded vocabularies)
                tokens.append(f"[PAD{index}]")
                types.append(gguf.TokenType.UNUSED)
            elif token in added:
                tokens.append(token)
                types.append(gguf.TokenType.CONTROL if decoder[index].special else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(token)
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model(kind.model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise ExportRefused(f"{model_dir}/tokenizer.json has no BPE merges; llama.cpp cannot tokenise without them")
        facts.update(pre_tokenizer=pre, merges=len(special.merges))
    special.chat_template = chat_template  # the template training used (template.chat_template), not only the tokenizer's
    # Training tokenised the template's text alone (tunekit.chat: add_special_tokens=False); a runtime that
    # added BOS or EOS on top would feed the model a sequence it never saw.
    special.add_special_token.update(bos=False, eos=False)
    special.add_to_gguf(writer, quiet=True)
    return {**facts, "tokens": len(tokens),
            "special_tokens": {name: tokens[index] for name, index in sorted(special.special_token_ids.items())}}


# ---------------------------------------------------------------- weights


def _qtype(precision: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, precision.upper())


def _file_type(precision: str):
    import gguf

    return gguf.LlamaFileType.ALL_F32 if precision == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{precision.upper()}")


def converted(array: np.ndarray, precision: str) -> tuple[np.ndarray, Any]:
    """(data, ggml type) of one tensor in `precision`; 1-D tensors stay f32, matrices that are no whole
    number of blocks per row fall back to f16."""
    import gguf
    from gguf import quants

    if array.ndim < 2 or precision == "f32":
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if precision == "f16":
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = _qtype(precision)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    return quants.quantize(array.astype(np.float32), qtype), qtype


def gguf_tensors(model: torch.nn.Module, arch: Architecture) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, in the checkpoint's order."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        target = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ExportRefused(f"tensor {name!r} has no GGUF name for {arch.gguf_arch} in the gguf package's tensor map")
        data = tensor.detach().float()
        if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_for_llama_rope(data, config.num_attention_heads)
        elif arch.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_for_llama_rope(data, config.num_key_value_heads)
        out.append((target, data.numpy()))
    return out


def write_gguf(model: torch.nn.Module, tokenizer, model_dir: Path, path: Path, precision: str, chat_template: str,
               name: str) -> dict[str, Any]:
    """Write `model` (a loaded causal LM, `model_dir` its checkpoint with the tokenizer files) as one GGUF file."""
    import gguf

    if precision not in PRECISIONS:
        raise ExportRefused(f"precision {precision!r}: the gguf package writes {', '.join(PRECISIONS)}")
    config = model.config
    arch = architecture_of(model)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        # llama.cpp's llama and qwen2 graphs attend over the whole context; a model trained with a sliding window
        # (Mistral 7B v0.1: 4096) computes the same only up to the window, so that is the context written.
        window = attention_window(config)
        context = int(config.max_position_embeddings)
        if window is not None and window < context:
            context = int(window)
        writer.add_context_length(context)
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(config.num_attention_heads))
        writer.add_head_count_kv(int(config.num_key_value_heads))
        dim = head_dim(config)
        writer.add_rope_dimension_count(dim)
        if dim != config.hidden_size // config.num_attention_heads:
            writer.add_key_length(dim)
            writer.add_value_length(dim)
        rope_facts, extra_tensors = add_rope(writer, config, arch)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_file_type(_file_type(precision))
        if precision not in UNQUANTISED:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = add_tokenizer(writer, tokenizer, Path(model_dir), int(config.vocab_size), chat_template)
        types: Counter[str] = Counter()
        for target, array in [*extra_tensors, *gguf_tensors(model, arch)]:
            data, qtype = converted(array, precision)
            writer.add_tensor(target, data, raw_dtype=qtype)
            types[qtype.name] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"file": path.name, "precision": precision, "architecture": arch.gguf_arch.lower(), "bytes": path.stat().st_size,
            "tensor_types": dict(sorted(types.items())), "context_length": context,
            "context_capped_to_sliding_window": context < int(config.max_position_embeddings), **rope_facts, **vocab}


# ---------------------------------------------------------------- reading back


def _alone(path: Path) -> Path:
    """A directory holding only a link to `path`. transformers' GGUF loading also looks in the file's directory
    (AutoTokenizer reads tokenizer_config.json there for the class and its options), and the export writes the
    GGUF files beside the checkpoint's own files: read alone, only the GGUF can inform the check."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="tunekit-gguf-"))
    (directory / path.name).symlink_to(path.resolve())
    return directory


def gguf_fields(path: Path, *keys: str) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for key in keys:
        field = reader.get_field(key)
        out[key] = None if field is None else field.contents()
    return out


def load_gguf_model(path: Path) -> torch.nn.Module:
    """The GGUF file as transformers reads it (de-quantised to float32): the independent reader. Its Llama and
    Qwen2 loaders ignore rope scaling (the rope.scaling.* keys and the rope_freqs tensor), so the rotary
    frequencies are rebuilt here from the file's own keys and tensor, with transformers' rope functions."""
    import shutil

    from transformers import AutoModelForCausalLM

    directory = _alone(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=path.name, dtype=torch.float32).eval()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    apply_file_rope(model, path)
    return model


def apply_file_rope(model: torch.nn.Module, path: Path) -> str:
    """Set the read-back model's rotary frequencies from the file: rope_freqs.weight divides them (llama.cpp's
    rule), rope.scaling.type linear / yarn goes through transformers' own rope functions. Returns the type."""
    import copy

    import gguf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture").contents()
    field = lambda key: None if reader.get_field(f"{arch}.{key}") is None else reader.get_field(f"{arch}.{key}").contents()
    freqs = next((t for t in reader.tensors if t.name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"), None)
    scaling = field("rope.scaling.type") or "none"
    rotary = model.model.rotary_emb
    if freqs is None and scaling == "none":
        return "default"
    if model.config.rope_parameters.get("rope_type", "default") != "default":
        return model.config.rope_parameters["rope_type"]  # the reader took the scaling in itself
    if freqs is not None:
        inv_freq, attention = rotary.original_inv_freq / torch.from_numpy(np.array(freqs.data, dtype=np.float32)), 1.0
        kind = "rope_freqs"
    else:
        config = copy.deepcopy(model.config)
        params = {"rope_type": scaling, "rope_theta": float(field("rope.freq_base")), "factor": float(field("rope.scaling.factor"))}
        if scaling == "yarn":
            params["original_max_position_embeddings"] = int(field("rope.scaling.original_context_length"))
            for key, name in (("beta_fast", "rope.scaling.yarn_beta_fast"), ("beta_slow", "rope.scaling.yarn_beta_slow"),
                              ("attention_factor", "rope.scaling.yarn_attn_factor")):
                if field(name) is not None:
                    params[key] = float(field(name))
        config.rope_parameters = params
        inv_freq, attention = ROPE_INIT_FUNCTIONS[scaling](config)
        kind = scaling
    rotary.inv_freq.copy_(inv_freq)
    rotary.original_inv_freq.copy_(inv_freq)
    rotary.attention_scaling = attention
    return kind


def gguf_chat_template(path: Path) -> str | None:
    return gguf_fields(path, "tokenizer.chat_template")["tokenizer.chat_template"]


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def compare_logits(reference: torch.Tensor, exported: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Largest |logit| difference and next-token KL(reference || exported) over real (non-padding) positions,
    and how often both pick the same greedy token."""
    keep = mask.bool()
    ref, out = reference[keep], exported[keep]
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"max_logit_difference": float((ref - out).abs().max()), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).float().mean()),
            "positions": int(keep.sum())}


def read_back_tokenizer(path: Path):
    """transformers' tokenizer built from the GGUF alone."""
    import shutil

    from transformers import AutoTokenizer

    directory = _alone(path)
    try:
        return AutoTokenizer.from_pretrained(str(directory), gguf_file=path.name)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class LlamaCppSentencePiece:
    """llama.cpp's SentencePiece tokenisation of a GGUF, with transformers' reading of its vocabulary.

    transformers builds the vocabulary from the file's tokens, and its merges from the file's scores (the file
    has no merges: llama.cpp merges by score); its own tokenizer then prefixes text the Metaspace way, which is
    not llama.cpp's. This applies llama.cpp's rule around that BPE model (llama-vocab.cpp, SPM): cut the text at
    the file's CONTROL, USER_DEFINED and UNKNOWN tokens, longest first; before each stretch of text at the start
    or after such a token put one space if tokenizer.ggml.add_space_prefix; write spaces as U+2581; BPE with
    byte fallback."""

    def __init__(self, path: Path):
        import gguf

        fields = gguf_fields(path, "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix")
        marked = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.UNKNOWN)
        self.specials = sorted(((token, index) for index, (token, kind) in enumerate(
            zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"])) if kind in marked and token),
            key=lambda pair: -len(pair[0]))
        prefix = fields["tokenizer.ggml.add_space_prefix"]
        self.add_space_prefix = True if prefix is None else bool(prefix)
        self.model = read_back_tokenizer(path).backend_tokenizer.model

    def encode(self, text: str) -> list[int]:
        fragments: list[str | int] = [text]
        for token, index in self.specials:
            split: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or token not in fragment:
                    split.append(fragment)
                    continue
                for k, part in enumerate(fragment.split(token)):
                    if k:
                        split.append(index)
                    if part:
                        split.append(part)
            fragments = split
        ids, after_special = [], True
        for fragment in fragments:
            if isinstance(fragment, int):
                ids.append(fragment)
                after_special = True
                continue
            piece = (" " if self.add_space_prefix and after_special else "") + fragment
            ids += [token.id for token in self.model.tokenize(piece.replace(" ", "\u2581"))]
            after_special = False
        return ids


def tokenizer_round_trip(path: Path, tokenizer, texts: list[str]) -> dict[str, float]:
    """Share of `texts` (special tokens written as text included) that the GGUF's tokenizer encodes to the
    checkpoint tokenizer's ids. `tokenizer_round_trip`: the way llama.cpp tokenises (byte-level BPE:
    transformers' tokenizer from the file, which applies the pre-tokenizer llama.cpp names; SentencePiece:
    LlamaCppSentencePiece). For a SentencePiece file also `reader_tokenizer_round_trip`: transformers' own
    tokenizer from the file, which prefixes text its own way (reported, not gated)."""
    expected = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    share = lambda encode: sum(encode(t) == ids for t, ids in zip(texts, expected)) / max(len(texts), 1)
    read_back = read_back_tokenizer(path)
    reader = share(lambda t: read_back.encode(t, add_special_tokens=False))
    if gguf_fields(path, "tokenizer.ggml.model")["tokenizer.ggml.model"] != "llama":
        return {"tokenizer_round_trip": reader}
    return {"tokenizer_round_trip": share(LlamaCppSentencePiece(path).encode), "reader_tokenizer_round_trip": reader}


def verify_gguf(path: Path, reference: torch.Tensor, batch: dict[str, torch.Tensor], probe: ProbeCheck | None) -> dict:
    """The figures of one written file against the checkpoint: logits on the held-out batch, and for a
    quantised file the perplexity change on the forgetting probe."""
    model = load_gguf_model(path)
    figures = compare_logits(reference, logits(model, batch), batch["attention_mask"])
    if probe is not None:
        exported = probe.perplexity(model)
        figures.update(probe_perplexity=exported, reference_perplexity=probe.reference,
                       perplexity_change=exported / probe.reference - 1)
    return figures


@dataclass
class ProbeCheck:
    """Perplexity on the forgetting stage's general-text probe, of the checkpoint (`reference`) and of a file."""
    rows: list[dict]
    pad_id: int
    batch_size: int
    reference: float = math.nan

    def perplexity(self, model: torch.nn.Module) -> float:
        from tunekit.forgetting import score

        return score(model, self.rows, self.pad_id, self.batch_size)["perplexity"]


def export_gguf(model_dir: Path, out_dir: Path, precisions: list[str], chat_template: str, rows: list[dict],
                probe: ProbeCheck, name: str, texts: list[str] | None = None) -> dict[str, dict]:
    """Write `model_dir` as one GGUF file per precision into `out_dir` and check each one read back:
    {precision: writer facts and figures}. `rows`: tokenised held-out conversations; `texts`: the same
    conversations rendered by the chat template, for the tokenizer check (default: the rows decoded, which is
    the rendered text for byte-level BPE but not for SentencePiece, whose decoding drops and adds spaces)."""
    from tunekit.models import load_causal_lm, load_tokenizer
    from tunekit.train import collate

    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    architecture_of(model)
    batch = collate(rows, tokenizer.pad_token_id)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    reference = logits(model, batch)
    if any(p not in UNQUANTISED for p in precisions):
        probe.reference = probe.perplexity(model)
    if texts is None:
        texts = [tokenizer.decode(row["input_ids"]) for row in rows]
    results: dict[str, dict] = {}
    for precision in precisions:
        path = out_dir / f"model-{precision}.gguf"
        started = time.perf_counter()
        info = write_gguf(model, tokenizer, model_dir, path, precision, chat_template, name)
        written = time.perf_counter()
        figures = verify_gguf(path, reference, batch, None if precision in UNQUANTISED else probe)
        if not results:  # the tokenizer and template are the same in every file: checked once
            figures.update(tokenizer_round_trip(path, tokenizer, texts))
            figures["chat_template_embedded"] = int(gguf_chat_template(path) == chat_template)
        figures.update(write_seconds=written - started, check_seconds=time.perf_counter() - written)
        log.info("%s: %.1f MB, %s", path.name, info["bytes"] / 1e6, figures)
        results[precision] = {**info, **figures}
    return results


def gguf_gates(files: dict[str, Any]) -> dict[str, str]:
    """The bounds of `export.gguf` as gates on the figures (metrics path `gguf.<precision>.<figure>`),
    plus the tokenizer and chat template checks of the first file."""
    gates = {}
    for precision, bounds in files.items():
        if bounds.max_logit_difference is not None:
            gates[f"gguf_{precision}_logits"] = f"gguf.{precision}.max_logit_difference <= {bounds.max_logit_difference}"
        if bounds.max_kl is not None:
            gates[f"gguf_{precision}_kl"] = f"gguf.{precision}.mean_kl <= {bounds.max_kl}"
        if bounds.max_perplexity_change is not None:
            gates[f"gguf_{precision}_perplexity"] = f"gguf.{precision}.perplexity_change <= {bounds.max_perplexity_change}"
    first = next(iter(files))
    gates["gguf_tokenizer"] = f"gguf.{first}.tokenizer_round_trip >= 1"
    gates["gguf_chat_template"] = f"gguf.{first}.chat_template_embedded >= 1"
    return gates
