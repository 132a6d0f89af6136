"""Multi-task (`task.type: multi_task`, `task.tasks`): one shared backbone with a head per task, a
composite of the single-head kinds (tunekit.tasks.heads): each task of `task.tasks` is ingested from its
own inputs in its own kind's formats, tokenised and aligned by its own kind's rules and settings
(`TaskParams.subtask`), trained on batches each drawn from one task with probability proportional to
its weight (`MultiTaskObjective`) and scored with its own kind's metrics.

`multitask_method` re-targets full / freeze / head / lora / dora / ia3 at the MultiTaskModel (the heads
in PEFT's modules_to_save) and refuses the rest; meta.json's "task" is `multitask_meta`;
`load_multitask_model(dir)` (or tunekit.tasks.load_task_model(dir)) reads a full or merged checkpoint
back and tunekit.modeling.one_task(model, name) is one task's model for `predict` / `score_task`.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunekit.constants import LABELS_FILE, SPLITS
from tunekit.ingest import IngestError, ingest_tasks
from tunekit.data import Rows, read_split, remove_work_dir, write_rows
from tunekit.io import atomic_dir, write_json, write_jsonl
from tunekit.modeling import MODEL_INPUTS, MultiTaskModel, TaskError, load_multitask_backbone, lora_targets, one_task
from tunekit.models import load_tokenizer
from tunekit.plots import write_csv
from tunekit.report import (collapse_banner, collapse_lines, flat_task_results, markdown_table, metrics_png, per_class_lines,
                            prediction_lines, table_rows)
from tunekit.tasks.base import CardFacts, MergeCheck, Task, Training, check_rows, learned_gate, not_collapsed_gate
from tunekit.tasks.heads import (FILE_LINE, TaskDataError, TaskObjective, TaskSpec, collate_task, head_kind,
                                 load_labels, load_multitask_model, loss_from_outputs, max_logit_difference, predict,
                                 predicted_classes, preview_html, score_task, select_test_rows, task_spec,
                                 tokenize_splits)
from tunekit.tasks.single import NO_GENERAL_TEXT, NO_GGUF, log_spec, score_models
from tunekit.tracking import data_tags

log = logging.getLogger("tunekit")


# ---------------------------------------------------------------- the objective


class MultiTaskObjective:
    """Rows carry "task" (their task's name); every micro-batch holds rows of one task. An epoch has as
    many batches as the tasks' rows fill (sum over tasks of ceil(rows / batch_size)); each batch's task is
    drawn with probability weight / sum(weights) (`task.tasks.<name>.weight`), and takes the next batch
    of that task's rows, reshuffled whenever they run out, so a task weighted 2 is trained on twice as
    often as a task weighted 1 whatever their sizes. Give it to TrainConfig.objective; tunekit.train's
    BatchPlan asks it for each epoch's batches (`epoch_batches`)."""

    def __init__(self, specs: dict[str, TaskSpec], weights: dict[str, float], row_tasks: Sequence[str]):
        unknown = sorted(set(row_tasks) - set(specs))
        if unknown:
            raise TaskError(f"rows of tasks {unknown} that task.tasks does not define ({sorted(specs)})")
        self.specs, self.weights, self.row_tasks = specs, weights, list(row_tasks)

    def collate(self, rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        """Rows of one task -> that task's batch (training batches always are: `epoch_batches`). Rows of
        several tasks (the validation loss takes rows in length order) -> {"parts": a batch per task},
        which `count` and `loss_sum` add up."""
        tasks = sorted({row["task"] for row in rows})
        if len(tasks) > 1:
            return {"parts": [self.collate([row for row in rows if row["task"] == task], pad_id) for task in tasks]}
        batch = collate_task(rows, pad_id, self.specs[tasks[0]].type)
        batch["task"] = tasks[0]
        return batch

    def count(self, batch: dict[str, Any]) -> int:
        if "parts" in batch:
            return sum(self.count(part) for part in batch["parts"])
        return TaskObjective(self.specs[batch["task"]]).count(batch)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        if "parts" in batch:
            losses = [self.loss_sum(model, part) for part in batch["parts"]]
            return sum(loss for loss, _ in losses), sum(n for _, n in losses)
        device = next(model.parameters()).device
        outputs = model(batch["task"], **{k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS})
        return loss_from_outputs(outputs, batch, self.specs[batch["task"]])

    def epoch_batches(self, lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        members = {t: [i for i, task in enumerate(self.row_tasks) if task == t] for t in self.specs}
        live = [t for t in self.specs if members[t]]
        queues: dict[str, list[list[int]]] = {t: [] for t in live}

        def refill(task: str) -> None:
            order = [members[task][j] for j in torch.randperm(len(members[task]), generator=gen).tolist()]
            queues[task] = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]

        n_batches = sum(-(-len(members[t]) // batch_size) for t in live)
        weights = torch.tensor([float(self.weights.get(t, 1.0)) for t in live])
        batches = []
        for _ in range(n_batches):
            task = live[int(torch.multinomial(weights, 1, generator=gen))]
            if not queues[task]:
                refill(task)
            batches.append(queues[task].pop(0))
        return batches


# ---------------------------------------------------------------- methods, meta.json and loading


# What a multi-task model can be trained with: full checkpoints (MultiTaskModel.save_pretrained) and
# PEFT adapters on the backbone with every head in modules_to_save (trained in full, saved with the adapter).
MULTITASK_METHODS = ("full", "freeze", "head", "lora", "dora", "ia3")


def multitask_meta(specs: dict[str, TaskSpec], weights: dict[str, float]) -> dict[str, Any]:
    """meta.json "task" of a multi-task checkpoint: every task's spec and its sampling weight."""
    return {"type": "multi_task", "tasks": {name: spec.to_meta() for name, spec in specs.items()},
            "weights": {name: float(weights[name]) for name in specs}}


def multitask_specs(meta: dict[str, Any]) -> dict[str, TaskSpec]:
    return {name: TaskSpec.from_meta(task) for name, task in meta["tasks"].items()}


def _multitask_peft(name: str):
    def prepare(model: torch.nn.Module, params) -> torch.nn.Module:
        from peft import IA3Config, LoraConfig, get_peft_model

        from tunekit.methods import MethodError

        keep = [f"heads.{task}" for task in model.specs]  # each head trains in full and is saved with the adapter
        if name == "ia3":
            config = IA3Config(target_modules=params.ia3.target_modules, feedforward_modules=params.ia3.feedforward_modules,
                               modules_to_save=keep)
        else:
            config = LoraConfig(r=params.lora.r, lora_alpha=params.lora.alpha, lora_dropout=params.lora.dropout,
                                target_modules=lora_targets(model, params.lora.target_modules), use_dora=name == "dora",
                                modules_to_save=keep)
        try:
            # No PEFT task type: the plain PeftModel passes the task name through to MultiTaskModel.forward.
            return get_peft_model(model, config)
        except ValueError as exc:
            raise MethodError(f"method {name} cannot be applied to the multi-task backbone: {exc}. Module names differ "
                              "between architectures (BERT: query, key, value, dense): set finetune.<method>.target_modules "
                              "for this model") from exc
    return prepare


def multitask_method(method, specs: dict[str, TaskSpec]):
    """The registry entry re-targeted at a MultiTaskModel: its base loader builds the shared backbone with
    a new head per task, full checkpoints load through `load_multitask_model`, and lora / dora / ia3 adapt
    the backbone with every head in modules_to_save. Other methods are refused, saying what to use."""
    from tunekit.methods import FULL_WEIGHTS, MethodError

    if method.name not in MULTITASK_METHODS:
        why = {"qlora": "the shared backbone is not loaded in 4-bit", "adapter": "bottleneck adapters are built for "
               "Llama-style decoder blocks and save no head"}.get(method.name, "virtual tokens or other PEFT types need "
                                                                              "a PEFT task model around the forward")
        raise MethodError(f"method {method.name} does not apply to multi-task training (task.type multi_task): {why}; "
                          f"use one of {', '.join(MULTITASK_METHODS)} (lora for an adapter, head for linear probing)")

    def load_base(path: Path, device: torch.device | str | None = None) -> torch.nn.Module:
        return load_multitask_backbone(path, specs, device=device)

    checkpoint = method.checkpoint
    if checkpoint is FULL_WEIGHTS:
        checkpoint = dataclasses.replace(checkpoint, load=lambda tuned_dir, base: load_multitask_model(tuned_dir))
        return dataclasses.replace(method, load_base=load_base, checkpoint=checkpoint)
    return dataclasses.replace(method, load_base=load_base, prepare=_multitask_peft(method.name))


def load_multitask_base(model_dir: Path, specs: dict[str, TaskSpec],
                        device: torch.device | str | None = None) -> MultiTaskModel:
    """The base checkpoint as the shared backbone with a new, untrained head per task (initialised from a
    fixed seed, so finetune, evaluate and merge build the same ones), on `device` (default: `compute_device()`)."""
    return load_multitask_backbone(model_dir, specs, device=device)


def retarget(method, task_meta: dict):
    return multitask_method(method, multitask_specs(task_meta))


# ---------------------------------------------------------------- ingest and template


def ingest(params, task_params, out: Path) -> dict:
    """Each task of `task.tasks` read from its own `inputs` in its own kind's formats (`ingest.inputs` is
    not read) into one set of split files, every row carrying its task's name."""
    if params.format != "auto":
        raise IngestError(f"ingest.format is {params.format!r} but task.type is multi_task, where each task's files "
                          "are read in its own type's formats: set ingest.format: auto (CoNLL files of a "
                          "token_classification task: .conll, or a single .txt file)")
    return ingest_tasks({name: (sub.type, sub.inputs) for name, sub in task_params.tasks.items()}, out,
                        max_chars=params.max_chars, max_reject_rate=params.max_reject_rate,
                        validation=params.validation, test=params.test)


def ingest_tags(params, task_params) -> dict[str, str]:
    return {"task.type": task_params.type, **{f"data.inputs_path.{name}": sub.inputs for name, sub in task_params.tasks.items()},
            **data_tags(**{f"inputs.{name}": Path(sub.inputs) for name, sub in task_params.tasks.items()})}


def tokenize_tasks(task_params: Any, max_length: int, tokenizer: Any, data_dir: Path, out_dir: Path,
                   preview_dir: Path, preview_examples: int = 8, processes: int = 0) -> dict:
    """Multi-task (`task.type: multi_task`): the rows of each task of `task_params.tasks` (ingested with
    `"task": <name>`) tokenised and aligned by that task's own rules and settings (`task_params.subtask`),
    each output row keeping its `"task"`; one set of split files, labels.json with every task's label set
    under "tasks" ({"task": "multi_task", "tasks": {name: {"task": type, "labels", ...}}}) and one preview
    page per task (mask_preview_<name>.html, linked from mask_preview.html). Metrics per task under
    "tasks", totals at the top."""
    from tunekit.io import write_json

    names = list(task_params.tasks)
    data = {split: read_split(data_dir, split) for split in SPLITS}
    tasks_of = {split: data[split].column("task") if "task" in data[split].columns else [None] * len(data[split])
                for split in SPLITS}
    for split in SPLITS:
        for line, found in enumerate(tasks_of[split], start=1):
            if found not in task_params.tasks:
                raise TaskDataError(
                    f"{Path(data_dir) / split} row {line}: the row belongs to task {found or 'sft'!r}, "
                    f"which is not one of task.tasks {names}; the ingested data is stale or from other inputs: run "
                    "the ingest stage again (dvc repro ingest)")
    work = Path(out_dir) / ".work"
    outputs: dict[str, dict[str, Rows]] = {}
    labels: dict[str, Any] = {}
    metrics: dict[str, Any] = {"task": "multi_task", "tasks": {}}
    links = []
    for name in names:
        sub = task_params.subtask(name)
        mine = {split: _task_rows(data[split], tasks_of[split], name) for split in SPLITS}
        try:
            rows, info, task_metrics = tokenize_splits(sub.type, sub, max_length, tokenizer, mine, Path(data_dir),
                                                       work / name, processes)
        except TaskDataError as exc:
            raise TaskDataError(f"task.tasks.{name} ({sub.type}): {exc}".replace("task.labels", f"task.tasks.{name}.labels")
                                .replace("task.label_all_subwords", f"task.tasks.{name}.label_all_subwords")) from None
        outputs[name] = rows
        labels[name] = info
        metrics["tasks"][name] = task_metrics
        page = f"mask_preview_{name}.html"
        (Path(preview_dir) / page).write_text(
            preview_html(sub.type, rows["train"][:preview_examples], tokenizer, info["labels"], preview_examples),
            encoding="utf-8")
        links.append(f'<li><a href="{html.escape(page)}">{html.escape(name)}</a> ({html.escape(sub.type)})</li>')
    for split in SPLITS:
        write_rows(Path(out_dir) / split, ({**row, "task": name} for name in names for row in outputs[name][split]),
                   work)
        metrics[split] = {key: sum(metrics["tasks"][name][split][key] for name in names)
                          for key in ("examples", "tokens", "truncated")}
    write_json(Path(out_dir) / LABELS_FILE, {"task": "multi_task", "tasks": labels})
    (Path(preview_dir) / "mask_preview.html").write_text(
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Task data preview</title></head><body>'
        f"<h1>multi-task preview</h1><ul>{''.join(links)}</ul></body></html>\n", encoding="utf-8")
    for key in ("labels", "truncated", "examples"):
        metrics[key] = sum(metrics["tasks"][name][key] for name in names)
    remove_work_dir(work)
    return metrics


def _task_rows(rows: Rows, tasks: list[str | None], name: str, numbered: bool = True) -> Rows:
    """The rows of task `name` (a memory-mapped selection), each with its row number in the split as
    FILE_LINE when `numbered`."""
    indices = [i for i, found in enumerate(tasks) if found == name]
    dataset = rows.dataset
    if len(dataset) and numbered:
        dataset = dataset.add_column(FILE_LINE, list(range(1, len(dataset) + 1)))
    return Rows(dataset.select(indices))


def tokenize(template, task_params, tokenizer, data_dir: Path, out: Path, preview: Path) -> dict:
    return tokenize_tasks(task_params, template.max_length, tokenizer, data_dir, out, preview, template.preview_examples,
                          template.num_proc)


def template_summary(metrics: dict) -> str:
    return (f"template (multi_task): {metrics['examples']} examples, {metrics['labels']} labels, "
            f"{metrics['truncated']} truncated")


# ---------------------------------------------------------------- finetune, merge, evaluate


def training(task, params, method, model_dir: Path, data_dir: Path, train_rows: list[dict]) -> Training:
    """The spec per task, the MultiTaskObjective mixing them by task.tasks.<name>.weight and the method
    re-targeted at the shared-backbone model, from labels.json."""
    info = load_labels(data_dir)
    if info.get("task") != "multi_task" or sorted(info.get("tasks", {})) != sorted(task.tasks):
        raise TaskError(f"{data_dir}/labels.json holds task {info.get('task')!r} {sorted(info.get('tasks', {}))} but "
                        f"params.yaml task.tasks names {sorted(task.tasks)}: re-run ingest and template "
                        "(dvc repro -f ingest template)")
    specs = {}
    for name in task.tasks:
        try:
            specs[name] = task_spec(task.subtask(name), info["tasks"][name], model_dir,
                                    [row for row in train_rows if row["task"] == name])
        except TaskError as exc:
            raise TaskError(f"task.tasks.{name}: {exc}") from None
        log_spec(specs[name], name, task.tasks[name].weight)
    weights = {name: sub.weight for name, sub in task.tasks.items()}
    objective = MultiTaskObjective(specs, weights, [row["task"] for row in train_rows])
    return Training(objective, multitask_method(method, specs), multitask_meta(specs, objective.weights), "loss_units")


def merge_check(params, data_dir: Path, tokenizer, task_meta: dict) -> MergeCheck:
    """Accepted only when the merged checkpoint, reloaded with load_multitask_model, predicts for every
    task exactly what the adapter model predicts on that task's held-out rows (merge.check_examples per
    task), with logits within merge.atol."""
    specs = multitask_specs(task_meta)
    rows = {name: check_rows(params, data_dir, name) for name in specs}

    def outputs(model, label: str) -> dict[str, list]:
        return {name: predict(one_task(model, name), rows[name], spec, tokenizer.pad_token_id, params.check_examples,
                              desc=f"predict ({label}, {name})")[0] for name, spec in specs.items()}

    def compare(before, after, atol: float) -> tuple[dict, str | None]:
        checks = {name: {"max_logit_difference": max_logit_difference(before[name], after[name]),
                         "predictions_identical": int(spec.kind.agree(predicted_classes(before[name], spec),
                                                                      predicted_classes(after[name], spec))),
                         "checked_examples": len(rows[name])} for name, spec in specs.items()}
        difference = max(check["max_logit_difference"] for check in checks.values())
        same = all(check["predictions_identical"] for check in checks.values())
        log.info("multi-task heads: per task, largest |logit| difference adapter vs merged checkpoint and identical "
                 "predictions: %s (tolerance %.3g)", checks, atol)
        metrics = {"task_head": 1, "max_logit_difference": difference, "predictions_identical": int(same),
                   "checked_examples": sum(check["checked_examples"] for check in checks.values()), "tasks": checks}
        if difference <= atol and same:
            return metrics, None
        bad = sorted(name for name, check in checks.items()
                     if not (check["max_logit_difference"] <= atol and check["predictions_identical"]))
        return metrics, (f"merged multi-task model differs from the adapter model on task(s) {bad} "
                         f"({ {n: checks[n] for n in bad} }, merge.atol={atol}): the merged checkpoint was not written. "
                         "Check that the adapter and base match (meta.json lineage).")

    return MergeCheck(lambda base_dir: load_multitask_base(base_dir, specs), outputs, load_multitask_model, compare)


def evaluate(params, template, task_params, model_dir: Path, data_dir: Path, tokenized_dir: Path, out: Path,
             merged_dir: Path | None, seed: int, task_meta: dict) -> dict:
    """Base (the shared backbone with untrained heads), tuned and merged scored on each task's test rows
    with that task's metrics, through a single-task view of the model (one_task). Results per model and
    task (results["tuned"]["<task>"]["accuracy"]), deltas per task, predictions per model with each row's
    task, and a table per task in report.md / one report.csv with a task column."""
    from tunekit.metrics import confusion_matrix_png

    meta = task_meta
    specs = multitask_specs(meta)
    tokenizer = load_tokenizer(model_dir)
    all_rows, all_records = read_split(tokenized_dir, "test"), read_split(data_dir, "test")
    train_records = read_split(data_dir, "train")
    data, allow_null = {}, {}
    for name in specs:
        data[name] = select_test_rows(params.max_examples, _task_rows(all_rows, all_rows.column("task"), name, False),
                                      _task_rows(all_records, all_records.column("task"), name, False))
        if not data[name][0]:
            raise SystemExit(f"{tokenized_dir / 'test'} holds no rows of task {name}: raise ingest.test or add data")
    # n_best / max_answer_length from params.yaml; a task no longer listed there scores with the defaults
    settings = {name: task_params.subtask(name) if task_params is not None and name in task_params.tasks else None
                for name in specs}
    for name, spec in specs.items():
        records = (r for r in itertools.chain(train_records, data[name][1]) if r.get("task") == name)
        allow_null[name] = spec.kind.score_settings(settings[name], records).get("allow_null")
    log.info("multi-task %s: scoring each task's predictions on its test rows (%s)", ", ".join(specs),
             ", ".join(f"{name}: {len(rows)}" for name, (rows, _) in data.items()))
    results: dict[str, dict] = {}
    predictions: dict[str, list[dict]] = {}
    matrices: dict[str, dict] = {}
    with atomic_dir(out) as tmp:
        def harness(label: str, model) -> None:
            results[label], predictions[label] = {}, []
            for name, spec in specs.items():
                rows, records = data[name]
                metrics, examples, extra = score_task(one_task(model, name), spec, rows, records, tokenizer.pad_token_id,
                                                      params.batch_size, label, settings[name], None, allow_null[name])
                results[label][name] = metrics
                predictions[label] += [{**example, "task": name} for example in examples]
                if extra.get("confusion_matrix"):
                    matrices.setdefault(name, {"labels": list(spec.labels)})[label] = extra["confusion_matrix"]
                    confusion_matrix_png(tmp / f"confusion_{name}_{label}.png", extra["confusion_matrix"], spec.labels,
                                         f"confusion matrix ({name}, {label})")

        checkpoints = score_models(harness, model_dir, merged_dir, retarget, load_multitask_model)
        for label, examples in predictions.items():
            write_jsonl(tmp / f"predictions_{label}.jsonl", examples)
        write_json(tmp / "confusion_matrices.json", matrices)
        csv_rows, csv_columns = [], ["task"]
        report = [f"# Evaluation on the test split: multi-task ({', '.join(f'{n} {s.type}' for n, s in specs.items())})", "",
                  "base = the shared backbone with untrained heads. loss is per example (qa: per window; "
                  "token_classification: per labelled token).", "",
                  "checkpoints: " + ", ".join(f"{label} = `{path}`" for label, path in checkpoints.items()), "",
                  "![main metrics per model and task](metrics.png)", ""]
        for name, spec in specs.items():
            per_model = {label: results[label][name] for label in results}
            columns, table = table_rows(per_model)
            csv_rows += [{"task": name, **row} for row in table]
            csv_columns += [c for c in columns if c not in csv_columns]
            banner = collapse_banner(per_model, about=f" ({name})")
            report += [f"## {name} ({spec.type}, weight {meta['weights'].get(name, 1.0):g})", "",
                       *([*banner, ""] if banner else []), *markdown_table(per_model), ""]
            report += collapse_lines(per_model, heading="###", about=f" ({name})")
            report += per_class_lines(per_model, heading="###", about=f" ({name})")
            report += [f"![confusion matrix ({name}, {label})](confusion_{name}_{label}.png)\n"
                       for label in matrices.get(name, {}) if label != "labels"]
            report += prediction_lines({label: [p for p in examples if p["task"] == name]
                                        for label, examples in predictions.items()}, heading="###", about=f" ({name})")
        write_csv(tmp / "report.csv", csv_rows, csv_columns)
        metrics_png(tmp / "metrics.png", flat_task_results(results))
        (tmp / "report.md").write_text("\n".join(report), encoding="utf-8")
    delta = {name: {k: v - results["base"][name][k] for k, v in results["tuned"][name].items()
                    if isinstance(v, float) and isinstance(results["base"][name].get(k), float)} for name in specs}
    log.info("scored %s on tasks %s (base = untrained heads)", ", ".join(results), ", ".join(specs))
    return {**results, "delta": delta, "task": "multi_task", "tasks": {name: spec.type for name, spec in specs.items()},
            "checkpoints": checkpoints}


# ---------------------------------------------------------------- model card


def gates(task_meta: dict) -> dict[str, str]:
    """Every task's head must have learned (its kind's main metric beats the untrained head's) and, where its kind
    checks for it, not collapsed onto one label."""
    gates = {}
    for name, spec in sorted((task_meta.get("tasks") or {}).items()):
        kind = head_kind(spec["type"])
        gates[f"learned_{name}"] = learned_gate(kind.main_metric, prefix=f"{name}.")
        if kind.collapse is not None:
            gates[f"not_collapsed_{name}"] = not_collapsed_gate(prefix=f"{name}.")
    return gates


def card(task_meta: dict) -> CardFacts:
    names = list((task_meta or {}).get("tasks") or {})
    # a head per task: the hub's pipeline tag of the first task by name (meta.json keeps them sorted)
    types = [spec["type"] for _, spec in sorted((task_meta.get("tasks") or {}).items())]
    tag = head_kind(types[0]).pipeline_tag if types else "feature-extraction"

    def how_to_load(chain: list[dict], meta: dict[str, Any], merged: bool) -> str:
        first = names[0] if names else "<task>"
        if merged or not meta.get("saves_adapter"):
            how, code = ("Standalone weights: a shared backbone with a head per task",
                         "from tunekit.modeling import one_task\nfrom tunekit.tasks.multi_task import load_multitask_model\n\n"
                         "model = load_multitask_model(Path(\"<this directory>\"))")
        else:
            how, code = ("An adapter on the shared backbone and the trained heads, on the base named in `meta.json`",
                         "from tunekit.modeling import one_task\nfrom tunekit.tasks import load_tuned\n\n"
                         "model = load_tuned(Path(\"<this directory>\")).model")
        return (f"{how} (multi-task: {', '.join(names)}). tunekit loads it, heads and labels included; "
                "`one_task(model, name)` is the model of one task, and `model(name, **inputs)` runs its head:"
                f"\n\n```python\nfrom pathlib import Path\n\n{code}\n{first} = one_task(model, \"{first}\")\n```\n")

    return CardFacts(tag, ("multi-task",), "loss_units", how_to_load)


TASK = Task(name="multi_task", ingest=ingest, ingest_tags=ingest_tags, tokenize=tokenize, template_summary=template_summary,
            training=training, retarget=retarget, merge_check=merge_check, evaluate=evaluate,
            flat_results=flat_task_results, card=card, gates=gates, no_general_text=NO_GENERAL_TEXT, no_gguf=NO_GGUF)
