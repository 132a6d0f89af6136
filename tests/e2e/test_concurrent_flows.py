"""Two pipeline flow runs in one workspace never corrupt each other.

DVC locks the repository (.dvc/tmp/lock) while it plans and records a run, and a running stage's deps
and outputs (.dvc/tmp/rwlock) while its command runs; a flow whose stage finds either taken retries
(flows/pipeline.py) or, when the retries run out, fails saying another DVC process holds the lock. Shown twice, on the tiny project's first stages (demo, base, ingest, template):
- deterministically: the test itself holds DVC's lock, the flow reports the lock and waits, and once
  the lock is released it completes;
- for real: two flows started together both end successfully or with that clear message, at least one
  succeeds, and afterwards `dvc status` is clean (dvc.lock matches every output) and no temporary
  output directory is left behind.
"""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.pipeline import LOCK_MESSAGE
from tests.tiny_project import build_project

pytestmark = pytest.mark.slow

STAGES = ["demo", "base", "ingest", "template"]
LOCKED = "another DVC process holds this workspace's lock"


def start_flow(root: Path, env: dict, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--stages", *STAGES, "--run-name", name],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_consistent(root: Path, env: dict) -> None:
    status = subprocess.run(["dvc", "status", *STAGES], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    leftovers = [str(p) for p in root.rglob(".*.tmp-*")]
    assert leftovers == [], leftovers
    assert (root / "data/tokenized/train/data-00000-of-00001.arrow").stat().st_size > 0


def test_a_flow_waits_for_the_dvc_lock_and_then_completes(tiny_model_dir, tmp_path):
    import zc.lockfile

    root, env = build_project(tmp_path / "project", tiny_model_dir)
    (root / ".dvc" / "tmp").mkdir(exist_ok=True)
    lock = zc.lockfile.LockFile(str(root / ".dvc" / "tmp" / "lock"))  # what every `dvc repro` takes
    flow = start_flow(root, env, "waits")
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(flow.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while LOCKED not in "".join(output):  # the flow met the lock and is waiting to retry
            assert flow.poll() is None, "".join(output)[-4000:]
            assert time.monotonic() < deadline, "the flow never reported the DVC lock:\n" + "".join(output)[-4000:]
            time.sleep(0.5)
        assert not (root / "data" / "demo").exists()  # nothing ran while the lock was held
    finally:
        lock.close()
    assert flow.wait(timeout=900) == 0, "".join(output)[-4000:]
    reader.join(timeout=60)
    text = "".join(output)
    assert LOCK_MESSAGE in text and "Retried up to" in text
    assert_consistent(root, env)


def test_two_flows_at_once_end_consistent(tiny_model_dir, tmp_path):
    root, env = build_project(tmp_path / "project", tiny_model_dir)
    flows = [start_flow(root, env, name) for name in ("first", "second")]
    results = [(flow.wait(timeout=1500), flow.stdout.read()) for flow in flows]
    for code, text in results:
        # each one either completed or stopped on the lock with the explanation, never on anything else
        assert code == 0 or LOCKED in text, text[-4000:]
    assert any(code == 0 for code, _ in results), [text[-2000:] for _, text in results]
    assert_consistent(root, env)
    # both flow runs are in MLflow, and each stage ran once: the later flow found it done (DVC's cache)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    stage_runs = [r.data.tags["dvc.stage"] for r in runs if "dvc.stage" in r.data.tags]
    assert sorted(stage_runs) == sorted({"base", "ingest", "template"}), stage_runs
    assert sorted(r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags) == ["first", "second"]
