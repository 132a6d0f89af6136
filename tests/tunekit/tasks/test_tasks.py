"""The task registry (tunekit/tasks) and the layering it rests on: the leaf names agree with the
registries, params validation imports no torch, the library has no import cycles, and stages ask the
registry instead of comparing task kinds."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tunekit.checkpoints import CheckpointMeta
from tunekit.constants import METHOD_NAMES, MULTI_TASK_KINDS, TASK_KINDS
from tunekit.methods import METHODS
from tunekit.params import TaskParams
from tunekit.tasks import TASKS, TaskError, task_for, task_of
from tunekit.tasks.heads import head_kind

from tests.conftest import REPO


def test_leaf_names_are_the_registries_names():
    assert tuple(TASKS) == TASK_KINDS
    assert tuple(METHODS) == METHOD_NAMES
    assert all(head_kind(name).name == name for name in MULTI_TASK_KINDS)


def test_the_two_ways_in():
    assert task_for(None).name == "sft" and task_for(TaskParams(type="qa")).name == "qa"
    assert task_of({}).name == "sft" and task_of(None).name == "sft"  # meta.json without "task": a causal LM
    assert task_of({"task": {"type": "token_classification", "labels": ["O"]}}).name == "token_classification"
    assert task_of(CheckpointMeta(Path("m"), {"task": {"type": "multi_task", "tasks": {}}})).name == "multi_task"
    with pytest.raises(TaskError, match=r"m/meta.json names task 'ranking', which this tunekit does not know"):
        task_of(CheckpointMeta(Path("m"), {"task": {"type": "ranking"}}))
    # only the kinds with a language-model output take general text (replay, forgetting)
    assert [name for name, task in TASKS.items() if not task.no_general_text] == ["sft"]
    assert [name for name, task in TASKS.items() if task.registrable] == ["sft"]


def test_checkpoint_meta_reads_lineage(tmp_path):
    (tmp_path / "meta.json").write_text('{"stage": "finetune", "parent": {"path": "models/base", "hash": "abc"}, '
                                        '"method": "lora", "hash": "def"}', encoding="utf-8")
    meta = CheckpointMeta.of_tuned(tmp_path)
    assert (meta.stage, meta.parent, meta.parent_hash, meta.method, meta.hash) == ("finetune", Path("models/base"), "abc",
                                                                                   "lora", "def")
    assert meta.task == {"type": "sft"} and meta.task_type == "sft"
    with pytest.raises(SystemExit, match="names no parent checkpoint; re-run the finetune stage"):
        CheckpointMeta.of_tuned(tmp_path / "missing")


def test_params_validation_imports_no_torch():
    code = ("import sys; from tunekit.params import load_all; load_all(); "
            "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def _library_imports() -> dict[str, set[str]]:
    """Every tunekit module and the tunekit modules it imports anywhere in it (function-level imports too)."""
    root = REPO / "tunekit"
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_cycles_in_the_library():
    graph = _library_imports()
    assert {"tunekit.params", "tunekit.tasks", "tunekit.train.loop"} <= set(graph)
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], cycles


def test_stages_never_compare_a_task_kind():
    kinds = "|".join(TASK_KINDS)
    pattern = re.compile(rf"task.*==|in \(.*classification|qa\"|[\"']({kinds})[\"']")
    for path in sorted((REPO / "stages").glob("*.py")):
        hits = [f"{path.name}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                if pattern.search(line)]
        assert not hits, hits
