"""Benchmark: what going through the `evaluate` modules costs against calling the reference libraries directly.

    python bench/metric_overhead.py                  # ~1-2 min on 2 cores: 1000 predictions, 3 rounds
    python bench/metric_overhead.py --n 5000 --rounds 5

For every metric the evaluate stage computes, on the same deterministic inputs (1000 answer/reference
pairs of 5-60 words of prose from the Python reference in `pydoc_data.topics`, 1000 labels, 1000 tag
sequences, 1000 regression rows, 1000 pass@k count pairs):

- direct: the reference library called as tunekit.metrics did before the modules (sacrebleu, rouge-score,
  the SQuAD normalisation, scikit-learn, seqeval, scipy, the pass@k estimator);
- module: the `tunekit.metrics` wrapper, i.e. `compute` of the loaded `evaluate` module (Arrow encoding of
  the inputs, then the same library);
- per-sample scores (each generation metric once per pair, 1000 calls): the library, the module's
  `compute`, and the module's own `_compute` inside `tunekit.metric_modules.one_pair_at_a_time()` (no
  Arrow round trip of the inputs), which is what `tunekit.generate.score_generations` does.

Plus the one-off costs per process: `import evaluate` (it imports transformers and torch) and loading
every module. Direct and module calls alternate within every round; the median of the rounds is
reported. Values are checked equal (the benchmark refuses to report a module that disagrees).
Results: bench/results/metrics/latest.json and latest.md (and a timestamped copy).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "metrics"


def prose_words() -> list[str]:
    from pydoc_data.topics import topics

    words = []
    for key in sorted(topics):
        words += topics[key].split()
    return words


def text_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """n (prediction, reference) pairs: a reference of 5-60 words of prose; the prediction the same words
    with about a fifth replaced, dropped or reordered (like a model's paraphrase), 5 % identical."""
    rng = random.Random(seed)
    words = prose_words()
    predictions, references = [], []
    for _ in range(n):
        start = rng.randrange(len(words) - 60)
        reference = words[start:start + rng.randint(5, 60)]
        prediction = [w if rng.random() > 0.2 else rng.choice(words) for w in reference]
        if rng.random() < 0.1:
            prediction = prediction[: max(1, len(prediction) - rng.randint(1, 5))]
        if rng.random() < 0.05:
            prediction = list(reference)
        references.append(" ".join(reference))
        predictions.append(" ".join(prediction))
    return predictions, references


def direct_functions():
    """The libraries called directly, as tunekit.metrics did before the evaluate modules (commit 430b7f0)."""
    import re
    import string
    from collections import Counter

    import numpy as np
    import sacrebleu
    from rouge_score import rouge_scorer
    from scipy.stats import pearsonr, spearmanr
    from seqeval.metrics import f1_score as seq_f1
    from seqeval.metrics import precision_score, recall_score
    from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error, roc_auc_score

    def normalize(text):
        text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())

    def squad_f1_one(p, r):
        pt, rt = normalize(p).split(), normalize(r).split()
        same = sum((Counter(pt) & Counter(rt)).values())
        return 0.0 if same == 0 else 2 * (same / len(pt)) * (same / len(rt)) / (same / len(pt) + same / len(rt))

    def rouge(p, r, types=("rouge1", "rouge2", "rougeL", "rougeLsum")):
        scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True, split_summaries=False)
        scores = [scorer.score(b, a) for a, b in zip(p, r)]
        return {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in types}

    def pass_at_k(n, c, ks):
        def one(n, c, k):
            return 1.0 if n - c < k else float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
        return {k: sum(one(a, b, k) for a, b in zip(n, c)) / len(c) for k in ks}

    def regression(t, p):
        t, p = np.asarray(t, dtype=float)[:, 0], np.asarray(p, dtype=float)[:, 0]
        return {"mse": float(mean_squared_error(t, p)), "mae": float(mean_absolute_error(t, p)),
                "pearson": float(pearsonr(t, p).statistic), "spearman": float(spearmanr(t, p).statistic)}

    return {
        "exact_match": lambda p, r: sum(a.strip() == b.strip() for a, b in zip(p, r)) / len(r),
        "bleu": lambda p, r: sacrebleu.corpus_bleu(p, [r]).score,
        "chrf": lambda p, r: sacrebleu.corpus_chrf(p, [r]).score,
        "rouge_l": lambda p, r: rouge(p, r, ("rougeL",))["rougeL"],
        "rouge": rouge,
        "squad": lambda p, r: {"exact_match": sum(normalize(a) == normalize(b) for a, b in zip(p, r)) / len(r),
                               "f1": sum(squad_f1_one(a, b) for a, b in zip(p, r)) / len(r)},
        "accuracy": lambda t, p: float(accuracy_score(t, p)),
        "f1_macro": lambda t, p: float(f1_score(t, p, average="macro", zero_division=0)),
        "roc_auc": lambda t, s: float(roc_auc_score(t, s)),
        "entity": lambda t, p: {"precision": precision_score(t, p, zero_division=0),
                                "recall": recall_score(t, p, zero_division=0), "f1": seq_f1(t, p, zero_division=0)},
        "regression": regression,
        "pass_at_k": pass_at_k,
    }


def module_functions():
    from tunekit import metrics as m

    return {
        "exact_match": m.exact_match, "bleu": m.bleu, "chrf": m.chrf, "rouge_l": m.rouge_l, "rouge": m.rouge,
        "squad": m.squad,
        "accuracy": m.accuracy, "f1_macro": lambda t, p: m.f1(t, p, "macro"), "roc_auc": m.roc_auc,
        "entity": m.entity_metrics, "regression": m.regression_metrics,
        "pass_at_k": m.pass_at_k,
    }


def inputs(n: int, seed: int) -> dict[str, tuple]:
    rng = random.Random(seed)
    predictions, references = text_pairs(n, seed)
    labels = [rng.randrange(4) for _ in range(n)]
    guessed = [y if rng.random() < 0.7 else rng.randrange(4) for y in labels]
    binary = [rng.randrange(2) for _ in range(n)]
    scores = [min(1.0, max(0.0, y * 0.6 + rng.random() * 0.5)) for y in binary]
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    true_tags = [[rng.choice(tags) for _ in range(rng.randint(3, 20))] for _ in range(n)]
    pred_tags = [[t if rng.random() < 0.8 else rng.choice(tags) for t in s] for s in true_tags]
    true_values = [[rng.gauss(0, 1)] for _ in range(n)]
    pred_values = [[v[0] + rng.gauss(0, 0.5)] for v in true_values]
    samples = [10] * n
    correct = [rng.randint(0, 10) for _ in range(n)]
    text = (predictions, references)
    return {"exact_match": text, "bleu": text, "chrf": text, "rouge_l": text, "rouge": text, "squad": text,
            "accuracy": (labels, guessed), "f1_macro": (labels, guessed), "roc_auc": (binary, scores),
            "entity": (true_tags, pred_tags), "regression": (true_values, pred_values),
            "pass_at_k": (samples, correct, [1, 5, 10])}


PER_SAMPLE = ("exact_match", "bleu", "chrf", "rouge_l", "rouge", "squad")


def same(a, b) -> bool:
    if isinstance(a, dict):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))


def timed(function, args) -> tuple[float, object]:
    start = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - start, value


def run(n: int, rounds: int, seed: int) -> dict:
    start = time.perf_counter()
    import evaluate  # noqa: F401  (imports transformers and torch: the one-off cost of the interface)

    import_s = time.perf_counter() - start
    from tunekit.metric_modules import BUILTIN, load, one_pair_at_a_time

    start = time.perf_counter()
    for name in BUILTIN:
        load(name)
    load_s = time.perf_counter() - start

    direct, module, data = direct_functions(), module_functions(), inputs(n, seed)
    times: dict[str, dict[str, list[float]]] = {name: {"direct": [], "module": []} for name in data}
    per_sample: dict[str, dict[str, list[float]]] = {name: {"direct": [], "module": [], "pairs": []} for name in PER_SAMPLE}
    for r in range(rounds):
        order = ("direct", "module") if r % 2 == 0 else ("module", "direct")
        for name, args in data.items():
            values = {}
            for side in order:
                seconds, values[side] = timed((direct if side == "direct" else module)[name], args)
                times[name][side].append(seconds)
            if not same(values["direct"], values["module"]):
                raise SystemExit(f"{name}: module gives {values['module']} but the library {values['direct']}")
        for name in PER_SAMPLE:
            predictions, references = data[name]
            values = {}
            for side in (*order, "pairs"):
                function = (direct if side == "direct" else module)[name]
                start = time.perf_counter()
                with one_pair_at_a_time() if side == "pairs" else contextlib.nullcontext():
                    values[side] = [function([p], [ref]) for p, ref in zip(predictions, references)]
                per_sample[name][side].append(time.perf_counter() - start)
            if not all(same(a, b) and same(a, c) for a, b, c in zip(values["direct"], values["module"], values["pairs"])):
                raise SystemExit(f"{name}: per-sample module scores differ from the library's")

    def summary(table):
        out = {}
        for name, sides in table.items():
            d, m = statistics.median(sides["direct"]), statistics.median(sides["module"])
            out[name] = {"direct_s": round(d, 5), "module_s": round(m, 5), "ratio": round(m / d, 2),
                         "overhead_ms": round(1000 * (m - d), 2)}
        return out

    corpus, samples = summary(times), summary(per_sample)
    for name in samples:
        samples[name]["overhead_ms_per_call"] = round(samples[name]["overhead_ms"] / n, 3)
        pairs = statistics.median(per_sample[name]["pairs"])
        samples[name]["pairs_s"] = round(pairs, 5)
        samples[name]["pairs_ratio"] = round(pairs / samples[name]["direct_s"], 2)
    return {"n": n, "rounds": rounds, "seed": seed, "import_evaluate_s": round(import_s, 2),
            "load_all_modules_s": round(load_s, 2), "corpus": corpus, "per_sample": samples}


def markdown(result: dict) -> str:
    lines = [f"# evaluate modules against the libraries called directly ({result['date']})", "",
             f"commit {result['commit']}, {result['machine']}, load average {result['load_before']} before, "
             f"{result['load_after']} after; {result['n']} examples, median of {result['rounds']} alternating rounds.",
             "", f"One-off per process: `import evaluate` {result['import_evaluate_s']} s (it imports transformers "
             f"and torch), loading all {len(result['corpus'])} modules {result['load_all_modules_s']} s.", "",
             "## One call over all examples", "", "| metric | direct (s) | module (s) | ratio | overhead (ms) |",
             "|---|---|---|---|---|"]
    for name, row in result["corpus"].items():
        lines.append(f"| {name} | {row['direct_s']} | {row['module_s']} | {row['ratio']} | {row['overhead_ms']} |")
    lines += ["", f"## Per-sample scores ({result['n']} one-pair calls)", "",
              "module: `compute` per pair; pairs: the module's `_compute` per pair inside `one_pair_at_a_time()`, "
              "as score_generations does it.", "",
              "| metric | direct (s) | module (s) | ratio | overhead per call (ms) | pairs (s) | pairs ratio |",
              "|---|---|---|---|---|---|---|"]
    for name, row in result["per_sample"].items():
        lines.append(f"| {name} | {row['direct_s']} | {row['module_s']} | {row['ratio']} | {row['overhead_ms_per_call']} "
                     f"| {row['pairs_s']} | {row['pairs_ratio']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    result = run(args.n, args.rounds, args.seed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    now = datetime.datetime.now(datetime.UTC)
    result = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    for name in (stamp, "latest"):
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (RESULTS / f"{name}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
