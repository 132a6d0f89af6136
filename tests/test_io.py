"""tunekit.io's provenance helpers against a real git repository."""

import subprocess

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
