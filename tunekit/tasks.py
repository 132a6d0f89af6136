"""Tokenisation and label alignment for the head-based tasks (issue 6): sequence classification,
token classification (NER) and extractive QA. The `template` stage calls `tokenize_task` when
`task.type` is not `sft`; training, evaluation and merging call `load_labels`, `word_predictions`
and `qa_postprocess`.

Everything goes through the model's own fast tokenizer (`transformers`); rows are unpadded, so the
tokenizer's padding side does not matter here.

- classification: `{"id", "input_ids", "token_type_ids"?, "labels"}`; labels is the class index, or a
  multi-hot list for multi-label data. `token_type_ids` are kept whenever the tokenizer makes them
  (BERT-style tokenizers always do; SmolLM2's does not).
- token_classification: `{"id", "input_ids", "labels", "word_ids", "n_words"}`; the words are joined
  with single spaces (the text a model sees at inference) and every token is mapped back to the word
  its characters come from through the offset mapping. Only the first sub-word of a word carries the
  word's tag (or every sub-word with `task.label_all_subwords`, continuation pieces of a `B-X` word
  getting `I-X`); special tokens and whitespace-only pieces get -100 and word id null.
- qa: one row per window of the context (`truncation="only_second"`, `stride=task.doc_stride`,
  overflowing windows), `{"id", "example_id", "input_ids", "token_type_ids"?, "offsets",
  "start_positions", "end_positions"}`. `offsets` are character spans into the context for context
  tokens (whitespace trimmed, so spans recover exact text with byte-level BPE too) and null for
  everything else. An answer that is not wholly inside a window, or an unanswerable question, points
  at index 0: the [CLS] token for BERT-style tokenizers; decoder tokenizers such as SmolLM2's have no
  CLS token, and index 0 (the first question token) is still used as the null position, consistently
  in training and in `qa_postprocess`.
"""

from __future__ import annotations

import bisect
import html
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tunekit.io import read_json, read_jsonl

log = logging.getLogger("tunekit")

IGNORE_INDEX = -100
TASK_TYPES = ("classification", "token_classification", "qa")
SPLITS = ("train", "validation", "test")
LABELS_FILE = "labels.json"
FILE_LINE = "_line"  # multi-task: a row's line in its split file, kept while its task's rows are checked apart
_BATCH = 256  # examples per tokenizer call


class TaskDataError(Exception):
    """The ingested data cannot be tokenised for the task; the message names file, line, field and fix."""


# ---------------------------------------------------------------- labels

def _sort_labels(labels: set[str]) -> list[str]:
    """Sorted; integer class ids ("0", "2", "10") in numeric order."""
    if labels and all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _row_labels(row: dict, task: str) -> list[str]:
    if task == "classification":
        label = row["label"]
        return list(label) if isinstance(label, list) else [label]
    if task == "token_classification":
        return list(row["tags"])
    return []


def _complete_bio(tags: set[str]) -> set[str]:
    """Add the I-X of every B-X and the B-X of every I-X, so a continuation piece (label_all_subwords)
    or an entity type seen only in one form still has its tag."""
    complete = set(tags)
    for tag in tags:
        if tag[:2] in ("B-", "I-"):
            complete |= {f"B-{tag[2:]}", f"I-{tag[2:]}"}
    return complete


def build_label_set(train_rows: Sequence[dict], task: str, fixed: list[str] | None, train_file: str = "train.jsonl"
                    ) -> tuple[list[str], bool]:
    """(labels, multi_label): `fixed` (task.labels) checked against the train split, or the train split's
    sorted labels. Token classification sets are completed to B-/I- pairs."""
    if task == "qa":
        return [], False
    multi = task == "classification" and any(isinstance(row["label"], list) for row in train_rows)
    seen: set[str] = set()
    for line, row in enumerate(train_rows, start=1):
        line = row.get(FILE_LINE, line)
        if task == "classification" and multi and not isinstance(row["label"], list):
            raise TaskDataError(
                f"{train_file}:{line} (from {row.get('source')}): label is {json.dumps(row['label'])} (one string) but "
                "other train rows are multi-label (a list); write every label as a list, e.g. "
                f"[{json.dumps(row['label'])}], or keep single-label data apart")
        seen.update(_row_labels(row, task))
    if fixed is not None:
        labels = list(fixed)
        if task == "token_classification" and "O" not in labels:
            raise TaskDataError(f"task.labels {labels} has no \"O\" tag; token classification needs \"O\" for words "
                                "outside every entity: add it to task.labels in params.yaml")
        return labels, multi
    if task == "token_classification":
        seen = _complete_bio(seen) | {"O"}
    if not seen:
        raise TaskDataError(f"{train_file} has no labels (every multi-label list is empty); label the data or fix "
                            "the label set with task.labels in params.yaml")
    return _sort_labels(seen), multi


def check_labels(rows: Sequence[dict], task: str, labels: list[str], multi: bool, file: str, origin: str) -> None:
    """Every label of `rows` must be in the label set; the error names the file, line and label."""
    known = set(labels)
    for line, row in enumerate(rows, start=1):
        line = row.get(FILE_LINE, line)
        if task == "classification" and isinstance(row["label"], list) != multi:
            kind = "a list (multi-label)" if isinstance(row["label"], list) else "one string (single-label)"
            raise TaskDataError(f"{file}:{line} (from {row.get('source')}): label is {kind} but the train split is "
                                f"{'multi' if multi else 'single'}-label; use one kind of label in every split")
        for position, label in enumerate(_row_labels(row, task)):
            if label not in known:
                where = f"tags[{position}]" if task == "token_classification" else "label"
                raise TaskDataError(
                    f"{file}:{line} (from {row.get('source')}): {where} {json.dumps(label)} is not in the label set "
                    f"{labels} ({origin}); fix the label in the data, add it to task.labels in params.yaml, or make "
                    "sure the train split contains it")


def load_labels(tokenized_dir: Path) -> dict[str, Any]:
    """labels.json of a tokenised task data directory: {"task", "labels", "multi_label", ...}."""
    path = Path(tokenized_dir) / LABELS_FILE
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist: {tokenized_dir} was not written by the template stage for a "
                            "task (task.type sft writes no label file); set task.type and run `dvc repro template`")
    return read_json(path)


# ---------------------------------------------------------------- encoding

def _encoding_fields(tokenizer: Any) -> tuple[str, ...]:
    return ("input_ids", "token_type_ids") if "token_type_ids" in tokenizer.model_input_names else ("input_ids",)


def encode_classification(rows: Sequence[dict], tokenizer: Any, label2id: dict[str, int], multi: bool,
                          max_length: int) -> tuple[list[dict], int]:
    """Rows for sequence classification and the number of truncated examples."""
    pairs = bool(rows) and "text_a" in rows[0]
    fields = _encoding_fields(tokenizer)
    out, truncated = [], 0
    for row in rows:
        if ("text_a" in row) != pairs:
            raise TaskDataError(f"{row.get('source')}: mixes single texts and text pairs in one split; keep one kind")
    firsts = [row["text_a"] if pairs else row["text"] for row in rows]
    seconds = [row["text_b"] for row in rows] if pairs else None
    full = tokenizer(firsts, seconds, truncation=False, verbose=False)
    long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    if long:
        cut = tokenizer([firsts[i] for i in long], [seconds[i] for i in long] if pairs else None,
                        truncation="longest_first" if pairs else True, max_length=max_length)
        for key in fields:
            for position, i in enumerate(long):
                full[key][i] = cut[key][position]
        truncated = len(long)
    for i, row in enumerate(rows):
        encoded = {"id": row["id"], **{key: list(full[key][i]) for key in fields}}
        if multi:
            hot = [0] * len(label2id)
            for label in row["label"]:
                hot[label2id[label]] = 1
            encoded["labels"] = hot
        else:
            encoded["labels"] = label2id[row["label"]]
        out.append(encoded)
    return out, truncated


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrink a character span so it neither starts nor ends on whitespace (byte-level BPE pieces carry
    their leading space)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


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
            start, end = _trim(text, start, end)
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
        start, end = _trim(row["context"], start, end)
        offsets.append([start, end] if start < end else None)
    answers = row["answers"]
    if answers["text"]:  # the first answer is the training target (SQuAD dev sets list several)
        answer_start = answers["answer_start"][0]
        start_position, end_position = _answer_positions(offsets, answer_start, answer_start + len(answers["text"][0]))
    else:
        start_position = end_position = 0
    return {"id": "", "example_id": row["id"],
            **{key: list(encoded[key][window]) for key in _encoding_fields(tokenizer)},
            "offsets": offsets, "start_positions": start_position, "end_positions": end_position}


# ---------------------------------------------------------------- post-processing (evaluate, predict)

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


# ---------------------------------------------------------------- the template stage for tasks

def _check_rows(rows: list[dict], task: str, file: Path) -> None:
    for line, row in enumerate(rows, start=1):
        found = row.get("task", "sft")
        if found != task:
            raise TaskDataError(
                f"{file}:{line}: the row is {found} data but task.type is {task}; the ingested data is stale or from "
                f"other inputs: run the ingest stage again with task.type: {task} (dvc repro ingest)")


def _tokens_of(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def preview_html(task: str, rows: list[dict], tokenizer: Any, labels: list[str], n: int = 8) -> str:
    """A small HTML table per example: each token with its label (or its answer role for QA)."""
    sections = []
    for row in rows[:n]:
        tokens = _tokens_of(tokenizer, row["input_ids"])
        if task == "classification":
            gold = row["labels"]
            shown = ", ".join(labels[i] for i, v in enumerate(gold) if v) if isinstance(gold, list) else labels[gold]
            cells = [(token, "") for token in tokens]
            caption = f"label: {shown}"
        elif task == "token_classification":
            cells = [(token, "" if label == IGNORE_INDEX else labels[label]) for token, label in zip(tokens, row["labels"])]
            caption = f"{row['n_words']} words"
        else:
            s, e = row["start_positions"], row["end_positions"]
            cells = [(token, "answer" if s and s <= i <= e else ("null" if i == 0 and not s else ""))
                     for i, token in enumerate(tokens)]
            caption = f"window {row['id']}: answer tokens {s}..{e}" if s else f"window {row['id']}: no answer (index 0)"
        body = "".join(f"<tr><td>{html.escape(repr(token))}</td><td>{html.escape(label)}</td></tr>"
                       for token, label in cells)
        sections.append(f"<h2>{html.escape(row['id'])}</h2><p>{html.escape(caption)}</p>"
                        f"<table><tr><th>token</th><th>label</th></tr>{body}</table>")
    return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Task data preview</title><style>'
            "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin-bottom:1.5em}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-family:monospace}</style></head><body>"
            f"<h1>{html.escape(task)} preview</h1><p>First {min(n, len(rows))} training rows; -100 labels are blank.</p>"
            f'{"".join(sections)}</body></html>\n')


def tokenize_task(task: str, task_params: Any, max_length: int, tokenizer: Any, data_dir: Path, out_dir: Path,
                  preview_dir: Path, preview_examples: int = 8) -> dict:
    """Tokenise data_dir/{train,validation,test}.jsonl for `task` into out_dir (rows + labels.json) and
    write the preview into preview_dir. Both directories must exist (the caller's atomic temporaries).
    Returns the metrics: per split examples, tokens, truncated, and per task extras."""
    from tunekit.io import write_json, write_jsonl

    if task not in TASK_TYPES:
        raise TaskDataError(f"task.type {task!r} is not a head task; use one of {', '.join(TASK_TYPES)}")
    data = {split: list(read_jsonl(Path(data_dir) / f"{split}.jsonl")) for split in SPLITS}
    for split in SPLITS:
        _check_rows(data[split], task, Path(data_dir) / f"{split}.jsonl")
    out, info, metrics = _tokenize_splits(task, task_params, max_length, tokenizer, data, Path(data_dir))
    for split in SPLITS:
        write_jsonl(Path(out_dir) / f"{split}.jsonl", out[split])
    write_json(Path(out_dir) / LABELS_FILE, info)
    (Path(preview_dir) / "mask_preview.html").write_text(
        preview_html(task, out["train"][:preview_examples], tokenizer, info["labels"], preview_examples), encoding="utf-8")
    return metrics


def tokenize_tasks(task_params: Any, max_length: int, tokenizer: Any, data_dir: Path, out_dir: Path,
                   preview_dir: Path, preview_examples: int = 8) -> dict:
    """Multi-task (`task.type: multi_task`): the rows of each task of `task_params.tasks` (ingested with
    `"task": <name>`) tokenised and aligned by that task's own rules and settings (`task_params.subtask`),
    each output row keeping its `"task"`; one set of split files, labels.json with every task's label set
    under "tasks" ({"task": "multi_task", "tasks": {name: {"task": type, "labels", ...}}}) and one preview
    page per task (mask_preview_<name>.html, linked from mask_preview.html). Metrics per task under
    "tasks", totals at the top."""
    from tunekit.io import write_json, write_jsonl

    names = list(task_params.tasks)
    data = {split: list(read_jsonl(Path(data_dir) / f"{split}.jsonl")) for split in SPLITS}
    for split in SPLITS:
        for line, row in enumerate(data[split], start=1):
            if row.get("task") not in task_params.tasks:
                raise TaskDataError(
                    f"{Path(data_dir) / f'{split}.jsonl'}:{line}: the row belongs to task {row.get('task', 'sft')!r}, "
                    f"which is not one of task.tasks {names}; the ingested data is stale or from other inputs: run "
                    "the ingest stage again (dvc repro ingest)")
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    labels: dict[str, Any] = {}
    metrics: dict[str, Any] = {"task": "multi_task", "tasks": {}}
    links = []
    for name in names:
        sub = task_params.subtask(name)
        mine = {split: [{**row, FILE_LINE: line} for line, row in enumerate(data[split], start=1) if row["task"] == name]
                for split in SPLITS}
        try:
            rows, info, task_metrics = _tokenize_splits(sub.type, sub, max_length, tokenizer, mine, Path(data_dir))
        except TaskDataError as exc:
            raise TaskDataError(f"task.tasks.{name} ({sub.type}): {exc}".replace("task.labels", f"task.tasks.{name}.labels")
                                .replace("task.label_all_subwords", f"task.tasks.{name}.label_all_subwords")) from None
        for split in SPLITS:
            out[split] += [{**row, "task": name} for row in rows[split]]
        labels[name] = info
        metrics["tasks"][name] = task_metrics
        page = f"mask_preview_{name}.html"
        (Path(preview_dir) / page).write_text(
            preview_html(sub.type, rows["train"][:preview_examples], tokenizer, info["labels"], preview_examples),
            encoding="utf-8")
        links.append(f'<li><a href="{html.escape(page)}">{html.escape(name)}</a> ({html.escape(sub.type)})</li>')
    for split in SPLITS:
        write_jsonl(Path(out_dir) / f"{split}.jsonl", out[split])
        metrics[split] = {key: sum(metrics["tasks"][name][split][key] for name in names)
                          for key in ("examples", "tokens", "truncated")}
    write_json(Path(out_dir) / LABELS_FILE, {"task": "multi_task", "tasks": labels})
    (Path(preview_dir) / "mask_preview.html").write_text(
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Task data preview</title></head><body>'
        f"<h1>multi-task preview</h1><ul>{''.join(links)}</ul></body></html>\n", encoding="utf-8")
    for key in ("labels", "truncated", "examples"):
        metrics[key] = sum(metrics["tasks"][name][key] for name in names)
    return metrics


def _tokenize_splits(task: str, task_params: Any, max_length: int, tokenizer: Any, data: dict[str, list[dict]],
                     data_dir: Path) -> tuple[dict[str, list[dict]], dict[str, Any], dict[str, Any]]:
    """(tokenised rows per split, the labels.json content, metrics) of one task's ingested rows."""
    if not data["train"]:
        raise TaskDataError(f"{data_dir / 'train.jsonl'} is empty: nothing to train on")
    labels, multi = build_label_set(data["train"], task, task_params.labels, str(data_dir / "train.jsonl"))
    origin = "task.labels in params.yaml" if task_params.labels is not None else "read from the train split"
    if task == "token_classification" and task_params.label_all_subwords:
        lacking = [label for label in labels if label.startswith("B-") and f"I-{label[2:]}" not in labels]
        if lacking:
            raise TaskDataError(f"task.label_all_subwords labels continuation pieces of a B-X word with I-X, but "
                                f"task.labels has no I- tag for {lacking}; add "
                                f"{[f'I-{label[2:]}' for label in lacking]} to task.labels in params.yaml")
    label2id = {label: i for i, label in enumerate(labels)}
    counts: Counter[str] = Counter()
    metrics: dict[str, Any] = {}
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows = data[split]
        check_labels(rows, task, labels, multi, str(data_dir / f"{split}.jsonl"), origin)
        if split == "train":
            for row in rows:
                counts.update(_row_labels(row, task))
        out_rows: list[dict] = []
        stats: dict[str, Any] = {"examples": len(rows), "truncated": 0}
        for begin in tqdm(range(0, len(rows), _BATCH), desc=f"template {task} ({split})", unit="batch",
                          dynamic_ncols=True, disable=None):
            batch = rows[begin:begin + _BATCH]
            if task == "classification":
                encoded, truncated = encode_classification(batch, tokenizer, label2id, multi, max_length)
                stats["truncated"] += truncated
            elif task == "token_classification":
                encoded, truncated, words_cut = encode_tokens(batch, tokenizer, label2id, max_length,
                                                              task_params.label_all_subwords)
                stats["truncated"] += truncated
                stats["truncated_words"] = stats.get("truncated_words", 0) + words_cut
            else:
                encoded = encode_qa(batch, tokenizer, max_length, task_params.doc_stride)
            out_rows += encoded
        stats["tokens"] = sum(len(row["input_ids"]) for row in out_rows)
        if task == "token_classification":
            stats.setdefault("truncated_words", 0)
            stats["words"] = sum(len(row["tokens"]) for row in rows)
        if task == "qa":
            per_example = Counter(row["example_id"] for row in out_rows)
            stats["features"] = len(out_rows)
            stats["features_per_example"] = len(out_rows) / max(len(rows), 1)
            stats["truncated"] = sum(1 for count in per_example.values() if count > 1)  # context split into windows
            stats["unanswerable"] = sum(1 for row in rows if not row["answers"]["text"])
            found = {row["example_id"] for row in out_rows if row["start_positions"]}
            stats["answer_outside_windows"] = sum(1 for row in rows if row["answers"]["text"] and row["id"] not in found)
        out[split] = out_rows
        metrics[split] = stats
    info = {"task": task, "labels": labels, "multi_label": multi,
            "counts": {label: counts.get(label, 0) for label in labels}}
    metrics["task"] = task
    metrics["labels"] = len(labels)
    metrics["truncated"] = sum(metrics[s]["truncated"] for s in SPLITS)
    metrics["examples"] = sum(metrics[s]["examples"] for s in SPLITS)
    if task == "qa" and any(metrics[s]["answer_outside_windows"] for s in SPLITS):
        log.warning("some answers lie in no single window (longer than a window's context part); they train as "
                    "unanswerable: raise template.max_length or task.doc_stride")
    return out, info, metrics
