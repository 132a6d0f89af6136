"""The entry of one task kind in the registry (`Task`): what the stages ask of a kind, and nothing more.

Every stage has one code path: it gets the entry from `tunekit.tasks.task_for(params)` (ingest,
template, finetune) or `tunekit.tasks.task_of(meta)` (merge, evaluate, forgetting, load_tuned, cards)
and calls its functions; no stage compares a task kind's name.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunekit.ingest import ingest
from tunekit.data import read_split
from tunekit.tracking import data_tags

Model = Any  # torch.nn.Module; this module stays free of torch


@dataclass(frozen=True)
class Training:
    """What the finetune stage trains for a kind: the objective handed to tunekit.train (SFT: its causal-LM loss
    over trained tokens, tunekit.train.loss.LanguageModeling), the method re-targeted at the kind's model, the meta.json
    "task" of the checkpoint (None for SFT) and what the loss is averaged over."""
    objective: Any
    method: Any
    meta: dict[str, Any] | None
    loss_unit: str  # "tokens" (SFT) or "loss_units" (examples, windows or labelled tokens)
    # the loss of always predicting the train split's label frequencies, in the objective's units (None: no check)
    prior_loss: float | None = None


@dataclass(frozen=True)
class MergeCheck:
    """How the merge stage checks a merged checkpoint of this kind: the full-precision base the adapter
    is merged into, the outputs compared before and after, and the verdict."""
    full_precision_base: Callable[[Path], Model]
    outputs: Callable[[Model, str], Any]  # (model, label) -> what is compared
    load_merged: Callable[[Path], Model]
    # (before, after, atol) -> (metrics, what differs or None when accepted)
    compare: Callable[[Any, Any, float], tuple[dict[str, Any], str | None]]
    # (method, tuned dir, base dir, outputs of the merged checkpoint) -> more metrics (qlora drift)
    extras: Callable[[Any, Path, Path, Any], dict[str, Any]] = lambda method, model_dir, base_dir, after: {}


@dataclass(frozen=True)
class CardFacts:
    """What a model card says that depends on the kind."""
    pipeline_tag: str
    tags: tuple[str, ...]
    unit: str  # what history.json's "tokens" counts
    how_to_load: Callable[[list[dict[str, Any]], dict[str, Any], bool], str]  # (lineage, meta, merged) -> Markdown


@dataclass(frozen=True)
class Task:
    name: str
    # ingest: (ingest params, task params, out dir) -> metrics; the MLflow tags of its inputs
    ingest: Callable[[Any, Any, Path], dict[str, Any]]
    ingest_tags: Callable[[Any, Any], dict[str, str]]
    # template: (template params, task params, tokenizer, ingested dir, out tmp dir, preview tmp dir) -> metrics
    tokenize: Callable[[Any, Any, Any, Path, Path, Path], dict[str, Any]]
    template_summary: Callable[[dict[str, Any]], str]
    # finetune: (task params, finetune params, method, base dir, tokenised dir, train rows) -> Training
    training: Callable[[Any, Any, Any, Path, Path, list[dict]], Training]
    # a tuned checkpoint's method entry re-targeted at this kind's models: (method, meta.json "task") -> method
    retarget: Callable[[Any, dict[str, Any]], Any]
    # merge: (merge params, tokenised dir, tokenizer, meta.json "task") -> MergeCheck
    merge_check: Callable[[Any, Path, Any, dict[str, Any]], MergeCheck]
    # evaluate: (evaluate params, template params, task params | None, tuned dir, ingested dir, tokenised dir, out,
    # merged dir | None, seed) -> results
    evaluate: Callable[..., dict[str, Any]]
    # {model: metrics} as one flat row per model (the MLflow table, the log)
    flat_results: Callable[[dict[str, dict]], dict[str, dict]]
    card: Callable[[dict[str, Any]], CardFacts]  # meta.json "task" -> facts
    # export: the quality gates used when `export.gates` is null (tunekit/gates.py syntax): meta.json "task" ->
    # {name: expression}. Each passes on the kind's demo data and fails a model that learned nothing.
    gates: Callable[[dict[str, Any]], dict[str, str]]
    # Whether general text (replay, the forgetting curve, the forgetting stage) means anything for this
    # kind: None when it does, else why not.
    no_general_text: str | None = None
    # Whether the export stage writes GGUF files for this kind's merged model: None when it does, else why not.
    no_gguf: str | None = None
    # The merged checkpoint is a text-generation pipeline MLflow can log and register.
    registrable: bool = False


# A head counts as learned when its main metric beats the untrained head's by this much (an absolute margin on
# metrics in [0, 1]: accuracy, entity F1, SQuAD F1, Pearson).
HEAD_LEARNED_MARGIN = 0.1


def learned_gate(metric: str, prefix: str = "") -> str:
    """The gate expression "the shipped model's `metric` beats the untrained head's by HEAD_LEARNED_MARGIN"."""
    return (f"evaluate.shipped.{prefix}{metric} >= evaluate.base.{prefix}{metric} + {HEAD_LEARNED_MARGIN}")


def not_collapsed_gate(prefix: str = "") -> str:
    """The gate expression "the shipped model did not collapse onto one label" (its kind's collapse check, evaluate's
    `collapsed` flag): a model that scores like a constant does not ship even where its main metric looks fine."""
    return f"evaluate.shipped.{prefix}collapsed <= 0"


def identity(results: dict[str, dict]) -> dict[str, dict]:
    return results


def ingest_inputs(params, task_params, out: Path) -> dict:
    """`ingest.inputs` read in the formats of `task.type` (a kind reads only its own formats)."""
    return ingest(params.inputs, out, fmt=params.format, max_chars=params.max_chars,
                  max_reject_rate=params.max_reject_rate, validation=params.validation, test=params.test,
                  task=task_params.type)


def ingest_tags(params, task_params) -> dict[str, str]:
    return {"data.inputs_path": params.inputs, "task.type": task_params.type, **data_tags(inputs=Path(params.inputs))}


def check_rows(params, data_dir: Path, task: str | None = None) -> list[dict]:
    """The held-out rows a merged checkpoint is checked on: test, else validation (multi-task: those of
    the task named `task`), at most merge.check_examples."""
    def held_out(split: str) -> list[dict]:
        return list(itertools.islice((row for row in read_split(data_dir, split)
                                      if task is None or row.get("task") == task), params.check_examples))

    rows = held_out("test") or held_out("validation")
    if not rows:
        raise SystemExit(f"{data_dir}: no test or validation examples{f' of task {task}' if task else ''} to check the merge on")
    return rows
