"""bench/data_scale.py: its generated data is deterministic and realistic, and the script runs end to end
at a toy size (every stage through its command line, results as JSON and Markdown)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import data_scale


def test_generated_conversations_and_documents_are_deterministic_and_shaped_as_asked():
    words = data_scale.prose_words()
    assert len(words) > 50_000  # Python's own prose, not ours
    first = list(data_scale.conversations(60, 0, words))
    assert first == list(data_scale.conversations(60, 0, words)) and first != list(data_scale.conversations(60, 1, words))
    for record in first:
        roles = [m["role"] for m in record["messages"]]
        assert roles[0] == "system" and 1 <= (len(roles) - 1) // 2 <= 3
        assert roles[1:] == ["user", "assistant"] * ((len(roles) - 1) // 2)
        assert all(50 <= len(m["content"].split()) <= 400 for m in record["messages"] if m["role"] == "assistant")
    assert {(len(r["messages"]) - 1) // 2 for r in first} == {1, 2, 3}
    docs = list(data_scale.documents(20_000, 1, words))
    assert docs == list(data_scale.documents(20_000, 1, words))
    assert sum(len(d["text"].split()) for d in docs) >= 20_000 and all(100 <= len(d["text"].split()) <= 1000 for d in docs)


@pytest.mark.slow
def test_the_benchmark_runs_at_a_toy_size(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench/data_scale.py"), "--sizes", "200", "--dapt-tokens", "20000",
                           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out/latest.json").read_text())
    stages = report["runs"][0]["stages"]
    assert set(stages) == {"ingest", "template", "reference", "pack", "finetune_loading"}
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 50 for s in stages.values())
    assert stages["pack"]["tokens"] >= 15_000 and 100 < stages["finetune_loading"]["rows"] < stages["reference"]["rows"] <= 200
    assert "| target | value | result |" in (tmp_path / "out/latest.md").read_text()
