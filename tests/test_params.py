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
