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

from tunekit.process import check_owner, process_alive

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
    remove_stale_temps(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_owner(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(tmp, target)


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temporary siblings (`.<name>.tmp-<pid>`) of `target` that killed processes left behind
    (a killed merge leaves a whole checkpoint there); those of live processes are theirs."""
    removed = []
    for tmp in Path(target).parent.glob(f".{Path(target).name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename) so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        check_owner(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` without its wall-clock figures (`seconds`, `*_seconds`, `*_per_second`, nested too): what a
    stage writes to its DVC metrics file, which dvc.lock hashes, so the same inputs give the same file. The
    timings go to the stage's MLflow run."""
    return {key: without_timings(value) if isinstance(value, dict) else value for key, value in metrics.items()
            if not (key == "seconds" or key.endswith(("_seconds", "_per_second")))}


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

    Later stages read lineage from here instead of re-declaring it ("None = inherit"). Only what the inputs
    determine goes in (no commit, time or absolute path: those are MLflow tags), so that the same inputs
    give the same bytes and DVC hash on any clone.
    """
    canonicalise_adapter_configs(checkpoint_dir)
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
        "versions": library_versions(),
        "hash": content_hash(checkpoint_dir),
        **(extra or {}),
    }
    write_json(Path(checkpoint_dir) / META_FILE, meta)
    return meta


ADAPTER_CONFIG = "adapter_config.json"


def canonicalise_adapter_configs(checkpoint_dir: Path) -> list[Path]:
    """Rewrite every PEFT `adapter_config.json` under `checkpoint_dir` with its list values sorted where
    order carries no meaning and its keys sorted. PEFT keeps `target_modules` and friends as sets and
    writes them in hash order, which differs from process to process: the same adapter would get a
    different file, directory hash and DVC key on each run."""
    rewritten = []
    for path in sorted(Path(checkpoint_dir).rglob(ADAPTER_CONFIG)):
        config = json.loads(path.read_text(encoding="utf-8"))
        for key, value in config.items():
            if key in SET_VALUED_ADAPTER_KEYS and isinstance(value, list) and all(isinstance(v, str) for v in value):
                config[key] = sorted(value)
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        if text != path.read_text(encoding="utf-8"):
            path.write_text(text, encoding="utf-8")
            rewritten.append(path)
    return rewritten


# The PEFT config fields that its configs' __post_init__ turn into sets: their order in the file is the set's
# iteration order, which string hashing randomises per process.
SET_VALUED_ADAPTER_KEYS = frozenset({"target_modules", "exclude_modules", "feedforward_modules"})


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
