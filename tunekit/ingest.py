"""Read user chat/instruction JSONL files into normalised conversations, or rejects with reasons.

`ingest()` is the library behind the `ingest` stage. `read_file()` is the streaming parser it runs on
each file; it is also usable alone, e.g. to check a file before adding it to the data directory.

Every input line becomes exactly one of: a Record (messages of role system/user/assistant with string
content, plus `"train": False` where the data said so) or a Reject naming the field and the fix.
Blank lines are neither; they are only counted.

With a task other than `sft` (params `task.type`, issue 6) the same holds for the task formats, which
become TaskRecords: classification (`text` or `text_a`/`text_b`, `label` or a list of labels),
token_classification (`tokens`/`tags` in BIO/IOB2, or CoNLL two-column text files where each sentence
is one record, reported at its first line) and squad (`context`, `question`, `answers` whose every
`answer_start` is checked against the context). A task accepts only its own formats.

Multi-task (`task.type: multi_task`): `ingest_tasks()` reads each task of `task.tasks` from its own
inputs with that task's formats and writes them into one set of split files, every row carrying its
task's name (`"task": <name>`, id `<name>-<hash>`); metrics per task and in total.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tunekit.data import jsonl_to_split
from tunekit.toolcalls import ToolDataError, check_tool_results, normalise_tool_calls, normalise_tools, tool_result_fields

FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt")
TASK_FORMATS = ("classification", "token_classification", "conll", "squad", "regression")
ALL_FORMATS = FORMATS + TASK_FORMATS
# Each format's task kind: a kind reads only its own formats (auto-detection looks only at these), and
# a format is read into the kind's records (chat Records for sft, TaskRecords for the heads).
FORMAT_TASK: dict[str, str] = {
    **dict.fromkeys(FORMATS, "sft"),
    "classification": "classification",
    "token_classification": "token_classification",
    "conll": "token_classification",
    "squad": "qa",
    "regression": "regression",
}
# task.type -> the ingest formats that kind accepts.
TASK_TYPES: dict[str, tuple[str, ...]] = {}
for _fmt, _task in FORMAT_TASK.items():
    TASK_TYPES[_task] = (*TASK_TYPES.get(_task, ()), _fmt)
TASK_OF_FORMAT = {fmt: task for fmt, task in FORMAT_TASK.items() if fmt not in FORMATS}
CONLL_SUFFIXES = (".conll",)  # detected as CoNLL under auto; with ingest.format: conll also .txt
TABLE_SUFFIXES = (".parquet", ".csv")  # read row by row like JSONL lines (rejects name the row number)
HUB_PREFIX = "hub:"  # ingest.inputs: hub:owner/name, a data set on the Hugging Face Hub (needs network)
# CSV cells that hold a JSON list or object (a CSV cell is text): parsed before the record is validated.
_JSON_CELLS = ("messages", "conversations", "tools", "tokens", "tags", "answers")
SPLITS = ("train", "validation", "test")

# The keys a line must have to be read as each format. Other keys are ignored, so user metadata
# columns (ids, sources, scores) do not make lines unreadable.
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "classification": ("label",),  # plus "text", or "text_a" and "text_b" (checked when normalising)
    "token_classification": ("tokens", "tags"),
    "squad": ("context", "question", "answers"),
    "regression": ("target",),  # plus "text", or "text_a" and "text_b", like classification
}
_FORMAT_KEYS_HELP = "; ".join(
    f"{fmt} needs {', '.join(json.dumps(key) for key in keys)}" for fmt, keys in _REQUIRED_KEYS.items()
    if fmt in FORMATS
)
_TASK_KEYS_HELP = {
    "classification": 'classification needs "text" (or "text_a" and "text_b") and "label"',
    "token_classification": 'token_classification needs "tokens" and "tags" (or .conll files)',
    "squad": 'squad needs "context", "question" and "answers"',
    "regression": 'regression needs "text" (or "text_a" and "text_b") and "target" (a number or a list of numbers)',
}
_ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_BOM = b"\xef\xbb\xbf"
_SUMMARY_REJECTS = 10
_MISSING = object()  # marks an absent key, so "missing" and null get different messages


class IngestError(Exception):
    """The inputs or ingest params are unusable; the message is a multi-line summary for the user."""


@dataclass(frozen=True)
class Record:
    messages: list[dict]
    file: str
    line: int
    id: str  # first 16 hex chars of the sha256 of the canonical messages JSON (with tools: of both)
    tools: list[dict] | None = None  # function schemas of a tool-calling record (tunekit/toolcalls.py)


@dataclass(frozen=True)
class TaskRecord:
    """A record of a head-based task: `fields` are the normalised columns written to the split files."""
    task: str  # classification | token_classification | qa
    fields: dict
    file: str
    line: int
    id: str  # first 16 hex chars of the sha256 of the canonical {"task", **fields} JSON (orig_id excluded)


@dataclass(frozen=True)
class Reject:
    file: str
    line: int
    reason: str  # short stable code, e.g. "unknown_role"
    detail: str  # names the field and the fix


class _Bad(Exception):
    """Raised while checking one line; becomes that line's Reject."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def input_files(inputs: str | Path, suffixes: tuple[str, ...] = (".jsonl",)) -> list[Path]:
    """The files to ingest: `inputs` itself, or every file under the directory ending in one of `suffixes`, sorted.

    suffixes is (".jsonl",) except for token classification, where CoNLL files (.conll; .txt with
    ingest.format: conll) are read too; see `suffixes_for`.
    """
    if str(inputs).startswith(HUB_PREFIX):
        return [Path(str(inputs))]
    path = Path(inputs)
    if path.is_file() or is_dataset_dir(path):
        return [path]
    if path.is_dir():
        # Hidden paths are tool leftovers (.ipynb_checkpoints, .git, our own .tmp dirs) that would
        # quietly add stale copies of the data.
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.name.endswith(suffixes)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if files:
            return files
        patterns = " / ".join(f"*{suffix}" for suffix in suffixes)
        raise IngestError(
            f"input directory {path} contains no {patterns} files (searched recursively, hidden paths skipped) and is "
            f"not a `datasets` save_to_disk directory; add {patterns} files there or point ingest.inputs in "
            "params.yaml at a file"
        )
    raise IngestError(
        f"input {path} does not exist; set ingest.inputs in params.yaml to a .jsonl, .parquet or .csv file, a "
        "directory of them, a `datasets` save_to_disk directory or hub:owner/name"
    )


def is_dataset_dir(path: Path) -> bool:
    """Whether `path` is a directory `datasets.Dataset(Dict).save_to_disk` wrote."""
    path = Path(path)
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def suffixes_for(task: str, fmt: str) -> tuple[str, ...]:
    """The file name endings read from an input directory for this task and ingest.format."""
    if fmt == "conll":
        return (*CONLL_SUFFIXES, ".txt")
    if "conll" in TASK_TYPES[task] and fmt == "auto":
        return (".jsonl", *TABLE_SUFFIXES, *CONLL_SUFFIXES)
    return (".jsonl", *TABLE_SUFFIXES)


def read_file(path: Path, fmt: str = "auto", max_chars: int = 16000,
              task: str = "sft") -> Iterator[Record | TaskRecord | Reject]:
    """Stream one Record (TaskRecord for a task other than sft) or Reject per non-blank line of `path`,
    holding one line in memory at a time (CoNLL files: one per sentence).

    With fmt="auto" the file's format is taken from the first line whose keys match a format;
    later lines of another format are rejected as wrong_format. A line of another task's format
    found first raises IngestError (the data and task.type disagree).
    """
    _check_read_args(fmt, max_chars, task)
    return (item for item, _ in _read_any(Path(path), fmt, max_chars, task) if item is not None)


def split_of(record_id: str, validation: float, test: float) -> str:
    """Return "train", "validation" or "test", decided by the record id alone.

    The id is a content hash, so its value is uniform and fixed for the record's lifetime: appending
    data never moves an old record, and identical records always share a split. Test takes the lowest
    ids so that changing `validation` never changes the test set.
    """
    _check_fractions(validation, test)
    position = int(record_id, 16) / 16 ** len(record_id)
    if position < test:
        return "test"
    if position < test + validation:
        return "validation"
    return "train"


def ingest(inputs: str | Path, out_dir: Path, fmt: str = "auto", max_chars: int = 16000,
           max_reject_rate: float = 0.05, validation: float = 0.1, test: float = 0.1, task: str = "sft") -> dict:
    """Read every input file and write out_dir/{train,validation,test,rejects}.jsonl; return metrics.

    out_dir is replaced only when everything succeeded and the reject rate is acceptable; otherwise
    an existing out_dir is left as it was and nothing partial is left behind. `task` (task.type)
    chooses which formats are accepted: the chat formats for sft, the task's own formats otherwise.
    """
    _check_read_args(fmt, max_chars, task)
    _check_fractions(validation, test)
    _check_reject_rate(max_reject_rate)
    files = input_files(inputs, suffixes_for(task, fmt))
    if not str(inputs).startswith(HUB_PREFIX):
        _check_no_overlap(Path(inputs), Path(out_dir))

    def write(tmp: Path) -> dict:
        tally = _Tally()
        with _split_files(tmp) as outputs:
            for path in files:
                _read_into(outputs, tally, path, fmt, max_chars, task, validation, test)
        tally.check(max_reject_rate, f"{len(files)} file(s)")
        return {**tally.metrics(), "files": len(files)}

    return _replace_dir(Path(out_dir), write)


def ingest_tasks(tasks: dict[str, tuple[str, str | Path]], out_dir: Path, max_chars: int = 16000,
                 max_reject_rate: float = 0.05, validation: float = 0.1, test: float = 0.1) -> dict:
    """Multi-task ingest (task.type multi_task): `tasks` maps each task name to (task type, inputs).

    Each task's inputs are read exactly as a single task's (its own formats, the same rejects, CoNLL
    for token_classification from .conll files, or .txt ones) and split by the same content hash; all
    rows go to one set of split files, each with `"task": <name>` and its id prefixed `<name>-`, so ids
    stay unique when two tasks hold the same content. Duplicates are counted within a task. The stage
    fails when any one task rejects more than max_reject_rate of its lines or accepts none, so a small
    task's bad file is not hidden by a big clean one. Metrics: totals, and the same per task under "tasks"."""
    _check_fractions(validation, test)
    _check_reject_rate(max_reject_rate)
    sources: dict[str, tuple[str, str, list[Path]]] = {}
    for name, (kind, inputs) in tasks.items():
        fmt = "conll" if "conll" in TASK_TYPES[kind] and Path(inputs).is_file() and str(inputs).endswith(".txt") else "auto"
        _check_read_args(fmt, max_chars, kind)
        try:
            files = input_files(inputs, suffixes_for(kind, fmt))
        except IngestError as exc:
            raise IngestError(f"task.tasks.{name}.inputs: {exc}".replace("ingest.inputs", f"task.tasks.{name}.inputs")) from None
        _check_no_overlap(Path(inputs), Path(out_dir))
        sources[name] = (kind, fmt, files)

    def write(tmp: Path) -> dict:
        tallies = {name: _Tally() for name in sources}
        with _split_files(tmp) as outputs:
            for name, (kind, fmt, files) in sources.items():
                for path in files:
                    _read_into(outputs, tallies[name], path, fmt, max_chars, kind, validation, test, name)
        for name, tally in tallies.items():
            tally.check(max_reject_rate, f"the {len(sources[name][2])} file(s) of task.tasks.{name}", f"task {name}: ")
        per_task = {name: {**tally.metrics(), "type": sources[name][0], "files": len(sources[name][2])}
                    for name, tally in tallies.items()}
        total = _Tally()
        for tally in tallies.values():
            total.add(tally)
        return {**total.metrics(), "files": sum(len(files) for _, _, files in sources.values()), "tasks": per_task}

    return _replace_dir(Path(out_dir), write)


def _check_reject_rate(max_reject_rate: float) -> None:
    if not 0 <= max_reject_rate <= 1:
        raise IngestError(f"ingest.max_reject_rate is {max_reject_rate}; use a fraction in [0, 1], e.g. 0.05")


def _replace_dir(out_dir: Path, write) -> dict:
    """Run `write(tmp)` in a temporary sibling of out_dir, then put it in out_dir's place; on any error
    the temporary is removed and an existing out_dir stays as it was."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run that happened to have our pid
    tmp.mkdir()
    try:
        metrics = write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


@contextmanager
def _split_files(tmp: Path) -> Iterator[dict[str, Any]]:
    """Open files for the rows of each split (JSONL spools in tmp/.work, written to a `datasets` directory
    tmp/<split> when the block ends: tunekit.data) and for tmp/rejects.jsonl. Streamed: one row in memory."""
    work = tmp / ".work"
    work.mkdir()
    with ExitStack() as stack:
        files = {name: stack.enter_context(open(work / f"{name}.jsonl", "w", encoding="utf-8")) for name in SPLITS}
        files["rejects"] = stack.enter_context(open(tmp / "rejects.jsonl", "w", encoding="utf-8"))
        yield files
    for name in SPLITS:
        jsonl_to_split(work / f"{name}.jsonl", tmp / name)
    shutil.rmtree(work)


@dataclass
class _Tally:
    """What happened to the lines of one ingest (or of one task of a multi-task ingest)."""
    lines_read: int = 0
    blank_lines: int = 0
    duplicates: int = 0
    by_reason: Counter = field(default_factory=Counter)
    per_split: Counter = field(default_factory=Counter)
    first_rejects: list = field(default_factory=list)
    # Only digests are kept, so memory grows by ~100 bytes per unique record, not by its text.
    seen: set = field(default_factory=set)

    def add(self, other: _Tally) -> None:
        self.lines_read += other.lines_read
        self.blank_lines += other.blank_lines
        self.duplicates += other.duplicates
        self.by_reason.update(other.by_reason)
        self.per_split.update(other.per_split)

    def metrics(self) -> dict:
        rejected = sum(self.by_reason.values())
        return {
            "lines_read": self.lines_read,
            "blank_lines": self.blank_lines,
            "accepted": sum(self.per_split.values()),
            "rejected": rejected,
            "rejected_by_reason": dict(sorted(self.by_reason.items())),
            "duplicates": self.duplicates,
            "reject_rate": rejected / self.lines_read if self.lines_read else 0.0,
            **{name: self.per_split[name] for name in SPLITS},
        }

    def check(self, max_reject_rate: float, inputs: str, prefix: str = "") -> None:
        """Raise IngestError when too many lines were rejected or none was accepted."""
        m = self.metrics()
        if m["reject_rate"] > max_reject_rate:
            raise IngestError(_summary(
                f"{prefix}ingest rejected {m['rejected']} of {m['lines_read']} lines read ({m['reject_rate']:.2%}), above "
                f"ingest.max_reject_rate = {max_reject_rate} ({max_reject_rate:.2%}).",
                self.by_reason, self.first_rejects,
                "fix: correct or remove the rejected lines in the input files and re-run, or, if these rejects are "
                "expected, raise ingest.max_reject_rate in params.yaml.",
            ))
        if m["accepted"] == 0:
            raise IngestError(_summary(
                f"{prefix}ingest accepted no records from {inputs}: {m['lines_read']} lines read, {m['blank_lines']} blank, "
                f"{m['rejected']} rejected.",
                self.by_reason, self.first_rejects,
                "fix: point ingest.inputs in params.yaml at files that contain data lines, or fix the rejected lines.",
            ))


def _read_into(outputs: dict[str, Any], tally: _Tally, path: Path, fmt: str, max_chars: int, task: str,
               validation: float, test: float, name: str | None = None) -> None:
    """Read one input file: every record to its split file, every reject to rejects.jsonl, all counted in
    `tally`. `name` (multi-task): the task's name, written as each row's "task" and prefixed to its id."""
    for item, digest in tqdm(_read_any(path, fmt, max_chars, task), desc=str(path), unit=" lines",
                             disable=None, file=sys.stderr):
        if item is None:
            tally.blank_lines += 1
            continue
        tally.lines_read += 1
        if isinstance(item, Reject):
            tally.by_reason[item.reason] += 1
            if len(tally.first_rejects) < _SUMMARY_REJECTS:
                tally.first_rejects.append(item)
            row: dict[str, Any] = {"file": item.file, "line": item.line, "reason": item.reason, "detail": item.detail,
                                   **({"task": name} if name else {})}
            outputs["rejects"].write(json.dumps(row, ensure_ascii=False) + "\n")
            continue
        if digest in tally.seen:
            tally.duplicates += 1
            continue
        tally.seen.add(digest)
        split = split_of(item.id, validation, test)
        tally.per_split[split] += 1
        if isinstance(item, TaskRecord):
            row = {"id": f"{name}-{item.id}" if name else item.id, "source": f"{item.file}:{item.line}",
                   "task": name or item.task, **item.fields}
        else:
            row = {"id": item.id, "messages": item.messages, **({"tools": item.tools} if item.tools else {}),
                   "source": f"{item.file}:{item.line}"}
        outputs[split].write(json.dumps(row, ensure_ascii=False) + "\n")


def _summary(headline: str, by_reason: Counter[str], first_rejects: list[Reject], fix: str) -> str:
    lines = [headline]
    if by_reason:
        lines.append("rejects by reason:")
        lines += [f"  {reason}: {count}" for reason, count in by_reason.most_common()]
        total = sum(by_reason.values())
        shown = f"first {len(first_rejects)} of {total}" if total > len(first_rejects) else "all"
        lines.append(f"{shown} rejects:")
        lines += [f"  {r.file}:{r.line}: {r.reason}: {r.detail}" for r in first_rejects]
    lines.append(fix)
    return "\n".join(lines)


def _check_read_args(fmt: str, max_chars: int, task: str = "sft") -> None:
    if task not in TASK_TYPES:
        raise IngestError(f"task.type is {task!r}; use one of: {', '.join(TASK_TYPES)}")
    if fmt != "auto" and fmt not in ALL_FORMATS:
        raise IngestError(f"ingest.format is {fmt!r}; use \"auto\" or one of: {', '.join(ALL_FORMATS)}")
    if fmt != "auto" and fmt not in TASK_TYPES[task]:
        owner = next(name for name, formats in TASK_TYPES.items() if fmt in formats)
        raise IngestError(f"ingest.format is {fmt!r}, a format of task.type {owner}, but task.type is {task} "
                          f"(which reads {', '.join(TASK_TYPES[task])}); set task.type: {owner} in params.yaml, "
                          "or ingest.format to one of those formats or auto")
    if max_chars < 1:
        raise IngestError(f"ingest.max_chars is {max_chars}; use a positive number of characters, e.g. 16000")


def _check_fractions(validation: float, test: float) -> None:
    for name, value in (("validation", validation), ("test", test)):
        if not 0 <= value < 1:
            raise IngestError(f"ingest.{name} is {value}; use a fraction in [0, 1), e.g. 0.1")
    if validation + test >= 1:
        raise IngestError(
            f"ingest.validation + ingest.test is {validation + test}; keep the sum below 1 so that data is left "
            "to train on"
        )


def _check_no_overlap(inputs: Path, out_dir: Path) -> None:
    # Replacing out_dir deletes it, and outputs inside an input directory are read back as input
    # on the next run; both must be impossible, not just unlikely.
    source, target = inputs.resolve(), out_dir.resolve()
    if source.is_relative_to(target) or target.is_relative_to(source):
        raise IngestError(
            f"ingest output {out_dir} overlaps the inputs {inputs}: writing it would delete the inputs or "
            "re-read old outputs as input; use an output directory outside the inputs"
        )


def _read_any(path: Path, fmt: str, max_chars: int, task: str = "sft"
              ) -> Iterator[tuple[Record | TaskRecord | Reject | None, bytes]]:
    """CoNLL text files for format conll (or a .conll file under token_classification); Parquet, CSV, a
    save_to_disk directory or a hub data set row by row; JSONL otherwise."""
    if str(path).startswith(HUB_PREFIX):
        return _read_sources(_hub_sources(str(path)[len(HUB_PREFIX):]), fmt, max_chars, task)
    if is_dataset_dir(path):
        return _read_sources(_dataset_sources(path), fmt, max_chars, task)
    if fmt == "conll" or (fmt == "auto" and "conll" in TASK_TYPES[task] and path.name.endswith(CONLL_SUFFIXES)):
        return _read_conll(path, max_chars)
    if path.name.endswith(".parquet"):
        return _read_objects(str(path), _parquet_rows(path), fmt, max_chars, task)
    if path.name.endswith(".csv"):
        return _read_objects(str(path), _csv_rows(path), fmt, max_chars, task)
    return _read_lines(path, fmt, max_chars, task)


def _read_sources(sources: Iterator[tuple[str, Iterator]], fmt: str, max_chars: int, task: str) -> Iterator:
    """Each (name, rows) source (a split of a data set) read like one file: its own format detection."""
    for name, rows in sources:
        yield from _read_objects(name, rows, fmt, max_chars, task)


def _without_nulls(value: Any) -> Any:
    """A table row as the JSON object it stands for: Arrow structs give every row every field of the
    column, null where the row had none, so null fields of objects are taken as absent (ingest treats a
    null `content` and an absent one alike)."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number from 1, row) of a Parquet file, 1024 rows in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for obj in batch.to_pylist():
                row += 1
                yield row, _without_nulls(obj)
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"{path}: not a readable Parquet file ({exc}); re-export it, or convert it to JSONL") from None


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    """(data row number from 1, the row as an object) of a CSV file with a header row. Cells are text; the
    cells of _JSON_CELLS columns (and a `label` written as a JSON list, a numeric `target`) are parsed as
    JSON, a cell that is not valid JSON there is the row's reject."""
    import csv

    name = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            for row_no, cells in enumerate(reader, start=1):
                if None in cells:
                    yield row_no, Reject(name, row_no, "wrong_format",
                                         f"row {row_no} has {len(cells) - 1 + len(cells[None])} cells but the header "
                                         f"names {len(cells) - 1} columns; quote cells that contain commas")
                    continue
                try:
                    yield row_no, {key: _csv_cell(key, value) for key, value in cells.items() if value is not None}
                except _Bad as bad:
                    yield row_no, Reject(name, row_no, bad.reason, bad.detail)
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: byte 0x{exc.object[exc.start]:02x} is not valid UTF-8; re-save the file as UTF-8 "
                          "(e.g. iconv -f latin1 -t utf-8)") from None
    except csv.Error as exc:
        raise IngestError(f"{path}: not readable as CSV ({exc}); re-export it with a header row") from None


def _csv_cell(key: str, value: str) -> Any:
    if key in _JSON_CELLS or (key == "label" and value.lstrip().startswith("[")):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise _Bad("invalid_json", f"column {key} holds {_describe(value)}, not valid JSON ({exc.msg} at column "
                                       f"{exc.colno}); a CSV cell of {key} must be a JSON list or object") from None
    if key == "target":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # rejected as not_a_number, with the value shown
    return value


def _dataset_sources(path: Path) -> Iterator[tuple[str, Iterator]]:
    """A save_to_disk directory: one source per split of a DatasetDict (named <dir>/<split>), or the Dataset."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=False)
    except Exception as exc:
        raise IngestError(f"{path}: not a readable `datasets` save_to_disk directory ({exc}); save it again with "
                          "Dataset.save_to_disk, or export it to JSONL") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, dataset in parts:
        yield (str(path) if split is None else f"{path}/{split}"), _dataset_rows(dataset)


def _dataset_rows(dataset) -> Iterator[tuple[int, dict[str, Any]]]:
    row = 0
    for batch in dataset.iter(batch_size=256):
        for values in zip(*batch.values()):
            row += 1
            yield row, _without_nulls(dict(zip(batch, values)))


def _hub_sources(repo: str) -> Iterator[tuple[str, Iterator]]:
    """A data set on the Hugging Face Hub, streamed split by split (needs network; nothing is cached)."""
    offline = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
               if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")]
    reason = f"{' and '.join(offline)} {'is' if len(offline) == 1 else 'are'} set" if offline else None
    if reason is None and not _online():
        reason = "huggingface.co cannot be reached"
    if reason is not None:
        raise IngestError(
            f"ingest.inputs is {HUB_PREFIX}{repo}, a data set on the Hugging Face Hub, but this machine has no network "
            f"({reason}). On a machine with network run\n"
            f"  python -c 'import datasets; datasets.load_dataset(\"{repo}\").save_to_disk(\"data/raw/{repo.split('/')[-1]}\")'\n"
            f"copy data/raw/{repo.split('/')[-1]} here and set ingest.inputs: data/raw/{repo.split('/')[-1]} in params.yaml "
            "(a save_to_disk directory is read like a file), or export the data to JSONL, Parquet or CSV")
    import datasets

    loaded = datasets.load_dataset(repo, streaming=True)
    for split, dataset in loaded.items():
        def rows(dataset=dataset) -> Iterator[tuple[int, dict[str, Any]]]:
            for row, obj in enumerate(dataset, start=1):
                yield row, _without_nulls(obj)
        yield f"{HUB_PREFIX}{repo}/{split}", rows()


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text, "") per physical line, read as bytes and decoded line by line so that one
    line in another encoding is that line's problem, not the file's; (line number, None, "byte 0x.. at
    byte N") for a line that is not UTF-8. Line endings and a BOM at the line's start are stripped, so
    decoder positions count from the line's start."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\r\n")
            # At any line, not only the first: files joined with `cat` keep each file's BOM.
            if raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                yield line_no, raw.decode("utf-8"), ""
            except UnicodeDecodeError as exc:
                yield line_no, None, f"byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}"


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | Reject | None]]:
    """(line number, the line's object) per physical line of a JSONL file; a Reject for a line that is not
    UTF-8 or not a JSON object, None for a blank line."""
    name = str(path)
    for line_no, text, bad_byte in _decoded_lines(path):
        if text is None:
            yield line_no, Reject(name, line_no, "invalid_utf8",
                                  f"{bad_byte} of the line is not valid UTF-8; "
                                  "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
        elif not text.strip():
            yield line_no, None
        else:
            try:
                yield line_no, _parse_object(text)
            except _Bad as bad:
                yield line_no, Reject(name, line_no, bad.reason, bad.detail)


def _read_lines(path: Path, fmt: str, max_chars: int, task: str = "sft"
                ) -> Iterator[tuple[Record | TaskRecord | Reject | None, bytes]]:
    """One pair per physical line: (None, b"") for a blank line, else the line's Record or Reject."""
    return _read_objects(str(path), _json_lines(path), fmt, max_chars, task)


def _read_objects(name: str, objects: Iterator[tuple[int, dict[str, Any] | Reject | None]], fmt: str, max_chars: int,
                  task: str = "sft") -> Iterator[tuple[Record | TaskRecord | Reject | None, bytes]]:
    """One pair per input object (a JSONL line, a table row): (None, b"") for a blank line, else its Record
    or Reject, reported at `name` and the object's line (row) number.

    A Record comes with the full sha256 of its canonical messages, which ingest dedups on; handing it
    over saves hashing every record twice.
    """
    # (format, line it was detected from); line 0 means the caller forced the format.
    detected: tuple[str, int] | None = None if fmt == "auto" else (fmt, 0)
    # classification: (multi-label?, line it was decided on): one kind of label per file.
    label_kind: tuple[bool, int] | None = None
    chat = TASK_TYPES[task] == FORMATS  # conversations, not the fields of a head's record
    for line_no, obj in objects:
        if obj is None or isinstance(obj, Reject):
            yield obj, b""
            continue
        try:
            if detected is None:
                found = _format_of(obj, ALL_FORMATS)
                if found is not None and found not in TASK_TYPES[task]:
                    owner = next(t for t, formats in TASK_TYPES.items() if found in formats)
                    raise IngestError(
                        f"{name}:{line_no}: the line is {found} data ({_keys(obj)}) but task.type is {task}, "
                        f"which reads {', '.join(TASK_TYPES[task])}; set task.type: {owner} in params.yaml to "
                        f"train on it, or point ingest.inputs at {task} data")
                if found is not None:
                    detected = (found, line_no)
            if chat:
                messages, tools = _normalise(obj, detected, max_chars)
            else:
                if detected is None:
                    help_ = "; ".join(_TASK_KEYS_HELP[f] for f in TASK_TYPES[task] if f in _TASK_KEYS_HELP)
                    raise _Bad("wrong_format", f"line has {_keys(obj)}, which match no {task} format, and no "
                                               f"earlier line did either; {help_}")
                fields = _normalise_task(obj, detected, max_chars)
                if detected[0] == "classification":
                    multi = isinstance(fields["label"], list)
                    if label_kind is None:
                        label_kind = (multi, line_no)
                    elif label_kind[0] != multi:
                        kind = "multi-label (label is a list)" if label_kind[0] else "single-label (label is a string)"
                        fix = (f'write the label as a list, e.g. [{json.dumps(fields["label"])}]' if label_kind[0]
                               else "give one label as a string, or make every line's label a list")
                        raise _Bad("wrong_type", f"label is {_describe(obj['label'])} but the file is {kind} as "
                                                 f"decided by line {label_kind[1]}; {fix}")
        except (_Bad, ToolDataError) as bad:
            yield Reject(name, line_no, bad.reason, bad.detail), b""
            continue
        if chat:
            digest = _digest({"messages": messages, "tools": tools} if tools else messages)
            yield Record(messages, name, line_no, digest.hex()[:16], tools), digest
        else:
            digest = _task_digest(TASK_OF_FORMAT[detected[0]], fields)
            yield TaskRecord(TASK_OF_FORMAT[detected[0]], fields, name, line_no, digest.hex()[:16]), digest


def _parse_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Bad("invalid_json", f"not valid JSON: {exc.msg} at column {exc.colno}; fix the line so that it "
                                   "holds one complete JSON object (JSONL allows no line breaks inside a record)") from None
    except RecursionError:
        raise _Bad("invalid_json", "JSON is nested too deeply to parse; flatten the line") from None
    if isinstance(obj, list):
        raise _Bad("not_an_object", "line is a JSON list, not an object; write one object per line "
                                    "(a JSON array file must be converted to JSONL)")
    if not isinstance(obj, dict):
        raise _Bad("not_an_object", f"line is {_describe(obj)}, not a JSON object; write one object per line "
                                    "such as {\"messages\": [...]}")
    return obj


def _format_of(obj: dict[str, Any], formats: tuple[str, ...] = FORMATS) -> str | None:
    for fmt in formats:
        if fmt == "conll":
            continue  # a text format, chosen by file name or ingest.format
        if all(key in obj for key in _REQUIRED_KEYS[fmt]):
            if fmt in ("classification", "regression") and "text" not in obj and "text_a" not in obj:
                continue
            return fmt
    return None


def _require_keys(obj: dict[str, Any], fmt: str, since: int) -> None:
    """A line must have every key of its file's format (`since`: the line that set it, 0 = ingest.format)."""
    missing = [key for key in _REQUIRED_KEYS[fmt] if key not in obj]
    if missing:
        origin = "as forced by ingest.format" if since == 0 else f"as detected from line {since}"
        raise _Bad("wrong_format", f"line has {_keys(obj)} but the file is {fmt} ({origin}), which needs "
                                   f"{', '.join(json.dumps(key) for key in missing)}; keep one format per file")


def _normalise(obj: dict[str, Any], detected: tuple[str, int] | None, max_chars: int
               ) -> tuple[list[dict], list[dict] | None]:
    """The line's messages, and its tools (None unless a messages-format line has a `tools` key)."""
    if detected is None:
        raise _Bad("wrong_format", f"line has {_keys(obj)}, which match no known format, and no earlier line "
                                   f"did either; {_FORMAT_KEYS_HELP}")
    fmt, since = detected
    _require_keys(obj, fmt, since)
    tools = None
    if fmt == "messages":
        # Exports write "tools": [] or null on records without tools.
        tools = normalise_tools(obj["tools"]) if obj.get("tools") not in (None, []) else None
        messages = _from_messages(obj["messages"], tools)
        _check_turns(messages, "messages")
        check_tool_results(messages, "messages")
    elif fmt == "sharegpt":
        messages = _from_sharegpt(obj["conversations"])
        _check_turns(messages, "conversations")
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text(obj["prompt"], "prompt")},
                    {"role": "assistant", "content": _text(obj["completion"], "completion")}]
    else:
        messages = _from_alpaca(obj)
    total = sum(len(message["content"]) + (len(json.dumps(message["tool_calls"])) if "tool_calls" in message else 0)
                for message in messages)
    if total > max_chars:
        raise _Bad("too_long", f"message contents total {total} characters, above ingest.max_chars = {max_chars}; "
                               "shorten or split the conversation, or raise ingest.max_chars in params.yaml")
    return messages, tools


def _from_messages(value: Any, tools: list[dict] | None = None) -> list[dict]:
    if not isinstance(value, list):
        raise _Bad("wrong_type", f"messages is {_describe(value)}; it must be a list of "
                                 "{\"role\": ..., \"content\": ...} objects")
    messages = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise _Bad("wrong_type", f"{where} is {_describe(item)}; it must be an object with role and content")
        role = item.get("role", _MISSING)
        if not isinstance(role, str):
            raise _Bad("wrong_type", f"{where}.role is {_describe(role)}; it must be one of {', '.join(_ROLES)}")
        if role.lower() not in _ROLES:
            raise _Bad("unknown_role", f"{where}.role is {json.dumps(role)}; use one of {', '.join(_ROLES)}")
        role = role.lower()  # exports write "User", "ASSISTANT"
        content = item.get("content", _MISSING)
        if role == "assistant" and item.get("tool_calls") not in (None, []):
            # A turn that only calls tools has no text (OpenAI writes null).
            text = "" if content in (_MISSING, None, "") else _content(content, f"{where}.content")
            message = {"role": role, "content": text,
                       "tool_calls": normalise_tool_calls(item["tool_calls"], f"{where}.tool_calls", tools)}
        elif role == "tool":
            message = {"role": role, "content": _text(content, f"{where}.content", allow_empty=True),
                       **tool_result_fields(item, where)}
        else:
            message = {"role": role, "content": _content(content, f"{where}.content")}
        if "train" in item:
            if not isinstance(item["train"], bool):
                raise _Bad("wrong_type", f"{where}.train is {_describe(item['train'])}; use true or false")
            # true is the default, so only false is kept: equal conversations then hash equal.
            if not item["train"]:
                message["train"] = False
        messages.append(message)
    return messages


def _content(value: Any, where: str) -> str:
    """A message content: a string, or OpenAI text parts joined with newlines."""
    if not isinstance(value, list):
        return _text(value, where, kinds="a string or a list of {\"type\": \"text\", \"text\": ...} parts")
    texts = []
    for index, part in enumerate(value):
        part_where = f"{where}[{index}]"
        if not isinstance(part, dict):
            raise _Bad("wrong_type", f"{part_where} is {_describe(part)}; content parts must be objects like "
                                     "{\"type\": \"text\", \"text\": \"...\"}")
        if part.get("type") != "text":
            raise _Bad("wrong_type", f"{part_where}.type is {_describe(part.get('type', _MISSING))}; only \"text\" "
                                     "parts can be trained on, drop other parts from the data")
        texts.append(_text(part.get("text", _MISSING), f"{part_where}.text", allow_empty=True))
    joined = "\n".join(texts)
    if not joined.strip():
        raise _Bad("empty_content", f"{where} has no text in its parts; write the text or drop the message")
    return joined


def _from_sharegpt(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise _Bad("wrong_type", f"conversations is {_describe(value)}; it must be a list of "
                                 "{\"from\": ..., \"value\": ...} objects")
    messages = []
    for index, item in enumerate(value):
        where = f"conversations[{index}]"
        if not isinstance(item, dict):
            raise _Bad("wrong_type", f"{where} is {_describe(item)}; it must be an object with from and value")
        source = item.get("from", _MISSING)
        if not isinstance(source, str):
            raise _Bad("wrong_type", f"{where}.from is {_describe(source)}; it must be one of "
                                     f"{', '.join(_SHAREGPT_ROLES)}")
        if source.lower() not in _SHAREGPT_ROLES:
            raise _Bad("unknown_role",
                       f"{where}.from is {json.dumps(source)}; use one of {', '.join(_SHAREGPT_ROLES)}")
        content = _text(item.get("value", _MISSING), f"{where}.value")
        messages.append({"role": _SHAREGPT_ROLES[source.lower()], "content": content})
    return messages


def _from_alpaca(obj: dict[str, Any]) -> list[dict]:
    user = _text(obj["instruction"], "instruction")
    # input and system are optional columns: exports from tables write them as "" or null when unused.
    extra = _optional_text(obj.get("input"), "input")
    if extra.strip():
        user += "\n\n" + extra
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(obj["output"], "output")}]
    system = _optional_text(obj.get("system"), "system")
    if system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _optional_text(value: Any, where: str) -> str:
    return "" if value is None else _text(value, where, allow_empty=True)


def _text(value: Any, where: str, allow_empty: bool = False, kinds: str = "a string") -> str:
    if not isinstance(value, str):
        raise _Bad("wrong_type", f"{where} is {_describe(value)}; it must be {kinds}")
    if not allow_empty and not value.strip():
        raise _Bad("empty_content", f"{where} is empty or whitespace only; write the text or drop the line")
    # JSON escapes can spell half of a surrogate pair (often a cut emoji); such text cannot be
    # written back as UTF-8 or tokenised, so it is rejected here with its position.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _Bad("invalid_utf8", f"{where} has an unpaired surrogate \\u{ord(value[exc.start]):04x} at "
                                       f"character {exc.start + 1}; fix or remove the broken \\u escape") from None
    return value


def _check_turns(messages: list[dict], where: str) -> None:
    for index, message in enumerate(messages[1:], start=1):
        if message["role"] == "system":
            raise _Bad("misplaced_system", f"{where}[{index}] is a system message but only {where}[0] may be; "
                                           "merge it into the first message or drop it")
    if not any(message["role"] == "assistant" for message in messages):
        state = "is empty" if not messages else "has no assistant message"
        raise _Bad("no_assistant_turn", f"{where} {state}; add the assistant reply to train on")
    if messages[-1]["role"] != "assistant":
        raise _Bad("not_ending_with_assistant",
                   f"{where}[{len(messages) - 1}] is the last message and has role {messages[-1]['role']}; end with "
                   "the assistant reply, or drop the trailing messages")


def _digest(messages: list[dict] | dict) -> bytes:
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def _keys(obj: dict[str, Any]) -> str:
    if not obj:
        return "no keys"
    names = [json.dumps(key) for key in list(obj)[:8]]
    more = f" and {len(obj) - 8} more" if len(obj) > 8 else ""
    return f"keys {', '.join(names)}{more}"


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{json.dumps(value)} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{value} (a number)"
    if isinstance(value, str):
        # ASCII escapes keep details writable even when the value holds a lone surrogate.
        shown = json.dumps(value[:40] + ("..." if len(value) > 40 else ""))
        return f"{shown} (a string)"
    if isinstance(value, list):
        return "a list"
    return "an object"


# ---------------------------------------------------------------- task formats (task.type other than sft)

def _normalise_task(obj: dict[str, Any], detected: tuple[str, int], max_chars: int) -> dict[str, Any]:
    """The normalised fields of one task line (see TaskRecord); raises _Bad naming the field and the fix."""
    fmt, since = detected
    _require_keys(obj, fmt, since)
    if fmt == "classification":
        fields = _classification_fields(obj)
        chars = sum(len(fields[key]) for key in ("text", "text_a", "text_b") if key in fields)
    elif fmt == "token_classification":
        fields = _token_fields(obj["tokens"], obj["tags"])
        chars = sum(len(token) for token in fields["tokens"])
    elif fmt == "regression":
        fields = {**_text_fields(obj), "target": _targets(obj["target"])}
        chars = sum(len(fields[key]) for key in ("text", "text_a", "text_b") if key in fields)
    else:
        fields = _squad_fields(obj)
        chars = len(fields["context"]) + len(fields["question"])
    if chars > max_chars:
        raise _Bad("too_long", f"the text fields total {chars} characters, above ingest.max_chars = {max_chars}; "
                               "shorten or split the example, or raise ingest.max_chars in params.yaml")
    return fields


def _label(value: Any, where: str) -> str:
    # Integer class ids (common in exported data sets) are kept as their decimal string.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _Bad("wrong_type", f"{where} is {_describe(value)}; a label must be a string (or an integer class id)")
    if not value.strip():
        raise _Bad("empty_content", f"{where} is empty or whitespace only; write the label or drop the line")
    return value


def _text_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """"text", or the pair "text_a" and "text_b", of a sequence-level record (classification, regression)."""
    if "text_a" in obj or "text_b" in obj:
        if "text" in obj:
            raise _Bad("wrong_format", 'line has "text" and "text_a"/"text_b"; use "text" for one text or '
                                       '"text_a" and "text_b" for a pair, not both')
        for key in ("text_a", "text_b"):
            if key not in obj:
                raise _Bad("wrong_format", f'{key} is missing; a text pair needs both "text_a" and "text_b"')
        return {"text_a": _text(obj["text_a"], "text_a"), "text_b": _text(obj["text_b"], "text_b")}
    return {"text": _text(obj["text"], "text")}


def _targets(value: Any) -> float | list[float]:
    """A regression target: one finite number, or a non-empty list of them (several outputs)."""
    def number(item: Any, where: str) -> float:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            hint = " (write it as a JSON number, without quotes)" if isinstance(item, str) else ""
            raise _Bad("not_a_number", f"{where} is {_describe(item)}; a regression target must be a number{hint}")
        if not math.isfinite(item):
            raise _Bad("not_a_number", f"{where} is {item}; a regression target must be a finite number")
        return float(item)

    if isinstance(value, list):
        if not value:
            raise _Bad("empty_content", "target is an empty list; give one number per output, or one number")
        return [number(item, f"target[{index}]") for index, item in enumerate(value)]
    return number(value, "target")


def _classification_fields(obj: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = _text_fields(obj)
    value = obj["label"]
    if isinstance(value, list):
        labels = [_label(item, f"label[{index}]") for index, item in enumerate(value)]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise _Bad("duplicate_label", f"label lists {', '.join(map(json.dumps, repeated))} more than once; "
                                          "list each label of a multi-label example once")
        fields["label"] = sorted(labels)  # a set: the order carries no meaning, and equal sets hash equal
    else:
        fields["label"] = _label(value, "label")
    return fields


def _token_fields(tokens: Any, tags: Any) -> dict[str, Any]:
    for key, value in (("tokens", tokens), ("tags", tags)):
        if not isinstance(value, list):
            raise _Bad("wrong_type", f"{key} is {_describe(value)}; it must be a list of strings")
    if not tokens:
        raise _Bad("empty_content", "tokens is an empty list; write the sentence's words or drop the line")
    if len(tokens) != len(tags):
        raise _Bad("length_mismatch", f"tokens has {len(tokens)} items but tags has {len(tags)}; give exactly one "
                                      "tag per token")
    for index, token in enumerate(tokens):
        if not isinstance(token, str):
            raise _Bad("wrong_type", f"tokens[{index}] is {_describe(token)}; it must be a string")
        if not token.strip():
            raise _Bad("empty_content", f"tokens[{index}] is empty or whitespace only; a token must hold text "
                                        f"(drop it together with tags[{index}])")
        _text(token, f"tokens[{index}]")
    for index, tag in enumerate(tags):
        if not isinstance(tag, str):
            raise _Bad("wrong_type", f"tags[{index}] is {_describe(tag)}; tags must be strings such as \"O\", "
                                     "\"B-CITY\", \"I-CITY\" (map integer tag ids to their names first)")
        if tag != "O" and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
            raise _Bad("invalid_tag", f"tags[{index}] is {json.dumps(tag)}; use BIO/IOB2 tags: \"O\", \"B-<type>\" "
                                      "or \"I-<type>\" (convert BIOES/IOB1 tags to IOB2)")
        if tag.startswith("I-"):
            previous = tags[index - 1] if index else None
            if previous not in (f"B-{tag[2:]}", tag):
                after = f"tags[{index - 1}] is {json.dumps(previous)}" if index else "it is the first tag"
                raise _Bad("invalid_bio", f"tags[{index}] is {json.dumps(tag)} but {after}; an I- tag must continue "
                                          f"B-{tag[2:]} or I-{tag[2:]} (IOB2): change tags[{index}] to "
                                          f"\"B-{tag[2:]}\" if an entity starts there")
    return {"tokens": list(tokens), "tags": list(tags)}


def _squad_fields(obj: dict[str, Any]) -> dict[str, Any]:
    context = _text(obj["context"], "context")
    question = _text(obj["question"], "question")
    answers = obj["answers"]
    if not isinstance(answers, dict):
        raise _Bad("wrong_type", f"answers is {_describe(answers)}; it must be an object "
                                 '{"text": [...], "answer_start": [...]} (empty lists for an unanswerable question)')
    for key in ("text", "answer_start"):
        if not isinstance(answers.get(key, _MISSING), list):
            raise _Bad("wrong_type", f"answers.{key} is {_describe(answers.get(key, _MISSING))}; it must be a list "
                                     "(empty for an unanswerable question)")
    texts, starts = answers["text"], answers["answer_start"]
    if len(texts) != len(starts):
        raise _Bad("length_mismatch", f"answers.text has {len(texts)} items but answers.answer_start has "
                                      f"{len(starts)}; give one start offset per answer")
    for index, (text, start) in enumerate(zip(texts, starts)):
        text = _text(text, f"answers.text[{index}]")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise _Bad("wrong_type", f"answers.answer_start[{index}] is {_describe(start)}; it must be the "
                                     "character offset (an integer >= 0) of the answer in the context")
        found = context[start:start + len(text)]
        if found != text:
            where = context.find(text)
            hint = (f"the text occurs at character {where}: set answer_start to {where}" if where >= 0
                    else "the text does not occur in the context at all: fix the answer or the context")
            raise _Bad("answer_mismatch", f"answers.text[{index}] {_describe(text)} is not at "
                                          f"answers.answer_start[{index}] = {start} (the context there reads "
                                          f"{_describe(found)}); {hint}")
    fields: dict[str, Any] = {"context": context, "question": question,
                              "answers": {"text": list(texts), "answer_start": list(starts)}}
    if "id" in obj:
        # Kept for reference (e.g. to match official SQuAD predictions); "id" itself is the content hash.
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            raise _Bad("wrong_type", f"id is {_describe(obj['id'])}; it must be a string or an integer")
        fields["orig_id"] = str(obj["id"])
    return fields


def _task_digest(task: str, fields: dict[str, Any]) -> bytes:
    content = {"task": task, **{key: value for key, value in fields.items() if key != "orig_id"}}
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def _read_conll(path: Path, max_chars: int) -> Iterator[tuple[TaskRecord | Reject | None, bytes]]:
    """CoNLL-style text: one `token ... tag` line per word (first column the token, last the tag, any
    whitespace between; the middle columns of CoNLL-2003's four are ignored), a blank line between
    sentences, -DOCSTART- lines skipped. One item per sentence, reported at the sentence's first line;
    (None, b"") per blank line."""
    name = str(path)
    tokens: list[str] = []
    tags: list[str] = []
    first = 0
    problem: tuple[str, str] | None = None  # first bad line of the current sentence: (reason, detail)

    def finish() -> tuple[TaskRecord | Reject, bytes]:
        if problem is not None:
            return Reject(name, first, *problem), b""
        try:
            fields = _token_fields(tokens, tags)
            chars = sum(len(token) for token in tokens)
            if chars > max_chars:
                raise _Bad("too_long", f"the sentence's tokens total {chars} characters, above ingest.max_chars = "
                                       f"{max_chars}; split the sentence or raise ingest.max_chars")
        except _Bad as bad:
            return Reject(name, first, bad.reason, f"sentence starting at line {first}: {bad.detail}"), b""
        digest = _task_digest(FORMAT_TASK["conll"], fields)
        return TaskRecord(FORMAT_TASK["conll"], fields, name, first, digest.hex()[:16]), digest

    for line_no, text, bad_byte in _decoded_lines(path):
        if text is None and problem is None:
            problem = ("invalid_utf8", f"line {line_no}: {bad_byte} is not valid UTF-8; re-save the file as UTF-8")
        if text is not None and not text.strip():
            if first:
                yield finish()
                tokens, tags, first, problem = [], [], 0, None
            yield None, b""
            continue
        if text is not None and text.split()[0] == "-DOCSTART-":
            continue
        if not first:
            first = line_no
        if text is None:
            continue
        columns = text.split()
        if len(columns) < 2:
            if problem is None:
                problem = ("wrong_format", f"line {line_no} has {len(columns)} column ({_describe(text)}); each "
                                           "line needs a token and its tag separated by whitespace, and "
                                           "sentences are separated by a blank line")
            continue
        tokens.append(columns[0])
        tags.append(columns[-1])
    if first:
        yield finish()
