"""Token classification / NER (`task.type: token_classification`): one BIO tag per word.

- ingest: `{"tokens", "tags"}` JSONL or CoNLL text (tunekit.ingest).
- template: `{"id", "input_ids", "labels", "word_ids", "n_words"}`; the words are joined with single
  spaces (the text a model sees at inference) and every token is mapped back to the word its characters
  come from through the offset mapping. Only the first sub-word of a word carries the word's tag (or
  every sub-word with `task.label_all_subwords`, continuation pieces of a `B-X` word getting `I-X`);
  special tokens and whitespace-only pieces get -100 and word id null.
- loss: token cross-entropy (optional class weights) summed per labelled token.
- scores: seqeval entity precision / recall / F1 on word-level tags, and tag accuracy.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tunekit.collapse import count_check, majority_check, prior_cross_entropy
from tunekit.constants import IGNORE_INDEX
from tunekit.modeling import real_positions
from tunekit.per_class import entity_report
from tunekit.tasks.heads import (HeadKind, TaskDataError, TaskSpec, check_known_labels, label_counts, record_for,
                                 records_by_id, register, sort_labels, trim_span)


def _row_labels(row: dict) -> list[str]:
    return list(row["tags"])


def _complete_bio(tags: set[str]) -> set[str]:
    """Add the I-X of every B-X and the B-X of every I-X, so a continuation piece (label_all_subwords)
    or an entity type seen only in one form still has its tag."""
    complete = set(tags)
    for tag in tags:
        if tag[:2] in ("B-", "I-"):
            complete |= {f"B-{tag[2:]}", f"I-{tag[2:]}"}
    return complete


def build_labels(train_rows, task_params, train_file: str = "train.jsonl") -> tuple[list[str], bool]:
    """task.labels (which must hold "O"), or the train split's tags completed to B-/I- pairs."""
    seen: set[str] = set()
    for row in train_rows:
        seen.update(_row_labels(row))
    if task_params.labels is not None:
        labels = list(task_params.labels)
        if "O" not in labels:
            raise TaskDataError(f"task.labels {labels} has no \"O\" tag; token classification needs \"O\" for words "
                                "outside every entity: add it to task.labels in params.yaml")
    else:
        labels = sort_labels(_complete_bio(seen) | {"O"})
    if task_params.label_all_subwords:
        lacking = [label for label in labels if label.startswith("B-") and f"I-{label[2:]}" not in labels]
        if lacking:
            raise TaskDataError(f"task.label_all_subwords labels continuation pieces of a B-X word with I-X, but "
                                f"task.labels has no I- tag for {lacking}; add "
                                f"{[f'I-{label[2:]}' for label in lacking]} to task.labels in params.yaml")
    return labels, False


def check_labels(rows, labels: list[str], multi: bool, file: str, origin: str) -> None:
    check_known_labels(rows, labels, file, origin, _row_labels, lambda position: f"tags[{position}]")


def encode_tokens(rows: Sequence[dict], tokenizer: Any, label2id: dict[str, int], max_length: int,
                  label_all_subwords: bool = False) -> tuple[list[dict], int, int]:
    """Rows for token classification, the number of truncated examples and of words cut off by truncation."""
    texts, spans = [], []
    for row in rows:
        starts, position = [], 0
        for word in row["tokens"]:
            starts.append(position)
            position += len(word) + 1
        texts.append(" ".join(row["tokens"]))
        spans.append(starts)
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True,
                        return_special_tokens_mask=True, verbose=False)
    out, truncated, words_cut = [], 0, 0
    for i, row in enumerate(rows):
        text, starts, tags = texts[i], spans[i], row["tags"]
        ends = [start + len(word) for start, word in zip(starts, row["tokens"])]
        word_ids: list[int | None] = []
        labels: list[int] = []
        previous: int | None = None
        for (start, end), special in zip(encoded["offset_mapping"][i], encoded["special_tokens_mask"][i]):
            start, end = trim_span(text, start, end)
            word = None
            if not special and start < end:
                # the word whose span holds the piece's first character
                index = bisect.bisect_right(starts, start) - 1
                if index >= 0 and start < ends[index]:
                    word = index
            word_ids.append(word)
            if word is None:
                labels.append(IGNORE_INDEX)
            elif word != previous:
                labels.append(label2id[tags[word]])
            elif label_all_subwords:
                tag = tags[word]
                labels.append(label2id["I-" + tag[2:] if tag.startswith("B-") else tag])
            else:
                labels.append(IGNORE_INDEX)
            if word is not None:
                previous = word
        covered = max((w for w in word_ids if w is not None), default=-1) + 1
        if covered < len(row["tokens"]) and len(encoded["input_ids"][i]) >= max_length:
            truncated += 1
            words_cut += len(row["tokens"]) - covered
        out.append({"id": row["id"], "input_ids": list(encoded["input_ids"][i]), "labels": labels,
                    "word_ids": word_ids, "n_words": len(row["tokens"])})
    return out, truncated, words_cut


def encode(rows, tokenizer: Any, label2id: dict[str, int], multi: bool, task_params, max_length: int):
    out, truncated, words_cut = encode_tokens(rows, tokenizer, label2id, max_length, task_params.label_all_subwords)
    return out, {"truncated": truncated, "truncated_words": words_cut}


def split_stats(rows, out_rows: list[dict], stats: dict) -> None:
    stats.setdefault("truncated_words", 0)
    stats["words"] = sum(len(row["tokens"]) for row in rows)


def preview(row: dict, tokens: list[str], labels: list[str]):
    cells = [(token, "" if label == IGNORE_INDEX else labels[label]) for token, label in zip(tokens, row["labels"])]
    return cells, f"{row['n_words']} words"


def word_predictions(word_ids: Sequence[int | None], token_pred_ids: Sequence[int], id2label: Sequence[str] | dict,
                     n_words: int | None = None) -> list[str]:
    """One tag per word from per-token predictions: the prediction at each word's first sub-word.

    With n_words (rows carry it), words with no token (cut off by truncation) get "O", so the result
    lines up with the word-level gold tags; otherwise the list ends at the last word seen.
    """
    tags: dict[int, str] = {}
    for word, prediction in zip(word_ids, token_pred_ids):
        if word is not None and word not in tags:
            tags[word] = id2label[int(prediction)]
    count = n_words if n_words is not None else (max(tags) + 1 if tags else 0)
    return [tags.get(word, "O") for word in range(count)]


def head_config(spec: TaskSpec) -> dict[str, Any]:
    return {"num_labels": len(spec.labels), "id2label": dict(enumerate(spec.labels)),
            "label2id": {label: i for i, label in enumerate(spec.labels)}}


def targets(rows, width: int, left: bool) -> dict[str, torch.Tensor]:
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        k = len(row["input_ids"])
        labels[i, slice(width - k, width) if left else slice(0, k)] = torch.tensor(row["labels"])
    return {"labels": labels}


def count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def loss(outputs, batch: dict[str, torch.Tensor], spec: TaskSpec) -> tuple[torch.Tensor, int]:
    weights = torch.tensor(spec.class_weights, dtype=torch.float) if spec.class_weights else None
    logits = real_positions(outputs.logits, batch["input_ids"].shape[1]).float()
    labels = batch["labels"].to(logits.device)
    selected = labels != IGNORE_INDEX
    n = int(selected.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(logits[selected], labels[selected],
                           weight=None if weights is None else weights.to(logits.device), reduction="sum"), n


def output(outputs, j: int, k: int, width: int, spec: TaskSpec) -> dict[str, Any]:
    logits = real_positions(outputs.logits, width)[j, :k].float()
    return {"pred_ids": logits.argmax(-1).tolist(), "logits": logits.cpu()}


def hard(outputs, spec: TaskSpec) -> list[Any]:
    return [o["pred_ids"] for o in outputs]


def score(outputs, rows, records, spec: TaskSpec, label: str, settings: dict, out_dir):
    from tunekit.metrics import accuracy, entity_metrics

    id2label = dict(enumerate(spec.labels))
    by_id = records_by_id(records)
    true_tags, pred_tags, predictions, cut = [], [], [], 0
    for i, (row, o) in enumerate(zip(rows, outputs)):
        record = record_for(row, i, records, by_id)
        reference = list(record["tags"])
        predicted = list(word_predictions(row["word_ids"], o["pred_ids"], id2label, row.get("n_words")))[:len(reference)]
        if len(predicted) < len(reference):  # words past template.max_length were never seen: predicted O
            cut += len(reference) - len(predicted)
            predicted += ["O"] * (len(reference) - len(predicted))
        true_tags.append(reference)
        pred_tags.append(predicted)
        predictions.append({"id": row.get("id"), "model": label, "tokens": record.get("tokens"),
                            "reference": reference, "prediction": predicted})
    metrics = {f"entity_{k}": v for k, v in entity_metrics(true_tags, pred_tags).items()}
    metrics["tag_accuracy"] = accuracy([t for s in true_tags for t in s], [t for s in pred_tags for t in s])
    metrics["truncated_words"] = float(cut)
    metrics["per_class"] = entity_report(true_tags, pred_tags)
    return metrics, predictions, {}


def collapse(predictions, spec: TaskSpec, params) -> dict[str, Any]:
    """Collapsed: one tag on nearly every word while the references vary (task.collapse prediction_share /
    reference_share), or far fewer predicted entities than the references hold (entity_ratio): the all-O
    model, whose tag accuracy is the share of O."""
    from seqeval.metrics.sequence_labeling import get_entities

    true = [list(p["reference"]) for p in predictions]
    pred = [list(p["prediction"]) for p in predictions]
    check = majority_check([t for s in true for t in s], [t for s in pred for t in s], params, "words")
    check["reference_entities"], check["predicted_entities"] = len(get_entities(true)), len(get_entities(pred))
    few = count_check(check["reference_entities"], check["predicted_entities"], params.entity_ratio, "entities",
                      "entity_ratio")
    if few:
        shares = (f"{check['label']!r} on {check['prediction_share']:.0%} of the words, "
                  f"{check['reference_share']:.0%} in the references")
        check["reason"] = f"{check['reason']}; it {few}" if check["collapsed"] else f"{few} ({shares})"
        check["collapsed"] = 1
    return check


def prior_loss(train_rows, spec: TaskSpec) -> float | None:
    """The loss per labelled token of always predicting the train tag frequencies (class-weighted with task.class_weights)."""
    return prior_cross_entropy(label_counts(train_rows, len(spec.labels), False), spec.class_weights)


KIND = register(HeadKind(
    name="token_classification", shape="token", auto_class="AutoModelForTokenClassification",
    pipeline_tag="token-classification", num_labels=lambda spec: len(spec.labels), head_config=head_config,
    custom_head=lambda spec: False, build_labels=build_labels, check_labels=check_labels, row_labels=_row_labels,
    encode=encode, preview=preview, targets=targets, loss=loss, output=output, hard=hard, score=score, count=count,
    main_metric="entity_f1", split_stats=split_stats, collapse=collapse, prior_loss=prior_loss,
))
