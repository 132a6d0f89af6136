"""tunekit.ingest on real files: one reject reason per bad situation, the four formats, splits, outputs."""

from __future__ import annotations

from tests.conftest import REPO
import hashlib
import inspect
import json
import os
import threading
from pathlib import Path

import pytest

from tunekit.data import read_split
from tunekit.ingest import FORMATS, IngestError, Record, Reject, ingest, input_files, read_file, split_of

DATA = REPO / "tests" / "data" / "ingest"

REASONS = {
    "invalid_json", "not_an_object", "wrong_format", "wrong_type", "unknown_role", "empty_content",
    "no_assistant_turn", "not_ending_with_assistant", "misplaced_system", "too_long", "invalid_utf8",
}


def chat(*turns: tuple[str, object], **extra: object) -> bytes:
    """A `messages` format line from (role, content) pairs."""
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns], **extra}).encode()


def write(path: Path, lines: list[bytes], end: bytes = b"\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + end for line in lines))
    return path


def canonical_id(messages: list[dict]) -> str:
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def split_ids(out: Path) -> dict[str, str]:
    """id -> split name, from an ingest output directory."""
    return {row["id"]: split for split in ("train", "validation", "test") for row in read_split(out, split)}


def qa_lines(start: int, stop: int) -> list[bytes]:
    return [json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}).encode() for i in range(start, stop)]


# --- rejects -------------------------------------------------------------------------------------

BLANK = "blank"
# (expected reason, None for an accepted line, BLANK for a skipped one; the raw line), read with max_chars=100.
CORPUS: list[tuple[str | None, bytes]] = [
    (None, chat(("user", "hi"), ("assistant", "hello"))),
    ("invalid_json", b'{"messages": [{"role": "user", "content": "hi"}'),
    ("not_an_object", b'["user", "hi"]'),
    ("wrong_format", b'{"prompt": "hi", "completion": "hello"}'),
    ("wrong_type", chat(("user", 42), ("assistant", "a number?"))),
    ("unknown_role", chat(("user", "hi"), ("bot", "beep"))),
    ("empty_content", chat(("user", "   "), ("assistant", "nothing asked"))),
    (BLANK, b"  \t"),
    (None, chat(("system", "be kind"), ("user", "hey"), ("assistant", "hey you"))),
    ("no_assistant_turn", chat(("user", "anyone?"))),
    ("not_ending_with_assistant", chat(("user", "a"), ("assistant", "b"), ("user", "c"))),
    ("misplaced_system", chat(("user", "a"), ("system", "late rules"), ("assistant", "b"))),
    ("too_long", chat(("user", "x" * 60), ("assistant", "y" * 60))),
    ("invalid_utf8", '{"messages": [{"role": "user", "content": "café"}, '
                     '{"role": "assistant", "content": "oui"}]}'.encode("latin-1")),
    (None, chat(("user", "last"), ("assistant", "one"))),
]


def test_each_bad_line_gets_its_own_reason(tmp_path: Path) -> None:
    path = write(tmp_path / "corpus.jsonl", [line for _, line in CORPUS])
    items = list(read_file(path, max_chars=100))

    rejects = {item.line: item.reason for item in items if isinstance(item, Reject)}
    expected = {n: reason for n, (reason, _) in enumerate(CORPUS, 1) if reason not in (None, BLANK)}
    assert rejects == expected
    assert set(rejects.values()) == REASONS
    assert [item.line for item in items if isinstance(item, Record)] == [1, 9, 15]
    assert all(item.file == str(path) for item in items)

    details = {item.reason: item.detail for item in items if isinstance(item, Reject)}
    assert details["unknown_role"] == 'messages[1].role is "bot"; use one of system, user, assistant, tool'
    assert "at column 48" in details["invalid_json"]  # just past the 47-character line
    assert '"prompt", "completion"' in details["wrong_format"]
    assert "the file is messages (as detected from line 1)" in details["wrong_format"]
    assert details["wrong_type"].startswith("messages[0].content is 42 (a number); it must be a string or a list")
    assert details["empty_content"].startswith("messages[0].content is empty")
    assert "messages[1] is a system message" in details["misplaced_system"]
    assert "messages[2] is the last message and has role user" in details["not_ending_with_assistant"]
    assert "total 120 characters, above ingest.max_chars = 100" in details["too_long"]
    assert "byte 0xe9" in details["invalid_utf8"]


@pytest.mark.parametrize(("fmt", "line", "reason", "detail"), [
    ("messages", b'{"messages": "hi"}', "wrong_type", 'messages is "hi" (a string); it must be a list'),
    ("messages", b'{"messages": ["hi"]}', "wrong_type", "messages[0] is"),
    ("messages", b'{"messages": [{"content": "hi"}]}', "wrong_type", "messages[0].role is missing"),
    ("messages", b'{"messages": [{"role": "user"}]}', "wrong_type", "messages[0].content is missing"),
    ("messages", b'{"messages": [{"role": "user", "content": null}]}', "wrong_type", "messages[0].content is null"),
    ("messages", b'{"messages": [{"role": "user", "content": "q"}, '
                 b'{"role": "assistant", "content": "a", "train": "no"}]}',
     "wrong_type", 'messages[1].train is "no" (a string); use true or false'),
    ("messages", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, '
                 b'{"type": "image_url"}]}]}',
     "wrong_type", 'messages[0].content[1].type is "image_url" (a string); only "text" parts'),
    ("messages", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}]}',
     "empty_content", "messages[0].content has no text in its parts"),
    ("messages", b'{"messages": []}', "no_assistant_turn", "messages is empty"),
    ("messages", b'{"messages": [{"role": "user", "content": "cut \\ud83d"}, '
                 b'{"role": "assistant", "content": "a"}]}',
     "invalid_utf8", "messages[0].content has an unpaired surrogate \\ud83d at character 5"),
    ("messages", b"[" * 100_000, "invalid_json", "nested too deeply"),
    ("messages", b"42", "not_an_object", "line is 42 (a number), not a JSON object"),
    ("messages", b'{"instruction": "a", "output": "b"}', "wrong_format", "(as forced by ingest.format)"),
    ("sharegpt", b'{"conversations": [{"from": "bot", "value": "x"}]}', "unknown_role",
     'conversations[0].from is "bot"; use one of system, human, user, gpt, assistant'),
    ("sharegpt", b'{"conversations": [{"from": "human", "value": 3}]}', "wrong_type",
     "conversations[0].value is 3 (a number)"),
    ("sharegpt", b'{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, '
                 b'{"from": "human", "value": "c"}]}',
     "not_ending_with_assistant", "conversations[2] is the last message"),
    ("alpaca", b'{"instruction": "a", "output": ""}', "empty_content", "output is empty"),
    ("alpaca", b'{"instruction": "a", "input": 5, "output": "b"}', "wrong_type", "input is 5 (a number)"),
    ("prompt_completion", b'{"prompt": ["a"], "completion": "b"}', "wrong_type", "prompt is a list"),
])
def test_reject_details_name_the_field(tmp_path: Path, fmt: str, line: bytes, reason: str, detail: str) -> None:
    [item] = read_file(write(tmp_path / "x.jsonl", [line]), fmt=fmt)
    assert isinstance(item, Reject) and (item.line, item.reason) == (1, reason)
    assert detail in item.detail


def test_file_with_no_known_format_rejects_every_object_line(tmp_path: Path) -> None:
    path = write(tmp_path / "qa.jsonl", [b'{"question": "a", "answer": "b"}', b"{}", b"not json"])
    items = list(read_file(path))
    assert [(r.line, r.reason) for r in items] == [(1, "wrong_format"), (2, "wrong_format"), (3, "invalid_json")]
    assert 'keys "question", "answer"' in items[0].detail and "no keys" in items[1].detail
    assert 'prompt_completion needs "prompt", "completion"' in items[0].detail


def test_format_is_detected_from_the_first_line_that_has_one(tmp_path: Path) -> None:
    path = write(tmp_path / "late.jsonl", [b'{"note": "header"}', b'{"prompt": "p", "completion": "c"}'])
    first, second = read_file(path)
    assert isinstance(first, Reject) and first.reason == "wrong_format"
    assert isinstance(second, Record) and second.messages == [{"role": "user", "content": "p"},
                                                                 {"role": "assistant", "content": "c"}]


def test_unknown_format_argument_fails_before_reading(tmp_path: Path) -> None:
    with pytest.raises(IngestError) as caught:
        read_file(tmp_path / "not-even-there.jsonl", fmt="chatml")
    assert all(fmt in str(caught.value) for fmt in ("auto", *FORMATS))


# --- formats -------------------------------------------------------------------------------------

EXPECTED: dict[str, list[list[dict]]] = {
    "messages": [
        [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "Paris."}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Bleu.", "train": False},
         {"role": "user", "content": "In English, please."}, {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Translate to English:\nchat"}, {"role": "assistant", "content": "cat"}],
    ],
    "prompt_completion": [
        [{"role": "user", "content": "2 + 2 ="}, {"role": "assistant", "content": " 4"}],
        [{"role": "user", "content": "Opposite of hot?"}, {"role": "assistant", "content": "Cold."}],
    ],
    "alpaca": [
        [{"role": "user", "content": "Summarise the text.\n\nThe cat sat on the mat all day."},
         {"role": "assistant", "content": "A cat rested."}],
        [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
        [{"role": "system", "content": "You are a thesaurus."}, {"role": "user", "content": "Give a synonym for big."},
         {"role": "assistant", "content": "Large."}],
        [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1, 2, 3"}],
    ],
    "sharegpt": [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "Goodbye."}],
        [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}],
    ],
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("given", ["auto", "forced"])
def test_each_format_normalises_to_messages(fmt: str, given: str) -> None:
    records = list(read_file(DATA / f"{fmt}.jsonl", fmt="auto" if given == "auto" else fmt))
    assert all(isinstance(r, Record) for r in records)
    assert [r.messages for r in records] == EXPECTED[fmt]
    assert [r.line for r in records] == list(range(1, len(EXPECTED[fmt]) + 1))
    assert [r.id for r in records] == [canonical_id(m) for m in EXPECTED[fmt]]


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    lines = [chat(("user", "one"), ("assistant", "1")), b"", chat(("user", "two"), ("assistant", "2"))]
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(line + b"\r\n" for line in lines))
    records = list(read_file(path))
    assert [(r.line, r.messages[0]["content"], r.messages[1]["content"]) for r in records] == [(1, "one", "1"),
                                                                                            (3, "two", "2")]


def test_bom_at_the_start_of_any_line_is_accepted(tmp_path: Path) -> None:
    """Files joined with `cat` keep each one's BOM, which then starts a line in the middle of the file."""
    bom = b"\xef\xbb\xbf"
    first = bom + chat(("user", "one"), ("assistant", "1")) + b"\n"
    second = bom + chat(("user", "two"), ("assistant", "2")) + b"\r\n" + chat(("user", "three"), ("assistant", "3"))
    path = tmp_path / "joined.jsonl"
    path.write_bytes(first + second + b"\n" + bom + b"\n")
    items = list(read_file(path))
    assert [(type(i).__name__, i.line, i.messages[0]["content"]) for i in items] == [
        ("Record", 1, "one"), ("Record", 2, "two"), ("Record", 3, "three")]  # a BOM-only line is blank
    # Only a BOM is stripped: a BOM inside a line's JSON text is still data, and a stray byte is still a reject.
    path.write_bytes(chat(("user", "\ufeffkept"), ("assistant", "a")) + b"\n" + b"\xef\xbb" + chat(("user", "x"), ("assistant", "y")))
    items = list(read_file(path))
    assert items[0].messages[0]["content"] == "\ufeffkept"
    assert isinstance(items[1], Reject) and items[1].reason == "invalid_utf8"


def test_role_names_are_matched_case_insensitively(tmp_path: Path) -> None:
    lines = [chat(("System", "rules"), ("USER", "hi"), ("Assistant", "hello")),
             json.dumps({"conversations": [{"from": "Human", "value": "hi"}, {"from": "GPT", "value": "hello"}]}).encode(),
             chat(("User", "hi"), ("Bot", "beep"))]
    items = [item for i, line in enumerate(lines) for item in read_file(write(tmp_path / f"{i}.jsonl", [line]))]
    assert [m["role"] for m in items[0].messages] == ["system", "user", "assistant"]
    assert [m["role"] for m in items[1].messages] == ["user", "assistant"]
    # Normalised to lower case, so differently cased copies are one record (and one id).
    assert items[0].id == canonical_id([{"role": "system", "content": "rules"}, {"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "hello"}])
    assert isinstance(items[2], Reject) and items[2].reason == "unknown_role" and '"Bot"' in items[2].detail


def test_read_file_streams(tmp_path: Path) -> None:
    # A named pipe hands out the second line only after the first record came back, so a reader
    # that needs the whole file first would wait for the writer's timeout and fail the check.
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    first_seen = threading.Event()
    seen_before_end: list[bool] = []

    def writer() -> None:
        with open(pipe, "wb") as handle:
            handle.write(chat(("user", "a"), ("assistant", "b")) + b"\n")
            handle.flush()
            seen_before_end.append(first_seen.wait(timeout=3))
            handle.write(chat(("user", "c"), ("assistant", "d")) + b"\n")

    thread = threading.Thread(target=writer)
    thread.start()
    items = read_file(pipe)
    assert inspect.isgenerator(items)
    first = next(items)
    first_seen.set()
    rest = list(items)
    thread.join()
    assert seen_before_end == [True]
    assert isinstance(first, Record) and first.line == 1 and [r.line for r in rest] == [2]


# --- ingest --------------------------------------------------------------------------------------

def test_ingest_counts_and_outputs(tmp_path: Path) -> None:
    a, b = chat(("user", "a"), ("assistant", "A")), chat(("user", "b"), ("assistant", "B"))
    inputs = tmp_path / "raw"
    write(inputs / "one.jsonl", [a, b, b"", a, b"{oops", chat(("user", "c"), ("assistant", "C")), b"   "])
    write(inputs / "sub" / "two.jsonl", [b, chat(("robot", "x"), ("assistant", "y")),
                                         chat(("user", "d"), ("assistant", "D"))])
    out = tmp_path / "ingested"

    metrics = ingest(inputs, out, max_reject_rate=0.5, validation=0.0, test=0.0)

    assert metrics == {
        "lines_read": 8, "blank_lines": 2, "accepted": 4, "rejected": 2,
        "rejected_by_reason": {"invalid_json": 1, "unknown_role": 1}, "duplicates": 2,
        "reject_rate": 0.25, "train": 4, "validation": 0, "test": 0, "files": 2,
    }
    assert metrics["accepted"] + metrics["rejected"] + metrics["duplicates"] == metrics["lines_read"]
    json.dumps(metrics)
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl", "test", "train", "validation"]

    train = list(read_split(out, "train"))
    # Input order, first occurrence kept.
    assert [row["source"] for row in train] == [f"{inputs / 'one.jsonl'}:1", f"{inputs / 'one.jsonl'}:2",
                                               f"{inputs / 'one.jsonl'}:6", f"{inputs / 'sub' / 'two.jsonl'}:3"]
    assert train[0] == {"id": canonical_id(train[0]["messages"]), "messages": [{"role": "user", "content": "a"},
                        {"role": "assistant", "content": "A"}], "source": f"{inputs / 'one.jsonl'}:1"}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["file"], r["line"], r["reason"]) for r in rejects] == [
        (str(inputs / "one.jsonl"), 5, "invalid_json"), (str(inputs / "sub" / "two.jsonl"), 2, "unknown_role")]
    assert all(r["detail"] for r in rejects)


def test_ingest_keeps_train_false_and_mixes_formats_across_files(tmp_path: Path) -> None:
    metrics = ingest(DATA, tmp_path / "out", validation=0.0, test=0.0)
    assert (metrics["files"], metrics["accepted"], metrics["rejected"]) == (4, 11, 0)
    rows = list(read_split(tmp_path / "out", "train"))
    assert [row["messages"] for row in rows] == [m for fmt in sorted(FORMATS) for m in EXPECTED[fmt]]


def test_ingest_replaces_an_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    ingest(DATA / "sharegpt.jsonl", out, validation=0.0, test=0.0)
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl", "test", "train", "validation"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_splits_are_stable_when_data_is_appended(tmp_path: Path) -> None:
    path = write(tmp_path / "qa.jsonl", qa_lines(0, 3000))
    out = tmp_path / "out"
    first = ingest(path, out, validation=0.1, test=0.1)
    before = split_ids(out)
    assert len(before) == 3000
    for split in ("validation", "test"):
        assert abs(first[split] / 3000 - 0.1) < 0.025
    assert first["train"] + first["validation"] + first["test"] == 3000

    with open(path, "ab") as handle:
        handle.write(b"".join(line + b"\n" for line in qa_lines(3000, 4000)))
    ingest(path, out, validation=0.1, test=0.1)
    after = split_ids(out)
    assert len(after) == 4000
    assert {record_id: after[record_id] for record_id in before} == before


def test_split_is_a_pure_function_of_the_id() -> None:
    assert split_of("0" * 16, 0.1, 0.1) == "test"
    assert split_of(f"{int(0.15 * 16 ** 16):016x}", 0.1, 0.1) == "validation"
    assert split_of("f" * 16, 0.1, 0.1) == "train"
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(2000)]
    assert [split_of(i, 0.1, 0.1) for i in ids] == [split_of(i, 0.1, 0.1) for i in ids]
    # Growing the validation fraction takes ids from train only; the test set stays the same.
    assert {i for i in ids if split_of(i, 0.1, 0.1) == "test"} == {i for i in ids if split_of(i, 0.3, 0.1) == "test"}


def test_reject_rate_above_threshold_fails_and_leaves_nothing(tmp_path: Path) -> None:
    lines = qa_lines(0, 10)
    lines[2] = b'{"prompt": "p", "completion": }'
    lines[6] = b'{"prompt": "", "completion": "c"}'
    path = write(tmp_path / "qa.jsonl", lines)
    out = tmp_path / "out"

    with pytest.raises(IngestError) as caught:
        ingest(path, out, max_reject_rate=0.1)

    message = str(caught.value)
    assert "rejected 2 of 10 lines read (20.00%), above ingest.max_reject_rate = 0.1 (10.00%)" in message
    assert "  invalid_json: 1\n" in message and "  empty_content: 1\n" in message
    assert f"{path}:3: invalid_json: not valid JSON" in message
    assert f"{path}:7: empty_content: prompt is empty" in message
    assert "raise ingest.max_reject_rate in params.yaml" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qa.jsonl"]


def test_failed_ingest_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ingest(DATA / "alpaca.jsonl", out)
    previous = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = write(tmp_path / "bad.jsonl", [b"nope"] * 12 + qa_lines(0, 1))

    with pytest.raises(IngestError) as caught:
        ingest(bad, out)

    message = str(caught.value)
    assert "first 10 of 12 rejects:" in message and f"{bad}:10: invalid_json" in message and f"{bad}:11:" not in message
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out"]


def test_reject_rate_at_threshold_passes(tmp_path: Path) -> None:
    lines = qa_lines(0, 20)
    lines[5] = b"oops"
    metrics = ingest(write(tmp_path / "qa.jsonl", lines), tmp_path / "out", max_reject_rate=0.05)
    assert (metrics["rejected"], metrics["reject_rate"]) == (1, 0.05)


def test_no_accepted_records_fails(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.jsonl", [b"", b" "])
    with pytest.raises(IngestError, match="accepted no records from 1 file"):
        ingest(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"validation": 1.0}, "ingest.validation is 1.0; use a fraction in [0, 1)"),
    ({"test": -0.1}, "ingest.test is -0.1"),
    ({"validation": 0.5, "test": 0.5}, "ingest.validation + ingest.test is 1.0"),
    ({"max_reject_rate": 1.5}, "ingest.max_reject_rate is 1.5"),
    ({"max_chars": 0}, "ingest.max_chars is 0"),
    ({"fmt": "chatml"}, "ingest.format is 'chatml'"),
])
def test_bad_params_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(IngestError) as caught:
        ingest(DATA, tmp_path / "out", **kwargs)
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_input_files(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a/c.jsonl", "notes.txt", ".ipynb_checkpoints/b-checkpoint.jsonl"):
        write(tmp_path / "raw" / name, [b"{}"])
    assert input_files(tmp_path / "raw") == [tmp_path / "raw" / "a" / "c.jsonl", tmp_path / "raw" / "b.jsonl"]
    assert input_files(str(tmp_path / "raw" / "notes.txt")) == [tmp_path / "raw" / "notes.txt"]
    with pytest.raises(IngestError, match="does not exist"):
        input_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match=r"contains no \*\.jsonl files"):
        input_files(tmp_path / "empty")


def test_output_may_not_overlap_inputs(tmp_path: Path) -> None:
    write(tmp_path / "data" / "raw" / "qa.jsonl", qa_lines(0, 3))
    with pytest.raises(IngestError, match="overlaps the inputs"):
        ingest(tmp_path / "data", tmp_path / "data" / "ingested")
    with pytest.raises(IngestError, match="overlaps the inputs"):
        ingest(tmp_path / "data" / "raw", tmp_path / "data")
    assert (tmp_path / "data" / "raw" / "qa.jsonl").is_file()
