"""Two CPU processes (torchrun, gloo) train exactly what one process trains with the same global batch.

The finetune stage runs as DVC runs it, once with `processes: 1, batch_size: 8` and once with
`processes: 2, batch_size: 4` (it re-launches itself under torch.distributed.run). Replay, L2 to init,
layer-wise rates, gradient accumulation, validation and the forgetting probe are all on, so sharding,
the global token count and the reductions are all exercised. Rank 0 alone writes and logs.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.stages.test_resume import conversation, stage_env
from tunekit.chat import encode_conversation, resolve_chat_template
from tunekit.data import write_rows

from tests.conftest import REPO
MAX_STEPS = 6


@pytest.fixture(scope="module")
def tokenized(smollm2_tokenizer, tmp_path_factory) -> Path:
    template = resolve_chat_template("model", smollm2_tokenizer)
    rows = []
    for i in range(40):
        enc = encode_conversation(conversation(i), smollm2_tokenizer, template)
        rows.append({"id": f"c{i}", "input_ids": enc.input_ids, "labels": enc.labels})
    data = tmp_path_factory.mktemp("tokenized")
    write_rows(data / "train", rows[:32])
    write_rows(data / "validation", rows[32:])  # 8 rows: shards of 4 on each rank
    return data


def project(root: Path, processes: int, batch_size: int) -> Path:
    root.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["project"]["experiment"] = "ddp-test"
    params["template"]["max_length"] = 64
    params["finetune"].update(
        max_steps=MAX_STEPS, batch_size=batch_size, grad_accum=2, processes=processes, threads=1, eval_every=2,
        checkpoint_every=3, early_stopping_patience=None, lr=1e-2, warmup_ratio=0.2, l2_to_init=0.01,
        layer_lr_decay=0.9, head_lr=2e-2, replay={"ratio": 0.25, "source": "pydoc", "max_length": 48},
        forgetting_every_n_steps=3, probe={"source": "pydoc", "passages": 6, "max_length": 32})
    params["finetune"]["lora"].update(r=4, dropout=0.0)  # dropout masks depend on the batch split
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return root


def start(root: Path, model: Path, data: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "stages.finetune", "--model", str(model), "--data", str(data),
               "--out", str(root / "out"), "--metrics", str(root / "metrics.json"), "--plots", str(root / "plots"),
               "--checkpoints", str(root / "checkpoints")]
    env = stage_env(root)
    env.pop("LOCAL_RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen(command, cwd=root, env=env, stdout=open(root / "run.log", "w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, root: Path) -> str:
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (root / "run.log").read_text()
    assert proc.returncode == 0, f"rc {proc.returncode}:\n{text[-5000:]}"
    return text


def finetune_runs(root: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["ddp-test"], output_format="list")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, tokenized, tmp_path):
    one, two = project(tmp_path / "one", 1, 8), project(tmp_path / "two", 2, 4)
    procs = [(start(one, tiny_model_dir, tokenized), one), (start(two, tiny_model_dir, tokenized), two)]
    logs = [finish(proc, root) for proc, root in procs]
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m stages.finetune" in logs[1]
    assert "rank 0 of 2" in logs[1] and "rank 1 of 2" in logs[1]

    history = {root.name: json.loads((root / "out" / "history.json").read_text()) for root in (one, two)}
    a, b = history["one"], history["two"]
    assert [h["step"] for h in a["train"]] == [h["step"] for h in b["train"]] == list(range(1, MAX_STEPS + 1))
    for key in ("tokens", "replay_tokens"):
        assert [h[key] for h in a["train"]] == [h[key] for h in b["train"]], key
    for key in ("train_loss", "l2_penalty", "lr"):
        assert [h[key] for h in b["train"]] == pytest.approx([h[key] for h in a["train"]], rel=1e-4, abs=1e-9), key
    assert a["train"][-1]["l2_penalty"] > 0 and all(h["replay_tokens"] > 0 for h in a["train"])
    assert [e["step"] for e in a["validation"]] == [e["step"] for e in b["validation"]] == [2, 4, 6]
    assert [e["val_loss"] for e in b["validation"]] == pytest.approx([e["val_loss"] for e in a["validation"]], rel=1e-4)
    assert [p["step"] for p in a["probe"]] == [p["step"] for p in b["probe"]] == [0, 3, 6]
    assert [p["probe_loss"] for p in b["probe"]] == pytest.approx([p["probe_loss"] for p in a["probe"]], rel=1e-4)

    expected, actual = load_file(one / "out" / "adapter_model.safetensors"), load_file(two / "out" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys() and any(t.abs().max() > 0 for n, t in expected.items() if "lora_B" in n)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)

    # Rank 0 alone wrote: the same files as the single process, one metrics file, one MLflow run, and the
    # checkpoints (written at step 3) removed by the one writer at the end.
    assert sorted(p.name for p in (two / "out").iterdir()) == sorted(p.name for p in (one / "out").iterdir())
    assert sorted(p.name for p in (two / "plots").iterdir()) == sorted(p.name for p in (one / "plots").iterdir())
    assert {"forgetting_curve.csv", "forgetting_curve.png", "loss.png"} <= {p.name for p in (two / "plots").iterdir()}
    assert not list((two / "checkpoints").glob("*/step-*"))
    assert not [p for p in two.iterdir() if p.name.startswith(".out")]
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == MAX_STEPS
    runs = finetune_runs(two)
    assert len(runs) == 1
    probe_series = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "probe_loss")
    assert [m.step for m in probe_series] == [0, 3, 6]
