"""Benchmark: what the bubblewrap sandbox costs per program against the audit-hook sandbox it replaced.

    python bench/sandbox_overhead.py                 # ~1-2 min on 2 cores: 40 trivial programs x 2 rounds, 164 x 2
    python bench/sandbox_overhead.py --trivial 100 --rounds 3
    python bench/sandbox_overhead.py --old-ref <commit>   # another baseline (any commit holding tunekit/sandbox.py)

The old sandbox is tunekit/sandbox.py as of --old-ref (default: the last commit before the rebuild,
read with `git show`, so both run in this one process on the same machine at the same time). The two
alternate within every round (old first in odd rounds, new first in even ones), so that drift in the
machine's load hits both alike:

- trivial programs (`pass`), one at a time: the fixed cost of starting a sandbox, per program;
- HumanEval's 164 canonical solutions through `check_humaneval` on every core, as the evaluate stage
  runs them: wall time for the set, per-program time inside it, and pass@1 (must be 1.0 for both).

Results: bench/results/sandbox/latest.json and latest.md. The CPU may be shared with other work:
the load average before and after is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "sandbox"
OLD_REF = "f1ff6b23ac2887e8a0889c19e66224c519e4f91a"  # main's last tunekit/sandbox.py with the audit hook alone


def load_old_sandbox(ref: str):
    source = subprocess.run(["git", "show", f"{ref}:tunekit/sandbox.py"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    spec = importlib.util.spec_from_loader("tunekit_sandbox_old", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{ref[:12]}:tunekit/sandbox.py", "exec"), module.__dict__)
    return module


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary_ms(values: list[float]) -> dict:
    return {"n": len(values), "median_ms": 1000 * statistics.median(values), "mean_ms": 1000 * statistics.fmean(values),
            "p90_ms": 1000 * percentile(values, 0.9), "min_ms": 1000 * min(values)}


def time_trivial(sandbox, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        result = sandbox.run_program("pass\n", timeout=30)
        times.append(time.perf_counter() - started)
        if not result.passed:
            raise SystemExit(f"a trivial program did not pass in {sandbox.__name__}: {result.reason}")
    return times


def time_humaneval(sandbox, problems: list[dict]) -> tuple[float, list[float], float]:
    started = time.perf_counter()
    results = sandbox.check_humaneval(problems, [[p["canonical_solution"]] for p in problems], timeout=15)
    wall = time.perf_counter() - started
    report = sandbox.pass_at_k_report(results, [1])
    return wall, [row[0].duration_s for row in results], report["pass@1"]


def bwrap_version() -> str:
    try:
        return subprocess.run(["bwrap", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not installed"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trivial", type=int, default=40, help="trivial programs per sandbox per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (each: trivial, then the 164)")
    parser.add_argument("--old-ref", default=OLD_REF, help="commit whose tunekit/sandbox.py is the baseline")
    args = parser.parse_args(argv)

    from tunekit import sandbox as new
    from tunekit.sandbox import load_humaneval

    old = load_old_sandbox(args.old_ref)
    sandboxes = {"old": old, "new": new}
    problems = load_humaneval()
    load_before = os.getloadavg()
    trivial = {name: [] for name in sandboxes}
    humaneval_wall = {name: [] for name in sandboxes}
    humaneval_each = {name: [] for name in sandboxes}
    pass_at_1 = {name: [] for name in sandboxes}
    for round_index in range(args.rounds):
        order = ["old", "new"] if round_index % 2 == 0 else ["new", "old"]
        for name in order:
            trivial[name] += time_trivial(sandboxes[name], args.trivial)
        for name in order:
            wall, each, score = time_humaneval(sandboxes[name], problems)
            humaneval_wall[name].append(wall)
            humaneval_each[name] += each
            pass_at_1[name].append(score)
        print(f"round {round_index + 1}/{args.rounds}: trivial median old "
              f"{1000 * statistics.median(trivial['old']):.1f} ms, new {1000 * statistics.median(trivial['new']):.1f} ms; "
              f"164 canonical old {humaneval_wall['old'][-1]:.1f} s, new {humaneval_wall['new'][-1]:.1f} s", flush=True)
    load_after = os.getloadavg()

    figures = {name: {"trivial": summary_ms(trivial[name]),
                      "humaneval_164": {"wall_s": humaneval_wall[name], "median_wall_s": statistics.median(humaneval_wall[name]),
                                        "per_program": summary_ms(humaneval_each[name]), "pass@1": pass_at_1[name]}}
               for name in sandboxes}
    overhead = {
        "trivial_median_ms": figures["new"]["trivial"]["median_ms"] - figures["old"]["trivial"]["median_ms"],
        "trivial_median_ratio": figures["new"]["trivial"]["median_ms"] / figures["old"]["trivial"]["median_ms"],
        "humaneval_wall_ratio": figures["new"]["humaneval_164"]["median_wall_s"] / figures["old"]["humaneval_164"]["median_wall_s"],
        "humaneval_per_program_median_ms": (figures["new"]["humaneval_164"]["per_program"]["median_ms"]
                                            - figures["old"]["humaneval_164"]["per_program"]["median_ms"]),
    }
    record = {
        "command": "python bench/sandbox_overhead.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "bwrap": bwrap_version(), "root": os.geteuid() == 0,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after]},
        "old_ref": args.old_ref, "trivial_per_round": args.trivial, "rounds": args.rounds,
        "workers": os.cpu_count(), "figures": figures, "overhead": overhead,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(markdown(record))
    print(markdown(record))
    return record


def markdown(record: dict) -> str:
    m, f, o = record["machine"], record["figures"], record["overhead"]
    rows = []
    for name, label in (("old", f"audit hook only ({record['old_ref'][:10]})"), ("new", "bubblewrap + seccomp + rlimits + hook")):
        t, h = f[name]["trivial"], f[name]["humaneval_164"]
        rows.append(f"| {label} | {t['median_ms']:.1f} | {t['p90_ms']:.1f} | {h['median_wall_s']:.1f} | "
                    f"{h['per_program']['median_ms']:.1f} | {', '.join(f'{s:.2f}' for s in h['pass@1'])} |")
    return "\n".join([
        "# Sandbox overhead per program: bubblewrap sandbox against the audit-hook-only one",
        "",
        f"Command: `{record['command']}` ({record['date']})  ",
        f"Machine: {m['cpus']} cores, {m['platform']}, Python {m['python']}, {m['bwrap']}, as root: {m['root']}  ",
        f"Load average before/after: {' '.join(map(str, m['load_average_before']))} / "
        f"{' '.join(map(str, m['load_average_after']))}: the cores were shared with other work, so "
        "absolute times are noisy; old and new alternate in each round and share that noise.  ",
        f"Rounds: {record['rounds']}; trivial programs (`pass`, one at a time): {record['trivial_per_round']} per sandbox "
        f"per round; HumanEval: the 164 canonical solutions through `check_humaneval` on {record['workers']} workers.",
        "",
        "| sandbox | trivial program, median ms | trivial p90 ms | 164 canonical, wall s (median of rounds) "
        "| per program inside the 164, median ms | pass@1 per round |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Overhead of the new sandbox: {o['trivial_median_ms']:+.1f} ms per trivial program "
        f"({o['trivial_median_ratio']:.2f}x the old median); the 164 canonical solutions take "
        f"{o['humaneval_wall_ratio']:.2f}x the old wall time ({o['humaneval_per_program_median_ms']:+.1f} ms per program, median).",
        "",
    ])


if __name__ == "__main__":
    main()
