"""MLflow tracking shared by the stages and the flow.

One experiment per project, one parent run per pipeline execution (opened by the flow), one child
run per stage that actually ran. Stages are separate processes started by DVC, so the parent run id
travels in PARENT_RUN_ENV; MLFLOW_RUN_ID is not used for this because it would resume that run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunekit.io import content_hash, git_commit
from tunekit.params import flatten
from tunekit.process import process_alive, start_time

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


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise the first access to a sqlite store across processes: two flow runs started together
    in one workspace would otherwise both create and migrate a new mlflow.db and one would fail."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = Path(uri.removeprefix("sqlite:///") + ".init-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def setup_mlflow(experiment: str, root: Path | None = None):
    """Point MLflow at the project store and experiment; returns the mlflow module."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    name = os.environ.get(EXPERIMENT_ENV, experiment)
    with _sqlite_init_lock(uri):
        existing = mlflow.get_experiment_by_name(name)  # the first access creates and migrates a new store
    location = project_artifact_location(uri)
    if existing is None:
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by another process
    elif location is not None and existing.artifact_location != location:
        with _sqlite_init_lock(uri):
            relocate_artifacts(uri, existing.experiment_id, existing.artifact_location, location)
    experiment = mlflow.set_experiment(name)
    fail_dead_runs(mlflow, experiment.experiment_id)
    return mlflow


ARTIFACTS_DIR = "mlartifacts"


def project_artifact_location(uri: str) -> str | None:
    """The artifact root of the project's own sqlite store: `mlartifacts/` beside it (not wherever the process
    happens to run). None for any other store, whose server or admin decides."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR).as_uri()


def relocate_artifacts(uri: str, experiment_id: str, old: str, new: str) -> int:
    """Point the experiment, its runs, logged models and model versions from the artifact root `old` to `new`.

    MLflow stores absolute artifact URIs (it resolves even a relative artifact_location when the experiment
    is created, and copies it into every run), so a project copied or moved with its mlflow.db would go on
    writing into, and reading from, the original's mlartifacts/. MLflow has no API to change an artifact
    location: this updates the project's own sqlite store in place. Only a root that is some project's
    mlartifacts/ moves; a location chosen by hand is left alone. Returns the rows changed."""
    if not old.startswith("file:") or not old.rstrip("/").endswith("/" + ARTIFACTS_DIR):
        return 0
    import sqlite3

    old = old.rstrip("/")
    columns = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
               ("model_versions", "source"), ("model_versions", "storage_location"))
    changed = 0
    with contextlib.closing(sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=60)) as db, db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, column in columns:
            if table in tables:
                changed += db.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {column} = ? OR {column} LIKE ? ESCAPE '\\'",
                    (new, len(old) + 1, old, old.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"),
                ).rowcount
    log.info("MLflow artifacts of experiment %s: %s -> %s (%d entries; the project was copied or moved)",
             experiment_id, old, new, changed)
    return changed


# Tags of every run a tunekit process opens: which process on which machine runs it, so a later run can tell
# a run whose process was killed (it stays RUNNING forever) from one that is still going.
HOST_TAG, PID_TAG, PID_START_TAG = "tunekit.host", "tunekit.pid", "tunekit.pid_start"


def process_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: start_time(os.getpid()) or ""}


def fail_dead_runs(mlflow: Any, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of this experiment whose process, on this machine, is gone (a stage or
    flow killed with -9, or stopped with its dvc); returns their ids. Runs of other machines are left alone."""
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    dead = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit():
            continue
        if process_alive(int(tags[PID_TAG]), tags.get(PID_START_TAG) or None):
            continue
        client.set_tag(run.info.run_id, "tunekit.failed_reason",
                       f"process {tags[PID_TAG]} on {host} ended without closing the run (killed)")
        client.set_terminated(run.info.run_id, status="FAILED")
        dead.append(run.info.run_id)
    if dead:
        log.info("marked %d MLflow run(s) of killed processes FAILED: %s", len(dead), ", ".join(dead))
    return dead


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: Any, tags: dict[str, str] | None = None,
              system_metrics: bool = False) -> Iterator[Any]:
    """Open the MLflow child run of one stage, with its params flattened under the stage name.

    `system_metrics`: sample CPU, memory, disk and network (MLflow's `system/*` metrics) every
    SYSTEM_METRICS_INTERVAL seconds in a background thread, for the long stages (finetune, dapt,
    evaluate); offline, and it cost no measurable wall time on a 2-core CPU (docs/tracking.md). The
    environment variable MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns it off everywhere.
    """
    mlflow = setup_mlflow(experiment)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    run_tags = {"dvc.stage": stage, "git.commit": git_commit(), **process_tags(), **(tags or {})}
    system_metrics = system_metrics and _system_metrics_allowed()
    if system_metrics:
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_INTERVAL))
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=run_tags, log_system_metrics=system_metrics) as run:
        mlflow.log_params(flatten(stage, params))
        log.info("MLflow run %s (%s) in %s", run.info.run_id, stage, tracking_uri())
        yield mlflow


SYSTEM_METRICS_INTERVAL = 5  # seconds between samples; MLflow's default of 10 gives few points on short stages


def _system_metrics_allowed() -> bool:
    """False when the user switched system metrics off, or psutil (MLflow's sampler) is missing."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in ("false", "0"):
        return False
    try:
        import psutil  # noqa: F401  (MLflow samples system metrics with it)
    except ImportError:
        return False
    return True


def log_datasets(mlflow: Any, kind: str, splits: dict[str, Path]) -> None:
    """`mlflow.log_input` for each data split a stage reads: dataset `<kind>/<split>` (e.g.
    `tokenized/train`) with context = the split name, the file's content hash (first 16 hex digits,
    as in the `data.*` tags) as digest, the file as source and its row count as a tag. Metadata only:
    the rows stay in DVC, so the same data shows up as the same dataset digest across runs. A split is a
    `datasets` directory (tunekit.data) or a JSONL file."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for split, path in splits.items():
        path = Path(path)
        if path.is_dir() and (path / "state.json").is_file():  # a `datasets` split (tunekit.data)
            import datasets

            rows = datasets.load_from_disk(str(path)).num_rows
        elif path.is_file():
            with open(path, "rb") as handle:
                rows = sum(1 for line in handle if line.strip())
        else:
            continue
        with warnings.catch_warnings():  # a local path matches MLflow's local source type twice
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path.resolve()))
        dataset = MetaDataset(source, name=f"{kind}/{split}", digest=content_hash(path)[:16])
        mlflow.log_input(dataset, context=split, tags={"rows": str(rows), "path": str(path)})


def data_tags(**inputs: Path) -> dict[str, str]:
    """`data.<name>` tags holding the content hash of each data input, so runs on different data
    are told apart in the UI even when their params are equal."""
    return {f"data.{name}": content_hash(path)[:16] for name, path in inputs.items() if Path(path).exists()}


def metric_name(key: str) -> str:
    """One part of a metrics key as MLflow accepts it: characters other than letters, digits, _ - . / : and
    space (a label name such as "ship?" or "a+b" in evaluate's per-class scores) become _, and so do the
    runs of . or / that would make an empty path part."""
    name = re.sub(r"\.{2,}|/{2,}", "_", re.sub(r"[^\w./\- :]", "_", str(key))).strip("/")
    return "_" if re.fullmatch(r"[./]*", name) else name


def _valid_keys(value: Any) -> Any:
    return {metric_name(k): _valid_keys(v) for k, v in value.items()} if isinstance(value, dict) else value


def log_metrics(mlflow: Any, metrics: dict[str, Any], prefix: str = "") -> None:
    """Log the numeric leaves of a (nested) metrics dict; strings and lists are not metrics. Each key part is
    made a valid MLflow name (`metric_name`); the parts are joined with "."."""
    flat = flatten(prefix, _valid_keys(metrics))
    numeric = {key: float(value) for key, value in flat.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if numeric:
        mlflow.log_metrics(numeric)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # peft imports bitsandbytes, which warns on every CPU start about an optional kernels package.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def log_checkpoint(mlflow: Any, checkpoint_dir: Path, artifact_path: str) -> None:
    """Log what an exported checkpoint carries besides registered weights: its model card
    (`<artifact_path>/README.md`) and, when the checkpoint is an adapter, the adapter itself
    (`<artifact_path>/adapter/`: weights, config, tokenizer, meta.json). When the run registered a model
    version (tag `registered_model` = `name/version`), the card becomes that version's description."""
    checkpoint_dir = Path(checkpoint_dir)
    card = checkpoint_dir / "README.md"
    if card.is_file():
        mlflow.log_artifact(str(card), artifact_path=artifact_path)
    meta_path = checkpoint_dir / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    if meta.get("saves_adapter"):
        mlflow.log_artifacts(str(checkpoint_dir), artifact_path=f"{artifact_path}/adapter")
    run = mlflow.active_run()
    if card.is_file() and run is not None:
        client = mlflow.MlflowClient()
        registered = client.get_run(run.info.run_id).data.tags.get("registered_model", "")
        if "/" in registered:
            name, version = registered.rsplit("/", 1)
            client.update_model_version(name, version, description=card.read_text(encoding="utf-8"))


def log_curves(mlflow: Any, curves: dict[str, list[dict[str, float]]]) -> None:
    """A training run's curves as MLflow step metrics: train_loss and lr per step ("history"), val_loss
    ("evals") and the forgetting curve's probe_loss ("probes") where recorded."""
    for point in curves.get("history") or []:
        mlflow.log_metrics({"train_loss": point["train_loss"], "lr": point["lr"]}, step=point["step"])
    for point in curves.get("evals") or []:
        mlflow.log_metric("val_loss", point["val_loss"], step=point["step"])
    for point in curves.get("probes") or []:
        mlflow.log_metric("probe_loss", point["probe_loss"], step=point["step"])
