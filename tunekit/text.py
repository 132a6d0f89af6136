"""Raw text for continued pretraining: reading documents and packing them into fixed-size blocks.

Documents come from `.txt` files (documents separated by blank lines) or `.jsonl` files (one
`{"text": ...}` object per line), a single file or every such file under a directory. Packing
tokenises each document without special tokens, joins the documents with the tokenizer's eos token
between them, and cuts the stream into blocks of exactly `block_size` tokens; the incomplete tail is
dropped. Every token of a block is a label, so the (shifted) loss trains all of them but the first.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".jsonl")


class TextError(ValueError):
    """Raw text that cannot be read; the message names the file (and line) and what to fix."""


@dataclass(frozen=True)
class Document:
    source: str  # "file" or "file:line"
    text: str


def text_files(inputs: str | Path) -> list[Path]:
    """`inputs` itself, or every .txt / .jsonl under the directory (recursive, hidden paths skipped), sorted."""
    path = Path(inputs)
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise TextError(f"{path}: raw text must be a .txt file (documents separated by blank lines) "
                            "or a .jsonl file (one {\"text\": ...} per line)")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise TextError(f"{path} contains no .txt or .jsonl files (searched recursively, hidden paths skipped)")
        return files
    raise TextError(f"{path} does not exist: point it at a .txt/.jsonl file or a directory of them")


def _txt_documents(path: Path) -> list[Document]:
    text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    return [Document(str(path), block.strip()) for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


def _jsonl_documents(path: Path) -> list[Document]:
    documents = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TextError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict) or "text" not in row:
                raise TextError(f"{path}:{number}: each line must be an object with a \"text\" key, "
                                f"got {type(row).__name__}" + (f" with keys {sorted(row)[:5]}" if isinstance(row, dict) else ""))
            if not isinstance(row["text"], str):
                raise TextError(f"{path}:{number}: \"text\" must be a string, got {type(row['text']).__name__}")
            if row["text"].strip():
                documents.append(Document(f"{path}:{number}", row["text"].strip()))
    return documents


def load_documents(inputs: str | Path) -> list[Document]:
    """Every non-empty document of the files named by `inputs`, in file order."""
    documents: list[Document] = []
    for path in text_files(inputs):
        documents.extend(_txt_documents(path) if path.suffix == ".txt" else _jsonl_documents(path))
    if not documents:
        raise TextError(f"{inputs}: no text found (a .txt needs non-empty paragraphs, a .jsonl non-empty \"text\" values)")
    return documents


def token_stream(texts: Iterable[str], tokenizer, separator: int) -> list[int]:
    """The documents' tokens, without special tokens, with `separator` between consecutive documents."""
    stream: list[int] = []
    for text in texts:
        if stream:
            stream.append(separator)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return stream


def pack(stream: Sequence[int], block_size: int) -> list[dict[str, list[int]]]:
    """Fixed blocks of `block_size` tokens, every token a label (the loss's shift leaves out only the
    first of each block); the incomplete tail is dropped."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}")
    return [{"input_ids": list(stream[i:i + block_size]), "labels": list(stream[i:i + block_size])}
            for i in range(0, len(stream) - block_size + 1, block_size)]


def pack_documents(texts: Iterable[str], tokenizer, block_size: int) -> tuple[list[dict[str, list[int]]], int]:
    """Blocks of the documents joined by the tokenizer's eos, and how many tokens the stream had."""
    if tokenizer.eos_token_id is None:
        raise TextError("the tokenizer has no eos token to separate documents with")
    stream = token_stream(texts, tokenizer, tokenizer.eos_token_id)
    return pack(stream, block_size), len(stream)


def block_hash(block: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(block["input_ids"]).encode()).hexdigest()


def split_blocks(blocks: Sequence[dict], validation: float) -> tuple[list[dict], list[dict]]:
    """(train, validation): the validation share chosen by the hash of each block's tokens (deterministic,
    independent of order); at least one block each when validation > 0 and there are two or more."""
    if validation <= 0 or len(blocks) < 2:
        return list(blocks), []
    count = min(len(blocks) - 1, max(1, round(validation * len(blocks))))
    held = set(sorted(range(len(blocks)), key=lambda i: block_hash(blocks[i]))[:count])
    return [b for i, b in enumerate(blocks) if i not in held], [b for i, b in enumerate(blocks) if i in held]
