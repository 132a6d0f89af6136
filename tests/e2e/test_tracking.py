"""MLflow tracking against a real sqlite store: a copied project keeps its artifacts to itself, and runs
left RUNNING by killed processes are marked FAILED by the next one (issue 14, parts 2 and 3)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture
def own_store(monkeypatch):
    """The project's default store (sqlite in the working directory), whatever the environment says."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TUNEKIT_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("TUNEKIT_EXPERIMENT", raising=False)


LOG_ONE_ARTIFACT = """
import sys
from tunekit.tracking import setup_mlflow
mlflow = setup_mlflow("moved")
with mlflow.start_run(run_name=sys.argv[1]) as run:
    mlflow.log_text(sys.argv[1], sys.argv[1] + ".txt")
print(run.info.run_id)
"""


def log_one_artifact(project: Path, name: str) -> str:
    """A process in `project` (its default store) that logs `name`.txt to a new run; returns the run id."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", LOG_ONE_ARTIFACT, name], cwd=project, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO)}, check=True)
    return done.stdout.split()[-1]


def test_a_copied_project_writes_and_reads_its_own_artifacts(tmp_path, monkeypatch, own_store):
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    first = log_one_artifact(original, "first")
    shutil.copytree(original, copy)
    second = log_one_artifact(copy, "second")

    from mlflow import MlflowClient

    monkeypatch.chdir(copy)
    client = MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    assert client.get_experiment_by_name("moved").artifact_location == (copy / "mlartifacts").as_uri()
    for run_id in (first, second):
        assert client.get_run(run_id).info.artifact_uri.startswith((copy / "mlartifacts").as_uri() + "/")
    assert list(original.rglob("second.txt")) == []  # the failure: it used to land in the original's mlartifacts/
    assert len(list(copy.rglob("second.txt"))) == 1
    shutil.rmtree(original)  # the copy stands alone
    assert Path(client.download_artifacts(first, "first.txt", str(tmp_path))).read_text() == "first"


OPEN_A_STAGE_RUN_AND_HANG = """
import sys, time
from tunekit.tracking import stage_run
with stage_run("finetune", "killed", {"lr": 1.0}):
    print("running", flush=True)
    time.sleep(600)
"""


def test_runs_of_killed_processes_are_marked_failed_by_the_next_run(tmp_path, monkeypatch, own_store):
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.Popen([sys.executable, "-c", OPEN_A_STAGE_RUN_AND_HANG], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "running"
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    from mlflow import MlflowClient

    from tunekit.tracking import setup_mlflow

    mlflow = setup_mlflow("killed")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("killed")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"  # the failure: RUNNING forever
    assert f"process {killed.pid}" in run.data.tags["tunekit.failed_reason"]

    # A run whose process is alive is left alone.
    with mlflow.start_run(run_name="alive", tags={"tunekit.pid": str(os.getpid()), "tunekit.host": os.uname().nodename,
                                                  "tunekit.pid_start": ""}) as alive:
        time.sleep(0.1)
        setup_mlflow("killed")
        assert client.get_run(alive.info.run_id).info.status == "RUNNING"
