"""Extractive QA (`task.type: qa`): the answer is a span of the context, or nothing (SQuAD 2.0).

- ingest: the `squad` format, `{"context", "question", "answers": {"text", "answer_start"}}` (tunekit.ingest).
- template: one row per window of the context (`truncation="only_second"`, `stride=task.doc_stride`,
  overflowing windows), `{"id", "example_id", "input_ids", "token_type_ids"?, "offsets",
  "start_positions", "end_positions"}`. `offsets` are character spans into the context for context
  tokens (whitespace trimmed, so spans recover exact text with byte-level BPE too) and null for
  everything else. An answer that is not wholly inside a window, or an unanswerable question, points
  at index 0: the [CLS] token for BERT-style tokenizers; decoder tokenizers such as SmolLM2's have no
  CLS token, and index 0 (the first question token) is still used as the null position, consistently
  in training and in `qa_postprocess`.
- loss: (start cross-entropy + end cross-entropy) / 2 per window.
- scores: SQuAD exact match and F1 with n-best post-processing and the null answer.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tunekit.collapse import majority_check
from tunekit.modeling import real_positions
from tunekit.tasks.heads import (HeadKind, TaskDataError, TaskError, TaskSpec, encoding_fields, records_by_id, register,
                                 trim_span)

log = logging.getLogger("tunekit")


def _answer_positions(offsets: list[list[int] | None], answer_start: int, answer_end: int) -> tuple[int, int]:
    """Token indices of the first and last piece of the answer span, or (0, 0) when the window does
    not hold the whole answer."""
    context = [(i, span) for i, span in enumerate(offsets) if span is not None]
    if not context or context[0][1][0] > answer_start or context[-1][1][1] < answer_end:
        return 0, 0
    start = max(i for i, span in context if span[0] <= answer_start)
    end = min(i for i, span in context if span[1] >= answer_end)
    if end < start:
        return 0, 0
    return start, end


def encode_qa(rows: Sequence[dict], tokenizer: Any, max_length: int, doc_stride: int) -> list[dict]:
    """One feature per window of each example's context; see the module docstring for the row layout."""
    if not getattr(tokenizer, "is_fast", False):
        raise TaskDataError("extractive QA needs a fast tokenizer (offset mappings and overflowing windows); "
                            f"{type(tokenizer).__name__} is not one: use a model with a tokenizer.json")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    question_lengths = [len(ids) for ids in tokenizer([row["question"] for row in rows], add_special_tokens=False,
                                                      verbose=False)["input_ids"]]
    # The stride must be smaller than a window's context part; examples with long questions get a smaller one.
    strides: dict[int, list[int]] = {}
    for index, (row, length) in enumerate(zip(rows, question_lengths)):
        room = max_length - specials - length  # context tokens per window
        if room < 2:
            raise TaskDataError(
                f"{row.get('source')}: the question is {length} tokens, which leaves no room for the context "
                f"within template.max_length = {max_length}; raise template.max_length or shorten the question")
        strides.setdefault(min(doc_stride, room - 1), []).append(index)
    features: dict[int, list[dict]] = {}
    for stride, indices in strides.items():
        group = [rows[i] for i in indices]
        encoded = tokenizer([row["question"] for row in group], [row["context"] for row in group],
                            truncation="only_second", max_length=max_length, stride=stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True, verbose=False)
        for window, sample in enumerate(encoded["overflow_to_sample_mapping"]):
            row = group[sample]
            features.setdefault(indices[sample], []).append(_qa_feature(row, encoded, window, tokenizer))
    out = []
    for index in range(len(rows)):
        for number, feature in enumerate(features[index]):
            feature["id"] = f"{rows[index]['id']}-{number}"
            out.append(feature)
    return out


def _qa_feature(row: dict, encoded: Any, window: int, tokenizer: Any) -> dict:
    offsets: list[list[int] | None] = []
    for sequence, (start, end) in zip(encoded.sequence_ids(window), encoded["offset_mapping"][window]):
        if sequence != 1:
            offsets.append(None)
            continue
        start, end = trim_span(row["context"], start, end)
        offsets.append([start, end] if start < end else None)
    answers = row["answers"]
    if answers["text"]:  # the first answer is the training target (SQuAD dev sets list several)
        answer_start = answers["answer_start"][0]
        start_position, end_position = _answer_positions(offsets, answer_start, answer_start + len(answers["text"][0]))
    else:
        start_position = end_position = 0
    return {"id": "", "example_id": row["id"],
            **{key: list(encoded[key][window]) for key in encoding_fields(tokenizer)},
            "offsets": offsets, "start_positions": start_position, "end_positions": end_position}


def qa_postprocess(example: dict, features: Sequence[dict], start_logits: Sequence, end_logits: Sequence,
                   n_best: int = 20, max_answer_length: int = 30, allow_null: bool = True) -> tuple[str, float]:
    """The predicted answer of one example from the logits of its features (windows).

    Candidates are the n_best start and end positions of each window, kept when both lie in the
    context (offsets not null), end >= start and the span is at most max_answer_length tokens; the
    answer is the context text between their character offsets, so it is always an exact substring.
    The null score is the lowest start+end score at index 0 over the windows; with allow_null, ""
    is returned when it beats the best span (and always when no span is valid).
    """
    context = example["context"]
    best_text, best_score = "", -math.inf
    null_score = math.inf
    for feature, starts, ends in zip(features, start_logits, end_logits):
        offsets = feature["offsets"]
        size = len(offsets)
        starts = [float(x) for x in list(starts)[:size]]
        ends = [float(x) for x in list(ends)[:size]]
        null_score = min(null_score, starts[0] + ends[0])
        top_starts = sorted(range(size), key=lambda i: starts[i], reverse=True)[:n_best]
        top_ends = sorted(range(size), key=lambda i: ends[i], reverse=True)[:n_best]
        for s in top_starts:
            if offsets[s] is None:
                continue
            for e in top_ends:
                if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = starts[s] + ends[e]
                if score > best_score:
                    best_text, best_score = context[offsets[s][0]:offsets[e][1]], score
    if best_score == -math.inf or (allow_null and null_score > best_score):
        return "", null_score if null_score != math.inf else -math.inf
    return best_text, best_score


def score(outputs, rows, records, spec: TaskSpec, label: str, settings: dict, out_dir):
    from tunekit.metrics import squad_exact_match, squad_f1

    n_best, max_answer_length = settings["n_best"], settings["max_answer_length"]
    allow_null = settings["allow_null"]
    by_id = records_by_id(records)
    windows: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        windows.setdefault(str(row["example_id"]), []).append(i)
    em, f1, has_answer, predictions = [], [], [], []
    for example_id, indices in windows.items():
        record = by_id.get(example_id)
        if record is None:
            raise TaskError(f"QA window of example {example_id!r} has no ingested test record with that id: "
                            "re-run ingest and template together")
        text, score = qa_postprocess(record, [rows[i] for i in indices], [outputs[i]["start_logits"] for i in indices],
                                     [outputs[i]["end_logits"] for i in indices], n_best, max_answer_length, allow_null)
        answers = [a for a in record["answers"]["text"] if a.strip()]
        if answers:
            em.append(squad_exact_match([text], [answers]))
            f1.append(squad_f1([text], [answers]))
        else:  # SQuAD 2.0: an unanswerable question scores 1 only for the empty answer
            em.append(float(not text.strip()))
            f1.append(float(not text.strip()))
        has_answer.append(bool(answers))
        predictions.append({"id": example_id, "model": label, "question": record.get("question"),
                            "reference": answers, "prediction": text, "score": float(score), "windows": len(indices)})
    n = max(len(em), 1)
    metrics = {"squad_exact_match": sum(em) / n, "squad_f1": sum(f1) / n}
    for name, keep in (("has_answer", True), ("no_answer", False)):
        picked = [i for i, h in enumerate(has_answer) if h == keep]
        if picked and len(picked) < len(has_answer):
            metrics[f"{name}_exact_match"] = sum(em[i] for i in picked) / len(picked)
            metrics[f"{name}_f1"] = sum(f1[i] for i in picked) / len(picked)
    return metrics, predictions, {}


NO_ANSWER, ANSWERED = "(no answer)", "(an answer)"


def collapse(predictions, spec: TaskSpec, params) -> dict[str, Any]:
    """Collapsed: the empty answer for nearly every question while most questions have an answer."""
    check = majority_check([ANSWERED if p["reference"] else NO_ANSWER for p in predictions],
                           [ANSWERED if str(p["prediction"]).strip() else NO_ANSWER for p in predictions], params, "questions")
    if check["label"] != NO_ANSWER:  # answering every question is no collapse (no_answer_* scores show it)
        check.update(collapsed=0, reason=None)
    return check


def build_labels(train_rows, task_params, train_file: str = "train.jsonl") -> tuple[list[str], bool]:
    return [], False


def check_labels(rows, labels: list[str], multi: bool, file: str, origin: str) -> None:
    """QA rows carry answers, not labels: nothing to check against a label set."""


def encode(rows, tokenizer: Any, label2id: dict[str, int], multi: bool, task_params, max_length: int):
    return encode_qa(rows, tokenizer, max_length, task_params.doc_stride), {}


def split_stats(rows, out_rows: list[dict], stats: dict) -> None:
    per_example = Counter(row["example_id"] for row in out_rows)
    stats["features"] = len(out_rows)
    stats["features_per_example"] = len(out_rows) / max(len(rows), 1)
    stats["truncated"] = sum(1 for count in per_example.values() if count > 1)  # context split into windows
    stats["unanswerable"] = sum(1 for row in rows if not row["answers"]["text"])
    found = {row["example_id"] for row in out_rows if row["start_positions"]}
    stats["answer_outside_windows"] = sum(1 for row in rows if row["answers"]["text"] and row["id"] not in found)


def finish_metrics(metrics: dict) -> None:
    if any(metrics[s]["answer_outside_windows"] for s in ("train", "validation", "test")):
        log.warning("some answers lie in no single window (longer than a window's context part); they train as "
                    "unanswerable: raise template.max_length or task.doc_stride")


def preview(row: dict, tokens: list[str], labels: list[str]):
    s, e = row["start_positions"], row["end_positions"]
    cells = [(token, "answer" if s and s <= i <= e else ("null" if i == 0 and not s else ""))
             for i, token in enumerate(tokens)]
    caption = f"window {row['id']}: answer tokens {s}..{e}" if s else f"window {row['id']}: no answer (index 0)"
    return cells, caption


def targets(rows, width: int, left: bool) -> dict[str, torch.Tensor]:
    shift = [width - len(row["input_ids"]) if left else 0 for row in rows]
    return {"start_positions": torch.tensor([row["start_positions"] + s for row, s in zip(rows, shift)]),
            "end_positions": torch.tensor([row["end_positions"] + s for row, s in zip(rows, shift)])}


def _span_logits(outputs, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    start = real_positions(outputs.start_logits.unsqueeze(-1), width).squeeze(-1)
    end = real_positions(outputs.end_logits.unsqueeze(-1), width).squeeze(-1)
    return start, end


def loss(outputs, batch: dict[str, torch.Tensor], spec: TaskSpec) -> tuple[torch.Tensor, int]:
    width = batch["input_ids"].shape[1]
    start, end = (logits.float() for logits in _span_logits(outputs, width))
    sp = batch["start_positions"].to(start.device).clamp(0, width - 1)
    ep = batch["end_positions"].to(start.device).clamp(0, width - 1)
    return (F.cross_entropy(start, sp, reduction="sum") + F.cross_entropy(end, ep, reduction="sum")) / 2, sp.shape[0]


def output(outputs, j: int, k: int, width: int, spec: TaskSpec) -> dict[str, Any]:
    start, end = _span_logits(outputs, width)
    start_logits, end_logits = start[j, :k].float(), end[j, :k].float()
    return {"start_logits": start_logits.tolist(), "end_logits": end_logits.tolist(),
            "logits": torch.stack([start_logits, end_logits]).cpu()}


def hard(outputs, spec: TaskSpec) -> list[Any]:
    return [(max(range(len(o["start_logits"])), key=o["start_logits"].__getitem__),
             max(range(len(o["end_logits"])), key=o["end_logits"].__getitem__)) for o in outputs]


def score_settings(task_params, records) -> dict[str, Any]:
    """task.n_best and task.max_answer_length; the null answer may win when the data has unanswerable
    questions (SQuAD 2.0), or when no records say (scoring outside the pipeline)."""
    allow_null = True if records is None else any(not [a for a in r["answers"]["text"] if a.strip()] for r in records)
    return {"n_best": getattr(task_params, "n_best", 20), "max_answer_length": getattr(task_params, "max_answer_length", 30),
            "allow_null": allow_null}


KIND = register(HeadKind(
    name="qa", shape="span", auto_class="AutoModelForQuestionAnswering", pipeline_tag="question-answering",
    num_labels=lambda spec: 2, head_config=lambda spec: {}, custom_head=lambda spec: False, build_labels=build_labels,
    check_labels=check_labels, row_labels=lambda row: [], encode=encode, preview=preview, targets=targets, loss=loss,
    output=output, hard=hard, score=score, main_metric="squad_f1", split_stats=split_stats, finish_metrics=finish_metrics,
    score_settings=score_settings, labelled=False, class_weights=False, collapse=collapse,
))
