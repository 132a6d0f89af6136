"""Stage `finetune`: train the base checkpoint on the tokenised conversations with `finetune.method`.

    python -m stages.finetune --model models/base --data data/tokenized --out models/finetune \
        --metrics metrics/finetune.json --plots reports/finetune --checkpoints checkpoints/finetune

The method (tunekit.methods) decides how the base is loaded, what is trained and what is saved: an
adapter on top of the base, or full weights; meta.json records which, for evaluate and merge.

Killed runs resume from the newest checkpoint under --checkpoints that matches the same params,
data and base model; the finished output is written atomically, so DVC never sees a partial one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from tunekit.io import atomic_dir, content_hash, read_jsonl, read_meta, write_json, write_meta
from tunekit.methods import Method, method_for, parameter_counts
from tunekit.models import load_tokenizer, set_threads
from tunekit.params import FinetuneParams, ProjectParams, load_section
from tunekit.plots import loss_curve_png, write_csv
from tunekit.tracking import configure_logging, data_tags, log_metrics, stage_run
from tunekit.train import TrainConfig, train

log = logging.getLogger("tunekit")


def run_key(params: FinetuneParams, seed: int, base_hash: str, data_hashes: dict[str, str]) -> str:
    """Checkpoints are only resumed by a run with the same params, seed, base and data."""
    blob = json.dumps({"params": params.model_dump(), "seed": seed, "base": base_hash, "data": data_hashes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_output(out: Path, method: Method, model: torch.nn.Module, tokenizer, params: dict, model_dir: Path,
                 data_hashes: dict[str, str]) -> None:
    """The method's checkpoint (adapter or full weights), the tokenizer, and meta.json saying which it is."""
    method.checkpoint.save(model, out)
    tokenizer.save_pretrained(out)
    write_meta(out, "finetune", params, parent=model_dir, data=data_hashes,
               extra={"method": method.name, "mergeable": method.mergeable, "saves_adapter": method.saves_adapter,
                      "full_forward": method.full_forward})


def run(params: FinetuneParams, seed: int, model_dir: Path, data_dir: Path, out: Path,
        plots: Path, checkpoints: Path) -> tuple[dict, dict]:
    threads = set_threads(params.threads)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    method = method_for(params)
    model = method.prepare(method.load_base(model_dir), params)
    counts = parameter_counts(model)
    log.info("method %s: %d of %d parameters trainable (%.3f%%)", method.name, counts["trainable_parameters"],
             counts["total_parameters"], 100 * counts["trainable_fraction"])

    train_rows = list(read_jsonl(data_dir / "train.jsonl"))
    val_rows = list(read_jsonl(data_dir / "validation.jsonl"))
    if not train_rows:
        raise SystemExit(f"{data_dir / 'train.jsonl'} holds no examples: check the ingest and template metrics")
    data_hashes = {name: content_hash(data_dir / f"{name}.jsonl") for name in ("train", "validation")}
    base_hash = (read_meta(model_dir) or {}).get("hash") or content_hash(model_dir)
    ckpt_dir = checkpoints / run_key(params, seed, base_hash, data_hashes)

    cfg = TrainConfig(
        epochs=params.epochs, lr=params.lr, batch_size=params.batch_size, grad_accum=params.grad_accum,
        max_steps=params.max_steps, schedule=params.schedule, warmup_ratio=params.warmup_ratio,
        weight_decay=params.weight_decay, max_grad_norm=params.max_grad_norm, eval_every=params.eval_every,
        early_stopping_patience=params.early_stopping_patience, checkpoint_every=params.checkpoint_every, seed=seed,
        full_forward=method.full_forward,
    )
    started = time.perf_counter()
    state = train(model, train_rows, val_rows, cfg, tokenizer.pad_token_id, ckpt_dir)
    seconds = time.perf_counter() - started

    with atomic_dir(out) as tmp:
        write_json(tmp / "history.json", {"train": state.history, "validation": state.evals})
        write_output(tmp, method, model, tokenizer, {"seed": seed, **params.model_dump()}, model_dir, data_hashes)
    write_csv(plots / "train_loss.csv", state.history, ["step", "train_loss"])
    write_csv(plots / "val_loss.csv", state.evals, ["step", "val_loss"])
    loss_curve_png(plots / "loss.png", state.history, state.evals, f"finetune ({method.name})")
    shutil.rmtree(ckpt_dir, ignore_errors=True)

    tokens = sum(h["tokens"] for h in state.history)
    metrics = {
        **counts,
        "steps": state.step,
        "stopped_early": int(state.stopped_early),
        "best_step": state.best_step or state.step,
        "best_val_loss": state.best_loss if state.best_loss is not None else float("nan"),
        "final_train_loss": state.history[-1]["train_loss"],
        "trained_tokens": tokens,
        "train_seconds": seconds,
        "trained_tokens_per_second": tokens / max(seconds, 1e-9),
        "threads": threads,
    }
    return metrics, {"history": state.history, "evals": state.evals}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="base checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="tokenised data directory (train/validation.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="directory for loss CSVs and PNG")
    parser.add_argument("--checkpoints", type=Path, required=True, help="resumable checkpoints (outside DVC outputs)")
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: FinetuneParams = load_section("finetune")

    tags = {"method": params.method, **data_tags(train=args.data / "train.jsonl", validation=args.data / "validation.jsonl")}
    with stage_run("finetune", project.experiment, params, tags=tags) as mlflow:
        metrics, curves = run(params, project.seed, args.model, args.data, args.out, args.plots, args.checkpoints)
        write_json(args.metrics, metrics)
        log_metrics(mlflow, metrics)
        for point in curves["history"]:
            mlflow.log_metrics({"train_loss": point["train_loss"], "lr": point["lr"]}, step=point["step"])
        for point in curves["evals"]:
            mlflow.log_metric("val_loss", point["val_loss"], step=point["step"])
        mlflow.log_artifact(str(args.plots / "loss.png"))
    log.info("finetune done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})


if __name__ == "__main__":
    main()
