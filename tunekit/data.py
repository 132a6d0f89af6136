"""The data between stages: Hugging Face `datasets` on disk (Arrow, the `save_to_disk` layout), read
memory-mapped.

Every split a stage writes (data/ingested/<split>, data/tokenized/<split>) is a directory that
`datasets.load_from_disk` opens: one Arrow shard `data-00000-of-00001.arrow`, `dataset_info.json` and
`state.json`. The bytes depend only on the rows: one shard whatever the number of processes that made
it, record batches of a fixed size, and the fingerprint in state.json is the shard's content hash (not
the random or path-derived one `datasets` would write), so two clones in different directories give
the same DVC hashes.

Readers get a `Rows` view: a sequence of row dicts over the memory-mapped dataset (len, indexing,
iteration in batches), so no stage holds a whole split as Python objects. Columns whose values are not
all strings or integers (chat messages, tool schemas, labels that may be lists, QA answers) are stored
as `datasets.Json` (JSON text in Arrow, decoded on read), which keeps every value exactly as ingest
wrote it; a key a row does not have is null in its column and absent again in the row dict.

`Dataset.map` writes cache files; stages give it a file inside their atomic output's temporary
directory (`work_dir`), never next to the source, and `configure()` turns off the global cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

SHARD = "data-00000-of-00001.arrow"
WRITER_BATCH = 1000  # rows per Arrow record batch: fixed, so the file does not depend on how the rows were made
READ_BATCH = 256  # rows decoded at a time when iterating a split


class DataFormatError(Exception):
    """A split directory is missing or is not a dataset this tunekit wrote; the message says what to run."""


_configured = False


def configure() -> None:
    """Stage-wide settings for `datasets`: no global cache (map results go where the stage says), progress
    bars only on a terminal (a log file would get carriage-return garbage). Every reader and writer here
    calls it; stages call it once at their start too. Nothing here reaches the network (load_from_disk,
    map and the Arrow writer are local); only ingest's hub: inputs do, and they say so when offline."""
    global _configured
    if _configured:
        return
    _configured = True
    import datasets

    datasets.disable_caching()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()


MIN_ROWS_PER_PROCESS = 2000  # a map process costs about a second to start: not worth it for fewer rows


def num_proc(requested: int, rows: int) -> int:
    """Processes for a `Dataset.map` over `rows` rows: `requested` (0 = the cores this process may use), but
    never more than one per MIN_ROWS_PER_PROCESS rows."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = requested or cores
    return max(1, min(wanted, rows // MIN_ROWS_PER_PROCESS))


# ---------------------------------------------------------------- reading


def split_path(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / split


def load_split(data_dir: Path, split: str):
    """The split as a memory-mapped `datasets.Dataset`."""
    import datasets

    configure()
    path = split_path(data_dir, split)
    if not (path / "state.json").is_file():
        legacy = Path(data_dir) / f"{split}.jsonl"
        if legacy.is_file():
            raise DataFormatError(f"{legacy} is the JSONL layout of an older tunekit; splits are now `datasets` "
                                  f"directories ({path}/): re-run the stage that writes {data_dir} (dvc repro)")
        raise DataFormatError(f"{path} is not a dataset directory (no state.json): run the stage that writes "
                              f"{data_dir} first (dvc repro)")
    return datasets.load_from_disk(str(path), keep_in_memory=False)


def read_split(data_dir: Path, split: str) -> Rows:
    """The rows of data_dir/<split>, memory-mapped (see `Rows`)."""
    return Rows(load_split(data_dir, split))


def _row(example: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in example.items() if value is not None}


class Rows(Sequence):
    """A read-only sequence of row dicts over a `datasets.Dataset`: `len`, `rows[i]`, `rows[a:b]` (a list of
    that slice only), iteration (decoded READ_BATCH rows at a time) and `column(name)` (one column, e.g. the
    lengths for batching). Keys whose value is null are left out of the dicts, as they were absent when written."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            if stop <= start:
                return []
            batch = self.dataset[start:stop]
            return [_row(dict(zip(batch, values))) for values in zip(*batch.values())]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return _row(self.dataset[int(index)])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.dataset.iter(batch_size=READ_BATCH):
            for values in zip(*batch.values()):
                yield _row(dict(zip(batch, values)))

    def __bool__(self) -> bool:
        return len(self) > 0

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def column(self, name: str) -> list[Any]:
        """One column as a list (small: one value per row)."""
        return self.dataset.data.column(name).to_pylist()

    def lengths(self) -> list[int]:
        """The token count of each row: the `length` column where the template stage wrote one."""
        if not len(self):
            return []
        if "length" in self.dataset.column_names:
            return self.column("length")
        return [len(ids) for ids in self.dataset.data.column("input_ids").to_pylist()]


def lengths_of(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Token counts of `rows`: from the length column of a split, else from the rows (in-memory lists)."""
    if isinstance(rows, Rows):
        return rows.lengths()
    return [len(row["input_ids"]) for row in rows]


# ---------------------------------------------------------------- writing


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "json"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "ints"
    return "json"


def _features(kinds: dict[str, set[str]]):
    from datasets import Features, Json, List, Value

    if not kinds:  # an empty split: Arrow needs a column; every row of a tunekit split has an id
        return Features({"id": Value("string")})
    columns = {}
    for key, found in kinds.items():
        if found <= {"string"} and found:
            columns[key] = Value("string")
        elif found <= {"int64"} and found:
            columns[key] = Value("int64")
        elif found <= {"ints"} and found:
            columns[key] = List(Value("int64"))
        else:
            columns[key] = Json()
    return Features(columns)


def write_rows(path: Path, rows: Iterable[dict[str, Any]], work_dir: Path | None = None) -> int:
    """Write `rows` (any iterable of dicts, consumed once) as a dataset directory at `path`; returns the count.

    The rows go to a JSONL file in `work_dir` first (streamed, one row in memory), then `jsonl_to_split`
    writes it to Arrow in batches. Memory does not grow with the rows. work_dir: default beside `path`."""
    work_dir = Path(work_dir) if work_dir is not None else Path(path).parent / f".{Path(path).name}.work"
    work_dir.mkdir(parents=True, exist_ok=True)
    spool = work_dir / f"{Path(path).name}.spool.jsonl"
    with open(spool, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    count = jsonl_to_split(spool, path)
    spool.unlink()
    if not any(work_dir.iterdir()):
        work_dir.rmdir()
    return count


def jsonl_to_split(jsonl: Path, path: Path) -> int:
    """A JSONL file of row dicts as a dataset directory at `path` (two streamed passes: the columns and
    their types, then the Arrow batches); returns the row count. Columns: string, int64, a list of int64,
    else `datasets.Json`."""
    kinds: dict[str, set[str]] = {}
    count = 0
    with open(jsonl, encoding="utf-8") as handle:
        for line in handle:
            for key, value in json.loads(line).items():
                found = kinds.setdefault(key, set())
                if value is not None:
                    found.add(_kind(value))
            count += 1
    features = _features(kinds)
    json_columns = [key for key, feature in features.items() if type(feature).__name__ == "Json"]

    def encoded() -> Iterator[dict[str, Any]]:
        with open(jsonl, encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                example = {key: row.get(key) for key in features}
                for key in json_columns:
                    if example[key] is not None:
                        example[key] = json.dumps(example[key], ensure_ascii=False)
                yield example

    _write_examples(Path(path), features, encoded())
    return count


def _write_examples(path: Path, features, examples: Iterable[dict[str, Any]]) -> None:
    from datasets.arrow_writer import ArrowWriter

    configure()
    path.mkdir(parents=True, exist_ok=True)
    writer = ArrowWriter(path=str(path / SHARD), features=features, writer_batch_size=WRITER_BATCH)
    try:
        for example in examples:
            writer.write(example)
        writer.finalize()
    finally:
        writer.close()
    _write_metadata(path, features)


def save_dataset(dataset, path: Path, split: str | None = None) -> None:
    """Write a `datasets.Dataset` (e.g. the result of a map) as a dataset directory at `path`: one shard,
    record batches of WRITER_BATCH rows, a content fingerprint, the `split` name if given (`Dataset.split` on
    loading); the same rows give the same bytes."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    writer = ArrowWriter(path=str(path / SHARD), features=dataset.features, writer_batch_size=WRITER_BATCH)
    try:
        for table in dataset.with_format("arrow").iter(batch_size=WRITER_BATCH):
            # take() copies the rows into fresh, unsliced arrays: a slice of a bigger table (a map shard, a
            # select) would otherwise carry offsets and that table's buffers into the file.
            writer.write_table(table.take(pa.array(range(table.num_rows))).combine_chunks(), WRITER_BATCH)
        writer.finalize()
    finally:
        writer.close()
    _write_metadata(path, dataset.features, split)


def _write_metadata(path: Path, features, split: str | None = None) -> None:
    digest = hashlib.sha256()
    with open(path / SHARD, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    info = {"citation": "", "description": "", "features": features.to_dict(), "homepage": "", "license": ""}
    (path / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state = {"_data_files": [{"filename": SHARD}], "_fingerprint": digest.hexdigest()[:16], "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": split}
    (path / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def map_rows(dataset, function: Callable[[list[dict[str, Any]]], dict[str, list]], work_dir: Path, name: str,
             processes: int = 1, batch_size: int = 256, desc: str | None = None, features=None):
    """`dataset.map` in batches of row dicts: `function(rows)` returns the output columns (dict of lists, any
    number of rows). The cache file goes to `work_dir` (inside the caller's atomic output), the input columns
    are dropped, the fingerprint is fixed (no hashing of the function)."""
    configure()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    def batched(batch: dict[str, list]) -> dict[str, list]:
        rows = [_row(dict(zip(batch, values))) for values in zip(*batch.values())]
        return function(rows)

    return dataset.map(batched, batched=True, batch_size=batch_size, num_proc=processes if processes > 1 else None,
                       remove_columns=dataset.column_names, cache_file_name=str(work_dir / f"{name}.arrow"),
                       new_fingerprint=f"tunekit-{name}", desc=desc, features=features, load_from_cache_file=False)


def remove_work_dir(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
