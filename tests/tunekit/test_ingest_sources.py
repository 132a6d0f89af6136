"""ingest's other inputs: Parquet, CSV, `datasets` save_to_disk directories and hub: data sets, validated row by
row like JSONL lines (rejects name the row), and its bounded memory."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunekit import ingest as ingest_module
from tunekit.data import read_split
from tunekit.ingest import IngestError, ingest

GOOD = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"},
                      {"role": "assistant", "content": f"a{i}", **({"train": False} if i == 1 else {})},
                      {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]} for i in range(6)]
BAD = {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}  # unknown_role


def rows_of(out: Path) -> list[dict]:
    return [row for split in ("train", "validation", "test") for row in read_split(out, split)]


def rejects_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


def as_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def reference(tmp_path: Path, records: list[dict]) -> list[dict]:
    out = tmp_path / "ref-out"
    ingest(as_jsonl(tmp_path / "ref.jsonl", records), out, max_reject_rate=0.5)
    return [{k: v for k, v in row.items() if k != "source"} for row in rows_of(out)]


def test_parquet_rows_are_read_like_jsonl_lines_and_a_bad_row_is_named(tmp_path):
    records = GOOD[:2] + [BAD] + GOOD[2:]
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)  # several row groups: read in batches
    out = tmp_path / "out"
    metrics = ingest(path, out, max_reject_rate=0.5)
    assert (metrics["accepted"], metrics["rejected"]) == (6, 1)
    (reject,) = rejects_of(out)
    assert (reject["file"], reject["line"], reject["reason"]) == (str(path), 3, "unknown_role")
    rows = rows_of(out)
    # The same records as from JSONL (Parquet's null `train` of the other messages is absent, not false).
    assert [{k: v for k, v in row.items() if k != "source"} for row in rows] == reference(tmp_path, records)
    assert sorted(row["source"] for row in rows) == sorted(f"{path}:{n}" for n in (1, 2, 4, 5, 6, 7))


def test_csv_rows_with_json_cells_and_bad_rows_named_by_row_number(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('\ufeffprompt,completion\n"Say hi, please",hi\nq2,\nq3,"a3\nwith a line break"\nq4,a4,extra\n',
                    encoding="utf-8")
    out = tmp_path / "out"
    metrics = ingest(path, out, max_reject_rate=0.6)
    assert (metrics["accepted"], metrics["rejected"]) == (2, 2)
    assert [(r["line"], r["reason"]) for r in rejects_of(out)] == [(2, "empty_content"), (4, "wrong_format")]
    messages = sorted((row["messages"] for row in rows_of(out)), key=lambda m: m[0]["content"])
    assert messages == [[{"role": "user", "content": "Say hi, please"}, {"role": "assistant", "content": "hi"}],
                        [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3\nwith a line break"}]]

    chats = tmp_path / "chats.csv"
    chats.write_text("messages\n" + "\n".join('"' + json.dumps(r["messages"]).replace('"', '""') + '"'
                                              for r in GOOD[:3]) + '\n"[{""role"": ""user""}, oops"\n', encoding="utf-8")
    metrics = ingest(chats, tmp_path / "out2", max_reject_rate=0.3)
    assert (metrics["accepted"], metrics["rejected"]) == (3, 1)
    (reject,) = rejects_of(tmp_path / "out2")
    assert (reject["line"], reject["reason"]) == (4, "invalid_json") and "column messages" in reject["detail"]


def test_save_to_disk_datasets_and_dataset_dicts_are_inputs(tmp_path):
    single = tmp_path / "single"
    datasets.Dataset.from_list(GOOD[:3] + [BAD]).save_to_disk(str(single))
    out = tmp_path / "out"
    ingest(single, out, max_reject_rate=0.3)
    assert len(rows_of(out)) == 3 and [(r["file"], r["line"]) for r in rejects_of(out)] == [(str(single), 4)]
    assert [{k: v for k, v in row.items() if k != "source"} for row in rows_of(out)] == reference(tmp_path, GOOD[:3])

    pair = tmp_path / "pair"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(GOOD[3:]),
                          "test": datasets.Dataset.from_list([GOOD[0], BAD])}).save_to_disk(str(pair))
    metrics = ingest(pair, tmp_path / "out2", max_reject_rate=0.3)
    assert (metrics["accepted"], metrics["rejected"]) == (4, 1)
    assert [(r["file"], r["line"]) for r in rejects_of(tmp_path / "out2")] == [(f"{pair}/test", 2)]


def test_a_directory_mixes_jsonl_parquet_and_csv(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    as_jsonl(inputs / "a.jsonl", GOOD[:2])
    pq.write_table(pa.Table.from_pylist(GOOD[2:4]), inputs / "b.parquet")
    (inputs / "c.csv").write_text("prompt,completion\nx,y\n", encoding="utf-8")
    metrics = ingest(inputs, tmp_path / "out")
    assert (metrics["files"], metrics["accepted"]) == (3, 5)


def test_hub_inputs_offline_fail_with_the_way_to_pass_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)  # the stages set it (tunekit.data.configure)
    with pytest.raises(IngestError, match=r"(?s)hub:owner/chats.*no network \(HF_HUB_OFFLINE is set\).*save_to_disk"
                                          r"\(\"data/raw/chats\"\).*ingest.inputs: data/raw/chats") as caught:
        ingest("hub:owner/chats", tmp_path / "out")
    assert "\n" in str(caught.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(ingest_module, "_online", lambda *a, **k: False)
    with pytest.raises(IngestError, match="huggingface.co cannot be reached"):
        ingest("hub:owner/chats", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def peak_python_memory(tmp_path: Path, n: int) -> int:
    records = (json.dumps({"prompt": f"question {i} " + "x" * 200, "completion": f"answer {i} " + "y" * 200}) + "\n"
               for i in range(n))
    path = tmp_path / f"{n}.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(records)
    tracemalloc.start()
    try:
        ingest(path, tmp_path / f"out{n}")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ingest_memory_does_not_grow_with_the_corpus(tmp_path):
    """8x the records: the peak of Python allocations grows only by the dedup digests (~100 bytes a record),
    not by the records (~450 bytes of text each, several KB as Python objects)."""
    small, large = peak_python_memory(tmp_path, 1500), peak_python_memory(tmp_path, 12000)
    assert large - small < 10500 * 300, (small, large)
    assert len(read_split(tmp_path / "out12000", "train")) > 9000
