"""A tiny copy of this project in a temporary directory (git + DVC initialised, tiny Llama as the base),
for tests that run the Prefect flow end to end. The params are tests/e2e/test_pipeline.py's tiny ones."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO
from tests.e2e.test_pipeline import GIT_ENV, tiny_params


def build_project(root: Path, model_dir: Path, tracking_uri: str | None = None, **sections: dict) -> tuple[Path, dict]:
    """`root` becomes a git + DVC repository holding stages/, tunekit/, flows/, dvc.yaml and tiny params
    (each keyword updates that params section). Returns (root, env to run the flow and dvc in)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("stages", "tunekit", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())
    write_params(root, model_dir, **sections)
    env = {**os.environ, **GIT_ENV,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": tracking_uri or f"sqlite:///{root / 'mlflow.db'}",
           "PREFECT_HOME": str(root / ".prefect"),
           # the flow starts a temporary Prefect server; on a loaded 2-core machine it can need more than 20 s
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
           "PYTHONPATH": ""}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "tiny project"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root, env


def write_params(root: Path, model_dir: Path, **sections: dict) -> None:
    """Update the project's params.yaml (tiny params from this repository's at first: later edits to the
    repository's params.yaml must not reach a project whose code was copied before them)."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text()) if path.exists() else tiny_params(model_dir)
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
