"""The registry entry of a single-head kind (`head_task(kind)`): the stages' steps for one task head,
filled in by the kind's `HeadKind` (tunekit.tasks.heads)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tunekit.data import read_split
from tunekit.io import atomic_dir, is_merged, not_merged_reason, write_json, write_jsonl
from tunekit.methods import load_tuned
from tunekit.models import load_tokenizer, resolve_checkpoint
from tunekit.plots import write_csv
from tunekit.report import markdown_report, metrics_png, table_rows
from tunekit.tasks.base import (CardFacts, MergeCheck, Task, Training, check_rows, identity, ingest_inputs, ingest_tags,
                                learned_gate, not_collapsed_gate)
from tunekit.tasks.heads import (HeadKind, TaskObjective, TaskSpec, load_labels, load_task_base, load_task_model,
                                 max_logit_difference, predict, predicted_classes, score_task, select_test_rows,
                                 task_method, task_spec, tokenize_task)

log = logging.getLogger("tunekit")

NO_GENERAL_TEXT = ("finetune.replay and finetune.forgetting_every_n_steps mix in or score general text with the "
                   "language-modelling loss, and the forgetting stage scores a general-text probe with it; a task head "
                   "has no language-model output")
NO_GGUF = ("an encoder or decoder with a task head; GGUF runtimes (llama.cpp, Ollama) serve causal language models. "
           "Serve it with tunekit.tasks.load_task_model")
TASK_NOTE = ("accuracy, f1_*, roc_auc, entity_*, tag_accuracy and squad_* are 0-1 (squad_* as in SQuAD 2.0, the null "
             "answer for unanswerable questions); mse and mae are in the targets' units (squared for mse), pearson and "
             "spearman -1 to 1; loss is per example (classification, regression), per labelled token (token "
             "classification) or per window (qa); base is the untrained head on the base model.")


def log_spec(spec: TaskSpec, name: str | None = None, weight: float | None = None) -> None:
    log.info("task %s: %d labels %s, pooling %s, %s%s%s", f"{name} ({spec.type})" if name else spec.type, spec.num_labels,
             list(spec.labels)[:8], spec.pooling, "encoder" if spec.encoder else "decoder",
             f", weight {weight:g}" if weight is not None else "",
             f", class weights {[round(w, 3) for w in spec.class_weights]}" if spec.class_weights else "")


def score_models(harness, model_dir: Path, merged_dir: Path | None, retarget, load_merged) -> dict[str, str]:
    """Run `harness(label, model)` on base (the tuned checkpoint's adapter switched off, or its base
    loaded), tuned and merged, one model in memory at a time; returns the checkpoint path of each."""
    tuned = load_tuned(model_dir, retarget)
    checkpoints = {"base": str(resolve_checkpoint(tuned.base_dir)), "tuned": str(model_dir)}
    with tuned.base() as base:
        harness("base", base)
    harness("tuned", tuned.model)
    del tuned
    if is_merged(merged_dir):
        checkpoints["merged"] = str(merged_dir)
        harness("merged", load_merged(merged_dir))
    elif merged_dir is not None:
        log.warning("no merged checkpoint at %s (%s): it is not scored", merged_dir, not_merged_reason(merged_dir))
    return checkpoints


def how_to_load(kind: str):
    def text(chain: list[dict], meta: dict[str, Any], merged: bool) -> str:
        if merged or not meta.get("saves_adapter"):
            how, code = ("Standalone weights with the trained head", "from tunekit.tasks import load_task_model\n\n"
                         "model = load_task_model(Path(\"<this directory>\"))")
        else:
            how, code = ("An adapter and the trained head on the base named in `meta.json`",
                         "from tunekit.tasks import load_tuned\n\nmodel = load_tuned(Path(\"<this directory>\")).model")
        return (f"{how} ({kind.replace('_', ' ')}). tunekit loads it, head and labels included:\n\n```python\n"
                f"from pathlib import Path\n\n{code}\n```\n")
    return text


def head_task(kind: HeadKind) -> Task:
    """The registry entry of one single-head kind."""

    def tokenize(template, task_params, tokenizer, data_dir: Path, out: Path, preview: Path) -> dict:
        return tokenize_task(kind.name, task_params, template.max_length, tokenizer, data_dir, out, preview,
                             template.preview_examples, template.num_proc)

    def summary(metrics: dict) -> str:
        return (f"template ({kind.name}): {metrics['examples']} examples, {metrics['labels']} labels, "
                f"{metrics['truncated']} truncated")

    def training(task_params, params, method, model_dir: Path, data_dir: Path, train_rows: list[dict]) -> Training:
        spec = task_spec(task_params, load_labels(data_dir), model_dir, train_rows)
        log_spec(spec)
        return Training(TaskObjective(spec), task_method(method, spec), spec.to_meta(), "loss_units",
                        kind.prior_loss(train_rows, spec))

    def retarget(method, task_meta: dict) -> Any:
        return task_method(method, TaskSpec.from_meta(task_meta))

    def merge_check(params, data_dir: Path, tokenizer, task_meta: dict) -> MergeCheck:
        """Accepted only when the merged checkpoint, reloaded with load_task_model, predicts exactly what
        the adapter model predicts on held-out rows, with logits within merge.atol."""
        spec = TaskSpec.from_meta(task_meta)
        rows = check_rows(params, data_dir)

        def outputs(model, label: str) -> list[dict]:
            return predict(model, rows, spec, tokenizer.pad_token_id, params.check_examples, desc=f"predict ({label})")[0]

        def compare(before, after, atol: float) -> tuple[dict, str | None]:
            difference = max_logit_difference(before, after)
            same = kind.agree(predicted_classes(before, spec), predicted_classes(after, spec))
            log.info("%s head: largest |logit| difference, adapter vs merged checkpoint: %.3g (tolerance %.3g); "
                     "predictions identical: %s", spec.type, difference, atol, same)
            metrics = {"task_head": 1, "max_logit_difference": difference, "predictions_identical": int(same),
                       "checked_examples": len(rows)}
            if difference <= atol and same:
                return metrics, None
            return metrics, (f"merged {spec.type} model differs from the adapter model (largest logit difference "
                             f"{difference:.4g}, merge.atol={atol}, identical predictions: {same}): the merged checkpoint "
                             "was not written. Check that the adapter and base match (meta.json lineage).")

        return MergeCheck(lambda base_dir: load_task_base(base_dir, spec), outputs,
                          lambda path: load_task_model(path, spec), compare)

    def evaluate(params, template, task_params, model_dir: Path, data_dir: Path, tokenized_dir: Path, out: Path,
                 merged_dir: Path | None, seed: int, task_meta: dict) -> dict:
        """Every checkpoint of the lineage scored on the tokenised test split with the kind's metrics,
        predictions per example, the same report shape as SFT's. `base` is the base model with the new head
        untrained (chance level: what the fine-tune starts from); compare heads trained with method `head`
        (linear probing) and with lora / full for the value of fine-tuning the encoder itself."""
        spec = TaskSpec.from_meta(task_meta)
        tokenizer = load_tokenizer(model_dir)
        rows, records = select_test_rows(params.max_examples, read_split(tokenized_dir, "test"),
                                         read_split(data_dir, "test"))
        if not rows:
            raise SystemExit(f"{tokenized_dir / 'test'} is empty: raise ingest.test or add data")
        settings = kind.score_settings(task_params, (r for split in ("train", "test") for r in read_split(data_dir, split)))
        log.info("task %s: generation, few-shot prompting and HumanEval do not apply to a %s head; scoring its "
                 "predictions on %d test rows instead", spec.type, spec.type, len(rows))
        results, predictions, extras = {}, {}, {}
        with atomic_dir(out) as tmp:
            def harness(label: str, model) -> None:
                results[label], predictions[label], extras[label] = score_task(
                    model, spec, rows, records, tokenizer.pad_token_id, params.batch_size, label, task_params, tmp,
                    settings.get("allow_null"))

            checkpoints = score_models(harness, model_dir, merged_dir, retarget, lambda path: load_task_model(path, spec))
            for name, examples in predictions.items():
                write_jsonl(tmp / f"predictions_{name}.jsonl", examples)
            write_json(tmp / "confusion_matrices.json", {name: {"labels": list(spec.labels), **extra}
                                                          for name, extra in extras.items() if extra})
            columns, table = table_rows(results)
            write_csv(tmp / "report.csv", table, columns)
            metrics_png(tmp / "metrics.png", results)
            report = markdown_report(results, predictions, checkpoints,
                                     title=f"# Evaluation on the test split: {spec.type} head", note=TASK_NOTE)
            (tmp / "report.md").write_text(report + "".join(f"\n![confusion matrix ({name})](confusion_{name}.png)\n"
                                                            for name in extras if extras[name]), encoding="utf-8")
        numeric = [k for k, v in results["tuned"].items() if isinstance(v, float)]
        summary = {**results, "delta": {k: results["tuned"][k] - results["base"][k] for k in numeric},
                   "task": spec.type, "checkpoints": checkpoints}
        log.info("scored %s (%s head; base = untrained head)", ", ".join(results), spec.type)
        return summary

    def card(task_meta: dict) -> CardFacts:
        return CardFacts(kind.pipeline_tag, (), "loss_units", how_to_load(kind.name))

    return Task(name=kind.name, ingest=ingest_inputs, ingest_tags=ingest_tags, tokenize=tokenize, template_summary=summary,
                training=training, retarget=retarget, merge_check=merge_check, evaluate=evaluate, flat_results=identity,
                card=card, gates=lambda task_meta: {"learned": learned_gate(kind.main_metric),
                                                  **({"not_collapsed": not_collapsed_gate()} if kind.collapse else {})},
                no_general_text=NO_GENERAL_TEXT, no_gguf=NO_GGUF)

