"""Stage `merge`: fold the adapter into the base weights and write a standalone checkpoint.

    python -m stages.merge --model models/finetune --data data/tokenized --out models/merged \
        --metrics metrics/merge.json

The merged checkpoint loads with plain `transformers` (no peft). It is also logged to the stage's
MLflow run as a transformers model and registered as a new version of `merge.registered_model`, tagged with the
checkpoint's hash (skip with `registered_model: null`); the export stage points the alias `candidate` at
it once the model passed its quality gates (tunekit/registry.py). Before it is accepted, its logits
on held-out conversations are compared with the adapter model's; the stage fails if they differ by
more than `merge.atol`.

What happens depends on the method that wrote --model (its meta.json):
- lora, dora, ia3, qlora (and mergeable `peft` types): the adapter is merged into the base loaded in
  full precision; for qlora that is the original weights, not the 4-bit ones it was trained on, and
  the check compares with the adapter on that same full-precision base.
- full, freeze, head: the checkpoint already is standalone weights; it is written through unchanged
  (and checked the same way), so the pipeline's merged output exists for every method.
- task heads: the trained head(s) are kept and the check compares predictions (per task for multi-task)
  as well as logits. What is compared, and the full-precision base, are the task kind's
  (tunekit.tasks `merge_check`).
- adapter, prompt_tuning, prefix_tuning, p_tuning: refused, saying why and how to serve them instead
  (a warning, NOT_MERGED.md and a meta.json with `merged: false` in --out, no weights). The stage
  still succeeds, so evaluate and forgetting score the tuned model; they skip the refusal.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tunekit.card import write_card
from tunekit.checkpoints import CheckpointMeta
from tunekit.io import NOT_MERGED, atomic_dir, read_meta, write_json, write_meta
from tunekit.methods import method_of_checkpoint
from tunekit.models import load_causal_lm, load_tokenizer, set_threads
from tunekit.params import MergeParams, ProjectParams, load_section
from tunekit.registry import HASH_TAG
from tunekit.tasks import task_of
from tunekit.tracking import configure_logging, data_tags, log_checkpoint, log_datasets, log_metrics, stage_run

log = logging.getLogger("tunekit")


class MergeMismatch(Exception):
    pass


def run(params: MergeParams, model_dir: Path, data_dir: Path, out: Path) -> dict:
    set_threads(0)
    meta = CheckpointMeta.of_tuned(model_dir)
    method = method_of_checkpoint(meta.raw)
    if method.saves_adapter and not method.mergeable:
        return write_refusal(params, model_dir, out, method.name, method.why_not_mergeable)
    task = task_of(meta)
    method = task.retarget(method, meta.task)
    base_dir = meta.parent
    tokenizer = load_tokenizer(model_dir)
    check = task.merge_check(params, data_dir, tokenizer, meta.task)
    # Always the full-precision base (qlora included): merging into quantised weights would bake the quantisation in.
    model = method.checkpoint.load(model_dir, lambda: check.full_precision_base(base_dir))
    before = check.outputs(model, "adapter")
    merged = method.checkpoint.merge(model)

    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # Check the checkpoint as users will load it: from disk.
        after = check.outputs(check.load_merged(tmp), "merged")
        metrics, problem = check.compare(before, after, params.atol)
        if problem:
            raise MergeMismatch(problem)
        write_meta(tmp, "merge", params.model_dump(), parent=model_dir,
                   extra={"base": str(base_dir), "method": method.name, "max_logit_difference": metrics["max_logit_difference"],
                          **({"task": meta.raw["task"]} if "task" in meta.raw else {})})
        metrics = {"merged": 1, **metrics, **check.extras(method, model_dir, base_dir, after)}
        write_card(tmp, {"merge": metrics})
    return metrics


def write_refusal(params: MergeParams, model_dir: Path, out: Path, method: str, why: str) -> dict:
    """The output of a merge that cannot be: no weights, a meta.json with `merged: false` and a
    NOT_MERGED.md saying why and how to serve the adapter instead. The stage succeeds, so evaluate and
    forgetting still score the tuned model in the pipeline; they read `merged: false` and skip this."""
    reason = f"{model_dir}: method {method!r} cannot be merged into the base weights: {why}"
    log.warning("%s", reason)
    with atomic_dir(out) as tmp:
        (tmp / NOT_MERGED).write_text(f"# Not merged\n\n{reason}\n", encoding="utf-8")
        write_meta(tmp, "merge", params.model_dump(), parent=model_dir,
                   extra={"method": method, "merged": False, "reason": reason})
    return {"merged": 0}


def log_task_model(mlflow, model_dir: Path) -> None:
    """Task heads are logged as the checkpoint directory (artifact path `task_model`), not registered:
    mlflow.transformers needs a transformers pipeline, and tunekit's own pooling heads are no pipeline."""
    log.info("task head: mlflow.transformers cannot log it as a pipeline (custom pooling heads are not transformers "
             "classes); logging the merged checkpoint directory as artifacts (task_model/) instead of registering it. "
             "Load it with tunekit.tasks.load_task_model(dir)")
    mlflow.log_artifacts(str(model_dir), artifact_path="task_model")


def register_merged(mlflow, model_dir: Path, name: str) -> str:
    """Log the merged checkpoint to the active run as an MLflow transformers model (text-generation
    pipeline) and register it as a new version of `name`, tagged with the checkpoint's hash so that the
    export stage can make it the `candidate` after the gates (tunekit.registry.promote_candidate).
    Returns the version. Loads back offline with `mlflow.transformers.load_model("models:/<name>/<version>")`.

    The checkpoint is loaded from its absolute path: MLflow looks up a model card for the model's
    `name_or_path`, and a path is no valid hub id, so that look-up fails at once instead of asking the
    network. Requirements are pinned here rather than inferred (inference loads the model again in a
    subprocess).
    """
    from importlib.metadata import version

    from mlflow import transformers as mlflow_transformers
    from transformers import pipeline

    model_dir = model_dir.resolve()
    generator = pipeline("text-generation", model=load_causal_lm(model_dir, device="cpu"), tokenizer=load_tokenizer(model_dir))
    requirements = [f"{package}=={version(package)}" for package in ("torch", "transformers", "safetensors", "accelerate")]
    info = mlflow_transformers.log_model(generator, name="merged_model", registered_model_name=name,
                                         pip_requirements=requirements, await_registration_for=60)
    registered = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    meta = read_meta(model_dir) or {}
    for key, value in {"dvc.stage": "merge", "method": meta.get("method"), "checkpoint": str(model_dir),
                       HASH_TAG: meta.get("hash")}.items():
        if value:
            client.set_model_version_tag(name, registered, key, str(value))
    log.info("registered %s version %s from %s", name, registered, model_dir)
    return registered


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="finetune checkpoint (its meta.json names the base and method)")
    parser.add_argument("--data", type=Path, required=True, help="tokenised data directory (held-out examples)")
    parser.add_argument("--out", type=Path, required=True, help="merged checkpoint directory to write")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: MergeParams = load_section("merge")

    with stage_run("merge", project.experiment, params, tags=data_tags(check=args.data / "test")) as mlflow:
        metrics = run(params, args.model, args.data, args.out)
        write_json(args.metrics, metrics)
        log_metrics(mlflow, metrics)
        if not metrics["merged"]:
            mlflow.log_artifact(str(args.out / NOT_MERGED))
        elif not task_of(CheckpointMeta.read(args.model)).registrable:
            log_task_model(mlflow, args.out)
        elif params.registered_model:
            mlflow.set_tag("registered_model", f"{params.registered_model}/{register_merged(mlflow, args.out, params.registered_model)}")
        log_checkpoint(mlflow, args.out, "merged")
        log_datasets(mlflow, "tokenized", {"test": args.data / "test"})
    log.info("merged checkpoint written to %s: %s", args.out, metrics)


if __name__ == "__main__":
    main()
