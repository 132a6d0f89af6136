"""Stage `export`: the checkpoint to ship, with its complete model card.

    python -m stages.export --finetune models/finetune --merged models/merged --metrics-dir metrics --out models/export

The deliverable is models/merged when the merge folded the adapter into the weights, else
models/finetune (full weights, or an adapter that cannot be merged and is served on its base). Its
files are linked into `--out` (hard links; copies where the file system refuses), and a `README.md` model
card is written beside them with everything: base model, method, params, data hashes, training, merge
check, evaluation and forgetting. The cards inside models/finetune and models/merged cannot hold the
evaluation and forgetting numbers, since those stages read the checkpoints; this stage runs after them.

dvc.yaml declares models/export with `cache: false`: DVC records its hash but keeps no second copy of
the weights in its cache or remote; after `dvc pull`, `dvc repro export` rebuilds it in about a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from tunekit.card import CARD_FILE, render_card
from tunekit.io import atomic_dir, is_merged, read_json, read_meta
from tunekit.params import ProjectParams, load_section
from tunekit.tracking import configure_logging, stage_run

log = logging.getLogger("tunekit")

# The stages whose metrics the card shows, in pipeline order.
CARD_SECTIONS = ("ingest", "template", "dapt", "finetune", "merge", "evaluate", "forgetting")


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def run(finetune_dir: Path, merged_dir: Path | None, metrics_dir: Path, out: Path) -> dict:
    merged = is_merged(merged_dir)
    source = merged_dir if merged else finetune_dir
    if read_meta(source) is None:
        raise SystemExit(f"{source}/meta.json is missing: run the stage that writes {source} first (dvc repro)")
    sections = [s for s in CARD_SECTIONS if s != "merge" or merged]
    metrics = {s: read_json(metrics_dir / f"{s}.json") for s in sections if (metrics_dir / f"{s}.json").is_file()}
    missing = [s for s in ("evaluate", "forgetting") if s not in metrics]
    if missing:
        log.warning("no %s in %s: the card leaves those sections as pointers", " or ".join(f"{s}.json" for s in missing),
                    metrics_dir)
    card = render_card(source, metrics)

    files, size = 0, 0
    with atomic_dir(out) as tmp:
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            if path.is_dir() or relative == Path(CARD_FILE):  # the checkpoint's own, partial card
                continue
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(path, tmp / relative)
            files, size = files + 1, size + path.stat().st_size
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    log.info("exported %s (%d files, %.1f MB) to %s with its model card", source, files, size / 1e6, out)
    return {"source": str(source), "merged": merged, "files": files, "bytes": size, "card_sections": sorted(metrics)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetune", type=Path, required=True, help="fine-tuned checkpoint (models/finetune)")
    parser.add_argument("--merged", type=Path, help="merge stage output (models/merged); exported when it is merged")
    parser.add_argument("--metrics-dir", type=Path, required=True, help="directory of the stages' <stage>.json metrics")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    with stage_run("export", project.experiment, {"finetune": str(args.finetune), "merged": str(args.merged)}) as mlflow:
        result = run(args.finetune, args.merged, args.metrics_dir, args.out)
        mlflow.set_tags({"export.source": result["source"], "export.merged": str(result["merged"]).lower()})
        mlflow.log_metrics({"export_files": result["files"], "export_bytes": result["bytes"]})
        mlflow.log_artifact(str(args.out / CARD_FILE), artifact_path="export")


if __name__ == "__main__":
    main()
