"""Benchmark: tunekit's training loop against TRL's SFTTrainer + PEFT on the same model, data and settings.

    pip install -r requirements-bench.txt          # TRL (and datasets), kept out of the main lock
    python bench/sft_vs_trl.py                     # default: 3 repetitions of every data set (~15 min, 2 idle cores)
    python bench/sft_vs_trl.py --quick             # 1 repetition, fewer rows: a smoke run
    python bench/sft_vs_trl.py --full              # the issue's sizes (64 single-turn chats, ...): ~1 h
    python bench/sft_vs_trl.py --reps 5 --sets variable demo
    python bench/sft_vs_trl.py --trainers ours trl-nogc   # against one reference only
    python bench/sft_vs_trl.py --device cuda --precision bf16 --sets long --max-length 2048 --trainers ours trl trl-best

Two references, each in its own processes: TRL with its defaults (`trl`: full-layer gradient checkpointing
on) and TRL's fastest valid CPU setting (`trl-nogc`: the same with gradient_checkpointing=False, what a user
with memory to spare runs). Our speed is compared with both; our memory with the defaults'. On a GPU a third:
TRL's strongest valid setting there (`trl-best`: gradient checkpointing, padding_free=True and
use_liger_kernel=True; refused on the CPU, where liger-kernel's Triton kernels do not run), and the same
without Liger (`trl-padfree`, which runs on the CPU too). bench/gpu_suite.py
drives these on one GPU within a fixed time budget (bench/GPU.md).

Both trainers get the same rows: the template stage's functions (stages.template.encode_split) render,
tokenise and mask each conversation once, and the same input_ids and loss mask go to both (TRL as a
pre-tokenised dataset with `assistant_masks`, so it trains exactly the tokens we train). Everything
else TRL does is its own default (padding to the longest row of a random batch, gradient checkpointing,
its fused LM head), except what the comparison pins: fp32, batch 4, max length 512, the pipeline's LoRA
config (finetune.lora: r=16 all-linear), learning rate, schedule, warm-up, clipping, one epoch, seed,
threads. Ours runs tunekit.train.train, the finetune stage's code path, with finetune.* from params.yaml
(batch size 4, one epoch).

Ours runs as a stage does: `import stages` first, which turns on PyTorch's transparent-huge-page CPU
allocation (THP_MEM_ALLOC_ENABLE=1, stages/__init__.py); TRL runs with PyTorch's default unless --trl-thp
(the control: the same allocator setting for TRL).

Every run is a fresh subprocess (peak RSS = that child's ru_maxrss from os.wait4); the trainers take
turns, the order rotating by one each repetition (ours first in the first). Validation loss after the epoch is
scored for both with one function (tunekit.train.evaluate_loss: mean over trained tokens).

Results: bench/results/latest.json and latest.md (and a timestamped copy of each).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
SETS = ("variable", "multiturn", "demo")  # the default run; "long" (chats up to 2048 tokens) is asked for by name
ALL_SETS = SETS + ("long",)
# (train, validation) rows per set; demo: (records generated, 0), split by ingest as in the pipeline.
# The default keeps a whole invocation near 15 minutes on 2 idle cores, where TRL runs at ~60 tokens/s:
# every repetition trains each set twice (ours and TRL), so each set holds ~5k tokens.
SIZES = {
    "quick": {"variable": (8, 4), "multiturn": (8, 4), "demo": (30, 0), "long": (8, 4)},
    "default": {"variable": (24, 12), "multiturn": (12, 6), "demo": (60, 0), "long": (16, 8)},
    "full": {"variable": (64, 16), "multiturn": (32, 8), "demo": (400, 0), "long": (64, 16)},
    # On a GPU an epoch of the sets above lasts about a second: mostly start-up, not training.
    "large": {"variable": (1024, 64), "multiturn": (512, 32), "demo": (4000, 0), "long": (384, 32)},
}
# The trainers, in the order of the first repetition; every trainer but ours is a reference.
TRAINERS = {
    "ours": "tunekit",
    "trl": "TRL SFTTrainer (defaults: gradient checkpointing)",
    "trl-nogc": "TRL SFTTrainer, gradient_checkpointing=False",
    "trl-best": "TRL SFTTrainer, gradient checkpointing + padding_free + Liger kernels",
    "trl-padfree": "TRL SFTTrainer, gradient checkpointing + padding_free (no Liger)",
}
# Trainers that cannot run on the CPU, and why (the refusal names the alternative).
CUDA_ONLY = {"trl-best": "use_liger_kernel needs liger-kernel's Triton kernels, which run on GPUs only; "
                         "on the CPU compare with trl and trl-nogc"}
# Run only when named in --trainers (bench/gpu_suite.py's fallback when trl-best fails).
OPT_IN = {"trl-padfree"}
REFERENCES = tuple(t for t in TRAINERS if t != "ours")
# Issue 17's CPU targets on set (a): speed against TRL's fastest setting, memory against its defaults,
# and our achieved FLOP/s as a share of the measured matmul peak.
TARGETS = {"speed_vs_fastest": 2.0, "peak_rss_vs_defaults": 1.0, "fraction_of_peak": 0.55}
SET_TITLES = {
    "variable": "(a) single-turn chats, 5-200 words each side",
    "multiturn": "(b) multi-turn chats, long system prompts",
    "demo": "(c) demo task (order note -> JSON)",
    "long": "(d) chats of 1-3 exchanges, up to 2048 tokens",
}


# ---------------------------------------------------------------- data (deterministic)


def _words() -> list[str]:
    """Real English prose to cut chats from: the Python Language Reference shipped with every Python
    (pydoc_data.topics, the text behind help()), so tokenisation looks like real text."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics))
    return re.findall(r"[A-Za-z][A-Za-z'\-]*[.,;:]?", text)


def _span(rng: random.Random, words: list[str], n: int) -> str:
    start = rng.randrange(len(words) - n)
    return " ".join(words[start:start + n])


def variable_chats(n: int, seed: int) -> list[dict]:
    """(a) single-turn chats, user and assistant each 5-200 words (uniform)."""
    rng, words = random.Random(seed), _words()
    return [{"id": f"v{i}", "messages": [
        {"role": "user", "content": _span(rng, words, rng.randint(5, 200))},
        {"role": "assistant", "content": _span(rng, words, rng.randint(5, 200))},
    ]} for i in range(n)]


def multiturn_chats(n: int, seed: int) -> list[dict]:
    """(b) a long system prompt (120-260 words) and 2-4 short exchanges (5-40 words each side): most
    tokens are prompt, which only the decoder (not the LM head) has to process."""
    rng, words = random.Random(seed + 1), _words()
    chats = []
    for i in range(n):
        messages = [{"role": "system", "content": _span(rng, words, rng.randint(120, 260))}]
        for _ in range(rng.randint(2, 4)):
            messages.append({"role": "user", "content": _span(rng, words, rng.randint(5, 40))})
            messages.append({"role": "assistant", "content": _span(rng, words, rng.randint(5, 40))})
        chats.append({"id": f"m{i}", "messages": messages})
    return chats


def long_chats(n: int, seed: int) -> list[dict]:
    """(d) 1-3 exchanges, each message 5 to 850/exchanges words (uniform): at most 1,700 words (~2,000
    tokens of this prose with SmolLM2's tokenizer) per chat, so lengths spread from about a hundred tokens
    to the 2048 cap, where padding to the longest row of a batch wastes most."""
    rng, words = random.Random(seed + 2), _words()
    chats = []
    for i in range(n):
        exchanges = rng.randint(1, 3)
        messages = []
        for _ in range(exchanges):
            messages.append({"role": "user", "content": _span(rng, words, rng.randint(5, 850 // exchanges))})
            messages.append({"role": "assistant", "content": _span(rng, words, rng.randint(5, 850 // exchanges))})
        chats.append({"id": f"l{i}", "messages": messages})
    return chats


def demo_splits(records: int, seed: int, work: Path) -> dict[str, list[dict]]:
    """(c) the demo task as the pipeline makes it: tunekit.demo.generate -> tunekit.ingest.ingest."""
    from tunekit.demo import generate
    from tunekit.ingest import ingest
    from tunekit.data import read_split
    from tunekit.io import write_jsonl
    from tunekit.params import load_section

    params = load_section("ingest")
    raw = work / "demo-raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_jsonl(raw / "orders.jsonl", generate(records, seed))
    ingest(raw, work / "demo-ingested", max_chars=params.max_chars, max_reject_rate=params.max_reject_rate,
           validation=params.validation, test=params.test)
    return {split: list(read_split(work / "demo-ingested", split)) for split in ("train", "validation")}


def tokenized(records: list[dict], tokenizer, split: str, max_length: int = 512) -> list[dict]:
    """The template stage's rows (input_ids, labels) for `records`, with template.* from params.yaml
    (max_length from the argument: the benchmark's, not the pipeline's)."""
    from tunekit.tasks.sft import encode_split
    from tunekit.chat import resolve_chat_template
    from tunekit.params import load_section

    params = load_section("template").model_copy(update={"max_length": max_length})
    chat_template = resolve_chat_template(params.chat_template, tokenizer)
    with tempfile.TemporaryDirectory() as work:
        kept, _, _ = encode_split(records, tokenizer, chat_template, params, split, Path(work))
        return [{"input_ids": ids, "labels": labels} for ids, labels in zip(kept["input_ids"], kept["labels"])]


def build_sets(names: list[str], sizes: dict[str, tuple[int, int]], model_dir: Path, work: Path, seed: int,
               max_length: int = 512) -> dict:
    from tunekit.data import write_rows
    from tunekit.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    out = {}
    for name in names:
        n_train, n_val = sizes[name]
        if name == "variable":
            chats = variable_chats(n_train + n_val, seed)
            splits = {"train": chats[:n_train], "validation": chats[n_train:]}
        elif name in ("multiturn", "long"):
            chats = (multiturn_chats if name == "multiturn" else long_chats)(n_train + n_val, seed)
            splits = {"train": chats[:n_train], "validation": chats[n_train:]}
        else:
            splits = demo_splits(n_train, seed, work)  # n_train = demo records before the split
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        info = {"dir": str(d)}
        for split, records in splits.items():
            rows = tokenized(records, tokenizer, split, max_length)
            write_rows(d / split, rows)
            info[split] = {"rows": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows),
                           "longest": max((len(r["input_ids"]) for r in rows), default=0),
                           "trained_tokens": sum(sum(x != -100 for x in r["labels"][1:]) for r in rows)}
        out[name] = info
    return out


def base_model_dir(requested: str | None) -> Path:
    """models/base from an earlier pipeline run, or the embedded SmolLM2 converted once into a cache dir."""
    if requested:
        return Path(requested)
    local = ROOT / "models" / "base"
    if (local / "model.safetensors").is_file():
        return local
    cache = Path(tempfile.gettempdir()) / "tunekit-bench-base"
    if not (cache / "model.safetensors").is_file():
        from tunekit.models import load_source

        model, tokenizer, _, _ = load_source("embedded")
        tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    return cache


# ---------------------------------------------------------------- FLOPs


def flops_model(model) -> dict[str, float]:
    """Per-token FLOP constants of a LoRA model, from its modules.

    frozen: sum of in*out over the frozen Linear layers inside the decoder (forward 2*N, input-gradient
    backward 2*N: 4*N per token; no weight gradient). lora: sum of r*(in+out) (forward 2x, backward 4x:
    6x per token). head: vocab*hidden (forward + input gradient: 4x, only at trained positions).
    attn: n_layers * heads*head_dim (attention is 12 * this * context per query, forward + backward).
    """
    import torch

    frozen = lora = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            base = module.base_layer
            frozen += base.in_features * base.out_features
            for key, a in module.lora_A.items():
                lora += a.out_features * (base.in_features + module.lora_B[key].out_features)
        elif (isinstance(module, torch.nn.Linear) and ".layers." in name and "lora_" not in name
              and not name.endswith("base_layer")):
            frozen += module.in_features * module.out_features
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"frozen": float(frozen), "lora": float(lora), "head": float(config.vocab_size * config.hidden_size),
            "attn": float(config.num_hidden_layers * config.num_attention_heads * head_dim)}


def epoch_flops(rows: list[dict], constants: dict[str, float]) -> float:
    """Forward + backward FLOPs of one epoch over `rows`, real tokens only (padding is not useful work)."""
    tokens = sum(len(r["input_ids"]) for r in rows)
    trained = sum(sum(x != -100 for x in r["labels"][1:]) for r in rows)
    context = sum(len(r["input_ids"]) * (len(r["input_ids"]) + 1) / 2 for r in rows)  # causal: keys per query
    return (tokens * (4 * constants["frozen"] + 6 * constants["lora"]) + trained * 4 * constants["head"]
            + 12 * constants["attn"] * context)


def matmul_peak(threads: int, size: int = 2048, tries: int = 5, device: str = "cpu", precision: str = "fp32") -> float:
    """Best FLOP/s of a size^3 matmul: fp32 on the CPU; on CUDA in the training precision (bf16 or fp32)."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# ---------------------------------------------------------------- one training run (child process)


def _rows(path: Path) -> list[dict]:
    """The rows of a tokenised split (a `datasets` directory, tunekit.data) as a list: the benchmark hands
    the same rows to both trainers."""
    from tunekit.data import read_split

    return list(read_split(path.parent, path.name))


def finetune_params(args):
    """finetune.* from params.yaml, with --lora-dropout applied: the same LoRA config for both trainers."""
    from tunekit.params import load_section

    params = load_section("finetune")
    if args.lora_dropout is not None:
        params = params.model_copy(update={"lora": params.lora.model_copy(update={"dropout": args.lora_dropout})})
    return params


def child_ours(args, train_rows, val_rows) -> dict:
    import torch

    from tunekit.methods import method_for
    from tunekit.models import load_tokenizer
    from tunekit.params import load_section
    from tunekit.train import TrainConfig, evaluate_loss, train

    params = finetune_params(args).model_copy(update={"batch_size": args.batch_size, "epochs": 1.0, "max_steps": None,
                                                      "grad_accum": 1})
    seed = load_section("project").seed
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(args.model)
    method = method_for(params)
    model = method.prepare(method.load_base(args.model), params)
    extra = json.loads(args.ours_options or "{}")
    cfg = TrainConfig(**{**params.loop_config(), "lr": params.lr, "seed": seed, "full_forward": method.full_forward,
                         "precision": args.precision, **extra})
    with tempfile.TemporaryDirectory() as ckpt:
        start = time.perf_counter()
        # No validation rows: both trainers are timed on the epoch alone and scored afterwards alike.
        state = train(model, train_rows, [], cfg, tokenizer.pad_token_id, Path(ckpt))
        seconds = time.perf_counter() - start
    val = evaluate_loss(model, val_rows, tokenizer.pad_token_id, args.batch_size)["loss"]
    losses = [h["train_loss"] for h in state.history]
    tokens = [h["tokens"] for h in state.history]
    return {"seconds": seconds, "steps": state.step, "final_train_loss": losses[-1],
            "mean_train_loss": sum(loss * t for loss, t in zip(losses, tokens)) / max(sum(tokens), 1), "val_loss": val,
            "flops": epoch_flops(train_rows, flops_model(model))}


def child_trl(args, train_rows, val_rows) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tunekit.methods import _lora_config
    from tunekit.models import load_tokenizer
    from tunekit.params import load_section
    from tunekit.train import evaluate_loss

    params = finetune_params(args)
    seed = load_section("project").seed
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    # Pre-tokenised: TRL skips its own templating and builds labels from this mask, so both trainers
    # train exactly the same tokens.
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "assistant_masks": [int(x != -100) for x in r["labels"]]}
                                 for r in train_rows])
    options = json.loads(args.trl_options or "{}")
    if args.child == "trl-nogc":  # TRL's fastest valid CPU setting: nothing recomputed
        options.setdefault("gradient_checkpointing", False)
    if args.child in ("trl-best", "trl-padfree"):  # gradient checkpointing stays TRL's default (on)
        options.setdefault("padding_free", True)
    if args.child == "trl-best":  # its strongest valid GPU setting
        refuse_cuda_only(args.child, args.device)
        options.setdefault("use_liger_kernel", True)
    # Padding-free TRL refuses a max_length without packing (it would not enforce it); the rows are already
    # cut to --max-length by the template functions, so nothing longer arrives.
    max_length = None if options.get("padding_free") else args.max_length
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=params.lr,
        lr_scheduler_type={"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[params.schedule],
        warmup_steps=params.warmup_ratio, weight_decay=params.weight_decay, max_grad_norm=params.max_grad_norm or 0.0,
        max_length=max_length, bf16=args.precision == "bf16", fp16=False, use_cpu=args.device == "cpu", seed=seed,
        data_seed=seed, save_strategy="no",
        eval_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        **options)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=_lora_config(params))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    shutil.rmtree(config.output_dir, ignore_errors=True)
    peft_model = trainer.model
    if getattr(peft_model, "is_gradient_checkpointing", False):
        peft_model.gradient_checkpointing_disable()
    val = evaluate_loss(peft_model, val_rows, tokenizer.pad_token_id, args.batch_size)["loss"]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": seconds, "steps": trainer.state.global_step, "final_train_loss": logs[-1]["loss"],
            "mean_train_loss": sum(e["loss"] for e in logs) / len(logs), "val_loss": val,
            "gradient_checkpointing": bool(config.gradient_checkpointing), "padding_free": bool(config.padding_free),
            "use_liger_kernel": bool(config.use_liger_kernel)}


def refuse_cuda_only(trainer: str, device: str) -> None:
    if trainer in CUDA_ONLY and device != "cuda":
        raise SystemExit(f"trainer {trainer} needs --device cuda: {CUDA_ONLY[trainer]}")


def child_main(args) -> None:
    if args.child == "ours":
        import stages  # noqa: F401  the process settings every stage starts with (stages/__init__.py), before torch loads
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = Path(args.data)
    train_rows, val_rows = _rows(data / "train"), _rows(data / "validation")
    result = (child_ours if args.child == "ours" else child_trl)(args, train_rows, val_rows)
    result["threads"] = torch.get_num_threads()
    result["thp_mem_alloc"] = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1"
    if args.device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


def run_child(trainer: str, data_dir: str, args, result_path: Path, timeout: float | None = None) -> dict:
    """One training run in a fresh process; killed after `timeout` seconds (RuntimeError saying so)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", trainer, "--data", data_dir,
               "--model", str(args.model), "--result", str(result_path), "--threads", str(args.threads),
               "--batch-size", str(args.batch_size), "--device", args.device, "--precision", args.precision,
               "--max-length", str(args.max_length)]
    if args.ours_options:
        command += ["--ours-options", args.ours_options]
    if args.lora_dropout is not None:
        command += ["--lora-dropout", str(args.lora_dropout)]
    if args.trl_options:
        command += ["--trl-options", args.trl_options]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TUNEKIT_DEVICE": args.device}
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # ours: what stages/__init__.py sets; TRL: its default, unless --trl-thp
    if trainer != "ours" and args.trl_thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    log = open(result_path.with_suffix(".log"), "w", encoding="utf-8")
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        proc.kill()

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    if timer:
        timer.cancel()
    killed = fired.is_set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = result_path.with_suffix(".log").read_text(encoding="utf-8")[-3000:]
        why = f"killed at its time cap of {timeout:.0f} s" if killed else f"exit {proc.returncode}"
        raise RuntimeError(f"{trainer} run on {data_dir} failed ({why}):\n{tail}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["process_seconds"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- pipeline timings


def noop_dvc_repro() -> dict:
    """Wall time of `dvc repro` with everything cached, measured only when `dvc status` says so."""
    dvc = shutil.which("dvc", path=f"{ROOT / '.venv' / 'bin'}:{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if not dvc:
        return {"status": "not measured: no dvc executable"}
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    status = subprocess.run([dvc, "status"], cwd=ROOT, env=env, capture_output=True, text=True)
    if status.returncode != 0 or "up to date" not in status.stdout:
        first = (status.stdout or status.stderr).strip().splitlines()[:1]
        return {"status": f"not measured: dvc status reports changes ({first[0] if first else 'error'})"}
    start = time.perf_counter()
    done = subprocess.run([dvc, "repro"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"status": f"not measured: dvc repro failed: {done.stderr.strip()[-200:]}"}
    return {"status": "measured", "seconds": seconds}


def last_pipeline_seconds() -> dict:
    """Duration of the newest finished `pipeline` parent run in the project's MLflow store (read-only)."""
    db = ROOT / "mlflow.db"
    if not db.is_file():
        return {"status": "not available: no mlflow.db"}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        # A pipeline execution is a parent run (flows.pipeline names it; `pipeline` by default): a run
        # that stage runs point at with mlflow.parentRunId.
        row = con.execute("SELECT start_time, end_time, name FROM runs WHERE status = 'FINISHED' AND end_time IS NOT NULL "
                          "AND run_uuid IN (SELECT value FROM tags WHERE key = 'mlflow.parentRunId') "
                          "ORDER BY end_time DESC LIMIT 1").fetchone()
        con.close()
    except sqlite3.Error as exc:
        return {"status": f"not available: {exc}"}
    if not row:
        return {"status": "not available: no finished pipeline run in mlflow.db"}
    ended = datetime.datetime.fromtimestamp(row[1] / 1000, datetime.UTC).isoformat(timespec="seconds")
    return {"status": "read from mlflow.db", "seconds": (row[1] - row[0]) / 1000, "ended": ended, "run_name": row[2]}


# ---------------------------------------------------------------- report


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarise(name: str, info: dict, runs: list[dict]) -> dict:
    tokens, trained = info["train"]["tokens"], info["train"]["trained_tokens"]
    per = {}
    for trainer in runs[0]:
        mine = [r[trainer] for r in runs]
        per[trainer] = {
            "seconds": _stats([r["seconds"] for r in mine]),
            "tokens_per_s": _stats([tokens / r["seconds"] for r in mine]),
            "trained_tokens_per_s": _stats([trained / r["seconds"] for r in mine]),
            "peak_rss_mb": _stats([r["peak_rss_mb"] for r in mine]),
            **({"peak_gpu_mb": _stats([r["peak_gpu_mb"] for r in mine])} if "peak_gpu_mb" in mine[0] else {}),
            "final_train_loss": _stats([r["final_train_loss"] for r in mine]),
            "val_loss": _stats([r["val_loss"] for r in mine]),
        }
    ratios = {  # ours/reference per repetition (side by side), then min/median/max, for each reference run
        ref: {
            "speed": _stats([r[ref]["seconds"] / r["ours"]["seconds"] for r in runs]),
            "peak_rss": _stats([r["ours"]["peak_rss_mb"] / r[ref]["peak_rss_mb"] for r in runs]),
            **({"peak_gpu": _stats([r["ours"]["peak_gpu_mb"] / r[ref]["peak_gpu_mb"] for r in runs])}
               if "peak_gpu_mb" in runs[0]["ours"] else {}),
            "val_loss": _stats([r["ours"]["val_loss"] / r[ref]["val_loss"] for r in runs]),
        }
        for ref in REFERENCES if ref in runs[0]
    }
    return {"set": name, "title": SET_TITLES[name], "data": info, "runs": runs, "per_trainer": per, "ratios": ratios}


def _fmt(stats: dict[str, float], digits: int = 1) -> str:
    return f"{stats['median']:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`  ",
             f"Machine: {report['machine']}; load average before/after: {report['load_before']} / {report['load_after']}  ",
             f"Repetitions: {report['reps']} (turns rotating, each run a fresh process); medians shown, "
             "ratios as median [min-max] of per-repetition ours/reference  ",
             "CPU allocator: ours THP_MEM_ALLOC_ENABLE=1 (as every stage), TRL "
             + ("THP_MEM_ALLOC_ENABLE=1 (--trl-thp)" if report.get("trl_thp") else "PyTorch's default"), ""]
    gpu = report.get("device") == "cuda"
    memory, memory_key, ratio_key = ("peak GPU MB", "peak_gpu_mb", "peak_gpu") if gpu else ("peak RSS MB", "peak_rss_mb", "peak_rss")
    lines.insert(2, f"Device: {report.get('gpu', report.get('device', 'cpu'))}, precision {report.get('precision', 'fp32')}  ")
    lines += [f"| data set | trainer | s/epoch | real tok/s | trained tok/s | {memory} | final train loss | val loss |",
              "|---|---|---|---|---|---|---|---|"]
    for s in report["sets"]:
        d = s["data"]["train"]
        for trainer, p in s["per_trainer"].items():
            label = TRAINERS[trainer]
            lines.append(f"| {s['title']}: {d['rows']} rows, {d['tokens']} tok ({d['trained_tokens']} trained) | {label} | "
                         f"{_fmt(p['seconds'])} | {_fmt(p['tokens_per_s'])} | {_fmt(p['trained_tokens_per_s'])} | "
                         f"{_fmt(p[memory_key], 0)} | {_fmt(p['final_train_loss'], 3)} | {_fmt(p['val_loss'], 3)} |")
    lines += ["", f"| data set | against | speed ours/ref (tok/s) | {memory.replace(' MB', '')} ours/ref | "
              "val loss ours/ref | our FLOP/s (fraction of matmul peak) |", "|---|---|---|---|---|---|"]
    for s in report["sets"]:
        f = s["flops"]
        for ref, r in s["ratios"].items():
            lines.append(f"| {s['title']} | {TRAINERS[ref]} | "
                         f"{r['speed']['median']:.2f}x [{r['speed']['min']:.2f}-{r['speed']['max']:.2f}] | "
                         f"{r[ratio_key]['median']:.2f} [{r[ratio_key]['min']:.2f}-{r[ratio_key]['max']:.2f}] | "
                         f"{r['val_loss']['median']:.3f} [{r['val_loss']['min']:.3f}-{r['val_loss']['max']:.3f}] | "
                         f"{f['gflops_per_s']:.1f} GFLOP/s ({100 * f['fraction_of_peak']:.0f} %) |")
    targets = report.get("targets")
    if targets:
        lines += ["", "Issue 17's CPU targets (set (a)):  "]
        lines += [f"- {t['name']}: {t['value']:.2f} against {t['bound']:.2f}: {'met' if t['met'] else 'NOT met'}  "
                  if t["value"] is not None else f"- {t['name']}: not measured ({t['why']})  " for t in targets]
    p = report["pipeline"]
    peak_label = (f"{report.get('precision', 'fp32')} matmul peak (CUDA, {report.get('matmul_size', 8192)}^3, best of 5)" if gpu
                  else f"fp32 matmul peak ({report['threads']} threads, 2048x2048, best of 5)")
    lines += ["", f"{peak_label}: {report['matmul_peak_gflops']:.1f} GFLOP/s  ",
              "No-op `dvc repro`: " + (f"{p['noop_dvc_repro']['seconds']:.2f} s" if "seconds" in p["noop_dvc_repro"]
                                        else p["noop_dvc_repro"]["status"]) + "  ",
              "Full default pipeline (last run): " + (f"{p['last_pipeline']['seconds']:.0f} s, ended {p['last_pipeline']['ended']}"
                                                      + f" (MLflow parent run {p['last_pipeline']['run_name']!r})"
                                                      if "seconds" in p["last_pipeline"] else p["last_pipeline"]["status"])]
    return "\n".join(lines) + "\n"


def targets_report(summaries: list[dict]) -> list[dict]:
    """Issue 17's CPU targets, read off set (a) when it ran (the targets are stated at the --full size)."""
    variable = next((s for s in summaries if s["set"] == "variable"), None)

    def target(name: str, bound: float, value: float | None, why: str, higher_is_better: bool) -> dict:
        met = None if value is None else (value >= bound if higher_is_better else value <= bound)
        return {"name": name, "bound": bound, "value": value, "met": met, "why": why}

    ratios = variable["ratios"] if variable else {}
    fastest = ratios.get("trl-nogc", {}).get("speed", {}).get("median")
    memory = ratios.get("trl", {}).get("peak_rss", {}).get("median")
    fraction = variable["flops"]["fraction_of_peak"] if variable else None
    return [
        target("real tokens/s, ours / TRL gradient_checkpointing=False", TARGETS["speed_vs_fastest"], fastest,
               "needs set (a) and trl-nogc", True),
        target("peak RSS, ours / TRL defaults", TARGETS["peak_rss_vs_defaults"], memory, "needs set (a) and trl", False),
        target("our FLOP/s / fp32 matmul peak", TARGETS["fraction_of_peak"], fraction, "needs set (a)", True),
    ]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=None, help="repetitions per data set (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="1 repetition and fewer rows: a smoke run")
    parser.add_argument("--full", action="store_true",
                        help="the issue's sizes: 64 single-turn chats, 32 multi-turn, the pipeline's 400 demo records (~1 h)")
    parser.add_argument("--large", action="store_true", help="16x the --full sizes, for a GPU (an epoch of --full takes ~1 s there)")
    parser.add_argument("--sets", nargs="+", choices=ALL_SETS, default=list(SETS),
                        help="data sets (default: all but long, whose chats need --max-length 2048)")
    parser.add_argument("--trainers", nargs="+", choices=tuple(TRAINERS), default=None,
                        help="ours and the references to run (default: all that run on --device but trl-padfree); ours is always run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both trainers run")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast on CUDA, both trainers")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512, help="tokens per row, both trainers (the template's cut)")
    parser.add_argument("--model", default=None, help="HF checkpoint dir (default: models/base or the embedded SmolLM2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for latest.json / latest.md")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the dvc repro / pipeline timings")
    parser.add_argument("--ours-options", default=None, help="JSON of extra TrainConfig fields for our runs (lever A/B)")
    parser.add_argument("--trl-options", default=None, help="JSON of extra SFTConfig fields for TRL runs")
    parser.add_argument("--lora-dropout", type=float, default=None, help="override finetune.lora.dropout for both trainers")
    parser.add_argument("--trl-thp", action="store_true",
                        help="control: give TRL the allocator setting our stages start with (THP_MEM_ALLOC_ENABLE=1)")
    # child mode (internal)
    parser.add_argument("--child", choices=tuple(TRAINERS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return

    reps = args.reps or (1 if args.quick else 3)
    sizes = SIZES["large" if args.large else "full" if args.full else "quick" if args.quick else "default"]
    if args.precision == "bf16" and args.device != "cuda":
        parser.error("--precision bf16 needs --device cuda (tunekit refuses bf16 on the CPU)")
    asked = args.trainers or [t for t in TRAINERS if t not in OPT_IN and (t not in CUDA_ONLY or args.device == "cuda")]
    trainers = ["ours"] + [t for t in TRAINERS if t != "ours" and t in asked]
    for trainer in trainers:
        if trainer in CUDA_ONLY and args.device != "cuda":
            parser.error(f"trainer {trainer} needs --device cuda: {CUDA_ONLY[trainer]}")
    args.model = base_model_dir(args.model)
    load_before = _load()
    print(f"model {args.model}; threads {args.threads}; reps {reps}; load average {load_before}", flush=True)
    matmul_size = 8192 if args.device == "cuda" else 2048
    peak = matmul_peak(args.threads, matmul_size, device=args.device, precision=args.precision if args.device == "cuda" else "fp32")
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="tunekit-bench-"))
    try:
        sets = build_sets(args.sets, sizes, args.model, work, seed=1234, max_length=args.max_length)
        summaries = []
        for name in args.sets:
            info = sets[name]
            print(f"{SET_TITLES[name]}: train {info['train']}, validation {info['validation']}", flush=True)
            runs = []
            for rep in range(reps):
                order = trainers[rep % len(trainers):] + trainers[:rep % len(trainers)]
                run = {}
                for trainer in order:
                    run[trainer] = run_child(trainer, info["dir"], args, work / f"{name}-{rep}-{trainer}.json")
                    r = run[trainer]
                    print(f"  rep {rep + 1} {trainer:8s}: {r['seconds']:7.1f} s/epoch, "
                          f"{info['train']['tokens'] / r['seconds']:6.1f} tok/s, rss {r['peak_rss_mb']:6.0f} MB, "
                          f"train {r['final_train_loss']:.3f}, val {r['val_loss']:.3f}  (load {_load()})", flush=True)
                runs.append({t: run[t] for t in trainers})
            summary = summarise(name, info, runs)
            flops = statistics.median([r["ours"]["flops"] / r["ours"]["seconds"] for r in runs])
            summary["flops"] = {"per_epoch": runs[0]["ours"]["flops"], "gflops_per_s": flops / 1e9,
                                "fraction_of_peak": flops / peak}
            summaries.append(summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pipeline = ({"noop_dvc_repro": {"status": "not measured (--no-pipeline)"}, "last_pipeline": {"status": "not read"}}
                if args.no_pipeline else {"noop_dvc_repro": noop_dvc_repro(), "last_pipeline": last_pipeline_seconds()})
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("trl", "peft", "datasets"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    report = {
        "command": "python bench/sft_vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "threads": args.threads, "reps": reps, "load_before": load_before, "load_after": _load(),
        "device": args.device, "precision": args.precision, "matmul_size": matmul_size,
        **({"gpu": torch.cuda.get_device_name(0)} if args.device == "cuda" else {}),
        "matmul_peak_gflops": peak / 1e9, "versions": versions, "model": str(args.model),
        "ours_options": json.loads(args.ours_options or "{}"), "trl_options": json.loads(args.trl_options or "{}"),
        "lora_dropout": args.lora_dropout, "trl_thp": args.trl_thp,
        "trainers": trainers, "sets": summaries, "pipeline": pipeline,
        "targets": targets_report(summaries) if args.device == "cpu" else [],
    }
    table = markdown(report)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for stem in ("latest", stamp):
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (args.out / f"{stem}.md").write_text(table, encoding="utf-8")
    print(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")


if __name__ == "__main__":
    main()
