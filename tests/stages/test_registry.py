"""The merge stage registers the merged model in MLflow's model registry; the export stage's gates decide
whether it becomes the `candidate` (tunekit/registry.py), and the candidate loads back offline (no hub,
no network) with the same logits and greedy generation as the checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from stages import merge
from tests.conftest import REPO
from tunekit.io import read_meta
from tunekit.registry import HASH_TAG, promote_candidate
from tests.stages.test_merge import adapter_and_data  # noqa: F401  (fixture: a tiny LoRA adapter + tokenized data)

# Runs in a fresh process with the hub switched off and every non-loopback connection refused, so a
# hub look-up anywhere in loading would fail loudly instead of passing thanks to a warm cache.
LOAD_BACK = r"""
import socket, sys
_connect = socket.socket.connect
def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
        raise OSError(f"network access attempted: {address!r}")
    return _connect(self, address)
socket.socket.connect = _loopback_only

import mlflow, torch
from mlflow import transformers as mlflow_transformers
mlflow.set_tracking_uri(sys.argv[1])
parts = mlflow_transformers.load_model(f"models:/{sys.argv[2]}@candidate", return_type="components")
model, tokenizer = parts["model"].eval(), parts["tokenizer"]
ids = torch.load(sys.argv[3])
with torch.no_grad():
    logits = model(input_ids=ids).logits
    generated = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
torch.save({"logits": logits, "generated": generated}, sys.argv[4])
pipe = mlflow_transformers.load_model(f"models:/{sys.argv[2]}@candidate")
print("TASK", pipe.task)
"""


def test_merge_registers_a_version_that_export_makes_the_candidate_and_that_loads_back_offline(adapter_and_data, tmp_path, monkeypatch):  # noqa: F811
    adapter, data, _ = adapter_and_data
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["project"]["experiment"] = "registry"
    params["merge"].update(atol=1e-4, registered_model="tiny-merged")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("TUNEKIT_PARENT_RUN_ID", raising=False)

    out = tmp_path / "merged"
    merge.main(["--model", str(adapter), "--data", str(data), "--out", str(out), "--metrics", str(tmp_path / "merge.json")])

    from mlflow import MlflowClient

    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    with pytest.raises(MlflowException):  # not before the export stage's gates passed
        client.get_model_version_by_alias("tiny-merged", "candidate")
    checkpoint_hash = read_meta(out)["hash"]
    assert client.get_model_version("tiny-merged", "1").tags[HASH_TAG] == checkpoint_hash
    assert promote_candidate(client, "tiny-merged", "no-such-hash") is None
    assert promote_candidate(client, "tiny-merged", checkpoint_hash) == "1"
    version = client.get_model_version_by_alias("tiny-merged", "candidate")
    assert str(version.version) == "1" and version.status == "READY" and version.tags["export.gates"] == "passed"
    run = client.get_run(version.run_id)
    assert run.info.run_name == "merge" and run.data.tags["registered_model"] == "tiny-merged/1"
    assert version.tags["dvc.stage"] == "merge"

    ids = torch.tensor([[1, 42, 7, 300, 5, 9]])
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", LOAD_BACK, uri, "tiny-merged", str(tmp_path / "ids.pt"), str(tmp_path / "back.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "TASK text-generation" in done.stdout

    back = torch.load(tmp_path / "back.pt")
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
        generated = merged.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=merged.config.pad_token_id)
    assert torch.allclose(back["logits"], logits, atol=1e-5)
    assert torch.equal(back["generated"], generated)


def test_registration_is_optional_and_named_by_default():
    assert merge.MergeParams(registered_model=None).registered_model is None
    assert merge.MergeParams().registered_model == "tunekit-merged"
