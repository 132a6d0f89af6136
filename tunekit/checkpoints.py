"""A checkpoint's meta.json as one object (`CheckpointMeta`), and the helpers every training stage
shares: the content hash of a checkpoint and the key under which its resumable training checkpoints
are kept.

Stages read lineage here (`CheckpointMeta.of_tuned(dir)`: the parent, its hash, the task and the
method) instead of each reading meta.json its own way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.io import content_hash, read_meta

SFT = {"type": "sft"}  # meta.json of a generative checkpoint has no "task"; this is what that means


@dataclass(frozen=True)
class CheckpointMeta:
    """What meta.json says about a checkpoint: the stage that wrote it, its parent, the task and the method."""
    path: Path
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def read(cls, checkpoint_dir: Path) -> CheckpointMeta | None:
        raw = read_meta(checkpoint_dir)
        return None if raw is None else cls(Path(checkpoint_dir), raw)

    @classmethod
    def of_tuned(cls, checkpoint_dir: Path, stage: str = "finetune") -> CheckpointMeta:
        """The meta of a checkpoint that must name its parent (a fine-tune or DAPT output); the error says
        which stage to re-run."""
        meta = cls.read(checkpoint_dir)
        if meta is None or not meta.raw.get("parent"):
            raise SystemExit(f"{checkpoint_dir}/meta.json is missing or names no parent checkpoint; re-run the {stage} stage")
        return meta

    @property
    def stage(self) -> str | None:
        return self.raw.get("stage")

    @property
    def hash(self) -> str | None:
        return self.raw.get("hash")

    @property
    def parent(self) -> Path | None:
        parent = self.raw.get("parent") or {}
        return Path(parent["path"]) if parent.get("path") else None

    @property
    def parent_hash(self) -> str | None:
        return (self.raw.get("parent") or {}).get("hash")

    @property
    def task(self) -> dict[str, Any]:
        """meta.json "task": the task spec of a head checkpoint; SFT when absent."""
        task = self.raw.get("task") or SFT
        return {"type": task} if isinstance(task, str) else task

    @property
    def task_type(self) -> str:
        return self.task.get("type", "sft")

    @property
    def method(self) -> str | None:
        return self.raw.get("method")

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)


def checkpoint_hash(path: Path) -> str:
    """The hash meta.json records for a checkpoint, else the content hash of its files."""
    return (read_meta(path) or {}).get("hash") or content_hash(path)


def run_key(params: dict[str, Any], seed: int, base_hash: str, data: Any) -> str:
    """Resumable checkpoints are only resumed by a run with the same params, seed, base and data."""
    blob = json.dumps({"params": params, "seed": seed, "base": base_hash, "data": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
