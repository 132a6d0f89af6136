"""The template stage: metrics, truncation reporting and packing on real ingested records."""


import pytest

from stages import template
from tunekit.chat import IGNORE_INDEX
from tunekit.data import read_split, write_rows
from tunekit.io import read_jsonl
from tunekit.params import TemplateParams


def records(n: int, long_every: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        user = "tell me " + ("a very long story " * 40 if long_every and i % long_every == 0 else f"fact {i}")
        out.append({"id": f"r{i}", "source": f"x.jsonl:{i + 1}", "messages": [
            {"role": "user", "content": user}, {"role": "assistant", "content": f"answer number {i}"}]})
    return out


@pytest.fixture()
def ingested(tmp_path):
    data = tmp_path / "ingested"
    data.mkdir()
    write_rows(data / "train", records(12, long_every=4))
    write_rows(data / "validation", records(3))
    write_rows(data / "test", records(3))
    return data


def test_over_long_conversations_are_counted_listed_and_never_trained_silently(tiny_model_dir, ingested, tmp_path):
    params = TemplateParams(max_length=96)
    metrics = template.run(params, tiny_model_dir, ingested, tmp_path / "tok", tmp_path / "preview")

    # Records 0, 4, 8 have a prompt longer than 96 tokens: nothing of their answer survives.
    assert metrics["train"]["truncated"] == 3 and metrics["train"]["dropped_no_trained_tokens"] == 3
    assert metrics["train"]["examples"] == 9
    dropped = list(read_jsonl(tmp_path / "preview/dropped.jsonl"))
    assert [d["id"] for d in dropped] == ["r0", "r4", "r8"]
    assert all("max_length" in d["reason"] and d["source"] for d in dropped)
    rows = list(read_split(tmp_path / "tok", "train"))
    assert len(rows) == 9 and all(any(label != IGNORE_INDEX for label in row["labels"]) for row in rows)
    assert metrics["eot_trained_fraction"] == 1.0
    assert 0 < metrics["trained_fraction"] < 0.5
    html = (tmp_path / "preview/mask_preview.html").read_text()
    assert html.count('class="example"') == 8  # template.preview_examples
    assert 'class="tok trained special"' in html  # <|im_end|> is trained and shown as special


def test_packing_fills_rows_and_keeps_every_trained_token(tiny_model_dir, ingested, tmp_path):
    unpacked = template.run(TemplateParams(max_length=512), tiny_model_dir, ingested, tmp_path / "a", tmp_path / "pa")
    packed = template.run(TemplateParams(max_length=512, packing=True), tiny_model_dir, ingested, tmp_path / "b", tmp_path / "pb")

    rows = list(read_split(tmp_path / "b", "train"))
    assert packed["train"]["packed_rows"] == len(rows) < unpacked["train"]["examples"]
    assert 0 < packed["train"]["packing_efficiency"] <= 1
    for row in rows:
        assert len(row["input_ids"]) <= 512 and sum(row["seq_lens"]) == len(row["input_ids"])
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == len(row["seq_lens"])
    trained_unpacked = sum(sum(x != IGNORE_INDEX for x in r["labels"]) for r in read_split(tmp_path / "a", "train"))
    trained_packed = sum(sum(x != IGNORE_INDEX for x in r["labels"]) for r in rows)
    assert trained_packed == trained_unpacked  # the first token of a conversation is never trained anyway
    # Held-out splits are never packed: evaluation scores one conversation at a time.
    assert "position_ids" not in read_split(tmp_path / "b", "test")[0]
