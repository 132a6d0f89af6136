"""The data between stages (tunekit/data.py): `datasets` directories on disk, read memory-mapped, whose bytes
depend only on the rows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import pytest

from stages import template
from tunekit import data as data_module
from tunekit.data import DataFormatError, Rows, lengths_of, read_split, save_dataset, write_rows
from tunekit.params import TemplateParams
from tunekit.train import BatchPlan, TrainConfig

ROWS = [
    {"id": "a", "source": "x.jsonl:1", "messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": None, "tool_calls": [
                                                        {"function": {"name": "f", "arguments": {"n": 1}}}]}],
     "tools": [{"type": "function", "function": {"name": "f"}}]},
    {"id": "b", "source": "x.jsonl:2", "messages": [{"role": "user", "content": "é 😀"},
                                                    {"role": "assistant", "content": "5", "train": False}],
     "label": ["x", "y"], "target": 0.1, "count": 3},
    {"id": "c", "source": "x.jsonl:3", "messages": [], "label": "5", "target": [1.5, 2.25], "input_ids": [1, 2, 3]},
]


def files_of(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_rows_round_trip_exactly_and_load_from_disk_opens_them(tmp_path):
    assert write_rows(tmp_path / "train", iter(ROWS)) == 3
    rows = read_split(tmp_path, "train")
    assert list(rows) == ROWS  # absent keys stay absent, null stays null inside values, "5" stays a string
    assert [rows[i] for i in range(3)] == ROWS and rows[1:] == ROWS[1:] and rows[-1] == ROWS[-1]
    plain = datasets.load_from_disk(str(tmp_path / "train"))  # what a user who wants to look does
    assert plain.num_rows == 3 and plain[0]["id"] == "a" and plain[1]["label"] == ["x", "y"]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    assert not (tmp_path / ".train.work").exists()


def test_the_bytes_depend_only_on_the_rows(tmp_path):
    write_rows(tmp_path / "one" / "deep" / "train", ROWS)
    write_rows(tmp_path / "two" / "train", ROWS)
    assert files_of(tmp_path / "one" / "deep" / "train") == files_of(tmp_path / "two" / "train")
    # A dataset made of several pieces (as Dataset.map with num_proc > 1 returns it) is written as the same bytes.
    table = {"id": [str(i) for i in range(2500)], "input_ids": [[i, i + 1] for i in range(2500)]}
    whole = datasets.Dataset.from_dict(table)
    pieces = datasets.concatenate_datasets([whole.select(range(0, 700)), whole.select(range(700, 1901)),
                                            whole.select(range(1901, 2500))])
    save_dataset(whole, tmp_path / "whole")
    save_dataset(pieces, tmp_path / "pieces")
    assert files_of(tmp_path / "whole") == files_of(tmp_path / "pieces")
    other = datasets.Dataset.from_dict({**table, "id": ["x"] + table["id"][1:]})
    save_dataset(other, tmp_path / "other")
    assert files_of(tmp_path / "other") != files_of(tmp_path / "whole")  # the fingerprint is the content's


def test_readers_are_memory_mapped_and_lengths_come_from_the_column(tmp_path):
    rows = [{"id": str(i), "input_ids": list(range(i % 7 + 1)), "labels": list(range(i % 7 + 1)), "length": i % 7 + 1}
            for i in range(50)]
    write_rows(tmp_path / "train", rows)
    split = read_split(tmp_path, "train")
    assert isinstance(split, Rows) and isinstance(split.dataset, datasets.Dataset)
    assert split.dataset.cache_files and split.dataset.cache_files[0]["filename"].endswith(".arrow")
    assert type(split.dataset.data).__name__ == "MemoryMappedTable"

    class NoRowAccess(Rows):
        def __getitem__(self, index):
            raise AssertionError("a row was read to get the lengths")

        def __iter__(self):
            raise AssertionError("the split was iterated to get the lengths")

    guarded = NoRowAccess(split.dataset)
    assert lengths_of(guarded) == [r["length"] for r in rows]
    cfg = TrainConfig(batch_size=4, epochs=1, lr=1e-3, seed=0)
    plan = BatchPlan(lengths_of(guarded), cfg)  # what train() builds: no row is touched
    assert sorted(i for b in range(plan.per_epoch) for i in plan.task_rows(b)) == list(range(50))


def test_an_old_jsonl_layout_is_named_with_the_fix(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(DataFormatError, match=r"train.jsonl is the JSONL layout of an older tunekit.*dvc repro"):
        read_split(tmp_path, "train")
    with pytest.raises(DataFormatError, match="no state.json"):
        read_split(tmp_path, "test")


def conversations(n: int) -> list[dict]:
    return [{"id": f"r{i:05d}", "source": f"x.jsonl:{i + 1}", "messages": (
        [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []) + [
        {"role": "user", "content": f"question {i} " + "word " * (i % 17)},
        {"role": "assistant", "content": f"answer {i}", **({"train": False} if i % 5 == 0 else {})},
        {"role": "user", "content": "and?"}, {"role": "assistant", "content": f"more {i}"}]}
        for i in range(n)]


def test_template_output_does_not_depend_on_processes_or_directory(tiny_model_dir, tmp_path, monkeypatch):
    ingested = tmp_path / "ingested"
    for split, n in (("train", 240), ("validation", 30), ("test", 30)):
        write_rows(ingested / split, conversations(n))
    one = template.run(TemplateParams(max_length=64, num_proc=1), tiny_model_dir, ingested, tmp_path / "a" / "tok",
                       tmp_path / "a" / "preview")
    monkeypatch.setattr(data_module, "MIN_ROWS_PER_PROCESS", 10)  # so that 2 processes tokenise these few rows
    assert data_module.num_proc(2, 240) == 2
    two = template.run(TemplateParams(max_length=64, num_proc=2), tiny_model_dir, ingested, tmp_path / "tok",
                       tmp_path / "preview")
    assert one == two
    for split in ("train", "validation", "test"):
        assert files_of(tmp_path / "a" / "tok" / split) == files_of(tmp_path / "tok" / split)
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["test", "train", "validation"]  # no cache files
    assert not list(ingested.rglob("cache-*")) and not list(tmp_path.rglob("*.work"))
    rows = datasets.load_from_disk(str(tmp_path / "tok" / "train"))
    assert rows.column_names == ["id", "input_ids", "labels", "length"]
    assert all(len(r["input_ids"]) == len(r["labels"]) == r["length"] for r in rows)


def test_head_tokenisation_goes_through_map_and_does_not_depend_on_processes(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from tunekit.models import embedded_minilm
    from tunekit.params import TaskParams
    from tunekit.tasks.heads import tokenize_task

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_minilm()))
    ingested = tmp_path / "ingested"
    for split, n in (("train", 120), ("validation", 20), ("test", 20)):
        write_rows(ingested / split, [{"id": f"{split}{i}", "source": f"x.jsonl:{i + 1}", "task": "qa",
                                       "context": "The parcel goes to Porto. " * (1 + i % 9) + f"Ask for desk {i}.",
                                       "question": "Where does the parcel go?",
                                       "answers": {"text": ["Porto"] if i % 4 else [],
                                                   "answer_start": [19] if i % 4 else []}} for i in range(n)])
    params = TaskParams(type="qa", doc_stride=16)
    calls: list[int | None] = []
    original = datasets.Dataset.map

    def counted_map(self, *args, **kwargs):
        calls.append(kwargs.get("num_proc"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", counted_map)
    for name, processes in (("one", 1), ("two", 2)):
        (tmp_path / name / "preview").mkdir(parents=True)
        (tmp_path / name / "tok").mkdir()
        if processes == 2:
            monkeypatch.setattr(data_module, "MIN_ROWS_PER_PROCESS", 10)
        calls.clear()
        metrics = tokenize_task("qa", params, 48, tokenizer, ingested, tmp_path / name / "tok",
                                tmp_path / name / "preview", processes=processes)
        assert calls and set(calls) == ({None} if processes == 1 else {2})  # Dataset.map did the tokenising
        assert metrics["train"]["features"] > 120  # long contexts become several windows
    for split in ("train", "validation", "test"):
        assert files_of(tmp_path / "one" / "tok" / split) == files_of(tmp_path / "two" / "tok" / split)
    row = read_split(tmp_path / "one" / "tok", "train")[0]
    assert row["length"] == len(row["input_ids"]) and None in row["offsets"]  # question tokens have no offsets


def test_demo_data_through_ingest_and_template_round_trips_with_the_masks_of_encode_conversation(tiny_model_dir,
                                                                                                 tmp_path):
    """demo -> ingest -> template -> load_from_disk: the rows are exactly what tunekit.chat.encode_conversation
    gives each ingested conversation (the template stage's earlier, per-record path), token for token and label
    for label, and the ingested records are the demo's."""
    from tunekit.chat import encode_conversation, resolve_chat_template
    from tunekit.demo import generate
    from tunekit.ingest import ingest
    from tunekit.io import write_jsonl
    from tunekit.models import load_tokenizer

    raw = tmp_path / "raw"
    raw.mkdir()
    write_jsonl(raw / "orders.jsonl", generate(80, 7))
    ingest(raw, tmp_path / "ingested")
    params = TemplateParams()
    template.run(params, tiny_model_dir, tmp_path / "ingested", tmp_path / "tok", tmp_path / "preview")
    tokenizer = load_tokenizer(tiny_model_dir)
    chat_template = resolve_chat_template(params.chat_template, tokenizer)
    seen = 0
    for split in ("train", "validation", "test"):
        records = {r["id"]: r for r in datasets.load_from_disk(str(tmp_path / "ingested" / split))}
        for row in datasets.load_from_disk(str(tmp_path / "tok" / split)):
            expected = encode_conversation(records[row["id"]]["messages"], tokenizer, chat_template, params.train_on,
                                           params.max_length)
            assert (row["input_ids"], row["labels"], row["length"]) == (
                expected.input_ids, expected.labels, len(expected.input_ids))
            seen += 1
    assert seen == 80
