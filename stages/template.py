"""Stage `template`: tokenise the ingested splits for the task kind: for sft, render each conversation
with the chat template, tokenise it and mask the loss to the assistant turns (optionally packing the
training split); for a head, tokenise and align its labels.

    python -m stages.template --model models/base --data data/ingested --out data/tokenized \
        --preview reports/template --metrics metrics/template.json

How a split is tokenised is the task kind's (tunekit.tasks, `task.type`): for sft (tasks/sft.py) the
chat template and the assistant-turn mask, examples left with no trained token listed with their
source line in <preview>/dropped.jsonl; for a head (tasks/heads.py) label alignment, QA windows,
<out>/labels.json and a token/label table as the preview; for multi_task each row by its own task's
rules and settings (task.tasks), labels.json holding every task's label set under "tasks".
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tunekit.data import configure as configure_datasets
from tunekit.io import atomic_dir, write_json
from tunekit.models import load_tokenizer
from tunekit.params import ProjectParams, TaskParams, TemplateParams, load_section
from tunekit.tasks import task_for
from tunekit.tracking import configure_logging, data_tags, log_datasets, log_metrics, stage_run

log = logging.getLogger("tunekit")


def run(params: TemplateParams, model_dir: Path, data_dir: Path, out: Path, preview: Path,
        task: TaskParams | None = None) -> dict:
    configure_datasets()
    tokenizer = load_tokenizer(model_dir)
    with atomic_dir(out) as tmp_out, atomic_dir(preview) as tmp_preview:
        return task_for(task).tokenize(params, task or TaskParams(), tokenizer, data_dir, tmp_out, tmp_preview)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint whose tokenizer and chat template to use")
    parser.add_argument("--data", type=Path, required=True, help="ingested data directory (a `datasets` directory per split)")
    parser.add_argument("--out", type=Path, required=True, help="tokenised data directory to write")
    parser.add_argument("--preview", type=Path, required=True, help="directory for the mask preview and dropped list")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: TemplateParams = load_section("template")
    task: TaskParams = load_section("task")

    tags = {"task.type": task.type, **data_tags(ingested=args.data)}
    with stage_run("template", project.experiment, params, tags=tags) as mlflow:
        metrics = run(params, args.model, args.data, args.out, args.preview, task)
        write_json(args.metrics, metrics)
        log_metrics(mlflow, metrics)
        mlflow.log_artifacts(str(args.preview), artifact_path="template")
        log_datasets(mlflow, "ingested", {s: args.data / s for s in ("train", "validation", "test")})
    log.info("%s", task_for(task).template_summary(metrics))


if __name__ == "__main__":
    main()
