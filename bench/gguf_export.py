"""What GGUF export costs and how close its files are: the demo's merged model through export_gguf.

    python -m bench.gguf_export [--model models/merged] [--precisions f16 q8_0 q4_0]

Times writing and checking each file exactly as the export stage does (transformers read-back, logits on
the test split's first export.check_examples conversations, the forgetting probe for quantised files),
prints the figures and writes bench/results/gguf/<model name>.json and .md. The export stage's default
(GGUF on) rests on these numbers: on the demo it must cost under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from tunekit.chat import resolve_chat_template
from tunekit.forgetting import load_probe, tokenize_probe
from tunekit.gguf_export import ProbeCheck, export_gguf
from tunekit.data import read_split
from tunekit.models import load_tokenizer, set_threads
from tunekit.params import ExportParams, ForgettingParams, TemplateParams

RESULTS = Path("bench/results/gguf")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/merged"))
    parser.add_argument("--data", type=Path, default=Path("data/tokenized"))
    parser.add_argument("--precisions", nargs="+", default=list(ExportParams().gguf))
    parser.add_argument("--name", default="demo-smollm2-135m")
    args = parser.parse_args(argv)
    set_threads(0)
    export, forgetting = ExportParams(), ForgettingParams()
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    chat_template = resolve_chat_template(TemplateParams().chat_template, tokenizer)
    rows = read_split(args.data, "test")[:export.check_examples]
    probe = ProbeCheck(tokenize_probe(load_probe(forgetting.probe, forgetting.probe_passages), tokenizer,
                                      forgetting.max_length), tokenizer.pad_token_id, forgetting.batch_size)
    with tempfile.TemporaryDirectory() as out:
        results = export_gguf(args.model, Path(out), args.precisions, chat_template, rows, probe, "bench")
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime  # what the run cost in CPU, whatever else shared the cores
    report = {"model": args.name, "precisions": args.precisions, "seconds_total": round(seconds, 1),
              "cpu_seconds_total": round(cpu, 1), "load_average_1min": round(os.getloadavg()[0], 1),
              "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
              "check_examples": export.check_examples, "probe_passages": forgetting.probe_passages,
              "files": {p: {k: v for k, v in r.items() if k not in ("special_tokens", "tensor_types")} | {
                  "tensor_types": r["tensor_types"]} for p, r in results.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    columns = ("bytes", "max_logit_difference", "mean_kl", "max_kl", "top1_agreement", "perplexity_change")
    lines = [f"# GGUF export of {args.name}: {seconds:.0f} s wall, {cpu:.0f} CPU-s for {', '.join(args.precisions)}", "",
             f"Write + transformers read-back + checks, {report['threads']} threads, load average "
             f"{report['load_average_1min']} while it ran (CPU-s counts the whole process, model loading included).", "",
             "| file | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in results.values():
        lines.append(f"| {r['file']} | " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                                                   for c in columns) + " |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
