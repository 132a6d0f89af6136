"""`dvc plots show` renders the loss curves and the forgetting plot offline: with the project's
.dvc/config (`plots.html_template`) plain `dvc plots show`, like `python -m tunekit.dvc_plots`, makes
a page that references no http(s) script (DVC's default page does: the negative control), and
headless Chromium, on a machine without internet, draws the Vega charts.

The plot files are written by the project's own plot writers (tunekit.plots, tunekit.forgetting) at
the paths the project's dvc.yaml declares, in a fresh git + DVC repository.
"""

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.test_mlflow_compare import CHROMIUM, CHROMIUM_FLAGS
from tunekit.forgetting import loss_bar_png
from tunekit.plots import loss_curve_png, write_csv

SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?https?://", re.IGNORECASE)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("plots")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    history = [{"step": s, "train_loss": 2.0 / s, "lr": 1e-3} for s in range(1, 11)]
    evals = [{"step": s, "val_loss": 2.2 / s} for s in (5, 10)]
    finetune = root / "reports" / "finetune"
    finetune.mkdir(parents=True)
    write_csv(finetune / "train_loss.csv", history, ["step", "train_loss"])
    write_csv(finetune / "val_loss.csv", evals, ["step", "val_loss"])
    loss_curve_png(finetune / "loss.png", history, evals, "finetune (lora)")
    (root / "reports" / "forgetting").mkdir()
    loss_bar_png(root / "reports" / "forgetting" / "loss.png",
                 {name: {"loss": loss, "loss_delta": loss - 3.36, "relative_loss_change": (loss - 3.36) / 3.36}
                  for name, loss in (("base", 3.36), ("tuned", 3.52), ("merged", 3.52))}, "probe loss")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root, env


def show(root: Path, env: dict, *command: str) -> str:
    done = subprocess.run([*command, "-o", "out"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (root / "out" / "index.html").read_text(encoding="utf-8")


def test_dvc_default_page_needs_a_cdn(workspace):  # the negative control for the check below
    root, env = workspace
    page = show(root, env, "dvc", "plots", "show")
    assert SCRIPT_SRC.search(page)


def repo_plots_config() -> str:
    """The [plots] section of the project's own .dvc/config."""
    parser = configparser.ConfigParser()
    parser.read(REPO / ".dvc" / "config")
    return f"[plots]\n    html_template = {parser['plots']['html_template']}\n"


@pytest.mark.parametrize("command", ["dvc plots show", "python -m tunekit.dvc_plots"])
def test_offline_page_inlines_vega_and_shows_loss_and_forgetting_plots(workspace, tmp_path, command):
    root, env = workspace
    if command == "dvc plots show":
        # Plain `dvc plots show`, with the project's .dvc/config setting and the template make setup writes.
        subprocess.run([sys.executable, "-m", "tunekit.dvc_plots", "--template-only"], cwd=root, env=env, check=True,
                       capture_output=True)
        (root / ".dvc" / "config.local").write_text(repo_plots_config(), encoding="utf-8")
        try:
            page = show(root, env, "dvc", "plots", "show")
        finally:
            (root / ".dvc" / "config.local").unlink()
    else:
        page = show(root, env, sys.executable, "-m", "tunekit.dvc_plots", "--", "show")
    assert not SCRIPT_SRC.search(page), SCRIPT_SRC.search(page)
    assert "window.vegaEmbed=" in page and page.count("vegaEmbed(") >= 2  # the bundle, and one call per chart
    for plot in ("reports/finetune/train_loss.csv", "reports/finetune/val_loss.csv"):
        assert plot in page, plot
    assert re.search(r"<img[^>]+reports_forgetting_loss\.png|<img[^>]+src=\"data:image/png", page)
    assert "reports/forgetting/loss.png" in page and "reports/finetune/loss.png" in page

    if CHROMIUM is None:
        if os.environ.get("TUNEKIT_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does this)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                           "--virtual-time-budget=10000", "--dump-dom", (root / "out" / "index.html").as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    # vega-embed replaced each chart's empty div with a drawn chart (an SVG or canvas of marks)
    drawn = re.findall(r"<(?:svg|canvas)[^>]*class=\"marks\"", done.stdout)
    assert len(drawn) >= 2, done.stdout[:3000]
