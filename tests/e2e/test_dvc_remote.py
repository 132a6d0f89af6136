"""DVC remotes: the project's default remote, and a push / wipe / pull round trip that restores every
output byte for byte.

The tmp project carries the repository's own `.dvc/config`, so the default remote it tests is the
one users get: `local`, the directory `tunekit-dvc-remote` beside the project.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}

MAKE = """\
import os, pathlib, random, sys
out = pathlib.Path(sys.argv[1])
(out / "nested").mkdir(parents=True, exist_ok=True)
rng = random.Random(int(sys.argv[2]))
(out / "weights.bin").write_bytes(bytes(rng.getrandbits(8) for _ in range(200_000)))
(out / "nested" / "notes.txt").write_text("seed %s\\n" % sys.argv[2])
"""

DVC_YAML = """\
stages:
  make:
    cmd: python make.py out 7
    deps:
      - make.py
    outs:
      - out
"""


def digests(root: Path, *paths: str) -> dict[str, str]:
    found = {}
    for name in paths:
        path = root / name
        for file in sorted([path] if path.is_file() else path.rglob("*")):
            if file.is_file():
                found[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


@pytest.fixture()
def project(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    env = {**os.environ, **GIT_ENV, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def dvc(*args: str) -> str:
        done = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    subprocess.run(["git", "init", "-q"], cwd=root, env=env, check=True)
    dvc("init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    (root / "make.py").write_text(MAKE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "raw.csv").write_text("a,b\n1,2\n")
    dvc("add", "-q", "raw.csv")  # a tracked data file as well as a stage output
    return root, dvc, env


def test_default_remote_is_the_local_directory_beside_the_project(project):
    root, dvc, _ = project
    assert dvc("remote", "default").strip() == "local"
    url = dvc("config", "remote.local.url").strip()
    # A relative url is relative to the config file's directory, .dvc/: the remote sits beside the project.
    assert (root / ".dvc" / url).resolve() == (root.parent / "tunekit-dvc-remote").resolve()


def test_push_then_pull_after_wiping_cache_and_outputs_restores_them_byte_identical(project):
    root, dvc, env = project
    dvc("repro", "-q")
    subprocess.run(["git", "add", "-A"], cwd=root, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "tiny"], cwd=root, env=env, check=True)
    before = digests(root, "out", "raw.csv")
    assert len(before) == 3

    dvc("push")
    remote = root.parent / "tunekit-dvc-remote"
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= 4  # 3 files + the directory's manifest

    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(root / "out")
    (root / "raw.csv").unlink()
    assert not (root / "out").exists() and not (root / "raw.csv").exists()

    dvc("pull")
    assert digests(root, "out", "raw.csv") == before
    assert "up to date" in dvc("status")
    # The restored outputs match dvc.lock, so nothing needs to run again.
    assert "didn't change" in dvc("repro")
