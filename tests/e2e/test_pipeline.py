"""End to end: the Prefect flow runs every DVC stage on a tiny model, MLflow records parent and
child runs, and a second run restores everything from DVC's cache yet still reports all metrics."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

STAGE_RUNS = {"base", "ingest", "template", "pack", "dapt", "finetune", "evaluate", "merge", "forgetting", "export"}
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def tiny_params(model_dir: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["project"]["experiment"] = "e2e"
    params["demo"]["records"] = 60
    params["base"]["model"] = str(model_dir)
    params["template"]["max_length"] = 256
    params["finetune"].update(max_steps=6, batch_size=4, eval_every=3, checkpoint_every=3, threads=1)
    params["finetune"]["lora"]["r"] = 4
    params["evaluate"].update(max_new_tokens=8, max_examples=4)
    params["export"]["gates"] = {}  # a 6-step tiny random model learns nothing; tests/stages/test_export.py tests the gates
    return params


@pytest.fixture(scope="module")
def project(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name in ("stages", "tunekit", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir), sort_keys=False))
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())
    env = {**os.environ, **GIT_ENV,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PREFECT_HOME": str(root / ".prefect"),
           "PYTHONPATH": ""}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "tiny project"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root, env


def run_flow(root: Path, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def runs_by_parent(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    children = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id] for p in parents}
    return parents, children


def test_flow_runs_every_stage_and_tracks_it(project):
    root, env = project
    run_flow(root, env)

    for path in ("models/base/model.safetensors", "models/base/meta.json", "models/base/chat_template.jinja",
                 "data/ingested/train/state.json", "data/ingested/rejects.jsonl", "data/tokenized/train/state.json",
                 "reports/template/mask_preview.html", "models/finetune/adapter_model.safetensors",
                 "models/finetune/meta.json", "reports/finetune/loss.png", "reports/evaluate/predictions_tuned.jsonl",
                 "reports/evaluate/report.md", "models/merged/model.safetensors", "models/merged/meta.json", "dvc.lock"):
        assert (root / path).exists(), path

    metrics = {p.stem: json.loads(p.read_text()) for p in (root / "metrics").glob("*.json")}
    assert metrics["ingest"]["lines_read"] == 60
    assert metrics["ingest"]["accepted"] + metrics["ingest"]["rejected"] + metrics["ingest"]["duplicates"] == 60
    assert metrics["template"]["eot_trained_fraction"] == 1.0
    assert 0 < metrics["template"]["trained_fraction"] < 1
    assert metrics["finetune"]["steps"] == 6 and 0 < metrics["finetune"]["trainable_fraction"] < 0.5
    for model in ("base", "tuned"):
        assert set(metrics["evaluate"][model]) >= {"exact_match", "bleu", "rouge_l", "loss", "perplexity"}
    assert metrics["merge"]["max_logit_difference"] <= 1e-3
    forgetting = metrics["forgetting"]
    assert forgetting["base_cached"] is False and forgetting["probe"]["passages"] == 64
    assert forgetting["base"]["loss_delta"] == 0 and forgetting["merged"]["loss"] == pytest.approx(forgetting["tuned"]["loss"], abs=1e-3)
    assert (root / "reports/forgetting/report.md").is_file() and (root / "reports/forgetting/loss.png").is_file()
    # The export: the merged weights with the complete card (evaluation and forgetting numbers in it).
    card = (root / "models/export/README.md").read_text()
    assert (root / "models/export/model.safetensors").read_bytes() == (root / "models/merged/model.safetensors").read_bytes()
    assert "| `tuned.exact_match` |" in card and "| `tuned.relative_loss_change` |" in card and "Scored downstream" not in card

    lineage = json.loads((root / "models/finetune/meta.json").read_text())
    assert lineage["parent"]["hash"] == json.loads((root / "models/base/meta.json").read_text())["hash"]
    # dapt is off by default: models/dapt passes the base through (meta.json only) and finetune starts from it.
    assert lineage["parent"]["path"] == "models/dapt" and metrics["dapt"] == {"enabled": 0}
    assert [p.name for p in (root / "models/dapt").iterdir()] == ["meta.json"]
    assert json.loads((root / "models/dapt/meta.json").read_text())["passthrough"] == "models/base"
    assert (root / "data/domain/corpus.txt").is_file()

    parents, children = runs_by_parent(root)
    assert len(parents) == 1
    stage_runs = children[parents[0].info.run_id]
    assert {r.data.tags["dvc.stage"] for r in stage_runs} == STAGE_RUNS
    assert all(r.info.status == "FINISHED" for r in stage_runs)
    finetune_run = next(r for r in stage_runs if r.info.run_name == "finetune")
    assert "finetune.lora.r" in finetune_run.data.params
    assert len(finetune_run.data.tags["data.train"]) == 16 and finetune_run.data.tags["method"] == "lora"
    assert "train_loss" in finetune_run.data.metrics
    assert "evaluate.tuned.exact_match" in parents[0].data.metrics
    assert "forgetting.tuned.relative_loss_change" in parents[0].data.metrics


def test_second_run_is_cached_but_still_reports_every_metric(project):
    root, env = project
    before = (root / "models/finetune/adapter_model.safetensors").stat().st_mtime_ns
    run_flow(root, env)

    parents, children = runs_by_parent(root)
    assert len(parents) == 2
    assert children[parents[1].info.run_id] == []  # nothing re-ran
    assert set(parents[1].data.metrics) == set(parents[0].data.metrics)
    assert (root / "models/finetune/adapter_model.safetensors").stat().st_mtime_ns == before
    status = subprocess.run(["dvc", "status"], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout
