"""MLflow tracking shared by the stages and the flow.

One experiment per project, one parent run per pipeline execution (opened by the flow), one child
run per stage that actually ran. Stages are separate processes started by DVC, so the parent run id
travels in PARENT_RUN_ENV; MLFLOW_RUN_ID is not used for this because it would resume that run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunekit.io import content_hash, git_commit
from tunekit.params import flatten

PARENT_RUN_ENV = "TUNEKIT_PARENT_RUN_ID"
EXPERIMENT_ENV = "TUNEKIT_EXPERIMENT"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

log = logging.getLogger("tunekit")


def tracking_uri(root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else an absolute sqlite store inside the project."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


def setup_mlflow(experiment: str, root: Path | None = None):
    """Point MLflow at the project store and experiment; returns the mlflow module."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    name = os.environ.get(EXPERIMENT_ENV, experiment)
    if mlflow.get_experiment_by_name(name) is None:
        # Keep artifacts beside the sqlite store rather than wherever the process happens to run.
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by another process
    mlflow.set_experiment(name)
    return mlflow


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: Any, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """Open the MLflow child run of one stage, with its params flattened under the stage name."""
    mlflow = setup_mlflow(experiment)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    run_tags = {"dvc.stage": stage, "git.commit": git_commit(), **(tags or {})}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=run_tags) as run:
        mlflow.log_params(flatten(stage, params))
        log.info("MLflow run %s (%s) in %s", run.info.run_id, stage, tracking_uri())
        yield mlflow


def data_tags(**inputs: Path) -> dict[str, str]:
    """`data.<name>` tags holding the content hash of each data input, so runs on different data
    are told apart in the UI even when their params are equal."""
    return {f"data.{name}": content_hash(path)[:16] for name, path in inputs.items() if Path(path).exists()}


def log_metrics(mlflow: Any, metrics: dict[str, Any], prefix: str = "") -> None:
    """Log the numeric leaves of a (nested) metrics dict; strings and lists are not metrics."""
    flat = flatten(prefix, metrics)
    numeric = {key: float(value) for key, value in flat.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if numeric:
        mlflow.log_metrics(numeric)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # peft imports bitsandbytes, which warns on every CPU start about an optional kernels package.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
