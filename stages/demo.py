"""Stage `demo`: write the deterministic demo data set (order notes -> strict JSON).

    python -m stages.demo --out data/demo

Point `ingest.inputs` at your own JSONL to train on your data instead; this stage then stays idle.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tunekit.demo import generate
from tunekit.io import atomic_dir, write_jsonl
from tunekit.params import DemoParams, load_section
from tunekit.tracking import configure_logging

log = logging.getLogger("tunekit")


def run(params: DemoParams, out: Path) -> int:
    with atomic_dir(out) as tmp:
        return write_jsonl(tmp / "orders.jsonl", generate(params.records, params.seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write orders.jsonl into")
    args = parser.parse_args(argv)
    configure_logging()
    params: DemoParams = load_section("demo")
    count = run(params, args.out)
    log.info("wrote %d demo records to %s", count, args.out / "orders.jsonl")


if __name__ == "__main__":
    main()
