"""Faults leave nothing behind and no second writer; errors are messages (issue 14, parts 3 and 4), with real
`dvc repro` on a tiny project: a params typo keeps the previous outputs, a stage whose dvc is killed stops and
publishes nothing, its MLflow run ends FAILED, and bad inputs print their message without a traceback."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.pipeline import stage_error
from tests.tiny_project import build_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tiny_model_dir, tmp_path_factory):
    root, env = build_project(tmp_path_factory.mktemp("faults"), tiny_model_dir)
    repro(root, env, "finetune")
    return root, env


def repro(root: Path, env: dict, stage: str, ok: bool = True) -> str:
    done = subprocess.run(["dvc", "repro", stage], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert (done.returncode == 0) == ok, output[-4000:]
    return output


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def edit_params(root: Path, section: str, edit) -> str:
    """Apply `edit` to a section of params.yaml; returns the previous file text (to restore)."""
    path = root / "params.yaml"
    before = path.read_text()
    params = yaml.safe_load(before)
    edit(params[section])
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return before


def test_a_params_typo_under_dvc_repro_keeps_the_previous_outputs(project):
    root, env = project
    before = snapshot(root / "models/finetune")
    metrics = (root / "metrics/finetune.json").read_bytes()
    good = edit_params(root, "finetune", lambda s: s.update(learning_rate=s.pop("lr")))
    try:
        output = repro(root, env, "finetune", ok=False)
        flow = subprocess.run([sys.executable, "-m", "flows.pipeline", "--stages", "finetune"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        (root / "params.yaml").write_text(good)
    hint = "finetune.learning_rate: unknown key (value 0.002); did you mean finetune.lr?"
    assert hint in output and "Traceback" not in output, output
    # What the flow makes of it: the stage's message alone as the run's state message ...
    assert stage_error(output) == f"1 problem(s) in params section 'finetune':\n  - params.yaml: {hint}"
    # ... and the flow itself reports it once, before Prefect or any stage starts.
    assert flow.returncode == 1 and flow.stderr.count(hint) == 1 and "Traceback" not in flow.stderr, flow.stderr
    # The failure: DVC used to delete models/finetune before the stage read its params.
    assert snapshot(root / "models/finetune") == before and (root / "metrics/finetune.json").read_bytes() == metrics
    assert "up to date" in subprocess.run(["dvc", "status", "finetune"], cwd=root, env=env, capture_output=True,
                                          text=True).stdout


def test_a_damaged_base_model_is_named_with_its_param_and_keeps_models_base(project, tiny_model_dir, tmp_path):
    import shutil

    root, env = project
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    with open(broken / "model.safetensors", "r+b") as handle:
        handle.truncate(1000)
    before = snapshot(root / "models/base")
    good = edit_params(root, "base", lambda s: s.update(model=str(broken)))
    try:
        output = repro(root, env, "base", ok=False)
    finally:
        (root / "params.yaml").write_text(good)
    assert f"error: base.model: {broken}: {broken / 'model.safetensors'} is truncated" in output, output
    assert "Traceback" not in output and snapshot(root / "models/base") == before


def stage_pids(root: Path, stage: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"stages.{stage}" in (proc / "cmdline").read_text() and \
                    Path(proc / "cwd").resolve() == root.resolve():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_killing_dvc_stops_the_stage_and_nothing_is_published(project):
    from mlflow import MlflowClient

    root, env = project
    before = snapshot(root / "models/finetune")
    good = edit_params(root, "finetune", lambda s: s.update(max_steps=100_000))
    log = root / "killed.log"
    try:
        with log.open("w") as out:
            dvc = subprocess.Popen(["dvc", "repro", "finetune"], cwd=root, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while "MLflow run" not in log.read_text():
            assert dvc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert stage_pids(root, "finetune"), "no stage process"  # the shell dvc runs it in may be a second one
        time.sleep(3)  # training under way
        dvc.send_signal(signal.SIGKILL)  # only dvc: its stage used to carry on as an orphan and publish later
        dvc.wait()
        deadline = time.monotonic() + 60
        while stage_pids(root, "finetune"):
            assert time.monotonic() < deadline, "the stage outlived its dvc by a minute"
            time.sleep(0.5)
    finally:
        (root / "params.yaml").write_text(good)
    assert "the dvc process (pid" in log.read_text() and "that ran this stage is gone" in log.read_text()
    assert snapshot(root / "models/finetune") == before
    assert not [p.name for p in (root / "models").iterdir() if p.name.startswith(".")]

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].data.tags["dvc.stage"] == "finetune" and runs[0].info.status == "FAILED"
    assert not [run for run in runs if run.info.status == "RUNNING"]
