"""Benchmark: fp32 against bf16 autocast in tunekit's training loop on a GPU (finetune.precision).

    python bench/cuda_precision.py                      # SmolLM2-135M's architecture, LoRA and full, on cuda
    python bench/cuda_precision.py --out results.json   # also write the figures as JSON
    python bench/cuda_precision.py --device cpu --tiny --precisions fp32   # a smoke run without a GPU

The model is SmolLM2-135M-Instruct's architecture (its config, written out below) with random weights:
throughput and memory do not depend on the weights' values, and the GPU machine holds no model files.
Each run trains with tunekit.train.train (the finetune stage's loop) on random token rows with every
token labelled; the first `--warmup` optimizer steps are left out of the timing. Printed per method and
precision: trained tokens per second, peak GPU memory (torch.cuda.max_memory_allocated), and the mean
training loss of the timed steps (bf16 should follow fp32 closely).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunekit.methods import method_for
from tunekit.params import FinetuneParams
from tunekit.train import TrainConfig, train

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def rows(count: int, length: int, vocab: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, length), generator=gen).tolist()
    return [{"input_ids": r, "labels": r} for r in ids]


def run_one(method: str, precision: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(TINY if args.tiny else SMOLLM2_135M))).to(device)
    params = FinetuneParams(method=method, lora={"r": 16, "alpha": 32, "dropout": 0.0})
    model = method_for(params).prepare(model, params)
    data = rows(args.batch_size * (args.warmup + args.steps), args.length, model.config.vocab_size, seed=1)
    cfg = TrainConfig(epochs=1, max_steps=args.warmup + args.steps, lr=1e-4 if method == "lora" else 1e-5,
                      batch_size=args.batch_size, schedule="constant", precision=precision, eval_every=10**9,
                      checkpoint_every=10**9, seed=0)
    marks: list[float] = []

    def on_step(state) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as ckpt:
        state = train(model, data, [], cfg, 0, Path(ckpt), on_step=on_step)
    timed = state.history[args.warmup:]
    seconds = marks[-1] - marks[args.warmup - 1]
    tokens = sum(h["tokens"] for h in timed)
    return {"method": method, "precision": precision, "steps": len(timed), "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "mean_train_loss": sum(h["train_loss"] for h in timed) / len(timed)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=512, help="tokens per row")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps left out of the timing")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of SmolLM2-135M's shape")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step's end starts the clock)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu --precisions fp32 for a smoke run")
    if device.type != "cuda" and "bf16" in args.precisions:
        raise SystemExit("bf16 autocast runs on CUDA only (tunekit refuses it on the CPU); use --precisions fp32")

    results = [run_one(m, p, args, device) for m in args.methods for p in args.precisions]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, batch {args.batch_size} x {args.length} tokens, "
          f"{args.steps} timed steps after {args.warmup}\n")
    print("| method | precision | tokens/s | peak GPU memory (GiB) | mean train loss |")
    print("|---|---|---|---|---|")
    for r in results:
        memory = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        print(f"| {r['method']} | {r['precision']} | {r['tokens_per_second']:,.0f} | {memory} | {r['mean_train_loss']:.4f} |")
    for method in args.methods:
        by = {r["precision"]: r for r in results if r["method"] == method}
        if {"fp32", "bf16"} <= set(by):
            print(f"{method}: bf16 is {by['bf16']['tokens_per_second'] / by['fp32']['tokens_per_second']:.2f}x fp32's throughput")
    if args.out:
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
