"""Stage `forgetting`: what fine-tuning cost the model on general text outside the task.

    python -m stages.forgetting --model models/finetune --merged models/merged --out reports/forgetting \
        --metrics metrics/forgetting.json --cache checkpoints/forgetting-cache

Scores a general-text probe (`forgetting.probe`; default: the prose of the Python Language Reference
shipped in `pydoc_data.topics`) with the base checkpoint, the fine-tuned model and the merged one,
and reports each one's loss, perplexity and change against the base. The base is read from the
fine-tuned checkpoint's meta.json (its lineage), not re-declared; its scores are cached under
--cache, keyed by the base's hash, the probe and max_length.

Optionally (`forgetting.code.enabled`), a general-ability probe for code models: HumanEval pass@1 of
the same models (completions run only in tunekit.sandbox), with its change against the base.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tunekit.checkpoints import CheckpointMeta, checkpoint_hash
from tunekit.forgetting import (BaseScoreCache, ProbeError, base_scores, cache_key, compare, load_probe, loss_bar_png,
                                markdown_report, score, tokenize_probe)
from tunekit.io import atomic_dir, is_merged, not_merged_reason, write_json
from tunekit.models import load_causal_lm, load_tokenizer, set_threads
from tunekit.params import ForgettingParams, ProjectParams, load_section
from tunekit.tasks import load_tuned, task_of
from tunekit.tracking import configure_logging, log_metrics, stage_run

log = logging.getLogger("tunekit")


def lineage(model_dir: Path) -> tuple[Path, CheckpointMeta]:
    """The base checkpoint named by the fine-tuned checkpoint's meta.json, and that meta."""
    meta = CheckpointMeta.of_tuned(model_dir)
    if not meta.parent.is_dir():
        raise SystemExit(f"{model_dir}/meta.json names the base {meta.parent}, which does not exist; re-run the base stage")
    return meta.parent, meta


def run(params: ForgettingParams, model_dir: Path, merged_dir: Path | None, out: Path, cache_dir: Path) -> dict:
    set_threads(params.threads)
    base_dir, meta = lineage(model_dir)
    if task_of(meta).no_general_text:
        return not_applicable(out, f"{model_dir} was fine-tuned for task {meta.task_type!r}: a task head has no "
                                   "language-model output to score a general-text probe with, so forgetting is measured "
                                   "for sft only")
    try:
        probe = load_probe(params.probe, params.probe_passages)
        tokenizer = load_tokenizer(base_dir)  # one tokenisation of the probe for every model
        rows = tokenize_probe(probe, tokenizer, params.max_length)
    except ProbeError as exc:
        raise SystemExit(str(exc)) from None
    pad_id = tokenizer.pad_token_id
    base_hash = checkpoint_hash(base_dir)
    log.info("probe %s: %d passages (of %d), %d tokens scored per model", probe.source, len(rows), probe.available,
             sum(len(r["input_ids"]) - 1 for r in rows))

    key = cache_key(base_hash, probe.hash, params.max_length)
    base, cached = base_scores(base_dir, rows, pad_id, params.batch_size, key, BaseScoreCache(cache_dir),
                               about={"base": str(base_dir), "base_hash": base_hash, "probe": probe.source,
                                      "probe_hash": probe.hash, "max_length": params.max_length})
    results = {"base": compare(base, base)}

    # The optional HumanEval probe scores each model while it is loaded for the text probe.
    humaneval = humaneval_scorer(params, tokenizer) if params.code.enabled else None
    code = {"base": base_code_scores(params, humaneval, base_dir, base_hash, cache_dir)} if humaneval else {}

    # Loaded as its method saved it (adapter, bottleneck adapters, full weights, virtual tokens).
    tuned = load_tuned(model_dir)
    results["tuned"] = compare(base, score(tuned.model, rows, pad_id, params.batch_size, tuned.method.full_forward))
    if humaneval:
        code["tuned"] = humaneval(tuned.model, "tuned")
    del tuned

    if is_merged(merged_dir):
        merged_meta = CheckpointMeta.read(merged_dir)
        if merged_meta is not None and merged_meta.parent_hash not in (None, meta.hash):
            log.warning("%s was merged from another fine-tune than %s; re-run the merge stage", merged_dir, model_dir)
        merged = load_causal_lm(merged_dir)
        results["merged"] = compare(base, score(merged, rows, pad_id, params.batch_size))
        if humaneval:
            code["merged"] = humaneval(merged, "merged")
        del merged
    elif merged_dir is not None:
        log.warning("no merged checkpoint at %s (%s): only base and tuned are scored", merged_dir,
                    not_merged_reason(merged_dir))
    for name in ("tuned", "merged"):  # a drop in pass@k against the base is forgetting of a general ability
        for k in params.code.ks if name in code else ():
            code[name][f"pass_at_{k}_delta"] = code[name][f"pass_at_{k}"] - code["base"][f"pass_at_{k}"]

    with atomic_dir(out) as tmp:
        report = markdown_report(results, probe, params.max_length, cached)
        if code:
            report += code_report(code, params)
        (tmp / "report.md").write_text(report, encoding="utf-8")
        loss_bar_png(tmp / "loss.png", results, f"probe loss ({len(rows)} passages)")
    return {**results, **({"code": code} if code else {}), "base_cached": cached,
            "probe": {"passages": len(rows), "available": probe.available, "tokens": base["tokens"]},
            "probe_hash": probe.hash[:16]}


def not_applicable(out: Path, reason: str) -> dict:
    log.warning("forgetting not measured: %s", reason)
    with atomic_dir(out) as tmp:
        (tmp / "report.md").write_text(f"# Forgetting on a general-text probe\n\nNot measured: {reason}.\n", encoding="utf-8")
    return {"measured": 0, "reason": reason}


def humaneval_scorer(params: ForgettingParams, tokenizer):
    """(model, label) -> HumanEval pass@k metrics of `params.code`; completions run only in tunekit.sandbox."""
    from tunekit.generate import score_code
    from tunekit.sandbox import load_humaneval

    problems = load_humaneval(params.code.problems)
    eot = tokenizer.eos_token or ""  # raw completion, no chat template: stop at eos or the code stops

    def scores(model, label: str) -> dict:
        return score_code(model, tokenizer, problems, eot, params.code, params.batch_size, label)[0]
    return scores


def base_code_scores(params: ForgettingParams, humaneval, base_dir: Path, base_hash: str, cache_dir: Path) -> dict:
    """The base's HumanEval scores, cached per base hash and code params like its probe scores."""
    key = cache_key(base_hash, "humaneval:" + json.dumps(params.code.model_dump(exclude={"enabled"}), sort_keys=True), 0)
    cache = BaseScoreCache(cache_dir)
    base = cache.get(key)
    if base is None:
        base = humaneval(load_causal_lm(base_dir), "base")
        cache.put(key, base, base=str(base_dir), base_hash=base_hash, probe="humaneval")
    return base


def code_report(code: dict, params: ForgettingParams) -> str:
    keys = [f"pass_at_{k}" for k in params.code.ks]
    lines = ["## General ability: HumanEval", "",
             f"First {params.code.problems} problems, {params.code.samples} completion(s) each "
             f"({'sampled' if params.code.do_sample else 'greedy'}), run in the sandbox; a negative delta is forgetting.", "",
             "| model | " + " | ".join(keys + [f"{k} delta" for k in keys]) + " |", "|---" * (2 * len(keys) + 1) + "|"]
    for name, metrics in code.items():
        deltas = [f"{metrics[f'{k}_delta']:+.3f}" if f"{k}_delta" in metrics else "" for k in keys]
        lines.append(f"| {name} | " + " | ".join([f"{metrics[k]:.3f}" for k in keys] + deltas) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="fine-tuned checkpoint (its meta.json names the base)")
    parser.add_argument("--merged", type=Path, help="merged checkpoint, scored too when it exists")
    parser.add_argument("--out", type=Path, required=True, help="directory for the report and the bar plot")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="directory of the base-score cache (outside DVC outputs)")
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: ForgettingParams = load_section("forgetting")

    with stage_run("forgetting", project.experiment, params) as mlflow:
        metrics = run(params, args.model, args.merged, args.out, args.cache)
        write_json(args.metrics, metrics)
        log_metrics(mlflow, metrics)  # numbers only: base_cached (a bool) and the probe hash go in as tags
        if metrics.get("measured", 1):
            mlflow.set_tags({"probe": params.probe, "probe_hash": metrics["probe_hash"], "base_cached": str(metrics["base_cached"]).lower()})
        else:
            mlflow.set_tag("not_measured", metrics["reason"])
        mlflow.log_artifacts(str(args.out), artifact_path="forgetting")
    for name in ("tuned", "merged"):
        if name in metrics:
            log.info("%s: loss %.4f vs base %.4f (%+.2f%%)", name, metrics[name]["loss"], metrics["base"]["loss"],
                     100 * metrics[name]["relative_loss_change"])


if __name__ == "__main__":
    main()
