"""Issue 17's GPU benchmarks in one run that fits ~9 minutes of one H200 (bench/GPU.md).

    python bench/gpu_suite.py --out $OUT               # on the GPU machine (after bench/gpu_preflight.py's install)
    python bench/gpu_suite.py --tiny                   # CPU smoke run: tiny shapes, every part (results in /tmp)
    python bench/gpu_suite.py --parts lora levers      # a subset

Parts, in the order they run (the most important first, so a run cut off still holds them):
  lora      a Llama-3.2-1B-shaped model (random weights), LoRA r=16 on all linear layers, bf16, the new data set
            (d) of chats up to 2048 tokens: ours (the finetune stage's loop), TRL SFTTrainer's strongest valid
            GPU setting (`trl-best`: gradient checkpointing + padding_free + Liger kernels; `trl-padfree`, the same
            without Liger, in its place if it fails) and TRL's defaults (`trl`); real tokens/s, peak GPU memory, validation loss, model FLOP utilisation against the measured
            bf16 matmul peak, and issue 17's targets (>= 1.3x the strongest TRL's tokens/s at no more than its
            peak GPU memory).
  qlora     a Llama-3.1-8B-shaped model in 4-bit: random bf16 weights written to disk one tensor at a time (never
            the whole model on the GPU), loaded by the finetune stage's qlora method, a few training steps: peak
            GPU memory (target: within 10 GB) and tokens/s.
  generate  the evaluate stage's generation harness (tunekit.generate) against plain model.generate on the same
            batches of the same prompts, greedy; outputs compared; vLLM when it imports.
  levers    our loop's levers that are TrainConfig fields, one run each on the lora part's data: gradient
            checkpointing true / mlp / false (auto, the default, is the lora part's run), and padding_free,
            compile and cuda_graphs when such fields exist (listed as not implemented otherwise).

Every training or generation run is a fresh process with a time cap; the whole run stops starting new
runs when --budget seconds are spent. latest.json and latest.md under --out are rewritten after every run.
The models are random-weight models from configs (the GPU machine holds no model files; speed and memory
do not depend on the weights) with SmolLM2's real tokenizer (vocabulary 49152, carried in .whl/ by
bench/gpu_preflight.py --prepare), so the vocabulary and LM head are SmolLM2's, not Llama's 128k.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "gpu"
_bench_spec = importlib.util.spec_from_file_location("sft_vs_trl", ROOT / "bench" / "sft_vs_trl.py")
bench = importlib.util.module_from_spec(_bench_spec)
_bench_spec.loader.exec_module(bench)
_preflight_spec = importlib.util.spec_from_file_location("gpu_preflight", ROOT / "bench" / "gpu_preflight.py")
preflight = importlib.util.module_from_spec(_preflight_spec)
_preflight_spec.loader.exec_module(preflight)

# Llama-3.2-1B and Llama-3.1-8B as published, except the vocabulary (SmolLM2's tokenizer) and no RoPE
# scaling (nothing here is longer than 2048 tokens).
LLAMA_1B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
LLAMA_8B = dict(vocab_size=49152, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_1B = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
TINY_8B = dict(LLAMA_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
PARTS = ("lora", "qlora", "generate", "levers")
TARGETS = {"speed_vs_strongest_trl": 1.3, "peak_gpu_vs_strongest_trl": 1.0, "qlora_peak_gb": 10.0}

# What each run may take at most on the H200, in seconds (the process start, model load and validation
# included), from the sizes below; the CPU smoke run takes the same caps.
CAPS = {"setup": 120, "ours": 110, "trl-best": 120, "trl": 120, "qlora": 170, "generate": 90, "lever": 100}


@dataclasses.dataclass(frozen=True)
class Sizes:
    shape_1b: dict
    shape_8b: dict
    train_rows: int        # set (d), lora and levers
    val_rows: int
    max_length: int
    batch_size: int        # lora and levers
    qlora_batch_size: int
    qlora_warmup: int      # optimizer steps left out of the timing
    qlora_steps: int       # timed optimizer steps
    prompts: int           # generate
    max_new_tokens: int
    generate_batch_size: int


GPU_SIZES = Sizes(LLAMA_1B, LLAMA_8B, train_rows=384, val_rows=32, max_length=2048, batch_size=8, qlora_batch_size=2,
                  qlora_warmup=2, qlora_steps=6, prompts=64, max_new_tokens=64, generate_batch_size=16)
TINY_SIZES = Sizes(TINY_1B, TINY_8B, train_rows=8, val_rows=4, max_length=512, batch_size=4, qlora_batch_size=2,
                   qlora_warmup=1, qlora_steps=2, prompts=6, max_new_tokens=8, generate_batch_size=4)

# Levers of our loop: (TrainConfig field, value, what it is). Run when the field exists, else listed as
# not implemented. gradient_checkpointing "auto" (the default, "mlp" on Llama) is the lora part's run.
LEVERS = [
    ("gradient_checkpointing", True, "recompute every decoder layer in backward"),
    ("gradient_checkpointing", False, "recompute nothing"),
    ("gradient_checkpointing", "mlp", "recompute the feed-forward blocks only (what auto picks on Llama)"),
    ("padding_free", True, "padding-free batches: rows concatenated with per-example position ids and "
                           "variable-length attention"),
    ("compile", True, "torch.compile of each decoder layer"),
    ("cuda_graphs", True, "CUDA graphs for the small-batch, launch-bound case"),
]


# ---------------------------------------------------------------- random checkpoints without the model in memory


def write_random_checkpoint(shape: dict, out: Path, tokenizer_dir: Path, device: str, seed: int = 0,
                            shard_bytes: int = 2 * 2**30) -> dict:
    """A Llama checkpoint of `shape` in bf16 safetensors shards with N(0, 0.02) matrices and unit norms
    (transformers' own initialisation), one tensor at a time: at most one tensor on `device` and one
    shard in CPU memory, so an 8B shape never needs 16 GB anywhere but the disk. Returns timings."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    config = LlamaConfig(**shape)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    tensors = [(name, tuple(t.shape)) for name, t in skeleton.state_dict().items()
               if not (config.tie_word_embeddings and name == "lm_head.weight")]
    del skeleton
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator(device=device).manual_seed(seed)

    def value(shape_: tuple[int, ...]) -> torch.Tensor:
        if len(shape_) == 1:  # RMSNorm weights
            return torch.ones(shape_, dtype=torch.bfloat16)
        return (torch.randn(shape_, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    # Shards planned from the shapes first (each file name holds the shard count), then filled and written one by one.
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = total = 0
    for name, shape_ in tensors:
        nbytes = 2 * math.prod(shape_)
        if size and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, shape_))
        size += nbytes
        total += nbytes
    weight_map = {}
    for i, group in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file({name: value(shape_) for name, shape_ in group}, str(tmp / file), metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in group})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"seconds": time.perf_counter() - start, "bytes": total, "parameters": total // 2, "shards": len(plan)}


def tokenizer_source(requested: Path | None, work: Path) -> Path:
    """The SmolLM2 tokenizer: --tokenizer, the one carried in .whl/, or saved from the embedded GGUF."""
    if requested:
        return requested
    carried = preflight.CARRY / preflight.TOKENIZER
    if (carried / "tokenizer.json").is_file():
        return carried
    saved = work / "smollm2-tokenizer"
    if not (saved / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from tunekit.models import embedded_gguf

        try:
            gguf = embedded_gguf()
        except Exception as exc:
            raise SystemExit(f"no SmolLM2 tokenizer: {exc}. On the GPU machine carry the one "
                             "`python bench/gpu_preflight.py --prepare` saves into .whl/ (bench/GPU.md)") from exc
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(saved)
    return saved


# ---------------------------------------------------------------- child processes: qlora and generate


def _marks(device) -> tuple[list[float], Callable]:
    import torch

    marks: list[float] = []

    def on_step(state) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())

    return marks, on_step


def child_qlora(args) -> dict:
    """Load the 8B-shaped checkpoint with the finetune stage's qlora method and train a few steps."""
    import torch

    from tunekit.methods import method_for
    from tunekit.models import compute_device, load_tokenizer
    from tunekit.params import load_section
    from tunekit.train import TrainConfig, train

    device = compute_device()
    params = load_section("finetune").model_copy(update={"method": "qlora"})
    method = method_for(params)
    tokenizer = load_tokenizer(args.model)
    rows = bench._rows(Path(args.data) / "train")[: args.batch_size * (args.warmup + args.steps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = method.prepare(method.load_base(Path(args.model)), params)
    load_seconds = time.perf_counter() - start
    loaded = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    cfg = TrainConfig(**{**params.loop_config(), "lr": params.lr, "seed": 0, "full_forward": method.full_forward,
                         "precision": args.precision, "batch_size": args.batch_size, "grad_accum": 1,
                         "max_steps": args.warmup + args.steps, "epochs": 1.0, "eval_every": 10**9,
                         "checkpoint_every": 10**9, "early_stopping_patience": None})
    marks, on_step = _marks(device)
    with tempfile.TemporaryDirectory() as ckpt:
        state = train(model, rows, [], cfg, tokenizer.pad_token_id, Path(ckpt), on_step=on_step)
    timed = state.history[args.warmup:]
    seconds = marks[-1] - marks[args.warmup - 1]
    tokens = sum(h["tokens"] for h in timed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The loop records trained tokens per step, not which rows a step took: real tokens are estimated
    # with the real/trained ratio of all the rows trained.
    ratio = sum(len(r["input_ids"]) for r in rows) / sum(h["tokens"] for h in state.history)
    return {"load_seconds": load_seconds, "steps": len(timed), "timed_seconds": seconds,
            "trained_tokens": tokens, "trained_tokens_per_s": tokens / seconds, "real_tokens_per_s": ratio * tokens / seconds,
            "trainable_parameters": trainable, "train_loss": [h["train_loss"] for h in state.history],
            "gpu_mb_after_load": loaded / 2**20 if loaded is not None else None,
            **({"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20} if device.type == "cuda" else {})}


def _new_tokens(generated, prompt_length: int, stops: list[int]) -> int:
    """Generated tokens up to and including each row's first stop token (the rest is padding)."""
    import torch

    new = generated[:, prompt_length:]
    stopped = torch.isin(new, torch.tensor(stops, device=new.device))
    first = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, torch.full_like(stopped[:, 0], new.shape[1],
                                                                                     dtype=torch.long))
    return int(first.sum())


def child_generate(args) -> dict:
    """Our harness (tunekit.generate.generate: longest prompts first, KV cache, stops at end of turn)
    against model.generate on the prompts in their given order, same batch size, greedy."""
    import torch

    from tunekit.chat import end_of_turn_marker, resolve_chat_template
    from tunekit.generate import cut_at_stops, generate, prompts_from_conversations, stop_token_ids
    from tunekit.models import compute_device, load_causal_lm, load_tokenizer
    from tunekit.params import load_section

    device = compute_device()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    tokenizer = load_tokenizer(Path(args.model))
    chat_template = resolve_chat_template(load_section("template").chat_template, tokenizer)
    eot = end_of_turn_marker(tokenizer, chat_template)
    prompts = prompts_from_conversations(bench.variable_chats(args.prompts, seed=4321), tokenizer, chat_template)
    stops = stop_token_ids(tokenizer, eot)
    out: dict = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                 "rows": []}

    def plain(model) -> list[str]:
        tokenizer.padding_side = "left"
        texts = []
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            enc = tokenizer([p.text for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            result = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=stops,
                                    pad_token_id=tokenizer.pad_token_id)
            texts += [cut_at_stops(tokenizer.decode(row, skip_special_tokens=True), [eot]).strip()
                      for row in result[:, enc["input_ids"].shape[1]:]]
        return texts

    reference: list[str] = []  # the first run's outputs (our harness, float32: what the evaluate stage scores)

    def timed(label: str, model, run) -> None:
        counts: list[int] = []
        original = model.generate

        def generate_and_count(*a, **k):
            result = original(*a, **k)
            counts.append(_new_tokens(result, k["input_ids"].shape[1], stops))
            return result

        model.generate = generate_and_count
        try:
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                texts = run(model)
            sync()
            seconds = time.perf_counter() - start
        finally:
            del model.generate  # the class's method again
        reference[:] = reference or texts
        out["rows"].append({"label": label, "seconds": seconds, "new_tokens": sum(counts),
                            "tokens_per_s": sum(counts) / seconds,
                            "same_outputs": sum(a == b for a, b in zip(texts, reference))})

    harness = lambda model: generate(model, tokenizer, prompts, eot, args.max_new_tokens, args.batch_size)
    for dtype in ("float32", "bfloat16"):  # the evaluate stage's float32, and bf16 weights as a lever
        model = load_causal_lm(Path(args.model), dtype=dtype, device=device).eval()
        with torch.no_grad():  # CUDA start-up and kernel selection out of the timings
            generate(model, tokenizer, prompts[: args.batch_size], eot, 4, args.batch_size)
        timed(f"tunekit.generate ({dtype})", model, harness)
        if dtype == "float32":
            timed("model.generate, prompts in order (float32)", model, plain)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if importlib.util.find_spec("vllm") is None:
        out["vllm"] = "not installed (too large to carry to the GPU machine)"
    else:
        try:
            from vllm import LLM, SamplingParams

            llm = LLM(model=str(args.model), dtype="float32", seed=0, gpu_memory_utilization=0.5)
            sampling = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, stop_token_ids=stops)
            start = time.perf_counter()
            results = llm.generate([p.text for p in prompts], sampling)
            seconds = time.perf_counter() - start
            texts = [cut_at_stops(r.outputs[0].text, [eot]).strip() for r in results]
            new = sum(len(r.outputs[0].token_ids) for r in results)
            out["rows"].append({"label": "vLLM (float32)", "seconds": seconds, "new_tokens": new,
                                "tokens_per_s": new / seconds,
                                "same_outputs": sum(a == b for a, b in zip(texts, reference))})
        except Exception as exc:
            out["vllm"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    return out


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = child_qlora(args) if args.child == "qlora" else child_generate(args)
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


def run_suite_child(kind: str, args, model: Path, data: Path | None, result: Path, timeout: float, **extra) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--model", str(model), "--result",
               str(result), "--threads", str(args.threads), "--precision", args.precision]
    if data is not None:
        command += ["--data", str(data)]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1", "TUNEKIT_DEVICE": args.device}
    log = result.with_suffix(".log")
    with open(log, "w", encoding="utf-8") as handle:
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{kind} killed at its time cap of {timeout:.0f} s:\n"
                               f"{log.read_text(encoding='utf-8')[-3000:]}") from None
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed (exit {done.returncode}):\n{log.read_text(encoding='utf-8')[-3000:]}")
    return json.loads(result.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the suite


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def cap(self, wanted: float) -> float | None:
        """`wanted` seconds, or what is left; None when less than 60 % of `wanted` is left (a run
        cut off that early gives no figure and costs the time)."""
        left = self.left()
        return None if left < 0.6 * wanted else min(wanted, left)


def _why(part: dict) -> str:
    """One table-safe line saying why a run or part has no figures: skipped, or its failure's first and last lines."""
    if part.get("skipped"):
        return part["skipped"]
    lines = [line.strip() for line in part.get("error", "no result").splitlines() if line.strip()]
    text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return "failed: " + text.replace("|", "/")[:300]


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _memory(r: dict) -> float:
    return r.get("peak_gpu_mb", r.get("peak_rss_mb"))


def training_row(r: dict, info: dict, flops: float | None, peak: float) -> dict:
    train = info["train"]
    return {"seconds": r["seconds"], "process_seconds": r["process_seconds"], "steps": r["steps"],
            "tokens_per_s": train["tokens"] / r["seconds"],
            "trained_tokens_per_s": train["trained_tokens"] / r["seconds"],
            "peak_gpu_mb": r.get("peak_gpu_mb"), "peak_rss_mb": r["peak_rss_mb"], "val_loss": r["val_loss"],
            "final_train_loss": r["final_train_loss"],
            "flops_per_epoch": flops, "mfu": flops / r["seconds"] / peak if flops else None,
            **{k: r[k] for k in ("gradient_checkpointing", "padding_free", "use_liger_kernel") if k in r}}


def strongest_trl(runs: dict) -> str | None:
    """The TRL configuration with the highest real tokens/s among those that ran."""
    refs = {name: r for name, r in runs.items() if name != "ours" and "tokens_per_s" in r}
    return max(refs, key=lambda n: refs[n]["tokens_per_s"]) if refs else None


def against(row: dict, ref: dict) -> dict:
    """Speed and peak memory of one of our runs as multiples of a reference run's."""
    key = "peak_gpu_mb" if row.get("peak_gpu_mb") is not None else "peak_rss_mb"
    return {"speed": row["tokens_per_s"] / ref["tokens_per_s"], "memory": row[key] / ref[key], "memory_kind": key}


def lora_targets(runs: dict, device: str) -> list[dict]:
    """Issue 17's GPU targets against the strongest TRL configuration that ran (highest tokens/s)."""
    ours = runs.get("ours", {})
    strongest = strongest_trl(runs)
    if device != "cuda":
        return [{"name": "targets", "value": None, "met": None, "why": "not evaluated on the CPU smoke run"}]
    if "tokens_per_s" not in ours or strongest is None:
        return [{"name": "targets", "value": None, "met": None, "why": "needs ours and a TRL run"}]
    ratios = against(ours, runs[strongest])
    speed, memory = ratios["speed"], ratios["memory"]
    return [{"name": f"real tokens/s, ours / {strongest} (the strongest TRL here)", "bound": TARGETS["speed_vs_strongest_trl"],
             "value": speed, "met": speed >= TARGETS["speed_vs_strongest_trl"]},
            {"name": f"peak GPU memory, ours / {strongest}", "bound": TARGETS["peak_gpu_vs_strongest_trl"],
             "value": memory, "met": memory <= TARGETS["peak_gpu_vs_strongest_trl"]}]


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`  ", f"Date: {report['date']}; machine: {report['machine']}  ",
             f"Device: {report.get('gpu', report['device'])}, precision {report['precision']}; "
             f"{report['peak_label']}: {report['matmul_peak_tflops']:.3g} TFLOP/s  "]
    versions = ", ".join(f"{k} {v['version']}" for k, v in report["preflight"]["packages"].items() if v["imports"])
    lines += [f"Installed: {versions}  ", ""]
    setup = report.get("setup")
    if setup:
        d = setup["data"]
        lines += [f"Model for lora/levers/generate: {_count(setup['model_1b']['parameters'])} parameters "
                  f"(Llama-3.2-1B's shape, random weights, SmolLM2 tokenizer, vocabulary 49152), written in "
                  f"{setup['model_1b']['seconds']:.0f} s. Data set {bench.SET_TITLES['long']}: train {d['train']['rows']} rows, "
                  f"{d['train']['tokens']} tokens ({d['train']['trained_tokens']} trained, longest {d['train']['longest']}); "
                  f"validation {d['validation']['rows']} rows; batch {report['sizes']['batch_size']}.  ", ""]
    lora = report["parts"].get("lora")
    if lora:
        lines += ["| trainer | s/epoch (process) | real tok/s | trained tok/s | peak GPU MB | peak RSS MB | val loss | MFU |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in lora["runs"].items():
            if "tokens_per_s" not in r:
                lines.append(f"| {bench.TRAINERS[name]} | {_why(r)} | | | | | | |")
                continue
            gpu = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") is not None else "-"
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
            lines.append(f"| {bench.TRAINERS[name]} | {r['seconds']:.1f} ({r['process_seconds']:.0f}) | {r['tokens_per_s']:.0f} | "
                         f"{r['trained_tokens_per_s']:.0f} | {gpu} | {r['peak_rss_mb']:.0f} | {r['val_loss']:.3f} | {mfu} |")
        lines += ["", "Targets (issue 17):  "]
        lines += [f"- {t['name']}: {t['value']:.2f} against {t['bound']:.2f}: {'met' if t['met'] else 'NOT met'}  "
                  if t["value"] is not None else f"- {t['name']}: {t['why']}  " for t in lora["targets"]]
        lines.append("")
    qlora = report["parts"].get("qlora")
    if qlora:
        if "result" in qlora:
            q, b = qlora["result"], qlora["build"]
            gb = 2**20 / 1e9  # MiB -> GB, the target's unit
            memory = (f"peak {q['peak_gpu_mb'] * gb:.2f} GB allocated ({q['peak_gpu_reserved_mb'] * gb:.2f} GB reserved), "
                      f"{q['gpu_mb_after_load'] * gb:.2f} GB after loading" if "peak_gpu_mb" in q else "no GPU memory on the CPU")
            lines += [f"QLoRA, Llama-3.1-8B's shape ({_count(b['parameters'])} parameters): checkpoint written in "
                      f"{b['seconds']:.0f} s ({b['bytes'] / 1e9:.3g} GB bf16, {b['shards']} shards), loaded in 4-bit by the qlora "
                      f"method in {q['load_seconds']:.0f} s; {q['steps']} timed steps of batch {report['sizes']['qlora_batch_size']}: "
                      f"{q['real_tokens_per_s']:.0f} real tok/s, {q['trained_tokens_per_s']:.0f} trained tok/s; {memory}; "
                      f"target within {TARGETS['qlora_peak_gb']:.0f} GB: "
                      + ({True: "met", False: "NOT met", None: "not evaluated on the CPU"}[qlora.get("met")]) + "  ", ""]
        else:
            lines += [f"QLoRA: {_why(qlora)}", ""]
    gen = report["parts"].get("generate")
    if gen:
        if "result" in gen:
            g = gen["result"]
            lines += [f"Generation: {g['prompts']} prompts, batch {g['batch_size']}, greedy, up to {g['max_new_tokens']} new tokens  ",
                      "", "| generator | s | new tokens | tok/s | outputs equal to tunekit.generate (float32) |", "|---|---|---|---|---|"]
            lines += [f"| {r['label']} | {r['seconds']:.2f} | {r['new_tokens']} | {r['tokens_per_s']:.0f} | "
                      f"{r.get('same_outputs', '-')}/{g['prompts']} |" for r in g["rows"]]
            lines += [f"vLLM: {g['vllm']}" if "vllm" in g else "", ""]
        else:
            lines += [f"Generation: {_why(gen)}", ""]
    levers = report["parts"].get("levers")
    if levers:
        ref = levers.get("against")
        lines += [f"| lever (ours) | s/epoch | real tok/s | peak GPU MB | peak RSS MB | val loss | MFU | "
                  f"speed / {ref or 'TRL'} | memory / {ref or 'TRL'} |", "|---|---|---|---|---|---|---|---|---|"]
        for r in levers["runs"]:
            if "tokens_per_s" not in r:
                lines.append(f"| {r['label']} | {_why(r)} | | | | | | | |")
                continue
            gpu = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") is not None else "-"
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
            vs = r.get("vs_strongest_trl")
            lines.append(f"| {r['label']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {gpu} | {r['peak_rss_mb']:.0f} | "
                         f"{r['val_loss']:.3f} | {mfu} | " + (f"{vs['speed']:.2f}x | {vs['memory']:.2f}x |" if vs else "- | - |"))
        lines += ["", "Not implemented in our loop (no TrainConfig field): "
                  + ("; ".join(f"{n['field']} ({n['what']})" for n in levers["not_implemented"]) or "none"), ""]
    if report.get("skipped"):
        lines += ["Skipped: " + "; ".join(report["skipped"]), ""]
    lines.append(f"Wall time: {report['wall_seconds']:.0f} s of a {report['budget_seconds']:.0f} s budget"
                 + (" (complete)" if report.get("complete") else " (still running or cut off)"))
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path, started: float) -> None:
    report["wall_seconds"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("latest.json", json.dumps(report, indent=2) + "\n"), ("latest.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and sizes (the CPU smoke run; default device cpu)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--trainers", nargs="+", choices=tuple(bench.TRAINERS), default=["ours", "trl-best", "trl"],
                        help="lora part, in this order (trl-padfree runs by itself when trl-best fails)")
    parser.add_argument("--levers", nargs="*", default=None, metavar="JSON",
                        help='extra lever runs of ours, each a JSON of TrainConfig fields, e.g. \'{"compile": true}\'')
    parser.add_argument("--budget", type=float, default=480,
                        help="seconds for the whole run (default 480: with the wheel install it fits a 600 s device call)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokenizer", type=Path, default=None, help="SmolLM2 tokenizer dir (default: .whl/ or the embedded model)")
    parser.add_argument("--work", type=Path, default=None, help="models and data (default: a temporary dir, removed)")
    parser.add_argument("--out", type=Path, default=None,
                        help="latest.json / latest.md go here (default: bench/results/gpu; with --tiny a temporary dir, "
                             "so CPU smoke figures never land among the GPU results)")
    # child mode (internal)
    parser.add_argument("--child", choices=("qlora", "generate"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    for name in ("batch-size", "warmup", "steps", "prompts", "max-new-tokens"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return

    import torch

    started = time.monotonic()
    budget = Budget(args.budget)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; for a smoke run use --tiny (CPU)")
    args.precision = "bf16" if args.device == "cuda" else "fp32"
    sizes = TINY_SIZES if args.tiny else GPU_SIZES
    checked = preflight.check()
    preflight.print_check(checked)
    peak = bench.matmul_peak(args.threads, 8192 if args.device == "cuda" else 2048, device=args.device,
                             precision=args.precision if args.device == "cuda" else "fp32")
    report: dict = {
        "command": "python bench/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "device": args.device, "precision": args.precision,
        **({"gpu": torch.cuda.get_device_name(0)} if args.device == "cuda" else {}),
        "peak_label": (f"{args.precision} matmul peak (8192^3, best of 5)" if args.device == "cuda"
                       else "fp32 matmul peak (2048^3, best of 5)"),
        "matmul_peak_tflops": peak / 1e12, "preflight": checked, "tiny": args.tiny,
        "sizes": dict(dataclasses.asdict(sizes).items()), "budget_seconds": args.budget,
        "targets": TARGETS, "parts": {}, "skipped": [], "complete": False}
    print(f"matmul peak {peak / 1e12:.3g} TFLOP/s; budget {args.budget:.0f} s", flush=True)
    out = args.out or (Path(tempfile.gettempdir()) / "tunekit-gpu-suite-tiny" if args.tiny else RESULTS)
    work = args.work or Path(tempfile.mkdtemp(prefix="tunekit-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer_dir = tokenizer_source(args.tokenizer, work)
        model_1b = work / "llama-1b"
        build = write_random_checkpoint(sizes.shape_1b, model_1b, tokenizer_dir, args.device)
        data = bench.build_sets(["long"], {"long": (sizes.train_rows, sizes.val_rows)}, model_1b, work, seed=1234,
                                max_length=sizes.max_length)["long"]
        report["setup"] = {"model_1b": build, "data": data, "tokenizer": str(tokenizer_dir)}
        print(f"setup: 1B-shaped model, {_count(build['parameters'])} parameters, in {build['seconds']:.0f} s; data {data['train']}",
              flush=True)
        save(report, out, started)
        ns = argparse.Namespace(model=model_1b, threads=args.threads, batch_size=sizes.batch_size, device=args.device,
                                precision=args.precision, ours_options=None, lora_dropout=None, trl_options=None,
                                trl_thp=False, max_length=sizes.max_length)

        def train_run(trainer: str, label: str, cap: float, options: dict | None = None) -> dict:
            timeout = budget.cap(cap)
            if timeout is None:
                why = f"not run: {budget.left():.0f} s of the budget left"
                report["skipped"].append(f"{label}: {why}")
                return {"skipped": why}
            if trainer in bench.CUDA_ONLY and args.device != "cuda":
                why = f"not run on the CPU: {bench.CUDA_ONLY[trainer]}"
                report["skipped"].append(f"{label}: {why}")
                return {"skipped": why}
            run_args = argparse.Namespace(**{**vars(ns), "ours_options": json.dumps(options) if options else None})
            try:
                r = bench.run_child(trainer, data["dir"], run_args, work / f"{label.replace(' ', '_')}.json", timeout)
            except RuntimeError as exc:
                print(f"  {label}: {exc}", flush=True)
                return {"error": str(exc)[-2000:]}
            flops = r.get("flops") or report.get("flops_per_epoch")
            row = training_row(r, data, flops, peak)
            print(f"  {label}: {row['seconds']:.1f} s, {row['tokens_per_s']:.0f} tok/s, "
                  f"peak {_memory(r):.0f} MB, val {row['val_loss']:.3f}", flush=True)
            return row

        if "lora" in args.parts:
            lora = report["parts"]["lora"] = {"runs": {}, "targets": []}
            # Ours first: its FLOP count of these rows (the same for every trainer) gives the references' MFU.
            for trainer in ["ours"] + [t for t in args.trainers if t != "ours"]:
                lora["runs"][trainer] = train_run(trainer, trainer, CAPS.get(trainer, CAPS["trl"]))
                if trainer == "ours" and lora["runs"]["ours"].get("flops_per_epoch"):
                    report["flops_per_epoch"] = lora["runs"]["ours"]["flops_per_epoch"]
                if trainer == "trl-best" and "error" in lora["runs"][trainer]:
                    # Liger is the part most likely to break against the image's transformers: the strongest
                    # valid setting is then the same without it.
                    lora["runs"]["trl-padfree"] = train_run("trl-padfree", "trl-padfree", CAPS["trl-best"])
                lora["targets"] = lora_targets(lora["runs"], args.device)
                save(report, out, started)

        if "qlora" in args.parts:
            part = report["parts"]["qlora"] = {}
            if budget.cap(CAPS["qlora"]) is None:
                part["skipped"] = f"not run: {budget.left():.0f} s of the budget left"
            else:
                try:
                    model_8b = work / "llama-8b"
                    part["build"] = write_random_checkpoint(sizes.shape_8b, model_8b, tokenizer_dir, args.device, seed=1)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                    print(f"qlora: 8B-shaped checkpoint written in {part['build']['seconds']:.0f} s", flush=True)
                    remaining = budget.cap(CAPS["qlora"] - part["build"]["seconds"])
                    if remaining is None:
                        raise RuntimeError(f"no budget left after writing the checkpoint ({budget.left():.0f} s)")
                    q = run_suite_child("qlora", args, model_8b, Path(data["dir"]), work / "qlora.json", remaining,
                                        batch_size=sizes.qlora_batch_size, warmup=sizes.qlora_warmup, steps=sizes.qlora_steps)
                    part["result"] = q
                    # A card of 10 GB must hold what the caching allocator reserved, not only what was allocated.
                    part["met"] = (q["peak_gpu_reserved_mb"] * 2**20 <= TARGETS["qlora_peak_gb"] * 1e9
                                   if "peak_gpu_mb" in q else None)
                    print(f"qlora: {q['real_tokens_per_s']:.0f} real tok/s, "
                          + (f"peak {q['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in q else "no GPU memory on the CPU"),
                          flush=True)
                except Exception as exc:
                    part["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
                    print(f"qlora: {part['error']}", flush=True)
                shutil.rmtree(work / "llama-8b", ignore_errors=True)
            save(report, out, started)

        if "generate" in args.parts:
            part = report["parts"]["generate"] = {}
            timeout = budget.cap(CAPS["generate"])
            if timeout is None:
                part["skipped"] = f"not run: {budget.left():.0f} s of the budget left"
            else:
                try:
                    part["result"] = run_suite_child("generate", args, model_1b, None, work / "generate.json", timeout,
                                                     prompts=sizes.prompts, max_new_tokens=sizes.max_new_tokens,
                                                     batch_size=sizes.generate_batch_size)
                    for r in part["result"]["rows"]:
                        print(f"generate: {r['label']}: {r['tokens_per_s']:.0f} tok/s, same outputs "
                              f"{r.get('same_outputs')}/{part['result']['prompts']}", flush=True)
                except Exception as exc:
                    part["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
                    print(f"generate: {part['error']}", flush=True)
            save(report, out, started)

        if "levers" in args.parts:
            from tunekit.train import TrainConfig

            fields = {f.name for f in dataclasses.fields(TrainConfig)}
            part = report["parts"]["levers"] = {"runs": [], "not_implemented": []}
            configs = [({name: value}, what) for name, value, what in LEVERS if name in fields]
            configs += [(json.loads(extra), "from --levers") for extra in (args.levers or [])]
            part["not_implemented"] = [{"field": name, "what": what} for name, value, what in LEVERS if name not in fields]
            lora_runs = report["parts"].get("lora", {}).get("runs", {})
            strongest = strongest_trl(lora_runs)
            part["against"] = strongest
            auto = lora_runs.get("ours")
            if auto and "tokens_per_s" in auto:
                part["runs"].append({"label": "gradient_checkpointing auto (the default; the lora part's run)", **auto})
            for options, what in configs:
                label = " ".join(f"{k}={json.dumps(v)}" for k, v in options.items())
                row = train_run("ours", label, CAPS["lever"], options)
                part["runs"].append({"label": label, "what": what, "options": options, **row})
                save(report, out, started)
            for row in part["runs"]:
                if strongest and "tokens_per_s" in row:
                    row["vs_strongest_trl"] = against(row, lora_runs[strongest])
            save(report, out, started)
        report["complete"] = True
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        save(report, out, started)
    print("\n" + markdown(report))
    print(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")


if __name__ == "__main__":
    main()
