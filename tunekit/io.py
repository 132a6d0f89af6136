"""Files the stages write: atomic outputs, JSON/JSONL, content hashes and checkpoint lineage (meta.json)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

META_FILE = "meta.json"
TRACKED_LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "accelerate", "mlflow", "dvc", "prefect")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `target` only when the block succeeds.

    An interrupted or failing stage therefore never leaves a half-written output where DVC or a
    later stage would take it for a finished one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(tmp, target)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename) so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def content_hash(path: Path) -> str:
    """sha256 over a file, or over a directory's relative paths and file contents (sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file.name == META_FILE and file.parent == path:
            continue  # meta.json records the hash; it cannot be part of it
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def git_commit() -> str:
    """HEAD's commit, with "-dirty" when tracked files differ from it. dvc.lock does not count: DVC itself
    rewrites it while `dvc repro` runs, so every stage after the first would otherwise be "dirty"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock"],
                               capture_output=True, text=True, check=False, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_meta(checkpoint_dir: Path, stage: str, params: dict[str, Any], parent: Path | None = None,
               data: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `meta.json` into a finished checkpoint: what made it, from what, with what.

    Later stages read lineage from here instead of re-declaring it ("None = inherit").
    """
    parent_meta = read_meta(parent) if parent is not None else None
    meta = {
        "stage": stage,
        "params": params,
        "parent": None if parent is None else {
            "path": str(parent),
            "hash": parent_meta["hash"] if parent_meta else content_hash(parent),
            "stage": parent_meta["stage"] if parent_meta else None,
        },
        "data": data or {},
        "git_commit": git_commit(),
        "versions": library_versions(),
        "hash": content_hash(checkpoint_dir),
        **(extra or {}),
    }
    write_json(Path(checkpoint_dir) / META_FILE, meta)
    return meta


def read_meta(checkpoint_dir: Path) -> dict[str, Any] | None:
    path = Path(checkpoint_dir) / META_FILE
    return read_json(path) if path.exists() else None


NOT_MERGED = "NOT_MERGED.md"  # what the merge stage writes, with meta `merged: false`, for a method that cannot merge


def is_merged(merged_dir: Path | None) -> bool:
    """Whether `merged_dir` holds a merged checkpoint: not missing, not the merge stage's refusal."""
    if merged_dir is None or not Path(merged_dir).is_dir():
        return False
    return (read_meta(merged_dir) or {}).get("merged", True) is not False


def not_merged_reason(merged_dir: Path | None) -> str:
    """Why `merged_dir` holds no merged checkpoint, for a log line."""
    if merged_dir is None or not Path(merged_dir).is_dir():
        return "missing"
    return (read_meta(merged_dir) or {}).get("reason") or "no merged weights"
