"""Stage `export`: the checkpoint to ship, its GGUF files and Ollama Modelfile, behind quality gates.

    python -m stages.export --finetune models/finetune --merged models/merged --metrics-dir metrics \
        --data data/tokenized --ingested data/ingested --out models/export --metrics metrics/export.json

The deliverable is models/merged when the merge folded the adapter into the weights, else
models/finetune (full weights, or an adapter that cannot be merged and is served on its base). Its
files are linked into `--out` (hard links; copies where the file system refuses), with beside them:
- one GGUF file per precision of `export.gguf` (tunekit/gguf_export.py), each read back with
  transformers' GGUF loader and compared with the checkpoint on held-out conversations and the
  forgetting probe; llama.cpp, Ollama and LM Studio run them (docs/export.md);
- an Ollama `Modelfile` (tunekit/modelfile.py): the training chat template in Ollama's syntax, its
  stop tokens and the system prompt training used;
- a `README.md` model card with everything: base, method, params, data hashes, training, merge check,
  evaluation, forgetting, the gates and the GGUF figures.

Nothing ships because it merely finished: `export.gates` (tunekit/gates.py) and the GGUF files' bounds
are checked first. When one fails, nothing is published (no --out, no registry alias) and the stage
fails listing the failed gates; `--metrics` still holds every figure. `export.force: true` publishes
anyway and records that it did. Passing, the registered merged model's version becomes `candidate`.

dvc.yaml declares models/export with `cache: false`: DVC records its hash but keeps no second copy of
the weights in its cache or remote; after `dvc pull`, `dvc repro export` rebuilds it.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
from pathlib import Path

from tunekit.card import CARD_FILE, render_card
from tunekit.chat import render, resolve_chat_template
from tunekit.forgetting import load_probe, tokenize_probe
from tunekit.gates import describe, evaluate_gates, failures
from tunekit.gguf_export import ExportRefused, ProbeCheck, export_gguf, gguf_gates
from tunekit.data import read_split
from tunekit.io import atomic_dir, is_merged, read_json, read_meta, write_json
from tunekit.methods import method_of_checkpoint
from tunekit.modelfile import MODELFILE, match_family, modelfile, training_system_prompt
from tunekit.models import load_tokenizer, set_threads
from tunekit.params import ExportParams, ForgettingParams, ProjectParams, TemplateParams, load_section
from tunekit.tasks import task_of
from tunekit.tracking import configure_logging, log_metrics, stage_run

log = logging.getLogger("tunekit")

# The stages whose metrics the card shows and the gates read, in pipeline order.
CARD_SECTIONS = ("ingest", "template", "dapt", "finetune", "merge", "evaluate", "forgetting")


class GatesFailed(Exception):
    def __init__(self, result: dict):
        self.result = result
        super().__init__("the model was not exported: quality gate(s) failed:\n" + "\n".join(
            f"  - {describe(r)}" for r in failures(result["gates"])) + "\n(export.force: true exports anyway)")


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def why_no_gguf(params: ExportParams, source: Path, merged: bool, meta: dict) -> str | None:
    """Why this checkpoint gets no GGUF files, or None when it does."""
    if not params.write_gguf or not params.gguf:
        return "export.write_gguf is false" if not params.write_gguf else "export.gguf is empty"
    task = task_of(meta)
    if task.no_gguf:
        return f"a {task.name} model is {task.no_gguf}"
    if not merged:
        method = method_of_checkpoint(meta)
        return (f"method {method.name!r} is not merged into the weights ({method.why_not_mergeable}) and llama.cpp "
                "applies LoRA adapters only, so it cannot apply this one either; serve it with tunekit.methods.load_tuned")
    return None


def run(params: ExportParams, template: TemplateParams, forgetting: ForgettingParams, finetune_dir: Path,
        merged_dir: Path | None, metrics_dir: Path, data_dir: Path, ingested_dir: Path, out: Path) -> dict:
    set_threads(forgetting.threads)
    merged = is_merged(merged_dir)
    source = merged_dir if merged else finetune_dir
    meta = read_meta(source)
    if meta is None:
        raise SystemExit(f"{source}/meta.json is missing: run the stage that writes {source} first (dvc repro)")
    sections = [s for s in CARD_SECTIONS if s != "merge" or merged]
    metrics = {s: read_json(metrics_dir / f"{s}.json") for s in sections if (metrics_dir / f"{s}.json").is_file()}
    shipped = "merged" if merged else "tuned"
    skipped = why_no_gguf(params, source, merged, {**(read_meta(finetune_dir) or {}), **meta})
    if skipped:
        log.warning("no GGUF files: %s", skipped)

    result: dict = {"source": str(source), "merged": merged, "shipped": shipped, "card_sections": sorted(metrics),
                    "forced": False}
    try:
        with atomic_dir(out) as tmp:
            files, size = 0, 0
            for path in sorted(source.rglob("*")):
                relative = path.relative_to(source)
                if path.is_dir() or relative == Path(CARD_FILE):  # the checkpoint's own, partial card
                    continue
                (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(path, tmp / relative)
                files, size = files + 1, size + path.stat().st_size
            result.update(files=files, bytes=size)

            lineage = {**(read_meta(finetune_dir) or {}), **meta}
            gates = dict(params.gates) if params.gates is not None else task_of(lineage).gates(lineage.get("task") or {})
            if skipped:
                result["gguf_skipped"] = skipped
            else:
                tokenizer = load_tokenizer(source)
                chat_template = resolve_chat_template(template.chat_template, tokenizer)
                rows = list(itertools.islice(read_split(data_dir, "test"), params.check_examples))
                # The same held-out conversations as text, rendered as training rendered them: the tokenizer check.
                texts = [render(record["messages"], tokenizer, chat_template, False) for record in
                         itertools.islice(read_split(ingested_dir, "test"), params.check_examples)
                         if record.get("messages")]
                probe_rows = tokenize_probe(load_probe(forgetting.probe, forgetting.probe_passages), tokenizer,
                                            forgetting.max_length)
                probe = ProbeCheck(probe_rows, tokenizer.pad_token_id, forgetting.batch_size)
                result["gguf"] = export_gguf(source, tmp, list(params.gguf), chat_template, rows, probe,
                                             name=f"tunekit {meta.get('method', 'model')}", texts=texts or None)
                gates.update(gguf_gates(params.gguf))
                if params.modelfile_from:
                    family, default = match_family(tokenizer, chat_template)
                    system = training_system_prompt(read_split(ingested_dir, "train")) or default
                    gguf_file = result["gguf"][params.modelfile_from]["file"]
                    (tmp / MODELFILE).write_text(modelfile(gguf_file, family, system), encoding="utf-8")
                    result["modelfile"] = {"from": gguf_file, "template": family.name if family else None,
                                           "system": system}
                    if family is None:
                        log.warning("the chat template maps to no Ollama template tunekit knows (chatml, llama3): the "
                                    "Modelfile has no TEMPLATE and Ollama falls back to its own guess")

            result["gates"] = evaluate_gates(gates, {**metrics, "gguf": result.get("gguf", {})}, shipped)
            failed = failures(result["gates"])
            result["passed"] = not failed
            result["forced"] = bool(failed) and params.force
            (tmp / CARD_FILE).write_text(render_card(source, {**metrics, "export": result}), encoding="utf-8")
            if failed and not params.force:
                raise GatesFailed(result)
            for gate in failed:
                log.warning("gate failed, exported anyway (export.force): %s", describe(gate))
    except GatesFailed:
        shutil.rmtree(out, ignore_errors=True)  # an earlier export is not this model: publish nothing
        raise
    log.info("exported %s (%d files, %.1f MB) to %s with %d GGUF file(s) and its model card", source, result["files"],
             result["bytes"] / 1e6, out, len(result.get("gguf", {})))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetune", type=Path, required=True, help="fine-tuned checkpoint (models/finetune)")
    parser.add_argument("--merged", type=Path, help="merge stage output (models/merged); exported when it is merged")
    parser.add_argument("--metrics-dir", type=Path, required=True, help="directory of the stages' <stage>.json metrics")
    parser.add_argument("--data", type=Path, required=True, help="tokenised data (the test split checks the GGUF files)")
    parser.add_argument("--ingested", type=Path, required=True, help="ingested data (the training system prompt)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file to write (gates, GGUF figures)")
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: ExportParams = load_section("export")
    template: TemplateParams = load_section("template")
    forgetting: ForgettingParams = load_section("forgetting")
    registered: str | None = load_section("merge").registered_model

    with stage_run("export", project.experiment, params) as mlflow:
        try:
            result = run(params, template, forgetting, args.finetune, args.merged, args.metrics_dir, args.data,
                         args.ingested, args.out)
        except GatesFailed as failed:
            record(mlflow, args.metrics, failed.result)
            raise SystemExit(str(failed)) from None
        except ExportRefused as refused:
            raise SystemExit(f"GGUF export refused: {refused}") from None
        record(mlflow, args.metrics, result)
        mlflow.log_artifact(str(args.out / CARD_FILE), artifact_path="export")
        if registered:
            promote(mlflow, registered, args.out, result["forced"])


def record(mlflow, path: Path, result: dict) -> None:
    """metrics/export.json, and the gates and GGUF figures in MLflow (tags for the verdicts)."""
    write_json(path, result)
    log_metrics(mlflow, {"files": result.get("files", 0), "bytes": result.get("bytes", 0), "gguf": result.get("gguf", {})},
                prefix="export")
    for gate in result.get("gates", []):
        mlflow.set_tag(f"gate.{gate['gate']}", gate["verdict"])
        if gate["value"] is not None:
            mlflow.log_metric(f"gate.{gate['gate']}.value", gate["value"])
    mlflow.set_tags({"export.source": result["source"], "export.passed": str(result.get("passed")).lower(),
                     "export.forced": str(result["forced"]).lower()})


def promote(mlflow, name: str, out: Path, forced: bool) -> None:
    """The merge stage registered merged causal LMs only (task heads are logged as artifacts)."""
    meta = read_meta(out) or {}
    if meta.get("stage") == "merge" and task_of(meta).registrable:
        from tunekit.registry import promote_candidate

        promote_candidate(mlflow.MlflowClient(), name, meta["hash"], forced)


if __name__ == "__main__":
    main()
