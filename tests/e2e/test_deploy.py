"""The scheduled deployment, end to end against a real Prefect server on loopback.

A tmp project (the real stages, flows and dvc.yaml) is served with `python -m flows.deploy` on a
few-second interval schedule limited to the quick `demo` stage; the server's scheduler creates the
flow runs and the serving process runs them. A manual run of the same deployment with `stages:
[ingest]` over a file of broken lines must fail, with ingest's own error in the flow run's state
message, and without retrying the stage (retries are for DVC's repository lock only).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
DEPLOYMENT = "tunekit-pipeline/every-few-seconds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group we started, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy-project")
    for name in ("stages", "tunekit", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["project"]["experiment"] = "deploy"
    params["demo"]["records"] = 20
    params["ingest"]["inputs"] = "broken/orders.jsonl"  # every line is rejected: the ingest stage fails
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "broken").mkdir()
    (root / "broken/orders.jsonl").write_text("not json\n{\"messages\": 3}\n{oops\n")
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())
    env = {**os.environ, **GIT_ENV,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PREFECT_HOME": str(root / ".prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny project"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root, env


@pytest.fixture(scope="module")
def server(project):
    root, env = project
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"prefect server exited early:\n{tail(log)}"
            assert time.monotonic() < deadline, f"prefect server not healthy after 120 s:\n{tail(log)}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def served(project, server):
    """`python -m flows.deploy` serving the pipeline every 4 s, demo stage only."""
    root, env = project
    env = {**env, "PREFECT_API_URL": server}
    log = root / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--name", DEPLOYMENT.split("/")[1],
                                 "--interval", "4", "--stages", "demo"],
                                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield server, proc, log
    finally:
        stop(proc)


def client_for(url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = temporary_settings(updates={PREFECT_API_URL: url})
    settings.__enter__()
    return settings, get_client(sync_client=True)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"`flows.deploy` exited:\n{tail(log)}"
        found = predicate()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; serve log:\n{tail(log)}")


def test_schedule_creates_a_run_that_completes_and_a_failed_stage_fails_the_run(project, served):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    root, _ = project
    url, proc, log = served
    settings, client = client_for(url)
    try:
        with client:
            deployment = wait_for(lambda: _deployment(client), 90, "the deployment to be registered", proc, log)
            assert deployment.parameters == {"stages": ["demo"], "force": False}
            assert deployment.schedules and deployment.schedules[0].active
            assert deployment.entrypoint == "flows/pipeline.py:pipeline"
            only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))

            def completed_scheduled_run():
                runs = client.read_flow_runs(deployment_filter=only_this)
                return next((r for r in runs if r.state and r.state.is_completed()
                             and r.auto_scheduled), None)

            started = time.monotonic()
            try:
                run = wait_for(completed_scheduled_run, 150, "a schedule-created flow run to complete", proc, log)
            except AssertionError as error:
                server_log = tail(root / "server.log", 6000)
                hint = ("\nprefect's scheduler failed on SQLAlchemy 2.1: pin SQLAlchemy==2.0.58"
                        if "bulk DML" in server_log else "")
                raise AssertionError(f"{error}\nserver log:\n{server_log}{hint}") from None
            assert run.parameters == {"stages": ["demo"], "force": False}
            print(f"first scheduled run completed {time.monotonic() - started:.0f} s after the deployment appeared")
            assert (root / "data/demo/orders.jsonl").is_file()
            assert len((root / "data/demo/orders.jsonl").read_text().splitlines()) == 20

            # Stop the schedule and drop the runs it queued ahead, so the next run is the one started by hand.
            client.pause_deployment(deployment.id)
            for queued in client.read_flow_runs(deployment_filter=only_this, flow_run_filter=_scheduled()):
                client.delete_flow_run(queued.id)

            # The same deployment, run by hand with other parameters: the ingest stage fails.
            failing = client.create_flow_run_from_deployment(deployment.id, parameters={"stages": ["ingest"], "force": False})

            def finished():
                current = client.read_flow_run(failing.id)
                return current if current.state and current.state.is_final() else None

            done = wait_for(finished, 150, "the failing flow run to finish", proc, log)
            assert done.state.is_failed(), done.state
            message = done.state.message or ""
            assert "StageFailed: stage 'ingest' failed (exit " in message, message
            # ingest's own error, not just an exit code
            assert "ingest rejected 3 of 3 lines read" in message and "max_reject_rate" in message, message
            task_runs = client.read_task_runs(flow_run_filter=_flow_run_filter(done.id))
            repro_runs = [t for t in task_runs if t.name.startswith("dvc repro ingest")]
            assert len(repro_runs) == 1 and repro_runs[0].run_count == 1  # not retried: only a lock retries
    finally:
        settings.__exit__(None, None, None)


def _deployment(client):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(DEPLOYMENT)
    except ObjectNotFound:
        return None


def _flow_run_filter(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))


def _scheduled():
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    return FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
