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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunekit.data import configure, save_dataset
from tunekit.io import read_meta

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


BLANK_LINE = re.compile(r"[ \t]*")


def _txt_documents(path: Path) -> Iterator[Document]:
    """Paragraphs of a .txt file, read line by line (a corpus file may be larger than memory): a line of
    nothing but spaces and tabs ends a document; CRLF counts as LF; a BOM at the start is dropped."""
    lines: list[str] = []
    with open(path, encoding="utf-8-sig", newline="\n") as handle:
        for line in handle:
            line = line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line
            if BLANK_LINE.fullmatch(line):
                if "\n".join(lines).strip():
                    yield Document(str(path), "\n".join(lines).strip())
                lines = []
            else:
                lines.append(line)
    if "\n".join(lines).strip():
        yield Document(str(path), "\n".join(lines).strip())


def _jsonl_documents(path: Path) -> Iterator[Document]:
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
                yield Document(f"{path}:{number}", row["text"].strip())


def iter_documents(inputs: str | Path) -> Iterator[Document]:
    """Every non-empty document of the files named by `inputs`, in file order, streamed (one file's
    line at a time); TextError when there is none at all."""
    found = False
    for path in text_files(inputs):
        for document in (_txt_documents(path) if path.suffix == ".txt" else _jsonl_documents(path)):
            found = True
            yield document
    if not found:
        raise TextError(f"{inputs}: no text found (a .txt needs non-empty paragraphs, a .jsonl non-empty \"text\" values)")


def load_documents(inputs: str | Path) -> list[Document]:
    """Every non-empty document of the files named by `inputs`, in file order, as a list (small inputs:
    the forgetting probe; a corpus goes through `pack_corpus`)."""
    return list(iter_documents(inputs))


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


# ---------------------------------------------------------------- packing a corpus, streamed, to disk
#
# `pack_documents` + `split_blocks` above hold the whole corpus in Python lists: the reference for small
# inputs and tests. `pack_corpus` writes the same blocks, split the same way, as `datasets` on disk
# (Arrow, `save_to_disk` layout) without ever holding the corpus: documents are streamed into an Arrow
# file, tokenised by a batched `Dataset.map` over `num_proc` processes, and cut into blocks by a second
# map that knows where each document starts in the joined stream (a prefix sum over the documents'
# lengths), so every batch packs its own blocks and the result does not depend on the batching or on
# `num_proc`. Memory beyond a constant: 16 bytes per document (lengths and starts) and about 50 per block
# (the digest that chooses the validation share, its sort order and the row indices of the splits), e.g.
# ~230 MB for 1B tokens in blocks of 256 from 2M documents. Every intermediate file lies under `scratch`, which the caller deletes.

SPLITS = ("train", "validation")
PACK_BATCH = 1000  # documents per map batch


def _datasets():
    """The `datasets` package with tunekit's settings (tunekit.data.configure: no global cache, whose files would
    land beside their source, inside an input or an output directory)."""
    configure()
    import datasets

    return datasets


def block_features(block_size: int):
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32"), length=block_size)})


def _generate_texts(inputs: str):
    for document in iter_documents(inputs):
        yield {"text": document.text}


def _tokenize_batch(batch: dict, tokenizer) -> dict:
    return {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}


def _doc_tokens(tokens, start: int, stop: int) -> list:
    """Documents start..stop-1 of the tokenised dataset as numpy arrays (memory-mapped, no copy)."""
    column = tokens.data.table.slice(start, stop - start).column("ids").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def block_digest(ids: np.ndarray) -> np.ndarray:
    """sha256 of the block's token list as JSON (`block_hash`), as 4 big-endian uint64: ordering these
    numerically orders the hex digests."""
    return np.frombuffer(hashlib.sha256(json.dumps(ids.tolist()).encode()).digest(), dtype=">u8").astype(np.uint64)


def _pack_batch(batch, indices: list[int], tokens, starts: np.ndarray, stream_len: int, block_size: int,
                eos: int) -> dict:
    """The blocks that begin inside this batch's part of the stream (its documents, each but the first of
    the corpus with the eos before it), read ahead into the next documents for the last one."""
    first, stop = indices[0], indices[-1] + 1
    own_start = 0 if first == 0 else int(starts[first]) - 1
    own_stop = stream_len if stop == len(starts) else int(starts[stop]) - 1
    k0 = -(-own_start // block_size)
    k1 = min(-(-own_stop // block_size), stream_len // block_size)
    empty = {"input_ids": np.zeros((0, block_size), np.int32), "digest": np.zeros((0, 4), np.uint64)}
    if k1 <= k0:
        return empty
    need = k1 * block_size - own_start  # tokens from own_start on
    eos_piece = np.array([eos], np.int32)
    pieces, have = [], 0
    for position, doc in enumerate(_doc_tokens(tokens, first, stop), first):
        if position > 0:
            pieces.append(eos_piece)
        pieces.append(doc)
        have += len(doc) + (position > 0)
    ahead = stop
    while have < need:  # the last block runs on into the following documents
        doc = _doc_tokens(tokens, ahead, ahead + 1)[0]
        pieces += [eos_piece, doc]
        have += len(doc) + 1
        ahead += 1
    segment = np.concatenate(pieces).astype(np.int32)[k0 * block_size - own_start:need]
    blocks = segment.reshape(-1, block_size)
    return {"input_ids": blocks, "digest": np.stack([block_digest(b) for b in blocks])}


def held_out(digests: np.ndarray, validation: float) -> np.ndarray:
    """The validation mask of `split_blocks`: the share of blocks with the smallest hashes (ties by position),
    at least one each side when validation > 0 and there are two or more blocks."""
    n = len(digests)
    mask = np.zeros(n, dtype=bool)
    if validation <= 0 or n < 2:
        return mask
    count = min(n - 1, max(1, round(validation * n)))
    order = np.lexsort((np.arange(n), digests[:, 3], digests[:, 2], digests[:, 1], digests[:, 0]))
    mask[order[:count]] = True
    return mask


def _column_2d(dataset, name: str, width: int, dtype) -> np.ndarray:
    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in dataset.data.column(name).chunks if len(c)]
    return np.concatenate(chunks).astype(dtype, copy=False).reshape(-1, width) if chunks else np.zeros((0, width), dtype)


def pack_corpus(inputs: str | Path, tokenizer, block_size: int, validation: float, out: Path, scratch: Path,
                num_proc: int = 1) -> dict[str, int]:
    """Write `out`/train and `out`/validation: the blocks of `pack_documents`, split as `split_blocks` splits
    them, as `datasets` on disk (`input_ids`, a fixed-size list of int32), streamed. Returns the counts."""
    datasets = _datasets()
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}")
    if tokenizer.eos_token_id is None:
        raise TextError("the tokenizer has no eos token to separate documents with")
    from datasets import Features, List, Value

    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    procs = num_proc if num_proc > 1 else None
    try:
        documents = datasets.Dataset.from_generator(
            _generate_texts, gen_kwargs={"inputs": str(inputs)}, features=Features({"text": Value("string")}),
            cache_dir=str(scratch / "documents"), fingerprint="documents")
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__ or exc.__context__
        raise (cause if isinstance(cause, TextError) else exc) from None
    tokens = documents.map(
        _tokenize_batch, batched=True, batch_size=PACK_BATCH, num_proc=procs, remove_columns=["text"],
        fn_kwargs={"tokenizer": tokenizer}, features=Features({"ids": List(Value("int32"))}),
        cache_file_name=str(scratch / "tokens.arrow"), new_fingerprint="tokens", desc="tokenise")
    import pyarrow.compute as pc

    lengths = np.concatenate([pc.list_value_length(c).to_numpy(zero_copy_only=False).astype(np.int64)
                              for c in tokens.data.column("ids").chunks] or [np.zeros(0, np.int64)])
    starts = np.concatenate([[0], np.cumsum(lengths[:-1] + 1)]).astype(np.int64) if len(lengths) else lengths
    stream_len = int(lengths.sum() + max(len(lengths) - 1, 0))
    features = Features({**block_features(block_size), "digest": List(Value("uint64"), length=4)})
    blocks = tokens.with_format("arrow").map(
        _pack_batch, batched=True, batch_size=PACK_BATCH, with_indices=True, num_proc=procs, remove_columns=["ids"],
        fn_kwargs={"tokens": tokens, "starts": starts, "stream_len": stream_len, "block_size": block_size,
                   "eos": tokenizer.eos_token_id},
        features=features, cache_file_name=str(scratch / "blocks.arrow"), new_fingerprint="blocks", desc="pack")
    mask = held_out(_column_2d(blocks, "digest", 4, np.uint64), validation)
    blocks = blocks.with_format(None).select_columns(["input_ids"])
    for split, keep in zip(SPLITS, (~mask, mask)):
        # tunekit.data's writer, as for every split between stages: one shard (also for an empty selection), the
        # same bytes for the same rows, a content fingerprint
        save_dataset(blocks.select(np.flatnonzero(keep), indices_cache_file_name=str(scratch / f"{split}.indices.arrow"),
                                   new_fingerprint=f"{split}-indices"), Path(out) / split, split)
    return {"documents": len(lengths), "tokens": stream_len, "blocks": len(mask),
            "train_blocks": int((~mask).sum()), "validation_blocks": int(mask.sum())}


# ---------------------------------------------------------------- reading packed blocks


def open_packed(packed: Path, expected: dict) -> tuple[dict, Blocks, Blocks]:
    """(the pack stage's meta.json, train blocks, validation blocks), memory-mapped. TextError naming the fix
    when `packed` is no packing, a packing made while dapt was off, or one made with other `expected` params."""
    meta = read_meta(packed)
    if meta is None or meta.get("stage") != "pack":
        raise TextError(f"{packed} is not the output of the pack stage (no meta.json from it): run `dvc repro pack`")
    if not meta.get("enabled"):
        raise TextError(f"{packed} was written with dapt.enabled false (nothing tokenised): run `dvc repro pack` "
                        "(or `python -m stages.pack`) with dapt.enabled true first")
    stale = [f"dapt.{key} {value!r} (packed with {meta['params'].get(key)!r})" for key, value in expected.items()
             if meta["params"].get(key) != value]
    if stale:
        raise TextError(f"{packed} was packed with other params: {', '.join(stale)}; re-run the pack stage (`dvc repro pack`)")
    return meta, Blocks(Path(packed) / "train"), Blocks(Path(packed) / "validation")


class Blocks(Sequence):
    """The rows of a packed split, memory-mapped: row i is {"input_ids": ..., "labels": ...}, the same
    read-only int32 view of block i twice (every token a label), no copy."""

    def __init__(self, path: Path):
        datasets = _datasets()
        self.path = Path(path)
        self.dataset = datasets.load_from_disk(str(path))
        column = self.dataset.data.column("input_ids")
        self.block_size = column.type.list_size
        self._chunks = [c.flatten().to_numpy(zero_copy_only=True).reshape(-1, self.block_size)
                        for c in column.chunks if len(c)]
        self._ends = np.cumsum([len(c) for c in self._chunks], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def ids(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        index %= len(self)
        chunk = int(np.searchsorted(self._ends, index, side="right"))
        return self._chunks[chunk][index - (int(self._ends[chunk - 1]) if chunk else 0)]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        ids = self.ids(index)
        return {"input_ids": ids, "labels": ids}


class Chained(Sequence):
    """Two row sequences as one (the packed domain blocks, then the replay blocks), nothing copied."""

    def __init__(self, first: Sequence, second: Sequence):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        index %= len(self)
        return self.first[index] if index < len(self.first) else self.second[index - len(self.first)]
