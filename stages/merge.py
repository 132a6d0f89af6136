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
  as well as logits.
- adapter, prompt_tuning, prefix_tuning, p_tuning: refused, saying why and how to serve them instead
  (a warning, NOT_MERGED.md and a meta.json with `merged: false` in --out, no weights). The stage
  still succeeds, so evaluate and forgetting score the tuned model; they skip the refusal.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from tunekit.card import write_card
from tunekit.io import NOT_MERGED, atomic_dir, read_jsonl, read_meta, write_json, write_meta
from tunekit.methods import method_of_checkpoint
from tunekit.models import load_causal_lm, load_tokenizer, set_threads
from tunekit.params import MergeParams, ProjectParams, load_section
from tunekit.registry import HASH_TAG
from tunekit.tracking import configure_logging, data_tags, log_checkpoint, log_datasets, log_metrics, stage_run
from tunekit.train import collate

log = logging.getLogger("tunekit")


class MergeMismatch(Exception):
    pass


@torch.no_grad()
def logits_on(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on the CPU (where the checks compare them), whichever device it computes on."""
    model.eval()
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits.float().cpu()


def max_logit_difference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |a - b| over real (non-padding) positions."""
    return float((a - b).abs().amax(dim=-1)[mask.bool()].max())


def trained_token_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Mean next-token cross-entropy over the trained (labelled) tokens."""
    targets = batch["labels"][:, 1:]
    selected = targets != -100
    return float(torch.nn.functional.cross_entropy(logits[:, :-1][selected].float(), targets[selected]))


def qlora_drift(method, model_dir: Path, base_dir: Path, batch: dict[str, torch.Tensor],
                merged_logits: torch.Tensor) -> dict:
    """How far the merged full-precision checkpoint is from the QLoRA model as it was trained (the
    adapter on the 4-bit NF4 base): max and mean |logit| difference over real tokens, and the loss over
    trained tokens of both (loss_difference = merged - quantised). The merge itself is exact (checked
    against the adapter on the full-precision base); this is the quantisation error the merge removes."""
    quantised = method.checkpoint.load(model_dir, lambda: method.load_base(base_dir))
    quantised_logits = logits_on(quantised, batch)
    del quantised
    difference = (quantised_logits.float() - merged_logits.float()).abs()[batch["attention_mask"].bool()]
    loss_quantised, loss_merged = trained_token_loss(quantised_logits, batch), trained_token_loss(merged_logits, batch)
    drift = {"max_logit_difference": float(difference.max()), "mean_logit_difference": float(difference.mean()),
             "loss_quantised": loss_quantised, "loss_merged": loss_merged, "loss_difference": loss_merged - loss_quantised}
    log.info("qlora drift, 4-bit adapter model vs merged full-precision checkpoint: %s", drift)
    return drift


def run(params: MergeParams, model_dir: Path, data_dir: Path, out: Path) -> dict:
    set_threads(0)
    meta = read_meta(model_dir)
    if meta is None or not meta.get("parent"):
        raise SystemExit(f"{model_dir}/meta.json is missing or names no parent checkpoint; re-run the finetune stage")
    method = method_of_checkpoint(meta)
    if method.saves_adapter and not method.mergeable:
        return write_refusal(params, model_dir, out, method.name, method.why_not_mergeable)
    if (meta.get("task") or {}).get("type", "sft") != "sft":
        return merge_task(params, model_dir, data_dir, out, meta, method)
    base_dir = Path(meta["parent"]["path"])
    tokenizer = load_tokenizer(model_dir)
    rows = check_rows(params, data_dir)
    batch = collate(rows, tokenizer.pad_token_id)  # held-out splits are never packed: one conversation per row

    # Always the full-precision base: merging into quantised weights would bake the quantisation in.
    adapter_model = method.checkpoint.load(model_dir, lambda: load_causal_lm(base_dir))
    adapter_logits = logits_on(adapter_model, batch)
    merged = method.checkpoint.merge(adapter_model)

    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # Check the checkpoint as users will load it: from disk, with plain transformers.
        reloaded_logits = logits_on(load_causal_lm(tmp), batch)
        difference = max_logit_difference(adapter_logits, reloaded_logits, batch["attention_mask"])
        log.info("largest |logit| difference, adapter vs merged checkpoint: %.3g (tolerance %.3g)", difference, params.atol)
        if not difference <= params.atol:
            raise MergeMismatch(
                f"merged model differs from the adapter model by {difference:.4g} > merge.atol={params.atol}: "
                "the merged checkpoint was not written. Check the adapter and base match (meta.json lineage)."
            )
        write_meta(tmp, "merge", params.model_dump(), parent=model_dir,
                   extra={"base": str(base_dir), "method": method.name, "max_logit_difference": difference})
        metrics = {"merged": 1, "max_logit_difference": difference, "checked_examples": len(rows),
                   "checked_tokens": int(batch["attention_mask"].sum())}
        if method.name == "qlora":
            metrics["qlora_drift"] = qlora_drift(method, model_dir, base_dir, batch, reloaded_logits)
        write_card(tmp, {"merge": metrics})
    return metrics


def check_rows(params: MergeParams, data_dir: Path, task: str | None = None) -> list[dict]:
    """The held-out rows the merged checkpoint is checked on: test, else validation (multi-task: those
    of `task`)."""
    def held_out(split: str) -> list[dict]:
        return [row for row in read_jsonl(data_dir / f"{split}.jsonl")
                if task is None or row.get("task") == task][:params.check_examples]

    rows = held_out("test") or held_out("validation")
    if not rows:
        raise SystemExit(f"{data_dir}: no test or validation examples{f' of task {task}' if task else ''} to check the merge on")
    return rows


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


# ---------------------------------------------------------------- task heads (task.type != sft)


def record_task_merge(tmp: Path, params: MergeParams, model_dir: Path, base_dir: Path, method: str, meta: dict,
                      difference: float, same: bool, checked: int, **extra) -> dict:
    """meta.json, metrics and model card of an accepted task-head merge (one head or several)."""
    write_meta(tmp, "merge", params.model_dump(), parent=model_dir,
               extra={"base": str(base_dir), "method": method, "max_logit_difference": difference, "task": meta["task"]})
    metrics = {"merged": 1, "task_head": 1, "max_logit_difference": difference, "predictions_identical": int(same),
               "checked_examples": checked, **extra}
    write_card(tmp, {"merge": metrics})
    return metrics


def merge_task(params: MergeParams, model_dir: Path, data_dir: Path, out: Path, meta: dict, method) -> dict:
    """A task checkpoint as one standalone model WITH its head: PEFT's merge_and_unload folds the adapter
    into the base and keeps the trained head (modules_to_save); full checkpoints are written through.
    Accepted only when the merged checkpoint, reloaded with tunekit.heads.load_task_model, predicts
    exactly what the adapter model predicts on held-out rows, with logits within merge.atol."""
    from tunekit.heads import TaskSpec, load_task_base, load_task_model, max_logit_difference, predict, predicted_classes

    if meta["task"]["type"] == "multi_task":
        return merge_multitask(params, model_dir, data_dir, out, meta, method)
    spec = TaskSpec.from_meta(meta["task"])
    base_dir = Path(meta["parent"]["path"])
    tokenizer = load_tokenizer(model_dir)
    rows = check_rows(params, data_dir)
    # Always the full-precision base (qlora included): merging into 4-bit weights would bake the quantisation in.
    if method.saves_adapter:
        model = method.checkpoint.load(model_dir, lambda: load_task_base(base_dir, spec))
    else:
        model = load_task_model(model_dir, spec)
    before, _ = predict(model, rows, spec, tokenizer.pad_token_id, params.check_examples, desc="predict (adapter)")
    merged = method.checkpoint.merge(model)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        after, _ = predict(load_task_model(tmp, spec), rows, spec, tokenizer.pad_token_id, params.check_examples,
                           desc="predict (merged)")
        difference = max_logit_difference(before, after)
        same = predicted_classes(before, spec) == predicted_classes(after, spec)
        log.info("%s head: largest |logit| difference, adapter vs merged checkpoint: %.3g (tolerance %.3g); "
                 "predictions identical: %s", spec.type, difference, params.atol, same)
        if not (difference <= params.atol and same):
            raise MergeMismatch(
                f"merged {spec.type} model differs from the adapter model (largest logit difference {difference:.4g}, "
                f"merge.atol={params.atol}, identical predictions: {same}): the merged checkpoint was not written. "
                "Check that the adapter and base match (meta.json lineage).")
        metrics = record_task_merge(tmp, params, model_dir, base_dir, method.name, meta, difference, same, len(rows))
    return metrics


def merge_multitask(params: MergeParams, model_dir: Path, data_dir: Path, out: Path, meta: dict, method) -> dict:
    """A multi-task checkpoint as one standalone MultiTaskModel: the adapter folded into the shared
    backbone, every trained head kept (full checkpoints are written through). Accepted only when the
    merged checkpoint, reloaded with tunekit.heads.load_multitask_model, predicts for every task exactly
    what the adapter model predicts on that task's held-out rows (merge.check_examples per task), with
    logits within merge.atol."""
    from tunekit.heads import (load_multitask_model, max_logit_difference, multitask_method, multitask_specs, one_task,
                               predict, predicted_classes)

    specs = multitask_specs(meta["task"])
    method = multitask_method(method, specs)
    base_dir = Path(meta["parent"]["path"])
    tokenizer = load_tokenizer(model_dir)
    rows = {name: check_rows(params, data_dir, name) for name in specs}
    # Always the full-precision base: merging into quantised weights would bake the quantisation in.
    model = method.checkpoint.load(model_dir, lambda: method.load_base(base_dir))

    def predictions(model, label: str) -> dict[str, list]:
        return {name: predict(one_task(model, name), rows[name], spec, tokenizer.pad_token_id, params.check_examples,
                              desc=f"predict ({label}, {name})")[0] for name, spec in specs.items()}

    before = predictions(model, "adapter")
    merged = method.checkpoint.merge(model)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        after = predictions(load_multitask_model(tmp), "merged")
        checks = {name: {"max_logit_difference": max_logit_difference(before[name], after[name]),
                         "predictions_identical": int(predicted_classes(before[name], spec) == predicted_classes(after[name], spec)),
                         "checked_examples": len(rows[name])} for name, spec in specs.items()}
        difference = max(check["max_logit_difference"] for check in checks.values())
        same = all(check["predictions_identical"] for check in checks.values())
        log.info("multi-task heads: per task, largest |logit| difference adapter vs merged checkpoint and identical "
                 "predictions: %s (tolerance %.3g)", checks, params.atol)
        if not (difference <= params.atol and same):
            bad = sorted(name for name, check in checks.items()
                         if not (check["max_logit_difference"] <= params.atol and check["predictions_identical"]))
            raise MergeMismatch(
                f"merged multi-task model differs from the adapter model on task(s) {bad} ({ {n: checks[n] for n in bad} }, "
                f"merge.atol={params.atol}): the merged checkpoint was not written. Check that the adapter and base "
                "match (meta.json lineage).")
        metrics = record_task_merge(tmp, params, model_dir, base_dir, method.name, meta, difference, same,
                                    sum(check["checked_examples"] for check in checks.values()), tasks=checks)
    return metrics


def log_task_model(mlflow, model_dir: Path) -> None:
    """Task heads are logged as the checkpoint directory (artifact path `task_model`), not registered:
    mlflow.transformers needs a transformers pipeline, and tunekit's own pooling heads are no pipeline."""
    log.info("task head: mlflow.transformers cannot log it as a pipeline (custom pooling heads are not transformers "
             "classes); logging the merged checkpoint directory as artifacts (task_model/) instead of registering it. "
             "Load it with tunekit.heads.load_task_model(dir) (multi-task: load_multitask_model(dir))")
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

    with stage_run("merge", project.experiment, params, tags=data_tags(check=args.data / "test.jsonl")) as mlflow:
        metrics = run(params, args.model, args.data, args.out)
        write_json(args.metrics, metrics)
        log_metrics(mlflow, metrics)
        if not metrics["merged"]:
            mlflow.log_artifact(str(args.out / NOT_MERGED))
        elif metrics.get("task_head"):
            log_task_model(mlflow, args.out)
        elif params.registered_model:
            mlflow.set_tag("registered_model", f"{params.registered_model}/{register_merged(mlflow, args.out, params.registered_model)}")
        log_checkpoint(mlflow, args.out, "merged")
        log_datasets(mlflow, "tokenized", {"test": args.data / "test.jsonl"})
    log.info("merged checkpoint written to %s: %s", args.out, metrics)


if __name__ == "__main__":
    main()
