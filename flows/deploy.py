"""Serve the pipeline flow as a scheduled Prefect deployment.

    prefect server start --host 127.0.0.1 --port 4200          # once, in another shell (schedules need a real server)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.deploy                                      # nightly at 02:00, every stage
    python -m flows.deploy --cron "0 */6 * * *" --stages ingest template finetune evaluate
    python -m flows.deploy --interval 3600 --force              # every hour, re-running even cached stages

This process is the worker: it registers the deployment `tunekit-pipeline/<name>` with the server and
runs each flow run the schedule creates (or `prefect deployment run 'tunekit-pipeline/<name>'`, or
the UI's "Run" button) as a subprocess in this directory. Parameters are the flow's own (`stages`,
`force`); what the stages do comes from this project's params.yaml, read by each run when it starts,
so edit params.yaml (or commit a new one) and the next scheduled run picks it up. Stop with Ctrl-C:
the deployment's schedule is paused until it is served again.

A failed stage fails the flow run; its state message carries the stage's own error output (the
`repro` task retries only when another DVC process holds the repository lock).
"""

from __future__ import annotations

import argparse
import os
import sys

from flows.pipeline import STAGES, pipeline

DEFAULT_NAME = "scheduled"
DEFAULT_CRON = "0 2 * * *"


def serve(name: str = DEFAULT_NAME, *, cron: str | None = DEFAULT_CRON, interval: float | None = None,
          stages: list[str] | None = None, force: bool = False, timezone: str | None = None,
          limit: int | None = 1) -> None:
    """Register the deployment and run its flow runs until interrupted.

    `limit=1`: one pipeline at a time; DVC holds a repository lock anyway, so a second concurrent run
    could only wait for it.
    """
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("schedules need a Prefect server: start one with `prefect server start --host 127.0.0.1` "
                         "and export PREFECT_API_URL=http://127.0.0.1:4200/api (the ephemeral server cannot schedule)")
    _warn_if_scheduler_is_broken()
    schedule: dict = {}
    if interval is not None:
        schedule["interval"] = interval
    elif cron:
        if timezone:
            from prefect.schedules import Cron

            schedule["schedules"] = [Cron(cron, timezone=timezone)]
        else:
            schedule["cron"] = cron
    pipeline.serve(name=name, parameters={"stages": list(stages) if stages else None, "force": force},
                   description="The tunekit pipeline (dvc repro per stage, one MLflow parent run) on a schedule.",
                   tags=["tunekit"], limit=limit, **schedule)


def _warn_if_scheduler_is_broken() -> None:
    """prefect 3.8.8's scheduler fails on SQLAlchemy 2.1 (`Can't evaluate bulk DML statement` in the
    server log) and then no scheduled run is ever created; SQLAlchemy 2.0.x works."""
    from importlib.metadata import version

    sqlalchemy = version("sqlalchemy")
    if tuple(int(p) for p in sqlalchemy.split(".")[:2]) >= (2, 1):
        print(f"warning: SQLAlchemy {sqlalchemy} is installed; a Prefect {version('prefect')} server running in this "
              "environment creates no scheduled runs (pin SQLAlchemy==2.0.58, see requirements.lock)", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default: {DEFAULT_NAME})")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default: {DEFAULT_CRON!r})")
    when.add_argument("--interval", type=float, help="seconds between runs, instead of --cron")
    parser.add_argument("--timezone", help="IANA time zone of the cron schedule (default: UTC)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="stages each run executes (default: all)")
    parser.add_argument("--force", action="store_true", help="re-run the stages even when DVC has them cached")
    parser.add_argument("--limit", type=int, default=1, help="flow runs at once (default: 1)")
    args = parser.parse_args(argv)
    serve(args.name, cron=args.cron, interval=args.interval, stages=args.stages, force=args.force,
          timezone=args.timezone, limit=args.limit)


if __name__ == "__main__":
    sys.exit(main())
