"""GGUF files for llama.cpp, Ollama and LM Studio, written with the `gguf` package and read back to check them.

Writing (`write_gguf`): the weights of a Hugging Face causal LM checkpoint, named by the gguf package's
own tensor-name map (`gguf.get_tensor_name_map`), converted to one precision, with the hyper-parameters
llama.cpp reads, the tokenizer (tokens, token types, merges, special-token ids) and the chat template
the model was trained with, so a runtime renders prompts the way training did. No llama.cpp checkout
is built or run.

What differs from the Hugging Face layout, and why:
- Llama-family q and k projections are re-ordered per head: Hugging Face's rotary embedding rotates
  the two halves of each head (rotate_half), llama.cpp's LLAMA graph rotates adjacent pairs; permuting
  the rows of q and k makes the two compute the same attention. Qwen2 uses llama.cpp's NEOX rope,
  which is rotate_half already: no permutation.
- 1-D tensors (norms, biases) stay float32 in every precision, as llama.cpp's own converter keeps them;
  a matrix whose rows are not a whole number of quantisation blocks falls back to float16.
- Tied output embeddings are not written twice: llama.cpp uses token_embd when `output` is missing.

Reading back (`load_gguf_model`) uses transformers' GGUF loader, an implementation independent of the
writer (its own de-quantisation, its own inverse permutation), so a wrong permutation, name or scale
shows up as a difference against the checkpoint; `compare_logits` and `probe_perplexity` give the
figures the export stage gates on.
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
            f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))} pre-tokenizers)")


def architecture_of(model: torch.nn.Module) -> Architecture:
    """How this model is written, or ExportRefused naming what is supported."""
    config = model.config
    name = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise ExportRefused(f"GGUF export supports {supported()}; this checkpoint is a {name} "
                            f"({config.model_type}). Convert it with llama.cpp's convert_hf_to_gguf.py, or set "
                            "export.write_gguf: false to export without GGUF files")
    rope = rope_parameters(config)
    if rope["rope_type"] not in ("default", None):
        raise ExportRefused(f"rope scaling {rope['rope_type']!r} is not written by this exporter (llama.cpp needs "
                            "extra tensors or keys for it); supported: unscaled rope")
    return arch


def rope_parameters(config) -> dict[str, Any]:
    """rope_theta and rope_type, from transformers 5's `rope_parameters` or the older flat keys."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            "rope_type": params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))}


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


def tokenizer_kind(model_dir: Path) -> str:
    """'gpt2' for byte-level BPE (SmolLM2, Llama 3, Qwen2); SentencePiece-style tokenizers are refused."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ExportRefused(f"{path} is missing: GGUF export needs a fast tokenizer's tokenizer.json")
    model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback", False):
        return "gpt2"
    raise ExportRefused(f"{path}: a {model.get('type')} tokenizer{' with byte fallback' if model.get('byte_fallback') else ''} "
                        "(SentencePiece style, e.g. Llama 2, Mistral 7B) is not written by this exporter; "
                        f"GGUF export supports {supported()}")


def add_tokenizer(writer, tokenizer, model_dir: Path, vocab_size: int, chat_template: str) -> dict[str, Any]:
    """Tokens, types, merges, special ids and the chat template: what llama.cpp needs to tokenise and stop."""
    import gguf

    kind = tokenizer_kind(model_dir)
    pre = pre_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportRefused(f"{model_dir}: the tokenizer has ids up to {max(vocab.values())} but the model only "
                            f"{vocab_size} embedding rows; resize the embeddings before exporting")
    by_id = {index: token for token, index in vocab.items()}
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
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ExportRefused(f"{model_dir}/tokenizer.json has no BPE merges; llama.cpp cannot tokenise without them")
    special.chat_template = chat_template  # the template training used (template.chat_template), not only the tokenizer's
    # Training tokenised the template's text alone (tunekit.chat: add_special_tokens=False); a runtime that
    # added BOS or EOS on top would feed the model a sequence it never saw.
    special.add_special_token.update(bos=False, eos=False)
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer": kind, "pre_tokenizer": pre, "tokens": len(tokens), "merges": len(special.merges),
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
        writer.add_context_length(int(config.max_position_embeddings))
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
        writer.add_rope_freq_base(rope_parameters(config)["rope_theta"])
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_file_type(_file_type(precision))
        if precision not in UNQUANTISED:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = add_tokenizer(writer, tokenizer, Path(model_dir), int(config.vocab_size), chat_template)
        types: Counter[str] = Counter()
        for target, array in gguf_tensors(model, arch):
            data, qtype = converted(array, precision)
            writer.add_tensor(target, data, raw_dtype=qtype)
            types[qtype.name] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"file": path.name, "precision": precision, "architecture": arch.gguf_arch.lower(), "bytes": path.stat().st_size,
            "tensor_types": dict(sorted(types.items())), **vocab}


# ---------------------------------------------------------------- reading back


def load_gguf_model(path: Path) -> torch.nn.Module:
    """The GGUF file as transformers reads it (de-quantised to float32): the independent reader."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def gguf_chat_template(path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(path).get_field("tokenizer.chat_template")
    return None if field is None else field.contents()


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


def tokenizer_round_trip(path: Path, tokenizer, texts: list[str]) -> float:
    """Share of `texts` that transformers' tokenizer built from the GGUF encodes to the checkpoint
    tokenizer's ids (special tokens written as text included)."""
    from transformers import AutoTokenizer

    read_back = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    same = [read_back.encode(t, add_special_tokens=False) == tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return sum(same) / max(len(same), 1)


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
                probe: ProbeCheck, name: str) -> dict[str, dict]:
    """Write `model_dir` as one GGUF file per precision into `out_dir` and check each one read back:
    {precision: writer facts and figures}. `rows`: tokenised held-out conversations."""
    from tunekit.models import load_causal_lm, load_tokenizer
    from tunekit.train import collate

    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    architecture_of(model)
    batch = collate(rows, tokenizer.pad_token_id)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    reference = logits(model, batch)
    if any(p not in UNQUANTISED for p in precisions):
        probe.reference = probe.perplexity(model)
    texts = [tokenizer.decode(row["input_ids"]) for row in rows]
    results: dict[str, dict] = {}
    for precision in precisions:
        path = out_dir / f"model-{precision}.gguf"
        started = time.perf_counter()
        info = write_gguf(model, tokenizer, model_dir, path, precision, chat_template, name)
        written = time.perf_counter()
        figures = verify_gguf(path, reference, batch, None if precision in UNQUANTISED else probe)
        if not results:  # the tokenizer and template are the same in every file: checked once
            figures["tokenizer_round_trip"] = tokenizer_round_trip(path, tokenizer, texts)
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
