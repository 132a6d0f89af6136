"""params.yaml validation: every problem reported at once, with key, value and what is valid."""

import pytest
import yaml

from tests.conftest import REPO
from tunekit.params import FinetuneParams, ParamsError, load_all, validate_section


def test_the_shipped_params_file_is_valid():
    sections = load_all(REPO / "params.yaml")
    assert sections["finetune"].method == "lora"


def test_every_bad_key_is_reported_together(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["finetune"]["lr"] = "fast"
    params["finetune"]["batch_sise"] = 8
    params["template"]["train_on"] = "first"
    params["ingest"]["validation"] = 0.6
    params["ingest"]["test"] = 0.5
    params["extra_section"] = {}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as info:
        load_all(path)
    message = str(info.value)
    assert "finetune.lr: value 'fast'" in message
    assert "finetune.batch_sise: unknown key" in message
    assert "template.train_on: value 'first'" in message and "'all' or 'last'" in message
    assert "validation (0.6) + test (0.5) must be < 1" in message
    assert "extra_section: unknown section" in message


def test_nested_keys_are_named_in_full():
    with pytest.raises(ParamsError, match=r"finetune\.lora\.r: value 0: Input should be greater than 0"):
        validate_section("finetune", {"lora": {"r": 0}}, FinetuneParams)


@pytest.mark.parametrize("section, raw, hint", [
    ("finetune", {"learning_rate": 1e-3}, "finetune.learning_rate: unknown key (value 0.001); did you mean finetune.lr?"),
    ("finetune", {"epohcs": 2}, "finetune.epohcs: unknown key (value 2); did you mean finetune.epochs?"),
    ("finetune", {"gradient_accumulation_steps": 4}, "did you mean finetune.grad_accum?"),
    ("finetune", {"lora": {"rank": 8}}, "finetune.lora.rank: unknown key (value 8); did you mean finetune.lora.r?"),
    ("task", {"type": "multi_task", "tasks": {"intent": {"type": "classification", "inputs": "x.jsonl", "wieght": 2}}},
     "task.tasks.intent.wieght: unknown key (value 2); did you mean task.tasks.intent.weight?"),
])
def test_a_misspelt_key_gets_the_closest_valid_one(section, raw, hint):
    from tunekit.params import SECTIONS

    with pytest.raises(ParamsError) as info:
        validate_section(section, raw, SECTIONS[section])
    assert hint in str(info.value)


def test_a_key_like_no_valid_one_lists_the_valid_keys(tmp_path):
    with pytest.raises(ParamsError, match=r"finetune.lora.zzz: unknown key \(value 1\); valid keys of finetune.lora: "
                                          r"alpha, dropout, r, target_modules"):
        validate_section("finetune", {"lora": {"zzz": 1}}, FinetuneParams)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "params.yaml").read_text()), "finetun": {"lr": 1}}))
    with pytest.raises(ParamsError, match="finetun: unknown section; did you mean finetune?"):
        load_all(path)


def test_checkpoint_every_is_a_positive_step_count_or_auto():
    assert FinetuneParams().checkpoint_every == "auto"
    assert validate_section("finetune", {"checkpoint_every": 7}, FinetuneParams).checkpoint_every == 7
    for bad in (0, "often", True):
        with pytest.raises(ParamsError, match="finetune.checkpoint_every: .*use a positive number of optimizer steps, or auto"):
            validate_section("finetune", {"checkpoint_every": bad}, FinetuneParams)
