"""Typed, validated views of `params.yaml`, one model per stage section.

Every stage validates its section before doing any work, and every bad key is reported at once
with the key, the value given, and what would be valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectParams(Section):
    experiment: str = "tunekit"
    seed: int = 1234


class DemoParams(Section):
    records: int = Field(400, ge=10)
    seed: int = 7


class BaseModelParams(Section):
    model: str = "embedded"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class IngestParams(Section):
    inputs: str = "data/demo"
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt"] = "auto"
    max_chars: int = Field(16000, gt=0)
    max_reject_rate: float = Field(0.05, ge=0, le=1)
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> "IngestParams":
        if self.validation + self.test >= 1:
            raise ValueError(
                f"validation ({self.validation}) + test ({self.test}) must be < 1 so that some data is left to train on"
            )
        return self


class TemplateParams(Section):
    chat_template: str = "model"
    train_on: Literal["all", "last"] = "all"
    max_length: int = Field(512, gt=8)
    packing: bool = False
    preview_examples: int = Field(8, ge=0)


class LoraParams(Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class FinetuneParams(Section):
    method: Literal["lora"] = "lora"
    lora: LoraParams = LoraParams()
    epochs: float = Field(2, gt=0)
    max_steps: int | None = Field(None, gt=0)
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int = Field(20, gt=0)
    early_stopping_patience: int | None = Field(3, gt=0)
    checkpoint_every: int = Field(20, gt=0)
    threads: int = Field(0, ge=0)


class EvaluateParams(Section):
    max_new_tokens: int = Field(96, gt=0)
    batch_size: int = Field(16, gt=0)
    max_examples: int | None = Field(None, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)


class MergeParams(Section):
    atol: float = Field(1e-3, gt=0)
    check_examples: int = Field(8, gt=0)


SECTIONS: dict[str, type[Section]] = {
    "project": ProjectParams,
    "demo": DemoParams,
    "base": BaseModelParams,
    "ingest": IngestParams,
    "template": TemplateParams,
    "finetune": FinetuneParams,
    "evaluate": EvaluateParams,
    "merge": MergeParams,
}

S = TypeVar("S", bound=Section)


class ParamsError(Exception):
    """Bad params.yaml content; the message lists every problem found."""


def read_params_file(path: Path = PARAMS_FILE) -> dict[str, Any]:
    if not path.exists():
        raise ParamsError(f"{path} not found: run stages from the project root (where dvc.yaml is)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(data).__name__}")
    return data


def _describe(error: dict[str, Any], section: str, path: Path) -> str:
    key = ".".join(str(part) for part in (section, *error["loc"]))
    if error["type"] == "extra_forbidden":
        return f"{path}: {key}: unknown key (value {error['input']!r}); check the spelling against the documented keys"
    value = "missing" if error["type"] == "missing" else f"value {error['input']!r}"
    return f"{path}: {key}: {value}: {error['msg']}"


def validate_section(section: str, raw: dict[str, Any] | None, model: type[S], path: Path = PARAMS_FILE) -> S:
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        problems = "\n".join("  - " + _describe(err, section, path) for err in exc.errors())
        raise ParamsError(f"{len(exc.errors())} problem(s) in params section '{section}':\n{problems}") from None


def load_section(section: str, path: Path = PARAMS_FILE) -> Section:
    data = read_params_file(path)
    return validate_section(section, data.get(section), SECTIONS[section], path)


def load_all(path: Path = PARAMS_FILE) -> dict[str, Section]:
    """Validate every section at once (used by the flow before anything runs)."""
    data = read_params_file(path)
    unknown = sorted(set(data) - set(SECTIONS))
    problems: list[str] = [f"  - {path}: {name}: unknown section; valid: {', '.join(SECTIONS)}" for name in unknown]
    sections: dict[str, Section] = {}
    for name, model in SECTIONS.items():
        try:
            sections[name] = validate_section(name, data.get(name), model, path)
        except ParamsError as exc:
            problems.extend(line for line in str(exc).splitlines()[1:])
    if problems:
        raise ParamsError(f"{len(problems)} problem(s) in {path}:\n" + "\n".join(problems))
    return sections


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """`{"lora": {"r": 16}}` under prefix "finetune" -> `{"finetune.lora.r": 16}` (MLflow params, metrics)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return flat
    return {prefix: value}
