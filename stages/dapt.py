"""Stage `dapt`: domain-adaptive continued pretraining of the base on raw domain text.

    python -m stages.dapt --model models/base --data data/packed --out models/dapt --metrics metrics/dapt.json \
        --plots reports/dapt --checkpoints checkpoints/dapt

The `pack` stage has tokenised the documents of `dapt.inputs` into blocks of `dapt.block_size` tokens with
eos between documents (<data>/train and <data>/validation, `datasets` on disk); this stage reads them
memory-mapped, and the model learns every token but each block's first, with `dapt.method` (lora or
full). The held-out share (`dapt.validation`): its perplexity before and after is the stage's headline number.
`dapt.replay_ratio` mixes general text (pydoc prose) into training against forgetting. A LoRA run is
merged, so the output is always a plain full checkpoint that later stages load like the base.

With `dapt.enabled: false` the output is a pass-through: a directory holding only meta.json that
names the base (`"passthrough"`), which tunekit.models.resolve_checkpoint follows; no weights are copied.
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

from tunekit.checkpoints import checkpoint_hash, run_key
from tunekit.forgetting import load_probe
from tunekit.io import atomic_dir, read_meta, without_timings, write_json, write_meta
from tunekit.methods import get_method, parameter_counts
from tunekit.models import PASSTHROUGH, compute_device, load_causal_lm, load_tokenizer, set_threads
from tunekit.params import DaptParams, FinetuneParams, ProjectParams, load_section
from tunekit.plots import loss_curve_png, write_csv
from tunekit.text import Chained, TextError, open_packed, pack
from tunekit.tracking import configure_logging, log_curves, log_metrics, stage_run
from tunekit.train import BF16_ON_CPU, TrainConfig, evaluate_loss, train

log = logging.getLogger("tunekit")

PACKED_PARAMS = ("inputs", "block_size", "validation")  # what the pack stage's blocks were made with
REPLAY_PROBE = "pydoc"  # general text replayed against forgetting: tunekit.forgetting's default probe


def blocks_hash(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps([row["input_ids"] for row in rows]).encode()).hexdigest()


def replay_blocks(tokenizer, block_size: int, count: int) -> list[dict]:
    """`count` blocks of general text (pydoc prose, passages in hash order), packed like the domain text."""
    if count == 0:
        return []
    passages = load_probe(REPLAY_PROBE, 10**6).passages  # every passage, in its deterministic hash order
    stream: list[int] = []
    for passage in passages:  # tokenise only as much as the blocks need
        if len(stream) >= count * block_size:
            break
        stream.extend(([tokenizer.eos_token_id] if stream else []) + tokenizer(passage, add_special_tokens=False)["input_ids"])
    blocks = pack(stream, block_size)
    if len(blocks) < count:
        log.warning("replay: only %d general-text blocks available, %d asked for", len(blocks), count)
    return blocks[:count]


def write_plots(plots: Path, history: list[dict], evals: list[dict], title: str) -> None:
    write_csv(plots / "train_loss.csv", history, ["step", "train_loss"])
    write_csv(plots / "val_loss.csv", evals, ["step", "val_loss"])
    loss_curve_png(plots / "loss.png", history, evals, title)


def pass_through(params: DaptParams, model_dir: Path, out: Path, plots: Path) -> dict:
    """meta.json only: the base unchanged, named by path, with the base's hash as its own (same model)."""
    with atomic_dir(out) as tmp:
        write_meta(tmp, "dapt", params.model_dump(), parent=model_dir,
                   extra={PASSTHROUGH: str(model_dir), "hash": checkpoint_hash(model_dir)})
    write_plots(plots, [], [], "dapt disabled: base passed through")
    return {"enabled": 0}


def run(params: DaptParams, seed: int, model_dir: Path, packed: Path, out: Path, plots: Path,
        checkpoints: Path) -> tuple[dict, dict]:
    if not params.enabled:
        log.info("dapt.enabled is false: %s passes %s through unchanged (no weights copied)", out, model_dir)
        return pass_through(params, model_dir, out, plots), {"history": [], "evals": []}
    started = time.perf_counter()
    device = compute_device()
    if params.precision == "bf16" and device.type != "cuda":
        raise SystemExit(BF16_ON_CPU.replace("finetune.", "dapt."))
    threads = set_threads(params.threads)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id

    try:
        meta, train_blocks, val_blocks = open_packed(packed, {k: getattr(params, k) for k in PACKED_PARAMS})
    except TextError as exc:
        raise SystemExit(str(exc)) from None
    replay = replay_blocks(tokenizer, params.block_size, round(params.replay_ratio * len(train_blocks)))
    train_rows = Chained(train_blocks, replay)
    scored = val_blocks or train_blocks  # perplexity before/after: held-out blocks, else the training blocks
    if not val_blocks:
        log.warning("dapt.validation is 0 (or too few blocks): perplexity before/after is measured on the training blocks")
    log.info("%d documents, %d tokens -> %d blocks of %d (%d train, %d validation; packed in %s) + %d replay blocks",
             meta["documents"], meta["tokens"], meta["blocks"], params.block_size, len(train_blocks), len(val_blocks),
             packed, len(replay))

    method = get_method(params.method)
    model = method.prepare(load_causal_lm(model_dir, device=device), FinetuneParams(method=params.method, lora=params.lora))
    counts = parameter_counts(model)
    before = evaluate_loss(model, scored, pad_id, params.batch_size)
    log.info("domain perplexity before: %.3f", before["perplexity"])

    data_hash = hashlib.sha256(f"{meta['hash']} {blocks_hash(replay)}".encode()).hexdigest()  # packed blocks + replay
    ckpt_dir = checkpoints / run_key(params.model_dump(), seed, checkpoint_hash(model_dir), data_hash)
    cfg = TrainConfig(**params.loop_config(), lr=params.learning_rate, seed=seed)
    train_started = time.perf_counter()
    state = train(model, train_rows, val_blocks, cfg, pad_id, ckpt_dir)
    train_seconds = time.perf_counter() - train_started

    if method.saves_adapter:
        model = method.checkpoint.merge(model)  # LoRA folded in: later stages see a plain model
    after = evaluate_loss(model, scored, pad_id, params.batch_size)
    log.info("domain perplexity after: %.3f", after["perplexity"])

    with atomic_dir(out) as tmp:
        model.cpu().save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "history.json", {"train": state.history, "validation": state.evals})
        write_meta(tmp, "dapt", {"seed": seed, **params.model_dump(), "lr": cfg.lr}, parent=model_dir,
                   data={"blocks": data_hash, "packed": meta["hash"], "inputs": meta["data"]["inputs"]},
                   extra={"method": params.method, "merged": method.saves_adapter})
    write_plots(plots, state.history, state.evals, f"dapt ({params.method})")
    shutil.rmtree(ckpt_dir, ignore_errors=True)

    metrics = {
        "enabled": 1,
        **counts,
        "documents": meta["documents"],
        "tokens": meta["tokens"],
        "blocks": meta["blocks"],
        "train_blocks": len(train_blocks),
        "validation_blocks": len(val_blocks),
        "replay_blocks": len(replay),
        "lr": cfg.lr,
        "steps": state.step,
        "stopped_early": int(state.stopped_early),
        "best_step": state.best_step or state.step,
        "trained_tokens": sum(h["tokens"] for h in state.history),
        "loss_before": before["loss"],
        "loss_after": after["loss"],
        "perplexity_before": before["perplexity"],
        "perplexity_after": after["perplexity"],
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - started,
        "threads": threads,
    }
    return metrics, {"history": state.history, "evals": state.evals}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="base checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="the pack stage's output (packed train/validation blocks)")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="directory for loss CSVs and PNG")
    parser.add_argument("--checkpoints", type=Path, required=True, help="resumable checkpoints (outside DVC outputs)")
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: DaptParams = load_section("dapt")

    tags = {"enabled": str(params.enabled).lower(), "method": params.method}
    if params.enabled and (read_meta(args.data) or {}).get("enabled"):
        tags["data.inputs"] = read_meta(args.data)["data"]["inputs"][:16]
    with stage_run("dapt", project.experiment, params, tags=tags, system_metrics=params.enabled) as mlflow:
        metrics, curves = run(params, project.seed, args.model, args.data, args.out, args.plots, args.checkpoints)
        write_json(args.metrics, without_timings(metrics))
        log_metrics(mlflow, metrics)
        log_curves(mlflow, curves)
        if metrics["enabled"]:
            mlflow.log_artifact(str(args.plots / "loss.png"))
    log.info("dapt done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})


if __name__ == "__main__":
    main()
