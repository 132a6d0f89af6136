"""The variants flow on a tiny DVC project: queue three param overrides as DVC experiments, run the
queue, pick the best by a metric read from `dvc exp show --json`, and apply it to the workspace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.variants import experiment_scores, parse_variant
from tests.conftest import REPO

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}

# Stands in for finetune + evaluate: the score peaks at lr = 5e-3.
SCORE = """\
import json, pathlib, yaml
params = yaml.safe_load(open("params.yaml"))["finetune"]
score = 1 - abs(params["lr"] - 5e-3) * 100 + params["bonus"]
pathlib.Path("metrics").mkdir(exist_ok=True)
json.dump({"tuned": {"exact_match": score}}, open("metrics/evaluate.json", "w"))
"""

DVC_YAML = """\
stages:
  evaluate:
    cmd: python score.py
    deps: [score.py]
    params: [finetune]
    metrics:
      - metrics/evaluate.json:
          cache: false
"""


def test_parse_variant_and_scores_from_exp_show():
    assert parse_variant("finetune.lr=1e-3 finetune.lora.r=32") == ["finetune.lr=1e-3", "finetune.lora.r=32"]
    with pytest.raises(ValueError, match="key=value"):
        parse_variant("finetune.lr")
    show = [{"rev": "workspace", "experiments": None},
            {"rev": "abc", "experiments": [
                {"revs": [{"rev": "1", "name": "a", "data": {"metrics": {"metrics/evaluate.json": {"data": {"tuned": {"exact_match": 0.5}}}}}}]},
                {"revs": [{"rev": "2", "name": "b", "error": {"msg": "failed"}, "data": {}}]},
                {"revs": [{"rev": "3", "name": "c", "data": {"metrics": {}}}]}]}]
    assert experiment_scores(show, "evaluate.tuned.exact_match") == {"a": 0.5, "b": None, "c": None}


@pytest.mark.slow
def test_variants_flow_runs_the_queue_and_applies_the_best(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    for name in ("flows", "tunekit"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "score.py").write_text(SCORE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(yaml.safe_dump({"finetune": {"lr": 1e-4, "bonus": 0.0}}))
    (root / ".gitignore").write_text("mlflow.db\n.prefect/\n__pycache__/\n")
    env = {**os.environ, **GIT_ENV, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_HOME": str(root / ".prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "baseline"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)

    done = subprocess.run([sys.executable, "-m", "flows.variants", "--set", "finetune.lr=1e-3",
                           "--set", "finetune.lr=5e-3", "--set", "finetune.lr=1e-2 finetune.bonus=0.1"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "best of 3 by evaluate.tuned.exact_match" in output and "(finetune.lr=5e-3)" in output, output[-3000:]

    # Applied: the workspace now holds the winner's params and metrics.
    assert yaml.safe_load((root / "params.yaml").read_text())["finetune"]["lr"] == pytest.approx(5e-3)
    assert json.loads((root / "metrics/evaluate.json").read_text())["tuned"]["exact_match"] == pytest.approx(1.0)
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=root, env=env, capture_output=True, text=True, check=True)
    scores = experiment_scores(json.loads(shown.stdout), "evaluate.tuned.exact_match")
    assert len(scores) == 3 and all(v is not None for v in scores.values())
