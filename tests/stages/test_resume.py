"""The finetune and dapt stages survive `kill -9`: a resumed run ends with the same weights as an uninterrupted one.

The stage runs as a real subprocess (as DVC runs it), is SIGKILLed once it has written its first
resumable checkpoint, and is then started again. Dropout is on, so the resumed run only matches if
model, optimizer, scheduler, RNG and data position are all restored.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunekit.chat import encode_conversation, resolve_chat_template
from tunekit.data import write_rows

from tests.conftest import REPO

MAX_STEPS = 40
CHECKPOINT_EVERY = 3
ADAPTER = "adapter_model.safetensors"

TOPICS = ["invoice", "parcel", "refund", "subscription", "warranty", "booking", "voucher", "account"]
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def conversation(i: int) -> list[dict]:
    """A varied multi-turn conversation of roughly 150-300 tokens."""
    topic = TOPICS[i % len(TOPICS)]
    filler = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(20 + (i * 13) % 40))
    messages = [
        {"role": "user", "content": f"Ticket {i}: my {topic} number {1000 + 37 * i} has a problem. Details: {filler}."},
        {"role": "assistant", "content": json.dumps({"ticket": i, "topic": topic, "words": filler.split()[: 5 + i % 9]})},
    ]
    if i % 3 == 0:
        messages += [
            {"role": "user", "content": f"Can you also check order {i * 11} placed on day {i % 28 + 1}?"},
            {"role": "assistant", "content": f"Order {i * 11} for {topic} is " + ("shipped. " if i % 2 else "pending. ") * (1 + i % 4)},
        ]
    return messages


@pytest.fixture(scope="module")
def tokenized(smollm2_tokenizer, tmp_path_factory) -> Path:
    template = resolve_chat_template("model", smollm2_tokenizer)
    rows = []
    for i in range(60):
        enc = encode_conversation(conversation(i), smollm2_tokenizer, template)
        assert any(label != -100 for label in enc.labels)
        rows.append({"id": f"c{i}", "input_ids": enc.input_ids, "labels": enc.labels})
    lengths = sorted(len(row["input_ids"]) for row in rows)
    assert 120 <= lengths[0] and lengths[-1] <= 400, lengths  # long enough that a step is not instant
    data = tmp_path_factory.mktemp("tokenized")
    write_rows(data / "train", rows[:50])
    write_rows(data / "validation", rows[50:])
    return data


def make_project(root: Path) -> Path:
    root.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["project"]["experiment"] = "resume-test"
    params["finetune"].update(max_steps=MAX_STEPS, checkpoint_every=CHECKPOINT_EVERY, eval_every=5, batch_size=4,
                              early_stopping_patience=None, threads=1)
    params["finetune"]["lora"].update(r=4, dropout=0.1)
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return root


def stage_command(root: Path, model: Path, data: Path | None) -> list[str]:
    """The finetune stage on `data`, or (data None) the dapt stage on the blocks the pack stage wrote to root/packed."""
    stage = ["stages.finetune", "--data", str(data)] if data is not None else ["stages.dapt", "--data", str(root / "packed")]
    return [sys.executable, "-m", stage[0], "--model", str(model), *stage[1:],
            "--out", str(root / "out"), "--metrics", str(root / "metrics.json"), "--plots", str(root / "plots"),
            "--checkpoints", str(root / "checkpoints")]


def stage_env(root: Path) -> dict[str, str]:
    """Environment of one project's stage runs. Each project gets its own MLflow store so that two projects
    can run at once without racing to create the same database."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
               HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("TUNEKIT_PARENT_RUN_ID", None)
    env.pop("TUNEKIT_EXPERIMENT", None)
    return env


def step_dirs(checkpoints: Path) -> list[Path]:
    return sorted(checkpoints.glob("*/step-*"))


class Stages:
    """Stage subprocesses, each logging to a file; whatever is still running at exit is killed."""

    def __init__(self, model: Path, data: Path | None):
        self.model, self.data, self.procs = model, data, []

    def start(self, root: Path, log_name: str) -> tuple[subprocess.Popen, Path]:
        log = root / log_name
        with open(log, "w") as handle:
            proc = subprocess.Popen(stage_command(root, self.model, self.data), cwd=root, env=stage_env(root),
                                    stdout=handle, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, log

    def finish(self, proc: subprocess.Popen, log: Path) -> str:
        proc.wait(timeout=300)
        text = log.read_text()
        assert proc.returncode == 0, f"{log} (rc {proc.returncode}):\n{text[-4000:]}"
        return text

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def kill_and_resume(stages: Stages, killed: Path, reference: Path) -> tuple[int, str]:
    """Run `reference` uninterrupted beside `killed`, which is SIGKILLed at its first checkpoint and run
    again. Checks that nothing half-written looks finished; returns (step killed at, the resumed log)."""
    ref_proc, ref_log = stages.start(reference, "run.log")
    proc, first_log = stages.start(killed, "first-attempt.log")
    deadline = time.monotonic() + 240
    while not step_dirs(killed / "checkpoints"):
        if proc.poll() is not None:
            pytest.fail(f"the stage exited (rc {proc.returncode}) before it wrote a checkpoint, so the kill "
                        f"never happened:\n{first_log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail("no checkpoint appeared within 240 s")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the stage was not killed (rc {proc.returncode})"
    if (killed / "out").exists() or (killed / "metrics.json").exists():
        pytest.fail("race: the kill landed after training had finished; make the run longer (max_steps) so "
                    "the kill falls mid-training")
    # Nothing half-written looks finished: no output directory, and every checkpoint named step-* is complete.
    assert not [p for p in killed.iterdir() if p.name.startswith("out") or p.name.startswith(".out")]
    # (Two step-* directories can exist for an instant: the new one is renamed in before the old is removed.)
    checkpoints = step_dirs(killed / "checkpoints")
    assert 1 <= len(checkpoints) <= 2 and len({p.parent for p in checkpoints}) == 1, checkpoints
    for checkpoint in checkpoints:
        assert {p.name for p in checkpoint.iterdir()} >= {"trainable.safetensors", "optimizer.pt", "state.json"}
    for entry in checkpoints[0].parent.iterdir():  # temporary directories start with '.'
        assert entry.name.startswith((".", "step-")), entry
    killed_at = json.loads((checkpoints[-1] / "state.json").read_text())["state"]["step"]
    assert 0 < killed_at < MAX_STEPS and killed_at % CHECKPOINT_EVERY == 0
    resumed_log = stages.finish(*stages.start(killed, "second-attempt.log"))
    stages.finish(ref_proc, ref_log)
    match = re.search(r"resuming from \S+ \(step (\d+) of (\d+)\)", resumed_log)
    assert match, f"the rerun did not resume from the checkpoint:\n{resumed_log[-4000:]}"
    assert killed_at <= int(match.group(1)) < MAX_STEPS and int(match.group(2)) == MAX_STEPS
    assert not step_dirs(killed / "checkpoints")  # a finished run removes its checkpoints
    return killed_at, resumed_log


def same_weights_and_steps(killed: Path, reference: Path, weights: str) -> tuple[dict, dict, dict]:
    """Assert the resumed run's `weights` file equals the reference run's tensor by tensor, and that both
    ran every step on the same tokens; return (reference tensors, reference metrics, resumed metrics)."""
    expected = load_file(reference / "out" / weights)
    actual = load_file(killed / "out" / weights)
    assert expected.keys() == actual.keys() and expected
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    res_metrics = json.loads((killed / "metrics.json").read_text())
    assert res_metrics["steps"] == ref_metrics["steps"] == MAX_STEPS
    assert res_metrics["trained_tokens"] == ref_metrics["trained_tokens"]
    return expected, ref_metrics, res_metrics


@pytest.mark.slow
def test_dapt_kill_9_and_resume_gives_the_same_merged_weights(tiny_model_dir, tmp_path):
    from tunekit.demo import generate_domain

    corpus = tmp_path / "domain.txt"
    corpus.write_text("\n\n".join(generate_domain(120, 7)) + "\n", encoding="utf-8")
    projects = []
    for name in ("killed", "reference"):
        root = make_project(tmp_path / name)
        params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
        params["dapt"].update(enabled=True, inputs=str(corpus), method="lora", block_size=96, batch_size=4, lr=1e-2,
                              max_steps=MAX_STEPS, checkpoint_every=CHECKPOINT_EVERY, eval_every=5,
                              early_stopping_patience=None, threads=1)
        params["dapt"]["lora"].update(r=4, dropout=0.1)
        (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        subprocess.run([sys.executable, "-m", "stages.pack", "--model", str(tiny_model_dir), "--out", str(root / "packed"),
                        "--metrics", str(root / "pack.json")], cwd=root, env=stage_env(root), check=True,
                       capture_output=True)
        projects.append(root)
    killed, reference = projects
    with Stages(tiny_model_dir, None) as stages:
        kill_and_resume(stages, killed, reference)

    # dapt merges its LoRA: the output is plain full weights, compared tensor by tensor.
    expected, ref_metrics, res_metrics = same_weights_and_steps(killed, reference, "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert any((expected[name] - base[name]).abs().max() > 0 for name in base)  # training moved the weights
    assert res_metrics["perplexity_after"] == pytest.approx(ref_metrics["perplexity_after"], rel=1e-5)
    assert res_metrics["perplexity_after"] < res_metrics["perplexity_before"]


@pytest.mark.slow
def test_kill_9_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_model_dir, tokenized, tmp_path):
    killed, reference = make_project(tmp_path / "killed"), make_project(tmp_path / "reference")
    with Stages(tiny_model_dir, tokenized) as stages:
        kill_and_resume(stages, killed, reference)

    expected, ref_metrics, res_metrics = same_weights_and_steps(killed, reference, ADAPTER)
    # Training moved the weights (LoRA B starts at zero), so the equality checked is not equality of two inits.
    assert any(t.abs().max() > 0 for name, t in expected.items() if "lora_B" in name)
    assert res_metrics["best_step"] == ref_metrics["best_step"]
    assert res_metrics["best_val_loss"] == pytest.approx(ref_metrics["best_val_loss"], rel=1e-5)
    assert res_metrics["final_train_loss"] == pytest.approx(ref_metrics["final_train_loss"], rel=1e-5)
    ref_history = json.loads((reference / "out" / "history.json").read_text())
    res_history = json.loads((killed / "out" / "history.json").read_text())
    assert [h["step"] for h in res_history["train"]] == list(range(1, MAX_STEPS + 1))
    assert [h["tokens"] for h in res_history["train"]] == [h["tokens"] for h in ref_history["train"]]
    assert [h["train_loss"] for h in res_history["train"]] == pytest.approx(
        [h["train_loss"] for h in ref_history["train"]], rel=1e-5)
    assert [e["step"] for e in res_history["validation"]] == [e["step"] for e in ref_history["validation"]]
