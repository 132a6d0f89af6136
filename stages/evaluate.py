"""Stage `evaluate`: score the base model and the fine-tuned model with one harness on the test split.

    python -m stages.evaluate --model models/finetune --data data/ingested --tokenized data/tokenized \
        --out reports/evaluate --metrics metrics/evaluate.json

Loss and perplexity over trained tokens; greedy generation scored with exact match, BLEU and ROUGE-L.
The base model is read from the fine-tuned checkpoint's meta.json (its lineage), not re-declared.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


from tunekit.chat import end_of_turn_marker, resolve_chat_template
from tunekit.generate import generate, prompts_from_conversations
from tunekit.io import atomic_dir, read_jsonl, write_json, write_jsonl
from tunekit.methods import load_tuned
from tunekit.metrics import generation_metrics
from tunekit.models import load_tokenizer, set_threads
from tunekit.params import EvaluateParams, ProjectParams, TemplateParams, load_section
from tunekit.tracking import configure_logging, data_tags, log_metrics, stage_run
from tunekit.train import evaluate_loss

log = logging.getLogger("tunekit")


def score(model, tokenizer, records: list[dict], tokenized: list[dict], chat_template: str, eot: str,
          params: EvaluateParams, label: str, full_forward: bool = False) -> tuple[dict, list[dict]]:
    prompts = prompts_from_conversations(records, tokenizer, chat_template)
    predictions = generate(model, tokenizer, prompts, eot, params.max_new_tokens, params.batch_size,
                           params.do_sample, params.temperature, params.top_p, desc=f"generate ({label})")
    references = [p.reference for p in prompts]
    metrics = generation_metrics(predictions, references)
    lm = evaluate_loss(model, tokenized, tokenizer.pad_token_id, params.batch_size, full_forward)
    metrics.update({"loss": lm["loss"], "perplexity": lm["perplexity"], "examples": len(prompts)})
    rows = [{"id": p.id, "model": label, "prompt": p.text, "reference": p.reference, "prediction": pred,
             "exact_match": float(pred.strip() == p.reference.strip())}
            for p, pred in zip(prompts, predictions)]
    return metrics, rows


def markdown_report(results: dict[str, dict], rows: dict[str, list[dict]], shown: int = 5) -> str:
    keys = ["exact_match", "bleu", "rouge_l", "loss", "perplexity", "examples"]
    lines = ["# Evaluation on the test split", "", "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[k]:.4g}" for k in keys) + " |")
    lines += ["", "exact_match and rouge_l are 0-1, bleu is sacrebleu's 0-100; loss is per trained token.", ""]
    for name, examples in rows.items():
        lines += [f"## {name}: first {shown} predictions", ""]
        for row in examples[:shown]:
            # JSON-quoted so multi-line or fenced model output cannot break the Markdown.
            lines += [f"- reference: {json.dumps(row['reference'], ensure_ascii=False)}",
                      f"  prediction: {json.dumps(row['prediction'], ensure_ascii=False)}"]
        lines.append("")
    return "\n".join(lines)


def run(params: EvaluateParams, template: TemplateParams, model_dir: Path, data_dir: Path, tokenized_dir: Path,
        out: Path) -> dict:
    set_threads(0)
    tokenizer = load_tokenizer(model_dir)
    chat_template = resolve_chat_template(template.chat_template, tokenizer)
    eot = end_of_turn_marker(tokenizer, chat_template)
    records = list(read_jsonl(data_dir / "test.jsonl"))
    tokenized = list(read_jsonl(tokenized_dir / "test.jsonl"))
    if params.max_examples:
        records, tokenized = records[:params.max_examples], tokenized[:params.max_examples]
    if not records:
        raise SystemExit(f"{data_dir / 'test.jsonl'} is empty: raise ingest.test or add data")

    tuned = load_tuned(model_dir)
    full_forward = tuned.method.full_forward
    results, rows = {}, {}
    # The base is scored by exactly the same harness.
    with tuned.base() as base:
        results["base"], rows["base"] = score(base, tokenizer, records, tokenized, chat_template, eot, params, "base",
                                              full_forward)
    results["tuned"], rows["tuned"] = score(tuned.model, tokenizer, records, tokenized, chat_template, eot, params,
                                            "tuned", full_forward)
    results["delta"] = {k: results["tuned"][k] - results["base"][k] for k in results["tuned"] if k != "examples"}

    with atomic_dir(out) as tmp:
        for name, examples in rows.items():
            write_jsonl(tmp / f"predictions_{name}.jsonl", examples)
        (tmp / "report.md").write_text(markdown_report({k: results[k] for k in ("base", "tuned")}, rows), encoding="utf-8")
    log.info("base model %s vs tuned %s (%s)", tuned.base_dir, model_dir, tuned.method.name)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="fine-tuned checkpoint (its meta.json names the base)")
    parser.add_argument("--data", type=Path, required=True, help="ingested data directory (test.jsonl)")
    parser.add_argument("--tokenized", type=Path, required=True, help="tokenised data directory (test.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="directory for predictions and the report")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: EvaluateParams = load_section("evaluate")
    template: TemplateParams = load_section("template")

    with stage_run("evaluate", project.experiment, params, tags=data_tags(test=args.data / "test.jsonl")) as mlflow:
        results = run(params, template, args.model, args.data, args.tokenized, args.out)
        write_json(args.metrics, results)
        log_metrics(mlflow, results)
        mlflow.log_artifacts(str(args.out), artifact_path="evaluate")
    for name in ("base", "tuned"):
        log.info("%s: %s", name, {k: round(v, 4) for k, v in results[name].items()})


if __name__ == "__main__":
    main()
