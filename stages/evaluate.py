"""Stage `evaluate`: score every checkpoint of the lineage with one harness on the test split.

    python -m stages.evaluate --model models/finetune --merged models/merged --data data/ingested \
        --tokenized data/tokenized --out reports/evaluate --metrics metrics/evaluate.json

Models, side by side: `base`; `dapt` when the fine-tune's parent is a real DAPT checkpoint; `few_shot`
(the base prompted with `evaluate.few_shot.k` train demonstrations); `tuned`; `merged` when --merged
exists. Each gets loss and perplexity over trained tokens and the generation metrics named in
`evaluate.metrics` (built-in `evaluate` modules of tunekit/metric_modules, a user's module file, hub:<name>); with `evaluate.code.enabled`, pass@k on HumanEval, its completions run only in
tunekit.sandbox. The base is read from the fine-tuned checkpoint's meta.json (its lineage).

Which models are scored and how is the checkpoint's task kind's (tunekit.tasks, meta.json "task"): the
above for sft (tasks/sft.py); a head kind scores base (the untrained head), tuned and merged with its
task's metrics; a multi-task checkpoint per task, with results["<model>"]["<task>"], deltas per task
and a table per task in the report. Head kinds also check each model for collapse onto one label
(task.collapse; a warning in the log, a report section, results["<model>"]["collapsed"] and the
predicted-label shares, the MLflow tag `collapsed` naming the trained models that did) and report
per-class scores (docs/tasks.md, "Collapse, class weights and per-class scores").
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tunekit.checkpoints import CheckpointMeta
from tunekit.constants import MODEL_ORDER
from tunekit.io import write_json
from tunekit.models import set_threads
from tunekit.params import EvaluateParams, ProjectParams, TaskParams, TemplateParams, flatten, load_section
from tunekit.report import table_rows
from tunekit.tasks import task_of
from tunekit.tracking import configure_logging, data_tags, log_datasets, log_metrics, stage_run

log = logging.getLogger("tunekit")


def run(params: EvaluateParams, template: TemplateParams, model_dir: Path, data_dir: Path, tokenized_dir: Path,
        out: Path, merged_dir: Path | None = None, seed: int = 0, task: TaskParams | None = None) -> dict:
    """Every model the checkpoint's task kind scores, side by side, into `out` (predictions, report.md,
    report.csv, metrics.png); the results by model, the deltas and the checkpoints scored. `task`: the
    task.* settings used in scoring (QA's n_best, ...); read from params.yaml for a head kind when None."""
    set_threads(0)
    meta = CheckpointMeta.of_tuned(model_dir)
    kind = task_of(meta)
    if task is None and "task" in meta.raw:
        task = load_section("task")
    return kind.evaluate(params, template, task, model_dir, data_dir, tokenized_dir, out, merged_dir, seed, meta.task)


def collapsed_models(results: dict) -> list[str]:
    """The trained models (not the untrained `base`) the task kind found collapsed: "tuned", "merged", or per
    task of a multi-task checkpoint "tuned.<task>" (results' "collapsed" flags, at any depth)."""
    return [key.removesuffix(".collapsed") for key, value in flatten("", {k: v for k, v in results.items()
                                                                          if k in MODEL_ORDER and k != "base"}).items()
            if key.endswith(".collapsed") and value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="fine-tuned checkpoint (its meta.json names the base)")
    parser.add_argument("--merged", type=Path, help="merged checkpoint, scored too when it exists")
    parser.add_argument("--data", type=Path, required=True, help="ingested data directory (the test and train datasets)")
    parser.add_argument("--tokenized", type=Path, required=True, help="tokenised data directory (the test dataset)")
    parser.add_argument("--out", type=Path, required=True, help="directory for predictions, the report and plots")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: EvaluateParams = load_section("evaluate")
    template: TemplateParams = load_section("template")

    with stage_run("evaluate", project.experiment, params, tags=data_tags(test=args.data / "test"),
                   system_metrics=True) as mlflow:
        results = run(params, template, args.model, args.data, args.tokenized, args.out, args.merged, project.seed)
        write_json(args.metrics, results)
        log_metrics(mlflow, {k: v for k, v in results.items() if k != "checkpoints"})
        collapsed = collapsed_models(results)
        mlflow.set_tag("collapsed", ", ".join(collapsed) or "none")
        mlflow.log_artifacts(str(args.out), artifact_path="evaluate")
        flat = task_of(CheckpointMeta.read(args.model)).flat_results
        models = {name: results[name] for name in MODEL_ORDER if name in results}
        columns, table = table_rows(flat(models))
        mlflow.log_table({c: [float("nan") if row[c] is None else row[c] for row in table] for c in columns},
                         artifact_file="evaluate/table.json")
        log_datasets(mlflow, "ingested", {"test": args.data / "test"})
        log_datasets(mlflow, "tokenized", {"test": args.tokenized / "test"})
    shown = flat(results)
    for name in MODEL_ORDER:
        if name in results:
            log.info("%s: %s", name, {k: round(v, 4) for k, v in shown[name].items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
