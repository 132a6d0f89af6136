"""Stage `demo`: write the deterministic demo data set (order notes -> strict JSON) and a raw-text
corpus of the same domain for continued pretraining (stage `dapt`).

    python -m stages.demo --out data/demo --domain data/domain --tasks data/demo_tasks

--tasks also writes the demo data of the head-based tasks (task.type, issue 6): classification.jsonl
(intent of customer messages), ner.jsonl (BIO-tagged order notes) and qa.jsonl (SQuAD-style questions
over order notes, ~10% unanswerable); point ingest.inputs at one of them with the matching task.type.

Point `ingest.inputs` (and `dapt.inputs`) at your own data to train on it instead; this stage then stays idle.
The domain corpus lives outside --out because ingest reads every *.jsonl under `data/demo` as chat data.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tunekit.demo import generate, generate_domain, generate_tasks
from tunekit.io import atomic_dir, write_jsonl
from tunekit.params import DemoParams, load_section
from tunekit.tracking import configure_logging

log = logging.getLogger("tunekit")

DOMAIN_FILE = "corpus.txt"


def run(params: DemoParams, out: Path, domain: Path | None = None, tasks: Path | None = None) -> int:
    with atomic_dir(out) as tmp:
        count = write_jsonl(tmp / "orders.jsonl", generate(params.records, params.seed))
    if domain is not None:
        with atomic_dir(domain) as tmp:
            # One document per paragraph: the .txt format of tunekit.text (documents separated by blank lines).
            documents = generate_domain(params.domain_documents, params.seed)
            (tmp / DOMAIN_FILE).write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    if tasks is not None:
        with atomic_dir(tasks) as tmp:
            for name, rows in generate_tasks(params.records, params.seed).items():
                write_jsonl(tmp / f"{name}.jsonl", rows)
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write orders.jsonl into")
    parser.add_argument("--domain", type=Path, help="directory to write the raw-text domain corpus (corpus.txt) into")
    parser.add_argument("--tasks", type=Path, help="directory to write the task demo sets into (classification, ner, qa)")
    args = parser.parse_args(argv)
    configure_logging()
    params: DemoParams = load_section("demo")
    count = run(params, args.out, args.domain, args.tasks)
    log.info("wrote %d demo records to %s", count, args.out / "orders.jsonl")
    if args.domain is not None:
        log.info("wrote %d domain documents to %s", params.domain_documents, args.domain / DOMAIN_FILE)
    if args.tasks is not None:
        log.info("wrote %d records each of the task demo sets to %s", params.records, args.tasks)


if __name__ == "__main__":
    main()
