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
    if existing is None:
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
def stage_run(stage: str, experiment: str, params: Any, tags: dict[str, str] | None = None,
              system_metrics: bool = False) -> Iterator[Any]:
    """Open the MLflow child run of one stage, with its params flattened under the stage name.

    `system_metrics`: sample CPU, memory, disk and network (MLflow's `system/*` metrics) every
    SYSTEM_METRICS_INTERVAL seconds in a background thread, for the long stages (finetune, dapt,
    evaluate); offline, and it cost no measurable wall time on a 2-core CPU (README). The
    environment variable MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns it off everywhere.
    """
    mlflow = setup_mlflow(experiment)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    run_tags = {"dvc.stage": stage, "git.commit": git_commit(), **(tags or {})}
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
    the rows stay in DVC, so the same data shows up as the same dataset digest across runs."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for split, path in splits.items():
        path = Path(path)
        if not path.is_file():
            continue
        with warnings.catch_warnings():  # a local path matches MLflow's local source type twice
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path.resolve()))
        with open(path, "rb") as handle:
            rows = sum(1 for line in handle if line.strip())
        dataset = MetaDataset(source, name=f"{kind}/{split}", digest=content_hash(path)[:16])
        mlflow.log_input(dataset, context=split, tags={"rows": str(rows), "path": str(path)})


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
