"""Generative SFT (`task.type: sft`, the default): chat conversations, the loss on the assistant turns.

- ingest: the chat formats (messages, prompt_completion, alpaca, sharegpt; tunekit.ingest).
- template: each conversation rendered with the chat template, tokenised, and the loss masked to the
  assistant turns (tunekit.chat); optionally the training split packed. Examples left with no trained
  token after truncation are not trained on; they are counted and listed in dropped.jsonl beside the
  mask preview.
- finetune: tunekit.train's causal-LM loss over trained tokens; every method of the registry applies.
- merge: the merged checkpoint's logits on held-out conversations, reloaded with plain transformers,
  within merge.atol of the adapter model's (and, for qlora, the drift from the 4-bit model as trained).
- evaluate: base, dapt (when the fine-tune's parent is a real DAPT checkpoint), few_shot (the base
  prompted with `evaluate.few_shot.k` train demonstrations), tuned and merged, each with loss and
  perplexity over trained tokens and the generation metrics of `evaluate.metrics`; with
  `evaluate.code.enabled`, pass@k on HumanEval, its completions run only in tunekit.sandbox.
- forgetting applies: the language-model loss on general text before and after.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from tunekit.chat import Encoded, encode_conversation, end_of_turn_marker, pack, preview_html, resolve_chat_template
from tunekit.checkpoints import CheckpointMeta
from tunekit.constants import IGNORE_INDEX, MODEL_ORDER, PEFT_METHODS, SPLITS
from tunekit.generate import (Prompt, few_shot_records, generate_samples, load_metrics, prompts_from_conversations,
                              score_code, score_generations)
from tunekit.metric_modules import MetricModuleError
from tunekit.data import Rows, map_rows, num_proc, read_split, remove_work_dir, save_dataset, write_rows
from tunekit.io import atomic_dir, is_merged, not_merged_reason, write_jsonl
from tunekit.methods import load_tuned
from tunekit.models import load_causal_lm, load_tokenizer, resolve_checkpoint
from tunekit.params import EvaluateParams, TemplateParams
from tunekit.plots import write_csv
from tunekit.report import markdown_report, metrics_png, table_rows
from tunekit.tasks.base import CardFacts, MergeCheck, Task, Training, check_rows, identity, ingest_inputs, ingest_tags
from tunekit.train import LanguageModeling, collate, evaluate_loss

log = logging.getLogger("tunekit")


# ---------------------------------------------------------------- template


PACK_WINDOW = 20_000  # conversations packed together (best-fit within a window): bounded memory at any corpus size


def _encode_batch(tokenizer, chat_template: str, params: TemplateParams):
    """The Dataset.map function: each conversation of a batch rendered, tokenised and masked by
    tunekit.chat.encode_conversation (its guarantee is the one the stage gives), with the counts the
    metrics and dropped.jsonl need."""
    def encode(records: list[dict]) -> dict[str, list]:
        out: dict[str, list] = {key: [] for key in TOKENIZED_FEATURES}
        for record in records:
            encoded = encode_conversation(record["messages"], tokenizer, chat_template, params.train_on,
                                          params.max_length, tools=record.get("tools"))
            out["id"].append(record["id"])
            out["source"].append(record.get("source"))
            out["input_ids"].append(encoded.input_ids)
            out["labels"].append(encoded.labels)
            out["length"].append(len(encoded.input_ids))
            out["trained"].append(sum(label != IGNORE_INDEX for label in encoded.labels))
            out["truncated"].append(encoded.truncated)
            out["eot_trained"].append(encoded.eot_trained)
        return out
    return encode


def _features():
    from datasets import Features, List, Value

    return Features({"id": Value("string"), "source": Value("string"), "input_ids": List(Value("int32")),
                     "labels": List(Value("int32")), "length": Value("int32"), "trained": Value("int32"),
                     "truncated": Value("bool"), "eot_trained": Value("bool")})


TOKENIZED_FEATURES = ("id", "source", "input_ids", "labels", "length", "trained", "truncated", "eot_trained")
KEPT_COLUMNS = ["id", "input_ids", "labels", "length"]  # what data/tokenized/<split> holds (unpacked)


def encode_split(records, tokenizer, chat_template: str, params: TemplateParams, split: str, work: Path):
    """(the encoded split as a dataset of kept rows, dropped rows, stats): `records` a memory-mapped split."""
    from datasets import Dataset

    features = _features()
    if not isinstance(records, Rows):  # rows in memory (benchmarks, tests): through a dataset file, like a split
        write_rows(work / f"{split}-input", records, work)
        records = read_split(work, f"{split}-input")
    source = records.dataset
    if len(source) == 0:
        encoded = Dataset.from_dict({key: [] for key in features}, features=features)
    else:
        encoded = map_rows(source, _encode_batch(tokenizer, chat_template, params), work, f"template-{split}",
                           processes=num_proc(params.num_proc, len(source)), desc=f"template ({split})",
                           features=features)
    table = encoded.data
    trained = table.column("trained").to_numpy()
    kept = [int(i) for i in (trained > 0).nonzero()[0]]
    dropped = []
    for i in (trained == 0).nonzero()[0]:
        row = encoded[int(i)]
        dropped.append({"id": row["id"], "source": row["source"], "split": split,
                        "reason": "no trained token left after truncation to template.max_length"
                        if row["truncated"] else "no assistant turn is trained (train: false / train_on)"})
    lengths = table.column("length").to_numpy()
    truncated = table.column("truncated").to_numpy()
    eot = table.column("eot_trained").to_numpy()
    stats = {"examples": len(kept), "dropped_no_trained_tokens": len(dropped), "truncated": int(truncated.sum()),
             "eot_trained": int(eot[trained > 0].sum()), "trained_tokens": int(trained.sum()),
             "tokens": int(lengths[trained > 0].sum())}
    stats["trained_fraction"] = stats["trained_tokens"] / max(stats["tokens"], 1)
    return encoded.select(kept) if len(kept) < len(encoded) else encoded, dropped, stats


def _packed_rows(kept, max_length: int):
    """Packed training rows, PACK_WINDOW conversations at a time (tunekit.chat.pack within each window)."""
    for start in range(0, len(kept), PACK_WINDOW):
        window = kept.select_columns(["input_ids", "labels"])[start:start + PACK_WINDOW]
        examples = [{"input_ids": ids, "labels": labels} for ids, labels in zip(window["input_ids"], window["labels"])]
        for row in pack(examples, max_length):
            yield {**row, "length": len(row["input_ids"])}


def tokenize(params, task_params, tokenizer, data_dir: Path, out: Path, preview: Path) -> dict:
    """Every split rendered, tokenised and masked into `out` (a dataset per split: id, input_ids, labels,
    length; packed: input_ids, labels, position_ids, seq_lens, length); the mask preview and dropped.jsonl
    into `preview`. Map cache files go to a work directory inside `out`, removed before it is published."""
    chat_template = resolve_chat_template(params.chat_template, tokenizer)
    metrics: dict = {}
    all_dropped: list[dict] = []
    preview_examples: list[Encoded] = []
    work = out / ".work"
    try:
        for split in SPLITS:
            records = read_split(data_dir, split)
            kept, dropped, stats = encode_split(records, tokenizer, chat_template, params, split, work / split)
            all_dropped += dropped
            if split == "train":
                first = kept[:params.preview_examples] if len(kept) and params.preview_examples else {
                    key: [] for key in TOKENIZED_FEATURES}
                preview_examples = [Encoded(*values) for values in zip(
                    first["input_ids"], first["labels"], first["truncated"], first["eot_trained"])]
            if split == "train" and params.packing and len(kept):
                stats["packed_rows"] = write_rows(out / split, _packed_rows(kept, params.max_length), work)
                stats["packing_efficiency"] = stats["tokens"] / (stats["packed_rows"] * params.max_length)
            else:
                save_dataset(kept.select_columns(KEPT_COLUMNS), out / split)
            metrics[split] = stats
    finally:
        remove_work_dir(work)
    (preview / "mask_preview.html").write_text(
        preview_html(preview_examples, tokenizer, n=params.preview_examples), encoding="utf-8")
    write_jsonl(preview / "dropped.jsonl", all_dropped)

    examples = sum(metrics[s]["examples"] for s in SPLITS)
    metrics["trained_fraction"] = sum(metrics[s]["trained_tokens"] for s in SPLITS) / max(sum(metrics[s]["tokens"] for s in SPLITS), 1)
    metrics["eot_trained_fraction"] = sum(metrics[s]["eot_trained"] for s in SPLITS) / max(examples, 1)
    metrics["truncated"] = sum(metrics[s]["truncated"] for s in SPLITS)
    metrics["dropped_no_trained_tokens"] = len(all_dropped)
    if all_dropped:
        log.warning("%d conversation(s) had no trained token and were left out; see dropped.jsonl beside the mask preview", len(all_dropped))
    if metrics["train"]["examples"] == 0:
        raise SystemExit("no training example has a trained token: raise template.max_length or check train_on / train: false")
    return metrics


def template_summary(metrics: dict) -> str:
    return (f"template: trained fraction {metrics['trained_fraction']:.3f}, end-of-turn trained in "
            f"{100 * metrics['eot_trained_fraction']:.1f}% of examples, {metrics['truncated']} truncated")


# ---------------------------------------------------------------- finetune and merge


def training(task_params, params, method, model_dir: Path, data_dir: Path, train_rows: list[dict]) -> Training:
    return Training(LanguageModeling(method.full_forward), method, None, "tokens")


def retarget(method, task_meta: dict) -> Any:
    return method


@torch.no_grad()
def logits_on(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on the CPU (where the checks compare them), whichever device it computes on."""
    model.eval()
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits.float().cpu()


def max_logit_difference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |a - b| over real (non-padding) positions."""
    return float((a - b).abs().amax(dim=-1)[mask.bool()].max())


def trained_token_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Mean next-token cross-entropy over the trained (labelled) tokens."""
    targets = batch["labels"][:, 1:]
    selected = targets != -100
    return float(torch.nn.functional.cross_entropy(logits[:, :-1][selected].float(), targets[selected]))


def qlora_drift(method, model_dir: Path, base_dir: Path, batch: dict[str, torch.Tensor],
                merged_logits: torch.Tensor) -> dict:
    """How far the merged full-precision checkpoint is from the QLoRA model as it was trained (the
    adapter on the 4-bit NF4 base): max and mean |logit| difference over real tokens, and the loss over
    trained tokens of both (loss_difference = merged - quantised). The merge itself is exact (checked
    against the adapter on the full-precision base); this is the quantisation error the merge removes."""
    quantised = method.checkpoint.load(model_dir, lambda: method.load_base(base_dir))
    quantised_logits = logits_on(quantised, batch)
    del quantised
    difference = (quantised_logits.float() - merged_logits.float()).abs()[batch["attention_mask"].bool()]
    loss_quantised, loss_merged = trained_token_loss(quantised_logits, batch), trained_token_loss(merged_logits, batch)
    drift = {"max_logit_difference": float(difference.max()), "mean_logit_difference": float(difference.mean()),
             "loss_quantised": loss_quantised, "loss_merged": loss_merged, "loss_difference": loss_merged - loss_quantised}
    log.info("qlora drift, 4-bit adapter model vs merged full-precision checkpoint: %s", drift)
    return drift


def merge_check(params, data_dir: Path, tokenizer, task_meta: dict) -> MergeCheck:
    """Accepted only when the merged checkpoint, reloaded from disk with plain transformers, gives logits
    within merge.atol of the adapter model's on held-out conversations."""
    rows = check_rows(params, data_dir)
    batch = collate(rows, tokenizer.pad_token_id)  # held-out splits are never packed: one conversation per row

    def compare(before, after, atol: float) -> tuple[dict, str | None]:
        difference = max_logit_difference(before, after, batch["attention_mask"])
        log.info("largest |logit| difference, adapter vs merged checkpoint: %.3g (tolerance %.3g)", difference, atol)
        metrics = {"max_logit_difference": difference, "checked_examples": len(rows),
                   "checked_tokens": int(batch["attention_mask"].sum())}
        if difference <= atol:
            return metrics, None
        return metrics, (f"merged model differs from the adapter model by {difference:.4g} > merge.atol={atol}: "
                         "the merged checkpoint was not written. Check the adapter and base match (meta.json lineage).")

    def extras(method, model_dir: Path, base_dir: Path, after) -> dict:
        return {"qlora_drift": qlora_drift(method, model_dir, base_dir, batch, after)} if method.name == "qlora" else {}

    return MergeCheck(load_causal_lm, lambda model, label: logits_on(model, batch), load_causal_lm, compare, extras)


# ---------------------------------------------------------------- evaluate


def dapt_checkpoint(model_dir: Path) -> tuple[Path | None, Path | None]:
    """(DAPT checkpoint, the base under it) when the fine-tune's parent is a real DAPT checkpoint (meta
    stage "dapt", no "passthrough"), else (None, None): the parent is the base itself."""
    meta = CheckpointMeta.read(model_dir)
    parent = meta.parent if meta is not None else None
    parent_meta = CheckpointMeta.read(parent) if parent is not None else None
    if parent_meta is None or parent_meta.stage != "dapt" or "passthrough" in parent_meta.raw:
        return None, None
    if parent_meta.parent is None:
        raise SystemExit(f"{parent}/meta.json (dapt) names no parent checkpoint; re-run the dapt stage")
    return parent, parent_meta.parent


def score(model, tokenizer, prompts: list[Prompt], loss_rows: list[dict], eot: str, params: EvaluateParams,
          label: str, full_forward: bool = False, seed: int = 0) -> tuple[dict, list[dict]]:
    """Generation metrics named in params.metrics, plus loss and perplexity over `loss_rows`."""
    predictions = generate_samples(model, tokenizer, prompts, eot, params.max_new_tokens, params.batch_size,
                                   params.do_sample, params.temperature, params.top_p, params.samples, params.stop,
                                   seed=seed, desc=f"generate ({label})")
    references = [p.reference for p in prompts]
    try:
        metrics, per_sample = score_generations(predictions, references, params.metrics)
    except MetricModuleError as exc:  # a user's module failed: say which, stop the stage
        raise SystemExit(f"evaluate ({label}): {exc}") from None
    lm = evaluate_loss(model, loss_rows, tokenizer.pad_token_id, params.batch_size, full_forward)
    metrics.update({"loss": lm["loss"], "perplexity": lm["perplexity"], "examples": len(prompts)})
    rows = [{"id": p.id, "model": label, "prompt": p.text, "reference": p.reference, "prediction": samples[0],
             "predictions": samples, "scores": scores}
            for p, samples, scores in zip(prompts, predictions, per_sample)]
    return metrics, rows


SFT_NOTE = ("exact_match, rouge*, squad_* and pass_at_k are 0-1; bleu and chrf are sacrebleu's 0-100; loss is per "
            "trained token (few_shot: the test answer's tokens after the demonstrations); <module>_<key>: a user's "
            "evaluate module named in evaluate.metrics.")


def evaluate(params, template, task_params, model_dir: Path, data_dir: Path, tokenized_dir: Path, out: Path,
             merged_dir: Path | None, seed: int, task_meta: dict) -> dict:
    """Every model of the lineage through one harness: the same prompts, decoding, metrics and sandbox."""
    try:  # users' metric modules load (or fail, naming the params key and file) before any model generates
        load_metrics(params.metrics)
    except MetricModuleError as exc:
        raise SystemExit(str(exc)) from None
    tokenizer = load_tokenizer(model_dir)
    chat_template = resolve_chat_template(template.chat_template, tokenizer)
    eot = end_of_turn_marker(tokenizer, chat_template)
    records = read_split(data_dir, "test")
    tokenized = read_split(tokenized_dir, "test")
    if params.max_examples:
        records, tokenized = records[:params.max_examples], tokenized[:params.max_examples]
    if not records:
        raise SystemExit(f"{data_dir / 'test'} is empty: raise ingest.test or add data")
    prompts = prompts_from_conversations(records, tokenizer, chat_template)

    few_shot_prompts, few_shot_rows = None, None
    if params.few_shot is not None:
        train = read_split(data_dir, "train")
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
        (tmp / "report.md").write_text(markdown_report(models, rows, checkpoints, note=SFT_NOTE), encoding="utf-8")
    log.info("scored %s (base %s, tuned %s)", ", ".join(models), checkpoints["base"], model_dir)
    return {**results, "checkpoints": checkpoints}


# ---------------------------------------------------------------- model card


def how_to_load(chain: list[dict], meta: dict[str, Any], merged: bool) -> str:
    method = meta.get("method", "")
    if merged or not meta.get("saves_adapter"):
        return ("Standalone weights; plain `transformers` loads them (no peft, no tunekit):\n\n```python\n"
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "model = AutoModelForCausalLM.from_pretrained(\"<this directory>\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"<this directory>\")  # chat template included\n"
                "text = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"...\"}], tokenize=False, add_generation_prompt=True)\n```\n")
    parent = chain[1] if len(chain) > 1 else {"path": "<base checkpoint>", "meta": {}}
    base = parent["meta"].get("passthrough") or parent["path"]  # dapt off: models/dapt only points at the base
    text = ("An adapter on top of its base, not standalone weights. tunekit loads it with the base named in "
            "`meta.json` (4-bit for qlora, as trained):\n\n```python\n"
            "from pathlib import Path\n\nfrom tunekit.tasks import load_tuned\n\n"
            "tuned = load_tuned(Path(\"<this directory>\"))  # tuned.model, tuned.base_dir, tuned.method\n```\n")
    if method in PEFT_METHODS:
        text += (f"\nWith peft alone (full-precision base):\n\n```python\n"
                 "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                 f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
                 "model = PeftModel.from_pretrained(base, \"<this directory>\")\n```\n")
    if meta.get("mergeable"):
        text += "\nThe merge stage folds it into the weights: `models/merged` is the standalone version.\n"
    return text


# Generative SFT must beat the base model by a margin and the few-shot baseline, and keep general text: the demo's
# exact match is 1.00 against base 0.00 and 3-shot 0.58, forgetting +0.049 on the pydoc probe. The task's metric
# is exact match, the default evaluate.metrics' first; a run scored otherwise sets export.gates on its own metric.
SFT_GATES = {
    "learned": "evaluate.shipped.exact_match >= evaluate.base.exact_match + 0.2",
    "beats_few_shot": "evaluate.shipped.exact_match >= evaluate.few_shot.exact_match",
    "forgetting": "forgetting.shipped.relative_loss_change <= 0.1",
}

TASK = Task(name="sft", ingest=ingest_inputs, ingest_tags=ingest_tags, tokenize=tokenize, template_summary=template_summary,
            training=training, retarget=retarget, merge_check=merge_check, evaluate=evaluate, flat_results=identity,
            card=lambda task_meta: CardFacts("text-generation", (), "tokens", how_to_load),
            gates=lambda task_meta: dict(SFT_GATES), registrable=True)
