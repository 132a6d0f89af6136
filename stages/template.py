"""Stage `template`: render each conversation with the chat template, tokenise it, and mask the loss
to the assistant turns; optionally pack the training split.

    python -m stages.template --model models/base --data data/ingested --out data/tokenized \
        --preview reports/template --metrics metrics/template.json

Examples left with no trained token after truncation are not trained on; they are counted in the
metrics and listed, with their source line, in <preview>/dropped.jsonl.

With `task.type` other than sft the stage tokenises the task data instead (tunekit/tasks.py): label
alignment, QA windows, <out>/labels.json, and a token/label table as the preview.
With `task.type: multi_task` each row is tokenised by its own task's rules and settings (task.tasks),
keeps its "task" name, and labels.json holds every task's label set under "tasks".
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm.auto import tqdm

from tunekit.chat import IGNORE_INDEX, Encoded, encode_conversation, pack, preview_html, resolve_chat_template
from tunekit.io import atomic_dir, read_jsonl, write_json, write_jsonl
from tunekit.models import load_tokenizer
from tunekit.params import ProjectParams, TaskParams, TemplateParams, load_section
from tunekit.tracking import configure_logging, data_tags, log_datasets, log_metrics, stage_run

log = logging.getLogger("tunekit")
SPLITS = ("train", "validation", "test")


def encode_split(records: list[dict], tokenizer, chat_template: str, params: TemplateParams, split: str
                 ) -> tuple[list[tuple[dict, Encoded]], list[dict], dict]:
    kept, dropped = [], []
    truncated = eot_trained = trained = total = 0
    for record in tqdm(records, desc=f"template ({split})", unit="conv", dynamic_ncols=True):
        encoded = encode_conversation(record["messages"], tokenizer, chat_template, params.train_on, params.max_length,
                                      tools=record.get("tools"))
        n_trained = sum(label != IGNORE_INDEX for label in encoded.labels)
        truncated += encoded.truncated
        if n_trained == 0:
            dropped.append({"id": record["id"], "source": record.get("source"), "split": split,
                            "reason": "no trained token left after truncation to template.max_length"
                            if encoded.truncated else "no assistant turn is trained (train: false / train_on)"})
            continue
        eot_trained += encoded.eot_trained
        trained += n_trained
        total += len(encoded.input_ids)
        kept.append((record, encoded))
    stats = {"examples": len(kept), "dropped_no_trained_tokens": len(dropped), "truncated": truncated,
             "eot_trained": eot_trained, "trained_tokens": trained, "tokens": total,
             "trained_fraction": trained / max(total, 1)}
    return kept, dropped, stats


def run(params: TemplateParams, model_dir: Path, data_dir: Path, out: Path, preview: Path,
        task: TaskParams | None = None) -> dict:
    tokenizer = load_tokenizer(model_dir)
    if task is not None and task.type == "multi_task":
        from tunekit.tasks import tokenize_tasks

        with atomic_dir(out) as tmp_out, atomic_dir(preview) as tmp_preview:
            return tokenize_tasks(task, params.max_length, tokenizer, data_dir, tmp_out, tmp_preview, params.preview_examples)
    if task is not None and task.type != "sft":
        from tunekit.tasks import tokenize_task

        with atomic_dir(out) as tmp_out, atomic_dir(preview) as tmp_preview:
            return tokenize_task(task.type, task, params.max_length, tokenizer, data_dir, tmp_out, tmp_preview,
                                 params.preview_examples)
    chat_template = resolve_chat_template(params.chat_template, tokenizer)
    metrics: dict = {}
    all_dropped: list[dict] = []
    preview_examples: list[Encoded] = []
    with atomic_dir(out) as tmp_out:
        for split in SPLITS:
            records = list(read_jsonl(data_dir / f"{split}.jsonl"))
            kept, dropped, stats = encode_split(records, tokenizer, chat_template, params, split)
            all_dropped += dropped
            rows = [{"id": record["id"], "input_ids": enc.input_ids, "labels": enc.labels} for record, enc in kept]
            if split == "train":
                preview_examples = [enc for _, enc in kept[:params.preview_examples]]
                if params.packing and rows:
                    rows = pack([enc for _, enc in kept], params.max_length)
                    stats["packed_rows"] = len(rows)
                    stats["packing_efficiency"] = stats["tokens"] / (len(rows) * params.max_length)
            write_jsonl(tmp_out / f"{split}.jsonl", rows)
            metrics[split] = stats
    with atomic_dir(preview) as tmp_preview:
        (tmp_preview / "mask_preview.html").write_text(
            preview_html(preview_examples, tokenizer, n=params.preview_examples), encoding="utf-8")
        write_jsonl(tmp_preview / "dropped.jsonl", all_dropped)

    examples = sum(metrics[s]["examples"] for s in SPLITS)
    metrics["trained_fraction"] = sum(metrics[s]["trained_tokens"] for s in SPLITS) / max(sum(metrics[s]["tokens"] for s in SPLITS), 1)
    metrics["eot_trained_fraction"] = sum(metrics[s]["eot_trained"] for s in SPLITS) / max(examples, 1)
    metrics["truncated"] = sum(metrics[s]["truncated"] for s in SPLITS)
    metrics["dropped_no_trained_tokens"] = len(all_dropped)
    if all_dropped:
        log.warning("%d conversation(s) had no trained token and were left out; see %s", len(all_dropped), preview / "dropped.jsonl")
    if metrics["train"]["examples"] == 0:
        raise SystemExit("no training example has a trained token: raise template.max_length or check train_on / train: false")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint whose tokenizer and chat template to use")
    parser.add_argument("--data", type=Path, required=True, help="ingested data directory (train/validation/test.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="tokenised data directory to write")
    parser.add_argument("--preview", type=Path, required=True, help="directory for the mask preview and dropped list")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: TemplateParams = load_section("template")
    task: TaskParams = load_section("task")

    tags = {"task.type": task.type, **data_tags(ingested=args.data)}
    with stage_run("template", project.experiment, params, tags=tags) as mlflow:
        metrics = run(params, args.model, args.data, args.out, args.preview, task)
        write_json(args.metrics, metrics)
        log_metrics(mlflow, metrics)
        mlflow.log_artifacts(str(args.preview), artifact_path="template")
        log_datasets(mlflow, "ingested", {s: args.data / f"{s}.jsonl" for s in ("train", "validation", "test")})
    if task.type != "sft":
        log.info("template (%s): %d examples, %d labels, %d truncated", task.type, metrics["examples"],
                 metrics["labels"], metrics["truncated"])
        return
    log.info("template: trained fraction %.3f, end-of-turn trained in %.1f%% of examples, %d truncated",
             metrics["trained_fraction"], 100 * metrics["eot_trained_fraction"], metrics["truncated"])


if __name__ == "__main__":
    main()
