"""Task kinds: one registry entry each, selected by `task.type` (tunekit.tasks.base.Task).

    sft                   chat conversations, the loss on the assistant turns (tasks/sft.py)
    classification        text or text pair -> one class or a set of classes (tasks/classification.py)
    token_classification  one BIO tag per word: NER (tasks/token_classification.py)
    qa                    extractive QA: a span of the context, or no answer (tasks/qa.py)
    regression            text or text pair -> one or more numbers (tasks/regression.py)
    multi_task            several heads on one shared backbone, a composite of the above (tasks/multi_task.py)

Two ways in, and only these: `task_for(params)` (the stages that read params.yaml: ingest, template,
finetune) and `task_of(meta)` (the stages and loaders that read a checkpoint's meta.json: merge,
evaluate, forgetting, `load_tuned`, model cards). Stages ask the entry; they never compare a kind's name.
A single-head kind is a `HeadKind` (tasks/heads.py) made into an entry by `head_task` (tasks/single.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunekit.checkpoints import CheckpointMeta
from tunekit.methods import Tuned
from tunekit.methods import load_tuned as load_tuned_with
from tunekit.tasks import classification, multi_task, qa, regression, sft, token_classification
from tunekit.tasks.base import Task
from tunekit.tasks.heads import TaskDataError, TaskError, TaskSpec, load_task_model
from tunekit.tasks.single import head_task

TASKS: dict[str, Task] = {task.name: task for task in [
    sft.TASK,
    head_task(classification.KIND),
    head_task(token_classification.KIND),
    head_task(qa.KIND),
    head_task(regression.KIND),
    multi_task.TASK,
]}


def task_for(params: Any) -> Task:
    """The entry of `task.type` (TaskParams; None: the default, sft)."""
    name = "sft" if params is None else params.type
    if name not in TASKS:
        raise TaskError(f"task.type {name!r} is not known; valid: {', '.join(TASKS)}")
    return TASKS[name]


def task_of(meta: CheckpointMeta | dict[str, Any] | None) -> Task:
    """The entry of the task a checkpoint was trained for (its meta.json "task"; none: sft)."""
    if not isinstance(meta, CheckpointMeta):
        meta = CheckpointMeta(Path(""), meta or {})
    if meta.task_type not in TASKS:
        raise TaskError(f"{meta.path}/meta.json names task {meta.task_type!r}, which this tunekit does not know; valid: "
                        f"{', '.join(TASKS)}")
    return TASKS[meta.task_type]


def load_tuned(model_dir: Path) -> Tuned:
    """The fine-tuned model as its method saved it, re-targeted at its task kind's models (a head, several,
    or the causal LM), with the base from meta.json lineage: tuned.model, tuned.base_dir, tuned.method."""
    return load_tuned_with(model_dir, task_of(CheckpointMeta.of_tuned(model_dir)).retarget)


__all__ = ["TASKS", "Task", "TaskDataError", "TaskError", "TaskSpec", "load_task_model", "load_tuned", "task_for", "task_of"]
