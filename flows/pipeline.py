"""The pipeline flow: run the DVC stages in order under one MLflow parent run.

    python -m flows.pipeline                      # the whole pipeline
    python -m flows.pipeline --stages base ingest # just these (and whatever DVC says they need)
    python -m flows.pipeline --force              # re-run stages even when DVC has them cached

Orchestration only: DVC decides what is stale and caches results, so these tasks do not cache; each
stage is a `dvc repro <stage>` subprocess that opens its own MLflow child run under the parent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

# Before prefect is imported: its settings are read once. `make` exports these too.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.states import Failed, State

from tunekit.io import git_commit
from tunekit.params import ParamsError, ProjectParams, flatten, load_all
from tunekit.tracking import PARENT_RUN_ENV, log_metrics, process_tags, setup_mlflow

STAGES = ("demo", "base", "ingest", "template", "pack", "dapt", "finetune", "merge", "evaluate", "forgetting", "export")
LOCK_MESSAGE = "Unable to acquire lock"  # DVC's repository lock (.dvc/tmp/lock)
BUSY_MESSAGE = "is busy, it is being blocked by"  # DVC's lock on a running stage's deps and outs (.dvc/tmp/rwlock)


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message carries the tail of its output."""


class DvcLocked(StageFailed):
    """Another DVC process holds the repository lock; waiting and retrying can help."""


def _stream(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run cmd, passing its output through as it comes (progress bars redraw with \r, not newlines),
    and return (exit code, the last lines of its output)."""
    tail = bytearray()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc:
        assert proc.stdout is not None
        for chunk in iter(lambda: os.read(proc.stdout.fileno(), 65536), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            tail = (tail + chunk)[-16384:]
    lines = [line.split("\r")[-1].rstrip() for line in tail.decode("utf-8", "replace").splitlines()]
    return proc.returncode, "\n".join(line for line in lines[-40:] if line)


def _retry_only_on_lock(task, task_run, state) -> bool:
    try:
        state.result()
    except DvcLocked:
        return True
    except Exception:
        return False
    return False


LOCK_RETRIES, LOCK_RETRY_DELAY = 3, 15  # a second flow run waits up to about a minute for the first one's stage


@task(cache_policy=NO_CACHE, retries=LOCK_RETRIES, retry_delay_seconds=LOCK_RETRY_DELAY,
      retry_condition_fn=_retry_only_on_lock, task_run_name="dvc repro {stage}")
def repro(stage: str, force: bool, parent_run_id: str) -> State | None:
    logger = get_run_logger()
    cmd = ["dvc", "repro", *(["--force", "--single-item"] if force else []), stage]
    logger.info("running: %s", " ".join(cmd))
    env = {**os.environ, PARENT_RUN_ENV: parent_run_id}
    code, tail = _stream(cmd, env)
    if code != 0 and (LOCK_MESSAGE in tail or BUSY_MESSAGE in tail):
        # DVC locks the repository (.dvc/tmp/lock) while it plans and records a run, and a running stage's
        # deps and outputs (.dvc/tmp/rwlock) while its command runs; so two flow runs in one workspace
        # never write the same outputs or dvc.lock at once: the one that finds a lock taken waits and retries.
        raise DvcLocked(
            f"stage {stage!r} did not start: another DVC process holds this workspace's lock (.dvc/tmp/lock or, "
            f"for the stage's files, .dvc/tmp/rwlock), e.g. "
            f"a second flow run or a `dvc repro` in a shell. Retried up to {LOCK_RETRIES} times, "
            f"{LOCK_RETRY_DELAY} s apart; if this is the final state, run again when the other one has finished "
            f"(or run it in its own clone). Last output:\n{tail}")
    if code != 0:
        # The stage's own error (tunekit.process prints it as `error: ...`) is the run's message, without a
        # traceback: the stage's output above already showed it once. Anything else keeps the last lines.
        error = stage_error(tail)
        if error is not None:
            return Failed(message=f"StageFailed: stage {stage!r} failed (exit {code}): {error}")
        raise StageFailed(f"stage {stage!r} failed (exit {code}). Last output:\n{tail}")


LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d|\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) |^> |^Running stage ")  # logs, DVC's echo


def stage_error(output: str) -> str | None:
    """The expected error a failed stage printed last, before DVC's own `ERROR:` line: its `error: ...` message
    (tunekit.process), else the lines a `SystemExit(message)` left after the last log line. None when the
    output holds a traceback (an unexpected error: its last lines are the report)."""
    lines = output.splitlines()
    end = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("ERROR: ")), len(lines))
    if any(line.startswith("Traceback (most recent call last)") for line in lines[:end]):
        return None
    start = next((i for i in range(end - 1, -1, -1) if lines[i].startswith("error: ")), None)
    if start is None:
        start = end
        while start > 0 and lines[start - 1].strip() and not LOG_LINE.match(lines[start - 1]):
            start -= 1
    return "\n".join(lines[start:end]).removeprefix("error: ").strip() or None


@flow(name="tunekit-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, force: bool = False, run_name: str = "pipeline") -> dict | State:
    """Run `stages` (default: all, in DAG order) under one MLflow parent run (named `run_name`, e.g.
    the variant it tries, for the MLflow UI's comparison) and return every stage's metrics. A params problem
    or a stage's expected error ends the run Failed with that message (and the parent run FAILED)."""
    selected = list(stages or STAGES)
    unknown = [s for s in selected if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    try:
        sections = load_all()  # every params problem reported before anything runs
    except ParamsError as exc:
        return Failed(message=str(exc))  # the message alone: a traceback would only repeat it
    project: ProjectParams = sections["project"]  # type: ignore[assignment]

    mlflow = setup_mlflow(project.experiment)
    with mlflow.start_run(run_name=run_name, tags={"git.commit": git_commit(), "stages": ",".join(selected),
                                                    **process_tags()}) as parent:
        # Every section's params on the parent too, so the UI's compare page shows which ones differ.
        mlflow.log_params({key: str(value)[:6000] for name, section in sections.items()
                           for key, value in flatten(name, section).items()})
        for stage in [s for s in STAGES if s in selected]:
            state = repro(stage, force, parent.info.run_id, return_state=True)
            if state.is_failed():
                if state.message is None or not state.message.startswith("StageFailed: "):
                    state.result()  # an unexpected failure: raised, with its traceback
                mlflow.end_run("FAILED")
                return Failed(message=state.message)
        # Stages restored from DVC's cache did not run, so their numbers come from their metrics files.
        metrics = {}
        for stage in STAGES:
            path = Path("metrics") / f"{stage}.json"
            if path.exists():
                metrics[stage] = json.loads(path.read_text(encoding="utf-8"))
        log_metrics(mlflow, metrics)
        for path in ("params.yaml", "dvc.lock"):
            if Path(path).exists():
                mlflow.log_artifact(path)
        log_cards(mlflow, metrics)
    return metrics


CARD_CHECKPOINTS = {"finetune": ("ingest", "template", "finetune", "evaluate", "forgetting"),
                    "merged": ("ingest", "template", "finetune", "merge", "evaluate", "forgetting")}


def log_cards(mlflow, metrics: dict) -> None:
    """The complete model cards, evaluation and forgetting included (which the cards inside the
    checkpoints cannot hold: those stages run after them), as `cards/<checkpoint>.md` on the parent run."""
    from tunekit.card import render_card
    from tunekit.io import read_meta

    for name, sections in CARD_CHECKPOINTS.items():
        path = Path("models") / name
        meta = read_meta(path) if path.is_dir() else None
        if meta is None or meta.get("merged") is False:
            continue  # not run yet, or a merge that was refused (NOT_MERGED.md says why)
        try:
            card = render_card(path, {s: metrics[s] for s in sections if s in metrics})
        except (OSError, ValueError, KeyError) as exc:
            get_run_logger().warning("model card of %s not rendered: %s", path, exc)
            continue
        mlflow.log_text(card, f"cards/{name}.md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="stages to run (default: all)")
    parser.add_argument("--force", action="store_true", help="re-run the selected stages even if cached")
    parser.add_argument("--run-name", default="pipeline", help="name of the MLflow parent run (default: pipeline)")
    args = parser.parse_args(argv)
    try:
        load_all()  # reported here, before Prefect starts, as the message alone
    except ParamsError as exc:
        raise SystemExit(f"error: {exc}") from None
    state = pipeline(stages=args.stages, force=args.force, run_name=args.run_name, return_state=True)
    if state.is_failed() and (state.message or "").startswith("StageFailed: "):
        raise SystemExit(1)  # the stage printed its error, and Prefect logged the state: nothing to add
    metrics = state.result()
    summary = metrics.get("evaluate", {})
    for name in ("base", "few_shot", "dapt", "tuned", "merged"):
        if isinstance(summary.get(name), dict):
            numbers = {k: v for k, v in summary[name].items() if isinstance(v, (int, float))}
            print(f"{name:>8}: " + ", ".join(f"{k}={v:.4g}" for k, v in numbers.items()))


if __name__ == "__main__":
    main()
