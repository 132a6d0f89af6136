"""Stage `merge`: fold the adapter into the base weights and write a standalone checkpoint.

    python -m stages.merge --model models/finetune --data data/tokenized --out models/merged \
        --metrics metrics/merge.json

The merged checkpoint loads with plain `transformers` (no peft). It is also logged to the stage's
MLflow run as a transformers model and registered as a new version of `merge.registered_model`, with
the alias `candidate` (skip with `registered_model: null`). Before it is accepted, its logits
on held-out conversations are compared with the adapter model's; the stage fails if they differ by
more than `merge.atol`.

What happens depends on the method that wrote --model (its meta.json):
- lora, dora, ia3, qlora (and mergeable `peft` types): the adapter is merged into the base loaded in
  full precision; for qlora that is the original weights, not the 4-bit ones it was trained on, and
  the check compares with the adapter on that same full-precision base.
- full, freeze, head: the checkpoint already is standalone weights; it is written through unchanged
  (and checked the same way), so the pipeline's merged output exists for every method.
- adapter, prompt_tuning, prefix_tuning, p_tuning: refused, saying why and how to serve them instead.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from tunekit.io import atomic_dir, read_jsonl, read_meta, write_json, write_meta
from tunekit.methods import method_of_checkpoint
from tunekit.models import load_causal_lm, load_tokenizer, set_threads
from tunekit.params import MergeParams, ProjectParams, load_section
from tunekit.tracking import configure_logging, data_tags, log_metrics, stage_run
from tunekit.train import collate

log = logging.getLogger("tunekit")


class MergeMismatch(Exception):
    pass


@torch.no_grad()
def logits_on(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def max_logit_difference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |a - b| over real (non-padding) positions."""
    return float((a - b).abs().amax(dim=-1)[mask.bool()].max())


def run(params: MergeParams, model_dir: Path, data_dir: Path, out: Path) -> dict:
    set_threads(0)
    meta = read_meta(model_dir)
    if meta is None or not meta.get("parent"):
        raise SystemExit(f"{model_dir}/meta.json is missing or names no parent checkpoint; re-run the finetune stage")
    method = method_of_checkpoint(meta)
    if method.saves_adapter and not method.mergeable:
        raise SystemExit(f"{model_dir}: method {method.name!r} cannot be merged into the base weights: {method.why_not_mergeable}")
    base_dir = Path(meta["parent"]["path"])
    tokenizer = load_tokenizer(model_dir)
    rows = list(read_jsonl(data_dir / "test.jsonl"))[:params.check_examples] or \
        list(read_jsonl(data_dir / "validation.jsonl"))[:params.check_examples]
    if not rows:
        raise SystemExit(f"{data_dir}: no test or validation examples to check the merge on")
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
    return {"max_logit_difference": difference, "checked_examples": len(rows),
            "checked_tokens": int(batch["attention_mask"].sum())}


REGISTRY_ALIAS = "candidate"


def register_merged(mlflow, model_dir: Path, name: str) -> str:
    """Log the merged checkpoint to the active run as an MLflow transformers model (text-generation
    pipeline), register it as a new version of `name` and point the alias `candidate` at it.
    Returns the version. Loads back offline with `mlflow.transformers.load_model("models:/<name>@candidate")`.

    The checkpoint is loaded from its absolute path: MLflow looks up a model card for the model's
    `name_or_path`, and a path is no valid hub id, so that look-up fails at once instead of asking the
    network. Requirements are pinned here rather than inferred (inference loads the model again in a
    subprocess).
    """
    from importlib.metadata import version

    from mlflow import transformers as mlflow_transformers
    from transformers import pipeline

    model_dir = model_dir.resolve()
    generator = pipeline("text-generation", model=load_causal_lm(model_dir), tokenizer=load_tokenizer(model_dir))
    requirements = [f"{package}=={version(package)}" for package in ("torch", "transformers", "safetensors", "accelerate")]
    info = mlflow_transformers.log_model(generator, name="merged_model", registered_model_name=name,
                                         pip_requirements=requirements, await_registration_for=60)
    registered = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, REGISTRY_ALIAS, registered)
    meta = read_meta(model_dir) or {}
    for key, value in {"dvc.stage": "merge", "method": meta.get("method"), "checkpoint": str(model_dir)}.items():
        if value:
            client.set_model_version_tag(name, registered, key, str(value))
    log.info("registered %s version %s (alias %r) from %s", name, registered, REGISTRY_ALIAS, model_dir)
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
        if params.registered_model:
            mlflow.set_tag("registered_model", f"{params.registered_model}/{register_merged(mlflow, args.out, params.registered_model)}")
    log.info("merged checkpoint written to %s: %s", args.out, metrics)


if __name__ == "__main__":
    main()
