"""Stage `finetune`: train the base checkpoint on the tokenised conversations with `finetune.method`.

    python -m stages.finetune --model models/base --data data/tokenized --out models/finetune \
        --metrics metrics/finetune.json --plots reports/finetune --checkpoints checkpoints/finetune

The method (tunekit.methods) decides how the base is loaded, what is trained and what is saved: an
adapter on top of the base, or full weights; meta.json records which, for evaluate and merge.
What is trained is the task kind's (tunekit.tasks, `task.type`): the objective (the causal-LM loss for
sft; a new head's loss on the base for a head kind; for multi_task one shared backbone with a head per
task of `task.tasks`, each batch drawn from one task with probability proportional to its weight) and
the method re-targeted at the kind's model, or refused with the reason.

Killed runs resume from the newest checkpoint under --checkpoints that matches the same params,
data and base model; the finished output is written atomically, so DVC never sees a partial one.

Several processes: `finetune.processes: N` (N > 1) makes the stage re-launch itself as
`python -m torch.distributed.run --standalone --nproc_per_node N -m stages.finetune <same args>`;
each worker joins a gloo (CPU) or nccl (CUDA) process group, trains its shard of every global batch
(batch_size * grad_accum * N rows per optimizer step; see tunekit/train/) and rank 0 alone writes
checkpoints, outputs, plots, metrics and the MLflow run. Multi-GPU recipes (DDP, FSDP, DeepSpeed):
docs/multi_gpu.md.

A head kind's run ends with the label-prior check: a warning when, by task.collapse.check_after of the
planned steps, the validation loss has not fallen below the loss of always predicting the train split's
label frequencies (metrics label_prior_loss, below_label_prior).

Optional extras (finetune.*): replay rows of general text in every batch, and a forgetting curve
(probe loss every N steps: MLflow metric `probe_loss`, forgetting_curve.csv/.png under --plots).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from tunekit.card import write_card
from tunekit.checkpoints import checkpoint_hash, run_key
from tunekit.collapse import prior_check
from tunekit.data import configure as configure_datasets
from tunekit.data import read_split
from tunekit.io import atomic_dir, content_hash, without_timings, write_json, write_meta
from tunekit.methods import Method, method_for, parameter_counts
from tunekit.models import compute_device, load_tokenizer, set_threads
from tunekit.params import FinetuneParams, ProjectParams, TaskParams, TemplateParams, load_section
from tunekit.plots import forgetting_curve_png, loss_curve_png, write_csv
from tunekit.tasks import Task, task_for
from tunekit.tracking import (configure_logging, data_tags, log_checkpoint, log_curves, log_datasets, log_metrics,
                              stage_run)
from tunekit.train import BF16_ON_CPU, TrainConfig, barrier, dist_info, replay_lm_rows, total_steps, train

log = logging.getLogger("tunekit")


def write_output(out: Path, method: Method, model: torch.nn.Module, tokenizer, params: dict, model_dir: Path,
                 data_hashes: dict[str, str], task: dict | None = None) -> None:
    """The method's checkpoint (adapter or full weights), the tokenizer, and meta.json saying which it is
    (and, for task heads, the task kind's meta: tunekit.tasks Training.meta)."""
    method.checkpoint.save(model, out)
    tokenizer.save_pretrained(out)
    write_meta(out, "finetune", params, parent=model_dir, data=data_hashes,
               extra={"method": method.name, "mergeable": method.mergeable, "saves_adapter": method.saves_adapter,
                      "full_forward": method.full_forward, **({"task": task} if task else {})})


def check_general_text(task: Task, task_params: TaskParams, params: FinetuneParams) -> None:
    if task.no_general_text and (params.replay.ratio > 0 or params.forgetting_every_n_steps):
        raise SystemExit(f"task.type {task_params.type}: {task.no_general_text}; set finetune.replay.ratio: 0 and "
                         "finetune.forgetting_every_n_steps: null")


def general_text_rows(params: FinetuneParams, tokenizer, replay_max_length: int) -> tuple[list[dict], list[dict]]:
    """(replay rows, probe rows) from tunekit.forgetting's probe loaders. Replay passages never include
    the probe's passages, so the forgetting curve measures text the model was not trained on."""
    from tunekit.forgetting import load_probe, tokenize_probe

    probe_rows: list[dict] = []
    held_out: set[str] = set()
    if params.forgetting_every_n_steps or params.replay.ratio > 0:
        probe = load_probe(params.probe.source, params.probe.passages)
        held_out = set(probe.passages)
        if params.forgetting_every_n_steps:
            probe_rows = tokenize_probe(probe, tokenizer, params.probe.max_length)
    replay_rows: list[dict] = []
    if params.replay.ratio > 0:
        passages = [p for p in load_probe(params.replay.source, 10**9).passages if p not in held_out]
        ids = tokenizer(passages, truncation=True, max_length=replay_max_length)["input_ids"] if passages else []
        replay_rows = replay_lm_rows(ids, replay_max_length)
        if not replay_rows:
            raise SystemExit(f"finetune.replay.source {params.replay.source!r}: no passage left for replay after "
                             f"leaving out the {len(held_out)} probe passages (finetune.probe)")
        log.info("replay: %d general-text rows from %s, %d of every %d rows per batch", len(replay_rows),
                 params.replay.source, round(params.replay.ratio * params.batch_size * params.processes),
                 params.batch_size * params.processes)
    return replay_rows, probe_rows


def run(params: FinetuneParams, seed: int, model_dir: Path, data_dir: Path, out: Path,
        plots: Path, checkpoints: Path, template_max_length: int = 512,
        task_params: TaskParams | None = None) -> tuple[dict, dict]:
    rank, world = dist_info()
    device = compute_device()
    if params.precision == "bf16" and device.type != "cuda":
        raise SystemExit(BF16_ON_CPU)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # threads 0 = all cores, shared evenly by the processes of one run
    threads = set_threads(params.threads or (max(1, (os.cpu_count() or 1) // world) if world > 1 else 0))
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    method = method_for(params)
    configure_datasets()
    train_rows = read_split(data_dir, "train")  # memory-mapped; batches come from its length column
    val_rows = read_split(data_dir, "validation")
    if not train_rows:
        raise SystemExit(f"{data_dir / 'train'} holds no examples: check the ingest and template metrics")
    task_params = task_params or TaskParams()
    task = task_for(task_params)
    check_general_text(task, task_params, params)
    training = task.training(task_params, params, method, model_dir, data_dir, train_rows)
    method = training.method
    model = method.prepare(method.load_base(model_dir, device=device), params)  # qlora on CUDA: bf16 compute
    counts = parameter_counts(model)
    log.info("method %s: %d of %d parameters trainable (%.3f%%)", method.name, counts["trainable_parameters"],
             counts["total_parameters"], 100 * counts["trainable_fraction"])

    data_hashes = {name: content_hash(data_dir / name) for name in ("train", "validation")}
    task_data = {"task": json.dumps(training.meta)} if training.meta else {}
    ckpt_dir = checkpoints / run_key(params.model_dump(), seed, checkpoint_hash(model_dir), {**data_hashes, **task_data})
    replay_rows, probe_rows = general_text_rows(params, tokenizer, params.replay.max_length or template_max_length)

    cfg = TrainConfig(
        **params.loop_config(), lr=params.lr, seed=seed, full_forward=method.full_forward,
        layer_lr_decay=params.layer_lr_decay, head_lr=params.head_lr, l2_to_init=params.l2_to_init, replay_ratio=params.replay.ratio,
        forgetting_every=params.forgetting_every_n_steps,
        objective=training.objective,
    )
    started = time.perf_counter()
    state = train(model, train_rows, val_rows, cfg, tokenizer.pad_token_id, ckpt_dir,
                  replay_rows=replay_rows or None, probe_rows=probe_rows or None)
    seconds = time.perf_counter() - started

    if rank == 0:  # the other ranks hold the same weights and history; one writer
        with atomic_dir(out) as tmp:
            write_json(tmp / "history.json", {"train": state.history, "validation": state.evals,
                                              **({"probe": state.probes} if state.probes else {})})
            write_output(tmp, method, model.cpu() if device.type == "cuda" and method.name != "qlora" else model,
                         tokenizer, {"seed": seed, **params.model_dump()}, model_dir, data_hashes, training.meta)
            write_card(tmp, {"finetune": counts})
        write_csv(plots / "train_loss.csv", state.history, ["step", "train_loss"])
        write_csv(plots / "val_loss.csv", state.evals, ["step", "val_loss"])
        loss_curve_png(plots / "loss.png", state.history, state.evals, f"finetune ({method.name})")
        # Always written (header only when the curve is off) so dvc.yaml can declare it as a plot.
        write_csv(plots / "forgetting_curve.csv", state.probes, ["step", "probe_loss"])
        if state.probes:
            forgetting_curve_png(plots / "forgetting_curve.png", state.probes,
                                 f"forgetting curve ({method.name}): loss on {params.probe.source}")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    barrier()

    # What the loss was averaged over (the kind's loss unit): trained tokens for SFT; for task heads the objective's count, i.e.
    # examples (classification), windows (qa) or labelled tokens (token classification), mixed for multi-task.
    trained = sum(h["tokens"] for h in state.history)
    unit = training.loss_unit
    metrics = {
        **counts,
        "steps": state.step,
        "stopped_early": int(state.stopped_early),
        "best_step": state.best_step or state.step,
        "best_val_loss": state.best_loss if state.best_loss is not None else float("nan"),
        "final_train_loss": state.history[-1]["train_loss"],
        f"trained_{unit}": trained,
        "train_seconds": seconds,
        f"trained_{unit}_per_second": trained / max(seconds, 1e-9),
        "threads": threads,
    }
    if world > 1:
        metrics["processes"] = world
    if state.probes:
        metrics["probe_loss_start"] = state.probes[0]["probe_loss"]
        metrics["probe_loss_final"] = state.probes[-1]["probe_loss"]
    if replay_rows:
        metrics["replay_tokens"] = sum(h.get("replay_tokens", 0) for h in state.history)
    if rank == 0:  # one warning, not one per process
        metrics.update(prior_loss_check(state.evals, total_steps(len(train_rows), cfg, world), training.prior_loss,
                                        task_params.collapse))
    return metrics, {"history": state.history, "evals": state.evals, "probes": state.probes}


def prior_loss_check(evals: list[dict], planned_steps: int, prior: float | None, params) -> dict:
    """The collapse warning of a task head (tunekit.collapse.prior_check): a warning in the log when the
    validation loss did not fall below the loss of always predicting the train split's label frequencies by
    task.collapse.check_after of the planned steps; the figures as metrics (none when there is no figure)."""
    check = prior_check(evals, planned_steps, prior, params)
    if check.get("skipped"):
        log.info("label-prior check skipped: %s", check["skipped"])
    if not check["checked"]:
        return {"label_prior_loss": check["prior"]} if check.get("prior") is not None else {}
    if check["reason"]:
        log.warning("finetune: %s", check["reason"])
    else:
        log.info("validation loss %.4g by step %d, below the label prior's %.4g: the head learned more than the label "
                 "frequencies", check["best"], check["step"], check["prior"])
    return {"label_prior_loss": check["prior"], "below_label_prior": check["below"],
            "val_loss_at_prior_check": check["best"]}


def torchrun_command(processes: int, argv: list[str]) -> list[str]:
    """The command that runs this stage as `processes` workers on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "stages.finetune", *argv]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="base checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="tokenised data directory (a `datasets` directory per split)")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="directory for loss CSVs and PNG")
    parser.add_argument("--checkpoints", type=Path, required=True, help="resumable checkpoints (outside DVC outputs)")
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: FinetuneParams = load_section("finetune")
    template: TemplateParams = load_section("template")  # replay rows are cut to template.max_length by default

    if params.processes > 1 and "LOCAL_RANK" not in os.environ:
        gpus = torch.cuda.device_count() if compute_device().type == "cuda" else 0
        if 0 < gpus < params.processes:
            raise SystemExit(f"finetune.processes is {params.processes} but {gpus} GPU(s) are visible: each worker needs its "
                             f"own GPU (NCCL refuses two ranks on one). Set finetune.processes to at most {gpus}, or "
                             "TUNEKIT_DEVICE=cpu to run the workers on the CPU with gloo")
        command = torchrun_command(params.processes, list(sys.argv[1:] if argv is None else argv))
        log.info("finetune.processes = %d: %s", params.processes, " ".join(command))
        raise SystemExit(subprocess.call(command))
    distributed = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if compute_device().type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=30))
    rank, world = dist_info()
    log.info("rank %d of %d", rank, world)
    if rank != 0:
        logging.getLogger("tunekit").setLevel(logging.WARNING)  # one voice in the log

    tags = {"method": params.method, **data_tags(train=args.data / "train", validation=args.data / "validation")}
    tracked = stage_run("finetune", project.experiment, params, tags=tags, system_metrics=True) if rank == 0 \
        else contextlib.nullcontext()
    try:
        with tracked as mlflow:
            metrics, curves = run(params, project.seed, args.model, args.data, args.out, args.plots, args.checkpoints,
                                  template.max_length, load_section("task"))
            if rank == 0:
                write_json(args.metrics, without_timings(metrics))
                log_metrics(mlflow, metrics)
                log_curves(mlflow, curves)
                mlflow.log_artifact(str(args.plots / "loss.png"))
                if curves["probes"]:
                    mlflow.log_artifact(str(args.plots / "forgetting_curve.png"))
                log_datasets(mlflow, "tokenized", {s: args.data / s for s in ("train", "validation")})
                log_checkpoint(mlflow, args.out, "finetune")
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if rank == 0:
        log.info("finetune done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})


if __name__ == "__main__":
    main()
