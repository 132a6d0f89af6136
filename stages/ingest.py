"""Stage `ingest`: validate, normalise, deduplicate and split the user's JSONL files.

    python -m stages.ingest --out data/ingested --metrics metrics/ingest.json

Reads `ingest.inputs` (a file or a directory of *.jsonl) in any supported format. Every line is
accepted, counted as a duplicate, or written to <out>/rejects.jsonl with its file, line and reason.
`task.type` chooses the formats: its registry entry (tunekit.tasks) reads the kind's own formats (the
chat formats for sft; classification, token_classification / CoNLL, squad for the heads), and for
`multi_task` each task of `task.tasks` from its own `inputs` (`ingest.inputs` is not read then), every
row carrying its task's name; metrics per task under "tasks", totals at the top.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tunekit.data import configure as configure_datasets
from tunekit.ingest import IngestError
from tunekit.io import write_json
from tunekit.params import IngestParams, ProjectParams, TaskParams, load_section
from tunekit.tasks import task_for
from tunekit.tracking import configure_logging, log_metrics, stage_run

log = logging.getLogger("tunekit")


def run(params: IngestParams, out: Path, task: TaskParams | None = None) -> dict:
    configure_datasets()
    return task_for(task).ingest(params, task or TaskParams(), out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the train/validation/test datasets and rejects.jsonl")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: IngestParams = load_section("ingest")
    task: TaskParams = load_section("task")

    with stage_run("ingest", project.experiment, params, tags=task_for(task).ingest_tags(params, task)) as mlflow:
        try:
            metrics = run(params, args.out, task)
        except IngestError as exc:
            mlflow.set_tag("error", str(exc)[:5000])
            print(f"ingest failed:\n{exc}", file=sys.stderr)
            raise SystemExit(1) from None
        write_json(args.metrics, metrics)
        log_metrics(mlflow, metrics)
        mlflow.log_artifact(str(args.out / "rejects.jsonl"), artifact_path="ingest")
    log.info("ingest: %d lines, %d accepted, %d rejected, %d duplicates; splits %d/%d/%d", metrics["lines_read"],
             metrics["accepted"], metrics["rejected"], metrics["duplicates"], metrics["train"], metrics["validation"], metrics["test"])
    for name, m in metrics.get("tasks", {}).items():
        log.info("  task %s (%s): %d lines, %d accepted, %d rejected, %d duplicates; splits %d/%d/%d", name, m["type"],
                 m["lines_read"], m["accepted"], m["rejected"], m["duplicates"], m["train"], m["validation"], m["test"])


if __name__ == "__main__":
    main()
