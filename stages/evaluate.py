"""Stage `evaluate`: score every checkpoint of the lineage with one harness on the test split.

    python -m stages.evaluate --model models/finetune --merged models/merged --data data/ingested \
        --tokenized data/tokenized --out reports/evaluate --metrics metrics/evaluate.json

Models, side by side: `base`; `dapt` when the fine-tune's parent is a real DAPT checkpoint; `few_shot`
(the base prompted with `evaluate.few_shot.k` train demonstrations); `tuned`; `merged` when --merged
exists. Each gets loss and perplexity over trained tokens and the generation metrics named in
`evaluate.metrics`; with `evaluate.code.enabled`, pass@k on HumanEval, its completions run only in
tunekit.sandbox. The base is read from the fine-tuned checkpoint's meta.json (its lineage).

Task heads are scored with their task's metrics instead (`run_task`); a multi-task checkpoint per task,
with results["<model>"]["<task>"], deltas per task and a table per task in the report (`run_multitask`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

from tunekit.chat import encode_conversation, end_of_turn_marker, resolve_chat_template
from tunekit.generate import (Prompt, few_shot_records, generate_samples, prompts_from_conversations, score_code,
                              score_generations)
from tunekit.io import atomic_dir, is_merged, not_merged_reason, read_jsonl, read_meta, write_json, write_jsonl
from tunekit.methods import load_tuned
from tunekit.models import load_causal_lm, load_tokenizer, resolve_checkpoint, set_threads
from tunekit.params import EvaluateParams, ProjectParams, TemplateParams, load_section
from tunekit.plots import write_csv
from tunekit.tracking import configure_logging, data_tags, log_datasets, log_metrics, stage_run
from tunekit.train import evaluate_loss

log = logging.getLogger("tunekit")

# Raw-completion stops of the HumanEval harness: the function body ends where top-level code starts.
MODEL_ORDER = ("base", "dapt", "few_shot", "tuned", "merged")


# ---------------------------------------------------------------- lineage


def dapt_checkpoint(model_dir: Path) -> tuple[Path | None, Path | None]:
    """(DAPT checkpoint, the base under it) when the fine-tune's parent is a real DAPT checkpoint (meta
    stage "dapt", no "passthrough"), else (None, None): the parent is the base itself."""
    meta = read_meta(model_dir) or {}
    parent = Path((meta.get("parent") or {}).get("path", ""))
    parent_meta = read_meta(parent) if str(parent) else None
    if not parent_meta or parent_meta.get("stage") != "dapt" or "passthrough" in parent_meta:
        return None, None
    if not parent_meta.get("parent"):
        raise SystemExit(f"{parent}/meta.json (dapt) names no parent checkpoint; re-run the dapt stage")
    return parent, Path(parent_meta["parent"]["path"])


# ---------------------------------------------------------------- one model, one task


def score(model, tokenizer, prompts: list[Prompt], loss_rows: list[dict], eot: str, params: EvaluateParams,
          label: str, full_forward: bool = False, seed: int = 0) -> tuple[dict, list[dict]]:
    """Generation metrics named in params.metrics, plus loss and perplexity over `loss_rows`."""
    predictions = generate_samples(model, tokenizer, prompts, eot, params.max_new_tokens, params.batch_size,
                                   params.do_sample, params.temperature, params.top_p, params.samples, params.stop,
                                   seed=seed, desc=f"generate ({label})")
    references = [p.reference for p in prompts]
    metrics, per_sample = score_generations(predictions, references, params.metrics)
    lm = evaluate_loss(model, loss_rows, tokenizer.pad_token_id, params.batch_size, full_forward)
    metrics.update({"loss": lm["loss"], "perplexity": lm["perplexity"], "examples": len(prompts)})
    rows = [{"id": p.id, "model": label, "prompt": p.text, "reference": p.reference, "prediction": samples[0],
             "predictions": samples, "scores": scores}
            for p, samples, scores in zip(prompts, predictions, per_sample)]
    return metrics, rows


# ---------------------------------------------------------------- report


def main_metrics(results: dict[str, dict]) -> list[str]:
    keys: list[str] = []
    for metrics in results.values():
        keys += [k for k, v in metrics.items() if isinstance(v, float) and k not in keys and k != "perplexity"]
        keys += [f"code.{k}" for k in metrics.get("code", {}) if k.startswith("pass_at_") and f"code.{k}" not in keys]
    return keys


def _value(metrics: dict, key: str) -> float | None:
    for part in key.split("."):
        metrics = metrics.get(part) if isinstance(metrics, dict) else None
    return metrics if isinstance(metrics, (int, float)) else None


def table_rows(results: dict[str, dict]) -> tuple[list[str], list[dict]]:
    keys = main_metrics(results) + ["perplexity", "examples"]
    return ["model", *keys], [{"model": name, **{k: _value(m, k) for k in keys}} for name, m in results.items()]


def markdown_table(results: dict[str, dict]) -> list[str]:
    columns, table = table_rows(results)
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in table:
        cells = [row["model"]] + ["-" if row[k] is None else f"{row[k]:.4g}" for k in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def prediction_lines(rows: dict[str, list[dict]], shown: int = 5, heading: str = "##", about: str = "") -> list[str]:
    lines = []
    for name, examples in rows.items():
        lines += [f"{heading} {name}{about}: first {shown} predictions", ""]
        for row in examples[:shown]:
            # JSON-quoted so multi-line or fenced model output cannot break the Markdown.
            lines += [f"- reference: {json.dumps(row['reference'], ensure_ascii=False)}",
                      f"  prediction: {json.dumps(row['prediction'], ensure_ascii=False)}"]
        lines.append("")
    return lines


SFT_NOTE = ("exact_match, rouge*, squad_* and pass_at_k are 0-1; bleu and chrf are sacrebleu's 0-100; loss is per "
            "trained token (few_shot: the test answer's tokens after the demonstrations).")
TASK_NOTE = ("accuracy, f1_*, roc_auc, entity_*, tag_accuracy and squad_* are 0-1 (squad_* as in SQuAD 2.0, the null "
             "answer for unanswerable questions); loss is per example (classification), per labelled token (token "
             "classification) or per window (qa); base is the untrained head on the base model.")


def markdown_report(results: dict[str, dict], rows: dict[str, list[dict]], checkpoints: dict[str, str],
                    shown: int = 5, title: str = "# Evaluation on the test split", note: str = SFT_NOTE) -> str:
    lines = [title, "", *markdown_table(results)]
    lines += ["", note, "",
              "checkpoints: " + ", ".join(f"{name} = `{path}`" for name, path in checkpoints.items()), "",
              "![main metrics per model](metrics.png)", ""]
    lines += prediction_lines(rows, shown)
    return "\n".join(lines)


def metrics_png(path: Path, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = main_metrics(results)
    names = list(results)
    cols = min(4, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), dpi=100, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        values = [_value(results[n], key) for n in names]
        ax.bar(range(len(names)), [v or 0.0 for v in values], color=[colors[i % len(colors)] for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- the stage


def run(params: EvaluateParams, template: TemplateParams, model_dir: Path, data_dir: Path, tokenized_dir: Path,
        out: Path, merged_dir: Path | None = None, seed: int = 0) -> dict:
    set_threads(0)
    if ((read_meta(model_dir) or {}).get("task") or {}).get("type", "sft") != "sft":
        return run_task(params, model_dir, data_dir, tokenized_dir, out, merged_dir)
    tokenizer = load_tokenizer(model_dir)
    chat_template = resolve_chat_template(template.chat_template, tokenizer)
    eot = end_of_turn_marker(tokenizer, chat_template)
    records = list(read_jsonl(data_dir / "test.jsonl"))
    tokenized = list(read_jsonl(tokenized_dir / "test.jsonl"))
    if params.max_examples:
        records, tokenized = records[:params.max_examples], tokenized[:params.max_examples]
    if not records:
        raise SystemExit(f"{data_dir / 'test.jsonl'} is empty: raise ingest.test or add data")
    prompts = prompts_from_conversations(records, tokenizer, chat_template)

    few_shot_prompts, few_shot_rows = None, None
    if params.few_shot is not None:
        train = list(read_jsonl(data_dir / "train.jsonl"))
        try:
            shots = few_shot_records(records, train, params.few_shot.k, seed)
        except ValueError as exc:
            raise SystemExit(f"evaluate.few_shot: {exc}") from None
        few_shot_prompts = prompts_from_conversations(shots, tokenizer, chat_template)
        few_shot_rows = []
        for shot in shots:
            enc = encode_conversation(shot["messages"], tokenizer, chat_template, template.train_on)
            few_shot_rows.append({"input_ids": enc.input_ids, "labels": enc.labels})

    problems = []
    if params.code.enabled:
        from tunekit.sandbox import load_humaneval

        problems = load_humaneval(params.code.problems)

    tuned = load_tuned(model_dir)
    full_forward = tuned.method.full_forward
    dapt_dir, root_base = dapt_checkpoint(model_dir)
    checkpoints = {"base": str(resolve_checkpoint(root_base or tuned.base_dir))}
    results, rows, code_rows = {}, {}, {}

    def harness(label: str, model, ff: bool = False) -> None:
        # Every model goes through exactly these calls: same prompts, decoding, metrics and sandbox.
        results[label], rows[label] = score(model, tokenizer, prompts, tokenized, eot, params, label, ff, seed)
        if problems:
            results[label]["code"], code_rows[label] = score_code(model, tokenizer, problems, eot, params.code,
                                                                   params.batch_size, label, seed)

    base_context = (contextlib.nullcontext(tuned.method.load_base(root_base)) if root_base is not None
                    else tuned.base())
    with base_context as base:
        harness("base", base, full_forward and root_base is None)
        if few_shot_prompts is not None:
            results["few_shot"], rows["few_shot"] = score(base, tokenizer, few_shot_prompts, few_shot_rows, eot, params,
                                                          "few_shot", full_forward and root_base is None, seed)
            results["few_shot"]["demonstrations"] = params.few_shot.k
            for row, shot in zip(rows["few_shot"], shots):
                row["demonstrations"] = shot["demonstrations"]
    if dapt_dir is not None:
        checkpoints["dapt"] = str(dapt_dir)
        with tuned.base() as dapt:
            harness("dapt", dapt, full_forward)
    else:
        log.info("no DAPT checkpoint in the lineage of %s: dapt is not scored", model_dir)
    checkpoints["tuned"] = str(model_dir)
    harness("tuned", tuned.model, full_forward)
    del tuned
    if is_merged(merged_dir):
        checkpoints["merged"] = str(merged_dir)
        harness("merged", load_causal_lm(merged_dir))
    elif merged_dir is not None:
        log.warning("no merged checkpoint at %s (%s): it is not scored", merged_dir, not_merged_reason(merged_dir))

    results = {name: results[name] for name in MODEL_ORDER if name in results}
    rows = {name: rows[name] for name in MODEL_ORDER if name in rows}
    models = dict(results)
    numeric = [k for k, v in results["tuned"].items() if isinstance(v, float)]
    results["delta"] = {k: results["tuned"][k] - results["base"][k] for k in numeric}
    if "few_shot" in results:
        results["delta_over_few_shot"] = {k: results["tuned"][k] - results["few_shot"][k] for k in numeric}

    with atomic_dir(out) as tmp:
        for name, examples in rows.items():
            write_jsonl(tmp / f"predictions_{name}.jsonl", examples)
        for name, examples in code_rows.items():
            write_jsonl(tmp / f"code_{name}.jsonl", examples)
        columns, table = table_rows(models)
        write_csv(tmp / "report.csv", table, columns)
        metrics_png(tmp / "metrics.png", models)
        (tmp / "report.md").write_text(markdown_report(models, rows, checkpoints), encoding="utf-8")
    log.info("scored %s (base %s, tuned %s)", ", ".join(models), checkpoints["base"], model_dir)
    return {**results, "checkpoints": checkpoints}


# ---------------------------------------------------------------- task heads (task.type != sft)


def run_task(params: EvaluateParams, model_dir: Path, data_dir: Path, tokenized_dir: Path, out: Path,
             merged_dir: Path | None = None, task_params=None) -> dict:
    """The same harness for a task head: every checkpoint of the lineage scored on the tokenised test split
    with the task's metrics (tunekit.heads.score_task), predictions per example, the same report shape.
    `base` is the base model with the new head untrained (chance level: what the fine-tune starts from);
    compare heads trained with method `head` (linear probing) and with lora / full for the value of
    fine-tuning the encoder itself."""
    from tunekit.heads import TaskSpec, load_task_model, score_task
    from tunekit.params import TaskParams

    task_params: TaskParams = task_params if task_params is not None else load_section("task")
    if read_meta(model_dir)["task"]["type"] == "multi_task":
        return run_multitask(params, model_dir, data_dir, tokenized_dir, out, merged_dir, task_params)
    spec = TaskSpec.from_meta(read_meta(model_dir)["task"])
    tokenizer = load_tokenizer(model_dir)
    rows, records = _task_rows(params, spec, list(read_jsonl(tokenized_dir / "test.jsonl")),
                               list(read_jsonl(data_dir / "test.jsonl")))
    if not rows:
        raise SystemExit(f"{tokenized_dir / 'test.jsonl'} is empty: raise ingest.test or add data")
    allow_null = spec.type == "qa" and any(not [a for a in r["answers"]["text"] if a.strip()]
                                           for split in ("train", "test") for r in read_jsonl(data_dir / f"{split}.jsonl"))
    log.info("task %s: generation, few-shot prompting and HumanEval do not apply to a %s head; scoring its "
             "predictions on %d test rows instead", spec.type, spec.type, len(rows))
    results, predictions, extras = {}, {}, {}
    with atomic_dir(out) as tmp:
        def harness(label: str, model) -> None:
            results[label], predictions[label], extras[label] = score_task(
                model, spec, rows, records, tokenizer.pad_token_id, params.batch_size, label, task_params, tmp, allow_null)

        checkpoints = score_task_models(harness, model_dir, merged_dir, lambda path: load_task_model(path, spec))
        for name, examples in predictions.items():
            write_jsonl(tmp / f"predictions_{name}.jsonl", examples)
        write_json(tmp / "confusion_matrices.json", {name: {"labels": list(spec.labels), **extra}
                                                      for name, extra in extras.items() if extra})
        columns, table = table_rows(results)
        write_csv(tmp / "report.csv", table, columns)
        metrics_png(tmp / "metrics.png", results)
        report = markdown_report(results, predictions, checkpoints, title=f"# Evaluation on the test split: {spec.type} head",
                                 note=TASK_NOTE)
        (tmp / "report.md").write_text(report + "".join(f"\n![confusion matrix ({name})](confusion_{name}.png)\n"
                                                        for name in extras if extras[name]), encoding="utf-8")
    numeric = [k for k, v in results["tuned"].items() if isinstance(v, float)]
    summary = {**results, "delta": {k: results["tuned"][k] - results["base"][k] for k in numeric},
               "task": spec.type, "checkpoints": checkpoints}
    log.info("scored %s (%s head; base = untrained head)", ", ".join(results), spec.type)
    return summary


def score_task_models(harness, model_dir: Path, merged_dir: Path | None, load_merged) -> dict[str, str]:
    """Run `harness(label, model)` on base (the tuned checkpoint's adapter switched off, or its base
    loaded), tuned and merged, one model in memory at a time; returns the checkpoint path of each."""
    tuned = load_tuned(model_dir)
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


def _task_rows(params: EvaluateParams, spec, rows: list[dict], records: list[dict]) -> tuple[list[dict], list[dict]]:
    """The test rows and records scored: all, or the first evaluate.max_examples records (and their QA windows)."""
    if params.max_examples:
        records = records[:params.max_examples]
        kept = {str(r.get("id")) for r in records}
        rows = [r for r in rows if str(r.get("example_id", r.get("id"))) in kept] if spec.type == "qa" else rows[:params.max_examples]
    return rows, records


def run_multitask(params: EvaluateParams, model_dir: Path, data_dir: Path, tokenized_dir: Path, out: Path,
                  merged_dir: Path | None, task_params) -> dict:
    """run_task for a multi-task checkpoint: base (the shared backbone with untrained heads), tuned and
    merged scored on each task's test rows with that task's metrics, through a single-task view of the
    model (tunekit.heads.one_task). Results per model and task (results["tuned"]["<task>"]["accuracy"]),
    deltas per task, predictions per model with each row's task, and a table per task in report.md / one
    report.csv with a task column."""
    from tunekit.heads import load_multitask_model, multitask_specs, one_task, score_task
    from tunekit.metrics import confusion_matrix_png

    meta = read_meta(model_dir)["task"]
    specs = multitask_specs(meta)
    tokenizer = load_tokenizer(model_dir)
    all_rows, all_records = list(read_jsonl(tokenized_dir / "test.jsonl")), list(read_jsonl(data_dir / "test.jsonl"))
    train_records = list(read_jsonl(data_dir / "train.jsonl"))
    data, allow_null = {}, {}
    for name, spec in specs.items():
        data[name] = _task_rows(params, spec, [r for r in all_rows if r.get("task") == name],
                                [r for r in all_records if r.get("task") == name])
        if not data[name][0]:
            raise SystemExit(f"{tokenized_dir / 'test.jsonl'} holds no rows of task {name}: raise ingest.test or add data")
        allow_null[name] = spec.type == "qa" and any(not [a for a in r["answers"]["text"] if a.strip()]
                                                      for r in train_records + data[name][1] if r.get("task") == name)
    # n_best / max_answer_length from params.yaml; a task no longer listed there scores with the defaults
    settings = {name: task_params.subtask(name) if name in task_params.tasks else None for name in specs}
    log.info("multi-task %s: scoring each task's predictions on its test rows (%s)", ", ".join(specs),
             ", ".join(f"{name}: {len(rows)}" for name, (rows, _) in data.items()))
    results: dict[str, dict] = {}
    predictions: dict[str, list[dict]] = {}
    matrices: dict[str, dict] = {}
    with atomic_dir(out) as tmp:
        def harness(label: str, model) -> None:
            results[label], predictions[label] = {}, []
            for name, spec in specs.items():
                rows, records = data[name]
                metrics, examples, extra = score_task(one_task(model, name), spec, rows, records, tokenizer.pad_token_id,
                                                      params.batch_size, label, settings[name], None, allow_null[name])
                results[label][name] = metrics
                predictions[label] += [{**example, "task": name} for example in examples]
                if extra.get("confusion_matrix"):
                    matrices.setdefault(name, {"labels": list(spec.labels)})[label] = extra["confusion_matrix"]
                    confusion_matrix_png(tmp / f"confusion_{name}_{label}.png", extra["confusion_matrix"], spec.labels,
                                         f"confusion matrix ({name}, {label})")

        checkpoints = score_task_models(harness, model_dir, merged_dir, load_multitask_model)
        for label, examples in predictions.items():
            write_jsonl(tmp / f"predictions_{label}.jsonl", examples)
        write_json(tmp / "confusion_matrices.json", matrices)
        csv_rows, csv_columns = [], ["task"]
        report = [f"# Evaluation on the test split: multi-task ({', '.join(f'{n} {s.type}' for n, s in specs.items())})", "",
                  "base = the shared backbone with untrained heads. loss is per example (qa: per window; "
                  "token_classification: per labelled token).", "",
                  "checkpoints: " + ", ".join(f"{label} = `{path}`" for label, path in checkpoints.items()), "",
                  "![main metrics per model and task](metrics.png)", ""]
        for name, spec in specs.items():
            per_model = {label: results[label][name] for label in results}
            columns, table = table_rows(per_model)
            csv_rows += [{"task": name, **row} for row in table]
            csv_columns += [c for c in columns if c not in csv_columns]
            report += [f"## {name} ({spec.type}, weight {meta['weights'].get(name, 1.0):g})", "", *markdown_table(per_model), ""]
            report += [f"![confusion matrix ({name}, {label})](confusion_{name}_{label}.png)\n"
                       for label in matrices.get(name, {}) if label != "labels"]
            report += prediction_lines({label: [p for p in examples if p["task"] == name]
                                        for label, examples in predictions.items()}, heading="###", about=f" ({name})")
        write_csv(tmp / "report.csv", csv_rows, csv_columns)
        metrics_png(tmp / "metrics.png", flat_task_results(results))
        (tmp / "report.md").write_text("\n".join(report), encoding="utf-8")
    delta = {name: {k: v - results["base"][name][k] for k, v in results["tuned"][name].items()
                    if isinstance(v, float) and isinstance(results["base"][name].get(k), float)} for name in specs}
    log.info("scored %s on tasks %s (base = untrained heads)", ", ".join(results), ", ".join(specs))
    return {**results, "delta": delta, "task": "multi_task", "tasks": {name: spec.type for name, spec in specs.items()},
            "checkpoints": checkpoints}


def flat_task_results(results: dict[str, dict]) -> dict[str, dict]:
    """{model: {task: metrics}} -> {model: {"task.metric": value}}: one row per model for the plot and MLflow table."""
    return {label: {f"{name}.{key}": value for name, metrics in per_task.items() for key, value in metrics.items()}
            for label, per_task in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="fine-tuned checkpoint (its meta.json names the base)")
    parser.add_argument("--merged", type=Path, help="merged checkpoint, scored too when it exists")
    parser.add_argument("--data", type=Path, required=True, help="ingested data directory (test.jsonl, train.jsonl)")
    parser.add_argument("--tokenized", type=Path, required=True, help="tokenised data directory (test.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="directory for predictions, the report and plots")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: EvaluateParams = load_section("evaluate")
    template: TemplateParams = load_section("template")

    with stage_run("evaluate", project.experiment, params, tags=data_tags(test=args.data / "test.jsonl"),
                   system_metrics=True) as mlflow:
        results = run(params, template, args.model, args.data, args.tokenized, args.out, args.merged, project.seed)
        write_json(args.metrics, results)
        log_metrics(mlflow, {k: v for k, v in results.items() if k != "checkpoints"})
        mlflow.log_artifacts(str(args.out), artifact_path="evaluate")
        models = {name: results[name] for name in MODEL_ORDER if name in results}
        columns, table = table_rows(flat_task_results(models) if results.get("task") == "multi_task" else models)
        mlflow.log_table({c: [float("nan") if row[c] is None else row[c] for row in table] for c in columns},
                         artifact_file="evaluate/table.json")
        log_datasets(mlflow, "ingested", {"test": args.data / "test.jsonl"})
        log_datasets(mlflow, "tokenized", {"test": args.tokenized / "test.jsonl"})
    shown = flat_task_results(models) if results.get("task") == "multi_task" else results
    for name in MODEL_ORDER:
        if name in results:
            log.info("%s: %s", name, {k: round(v, 4) for k, v in shown[name].items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
