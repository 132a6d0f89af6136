"""Try variants of the pipeline as DVC experiments, keep the best.

    python -m flows.variants --set finetune.lr=1e-3 --set finetune.lr=5e-3 --set "finetune.lr=1e-3 finetune.lora.r=32"
    python -m flows.variants --set finetune.lr=1e-3 --set finetune.lr=5e-3 --metric evaluate.tuned.loss --lower-is-better
    python -m flows.variants --set finetune.epochs=2 --no-apply        # compare only; leave the workspace alone

Each `--set` is one variant: one or more `key=value` param overrides separated by spaces. The flow
queues every variant (`dvc exp run --queue -S ...`), runs the queue (`dvc exp run --run-all`, each
experiment in its own temporary copy of the workspace, `--jobs` at a time), reads every experiment's
metrics from `dvc exp show --json`, picks the best by `--metric` (`<metrics file stem>.<key path>`,
e.g. `evaluate.tuned.exact_match` is `tuned.exact_match` in `metrics/evaluate.json`) and applies it to
the workspace (`dvc exp apply`): params.yaml, dvc.lock and the outputs are then the winner's, ready to
commit (`git add -A && git commit`) or `dvc exp push` to share. All experiments stay listed in
`dvc exp show` and, as stage runs, in MLflow (the experiments log to this project's store).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from tunekit.params import flatten
from tunekit.tracking import tracking_uri


class VariantsFailed(RuntimeError):
    pass


def _env() -> dict[str, str]:
    # Queued experiments run in temporary copies of the workspace: without an absolute store they would
    # each log to a throw-away mlflow.db inside their copy.
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(Path.cwd())}


def _dvc(*args: str) -> str:
    done = subprocess.run(["dvc", *args], capture_output=True, text=True, env=_env())
    if done.returncode != 0:
        raise VariantsFailed(f"dvc {' '.join(args)} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return done.stdout


def parse_variant(spec: str | list[str]) -> list[str]:
    overrides = spec.split() if isinstance(spec, str) else list(spec)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if not overrides or bad:
        raise ValueError(f"variant {spec!r}: give one or more key=value overrides, e.g. finetune.lr=1e-3 (bad: {bad})")
    return overrides


@task(cache_policy=NO_CACHE, task_run_name="queue {name}")
def queue(name: str, overrides: list[str]) -> str:
    get_run_logger().info("queueing %s: %s", name, " ".join(overrides))
    _dvc("exp", "run", "--queue", "--name", name, *[arg for o in overrides for arg in ("--set-param", o)])
    return name


@task(cache_policy=NO_CACHE, task_run_name="dvc exp run --run-all")
def run_queue(jobs: int) -> None:
    get_run_logger().info("running the queue, %d at a time", jobs)
    _dvc("exp", "run", "--run-all", "--jobs", str(jobs))


def experiment_scores(show: list[dict[str, Any]], metric: str) -> dict[str, float | None]:
    """Name -> value of `metric` for every experiment in `dvc exp show --json` output (None when the
    experiment failed or lacks the metric)."""
    scores: dict[str, float | None] = {}
    for baseline in show:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                name = rev.get("name") or rev.get("rev")
                data = rev.get("data") or {}
                if rev.get("error") or data.get("status") == "Failed":
                    scores[name] = None
                    continue
                flat: dict[str, Any] = {}
                for file, content in (data.get("metrics") or {}).items():
                    values = (content or {}).get("data") or {}
                    flat.update(flatten(Path(file).stem, values))
                value = flat.get(metric)
                scores[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return scores


@task(cache_policy=NO_CACHE)
def pick_best(names: list[str], metric: str, higher_is_better: bool) -> tuple[str, dict[str, float | None]]:
    scores = experiment_scores(json.loads(_dvc("exp", "show", "--json") or "[]"), metric)
    mine = {name: scores.get(name) for name in names}
    logger = get_run_logger()
    for name, value in mine.items():
        logger.info("%s: %s = %s", name, metric, "failed or missing" if value is None else f"{value:.6g}")
    scored = {n: v for n, v in mine.items() if v is not None}
    if not scored:
        raise VariantsFailed(f"no variant produced {metric!r}; scores: {mine}. `dvc exp show` lists them, "
                             "`dvc queue logs <name>` shows why one failed")
    best = (max if higher_is_better else min)(scored, key=scored.__getitem__)
    return best, mine


@task(cache_policy=NO_CACHE, task_run_name="dvc exp apply {name}")
def apply(name: str) -> None:
    _dvc("exp", "apply", name)


@flow(name="tunekit-variants", log_prints=True)
def variants(sets: list[str] | list[list[str]], metric: str = "evaluate.tuned.exact_match", higher_is_better: bool = True,
             apply_best: bool = True, jobs: int = 1, prefix: str | None = None) -> dict:
    """Queue one DVC experiment per entry of `sets`, run them, pick the best by `metric`, apply it."""
    parsed = [parse_variant(spec) for spec in sets]
    if not parsed:
        raise ValueError("give at least one variant")
    prefix = prefix or time.strftime("v%Y%m%d-%H%M%S")
    names = [queue(f"{prefix}-{i}", overrides) for i, overrides in enumerate(parsed, 1)]
    run_queue(jobs)
    best, scores = pick_best(names, metric, higher_is_better)
    if apply_best:
        apply(best)
    overrides = dict(zip(names, parsed))
    print(f"best of {len(names)} by {metric}: {best} ({' '.join(overrides[best])}) = {scores[best]:.6g}"
          + ("; applied to the workspace" if apply_best else ""))
    return {"best": best, "overrides": overrides[best], "scores": scores, "applied": apply_best}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="sets", action="append", required=True, metavar="KEY=VALUE [KEY=VALUE ...]",
                        help="one variant (repeat for more)")
    parser.add_argument("--metric", default="evaluate.tuned.exact_match", help="<metrics file stem>.<key path> to compare")
    parser.add_argument("--lower-is-better", action="store_true", help="pick the smallest value (losses)")
    parser.add_argument("--no-apply", action="store_true", help="do not apply the best experiment to the workspace")
    parser.add_argument("--jobs", type=int, default=1, help="experiments run at once (default: 1)")
    args = parser.parse_args(argv)
    variants(args.sets, metric=args.metric, higher_is_better=not args.lower_is_better,
             apply_best=not args.no_apply, jobs=args.jobs)


if __name__ == "__main__":
    main()
