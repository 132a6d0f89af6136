"""Outputs depend only on inputs (issue 14, part 2): two clones of one project, in different directories and with
different string-hash seeds, run the pipeline to `evaluate` with real DVC and get the same dvc.lock and the same
bytes in every output: base, ingest, template, dapt, finetune, merge, evaluate and their metrics files."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tiny_project import build_project

pytestmark = pytest.mark.slow


def outputs(root: Path) -> dict[str, bytes]:
    """Every file of every output dvc.lock lists, by path relative to the project."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    files = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = root / out["path"]
            for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
                files[str(file.relative_to(root))] = file.read_bytes()
    return files


def test_two_clones_give_the_same_dvc_lock_and_outputs(tiny_model_dir, tmp_path):
    first, env = build_project(tmp_path / "first", tiny_model_dir)
    second = tmp_path / "elsewhere" / "second"
    subprocess.run(["git", "clone", "-q", str(first), str(second)], check=True, env=env)
    for root, seed in ((first, "1"), (second, "2")):
        run_env = {**env, "PYTHONHASHSEED": seed, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        done = subprocess.run(["dvc", "repro", "evaluate"], cwd=root, env=run_env, capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    lock = yaml.safe_load((first / "dvc.lock").read_text())
    assert {"base", "ingest", "template", "dapt", "finetune", "merge", "evaluate"} <= set(lock["stages"])
    assert (first / "dvc.lock").read_text() == (second / "dvc.lock").read_text()
    mine, theirs = outputs(first), outputs(second)
    assert mine.keys() == theirs.keys() and "models/finetune/adapter_config.json" in mine
    assert [path for path in mine if mine[path] != theirs[path]] == []
    for text in (mine["models/base/meta.json"], mine["models/finetune/meta.json"]):
        assert str(tmp_path).encode() not in text and b"git_commit" not in text
    assert b"train_seconds" not in mine["metrics/finetune.json"]
    # The provenance that is not an input went to MLflow instead.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{second / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    base_run = next(run for run in runs if run.data.tags.get("dvc.stage") == "base")
    assert base_run.data.tags["base.location"] == str(tiny_model_dir) and base_run.data.tags["git.commit"]
    finetune_run = next(run for run in runs if run.data.tags.get("dvc.stage") == "finetune")
    assert finetune_run.data.metrics["train_seconds"] > 0
    assert os.path.commonpath([finetune_run.info.artifact_uri.removeprefix("file://"), str(second)]) == str(second)
