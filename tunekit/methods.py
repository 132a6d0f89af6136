"""Fine-tuning methods: one registry entry each, selected by `finetune.method`.

An entry says how the base is loaded for training, how it becomes the model to train (what is
trainable), whether the loss needs the model's own forward, what checkpoint the result is, and
whether that merges back into standalone weights. Stages never branch on a method's name: they ask
its entry.

    full, freeze, head           full checkpoint (save_pretrained); "merging" writes it through
    lora, dora, ia3, qlora, peft PEFT adapter; merged with merge_and_unload into full-precision weights
    prompt_tuning, prefix_tuning, p_tuning
                                 PEFT virtual tokens; inputs, not weights: not mergeable
    adapter                      our bottleneck adapters (below); the non-linearity is not mergeable
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tunekit.checkpoints import CheckpointMeta
from tunekit.modeling import (HEAD_NAMES, head_module_names, is_task_model, lora_targets, peft_task_type, train_head_only,
                              transformer_layers)
from tunekit.models import compute_device, load_causal_lm, resolve_checkpoint
from tunekit.params import FinetuneParams

log = logging.getLogger("tunekit")

Module = torch.nn.Module
BaseLoader = Callable[[], Module]


class MethodError(ValueError):
    """A method cannot be applied to this model or these params; the message says why and what to do."""


# ---------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """What a method's output is on disk and how it is used again by evaluate and merge."""
    saves_adapter: bool  # an adapter on top of the base, not full weights
    save: Callable[[Module, Path], None]
    load: Callable[[Path, BaseLoader], Module]  # (tuned dir, base loader) -> the tuned model
    # The base beside the tuned model, for scoring it with the same harness.
    as_base: Callable[[Module, BaseLoader], AbstractContextManager[Module]]
    merge: Callable[[Module], Module] | None  # tuned model on a full-precision base -> standalone model


def _save_pretrained(model: Module, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)


def _load_peft(tuned_dir: Path, load_base: BaseLoader) -> Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(), str(tuned_dir))


@contextlib.contextmanager
def _peft_disabled(model: Module, load_base: BaseLoader) -> Iterator[Module]:
    with model.disable_adapter():
        yield model


def _load_full(tuned_dir: Path, load_base: BaseLoader) -> Module:
    return load_causal_lm(tuned_dir)


@contextlib.contextmanager
def _base_loaded_separately(model: Module, load_base: BaseLoader) -> Iterator[Module]:
    yield load_base()  # full weights were trained: the base exists only on disk


def _already_standalone(model: Module) -> Module:
    log.info("nothing to merge: the method trained the weights themselves; the checkpoint is written through")
    return model


PEFT_ADAPTER = Checkpoint(True, _save_pretrained, _load_peft, _peft_disabled, lambda model: model.merge_and_unload())
FULL_WEIGHTS = Checkpoint(False, _save_pretrained, _load_full, _base_loaded_separately, _already_standalone)


# ---------------------------------------------------------------- bottleneck adapters

BOTTLENECK_WEIGHTS = "bottleneck_adapters.safetensors"
BOTTLENECK_CONFIG = "bottleneck_config.json"
BOTTLENECK_SITES = ("self_attn", "mlp")  # after the attention block and after the MLP of each decoder layer


class Bottleneck(torch.nn.Module):
    """x + up(gelu(down(x))), the adapter of Houlsby et al. (2019). `up` starts at zero, so training
    starts from exactly the base model; the GELU between the projections is why it cannot be folded
    into the base weights."""

    def __init__(self, hidden_size: int, size: int):
        super().__init__()
        self.down = torch.nn.Linear(hidden_size, size)
        self.up = torch.nn.Linear(size, hidden_size)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x))) if self.enabled else x


def _through_bottleneck(block: Module, args: Any, output: Any) -> Any:
    # Attention blocks return (hidden, attention weights); MLPs return the hidden states.
    if isinstance(output, tuple):
        return (block.bottleneck(output[0]), *output[1:])
    return block.bottleneck(output)


def decoder_layers(model: Module) -> torch.nn.ModuleList:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Task models (heads on an encoder or decoder): BERT's encoder.layer or Llama's layers.
    layers = transformer_layers(model) if is_task_model(model) else getattr(inner.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise MethodError(f"{type(inner).__name__}: cannot find its transformer layers (expected decoder.layers); "
                          "freeze and adapter support Llama-style decoders only")
    return layers


def attach_bottlenecks(model: Module, size: int) -> Module:
    """Add a zero-initialised bottleneck adapter after every attention block and MLP (forward hooks, so
    the base's own modules and parameter names stay as they are)."""
    reference = model.get_input_embeddings().weight
    for index, layer in enumerate(decoder_layers(model)):
        for site in BOTTLENECK_SITES:
            block = getattr(layer, site, None)
            if block is None:
                raise MethodError(f"decoder layer {index} has no `{site}` module to put an adapter after")
            block.add_module("bottleneck", Bottleneck(model.config.hidden_size, size).to(reference.device, reference.dtype))
            block.register_forward_hook(_through_bottleneck)
    return model


def _bottleneck_weights(model: Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if ".bottleneck." in name}


def save_bottlenecks(model: Module, out: Path) -> None:
    """Only the adapters' weights (safetensors) and what is needed to rebuild them (json)."""
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    save_file(_bottleneck_weights(model), out / BOTTLENECK_WEIGHTS)
    config = {"type": "bottleneck", "bottleneck": blocks[0].down.out_features, "hidden_size": model.config.hidden_size,
              "layers": len(decoder_layers(model)), "sites": list(BOTTLENECK_SITES), "activation": "gelu",
              "base_model": str(model.name_or_path)}
    (out / BOTTLENECK_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_bottlenecks(tuned_dir: Path, load_base: BaseLoader) -> Module:
    """The base with the saved bottleneck adapters attached: `load_bottlenecks(dir, lambda: base)`."""
    config = json.loads((Path(tuned_dir) / BOTTLENECK_CONFIG).read_text(encoding="utf-8"))
    model = load_base()
    shape = {"hidden_size": model.config.hidden_size, "layers": len(decoder_layers(model)), "sites": list(BOTTLENECK_SITES)}
    if any(config[key] != value for key, value in shape.items()):
        raise MethodError(f"{tuned_dir}: adapters built for {({k: config[k] for k in shape})}, base has {shape}: "
                          "they belong to another base model (check meta.json lineage)")
    attach_bottlenecks(model, config["bottleneck"])
    saved = load_file(Path(tuned_dir) / BOTTLENECK_WEIGHTS)
    params = _bottleneck_weights(model)
    if saved.keys() != params.keys():
        raise MethodError(f"{tuned_dir}/{BOTTLENECK_WEIGHTS}: adapter weights do not match the model "
                          f"(missing {sorted(params.keys() - saved.keys())[:3]}, unexpected {sorted(saved.keys() - params.keys())[:3]})")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            named[name].copy_(value)
    return model


@contextlib.contextmanager
def bottlenecks_disabled(model: Module, load_base: BaseLoader | None = None) -> Iterator[Module]:
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    for block in blocks:
        block.enabled = False
    try:
        yield model
    finally:
        for block in blocks:
            block.enabled = True


BOTTLENECK_ADAPTER = Checkpoint(True, save_bottlenecks, load_bottlenecks, bottlenecks_disabled, None)


# ---------------------------------------------------------------- how the base is loaded


def load_4bit(path: Path, device: torch.device | str | None = None) -> Module:
    """The base in 4-bit NF4 (QLoRA), on `device` (default: `compute_device()`). On the CPU
    bitsandbytes computes in float32; on CUDA the compute dtype is bfloat16."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device(device or compute_device())
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(resolve_checkpoint(path)), quantization_config=quantization,
                                                 device_map={"": str(device)}, use_safetensors=True)
    # On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weights for a faster kernel the first time
    # it runs in eval mode without grad (a validation pass) and never packs them back; that kernel has no
    # backward, so later training steps would silently get wrong gradients through the frozen base (and
    # it rejects layers narrower than 64 inputs). One code path for training and evaluation instead.
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable[[Module, FinetuneParams], Module]  # loaded base -> model to train, trainable set
    checkpoint: Checkpoint
    mergeable: bool  # an adapter that folds into the base weights (full checkpoints have nothing to merge)
    why_not_mergeable: str = ""  # for an adapter that does not: why, and how to serve it instead
    # The loss must run the model's own forward (PEFT prepends virtual tokens there), not the decoder.
    full_forward: bool = False
    load_base: Callable[..., Module] = load_causal_lm  # (path, device=None): for training and evaluation; merge uses full precision
    # Settles what depends on params (the `peft` pass-through knows its flags only from its config).
    specialise: Callable[[Method, FinetuneParams], Method] | None = None

    @property
    def saves_adapter(self) -> bool:
        return self.checkpoint.saves_adapter


def _full(model: Module, params: FinetuneParams) -> Module:
    return model.requires_grad_(True)


def head_is_tied(model: Module) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _freeze(model: Module, params: FinetuneParams) -> Module:
    layers = decoder_layers(model)
    if params.freeze.layers > len(layers):
        raise MethodError(f"finetune.freeze.layers is {params.freeze.layers} but the model has {len(layers)} "
                          f"transformer layers; freeze at most {len(layers)} (the head, final norm and any layer above stay trained)")
    model.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    for layer in layers[:params.freeze.layers]:
        layer.requires_grad_(False)
    if not is_task_model(model) and head_is_tied(model):
        log.info("freeze: the output head is tied to the (frozen) input embeddings, so it stays frozen too")
    return model


def _head(model: Module, params: FinetuneParams) -> Module:
    if is_task_model(model):
        if not head_module_names(model):
            raise MethodError(f"method head: {type(model).__name__} has no task head named {', '.join(HEAD_NAMES)}")
        return train_head_only(model)  # linear probing: only the new task head trains
    if head_is_tied(model):
        raise MethodError(
            "method head trains only the output head, but this model's head is tied to its input embeddings "
            "(tie_word_embeddings): training it would change every input token's embedding too, which is not "
            "linear probing. Use method freeze (top layers + final norm, embeddings kept) or lora instead.")
    model.requires_grad_(False)
    model.get_output_embeddings().requires_grad_(True)
    return model


def _task_type(model: Module | None):
    """CAUSAL_LM, or SEQ_CLS / TOKEN_CLS / QUESTION_ANS for task heads (PEFT then trains and saves the head
    through modules_to_save)."""
    from peft import TaskType

    return TaskType.CAUSAL_LM if model is None else peft_task_type(model)


def _lora_config(params: FinetuneParams, model: Module | None = None, **extra: Any):
    from peft import LoraConfig

    targets = params.lora.target_modules if model is None else lora_targets(model, params.lora.target_modules)
    return LoraConfig(task_type=_task_type(model), r=params.lora.r, lora_alpha=params.lora.alpha,
                      lora_dropout=params.lora.dropout, target_modules=targets, **extra)


def _peft(config_for: Callable[[Module, FinetuneParams], Any]) -> Callable[[Module, FinetuneParams], Module]:
    def prepare(model: Module, params: FinetuneParams) -> Module:
        from peft import get_peft_model

        config = config_for(model, params)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise MethodError(f"method {params.method} cannot be applied to {type(model).__name__}: {exc}. Module names "
                              "differ between architectures (Llama: q_proj, k_proj, v_proj, down_proj; BERT: query, key, "
                              "value, dense): set finetune.<method>.target_modules for this model") from exc
    return prepare


def _qlora(model: Module, params: FinetuneParams) -> Module:
    from peft import get_peft_model, prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False):
        raise MethodError("method qlora needs the base loaded in 4-bit: load it with the method's load_base")
    # Casts norms and embeddings to fp32, freezes the base and turns on gradient checkpointing; the
    # LoRA weights added next are fp32.
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, _lora_config(params, model))


def _ia3_config(model: Module, params: FinetuneParams):
    from peft import IA3Config

    return IA3Config(task_type=_task_type(model), target_modules=params.ia3.target_modules,
                     feedforward_modules=params.ia3.feedforward_modules)


def _prompt_tuning_config(model: Module, params: FinetuneParams):
    from peft import PromptTuningConfig

    virtual = params.virtual
    if virtual.init == "text":
        # PEFT tokenises the text with the base's own tokenizer, saved beside its weights.
        return PromptTuningConfig(task_type=_task_type(model), num_virtual_tokens=virtual.tokens,
                                  prompt_tuning_init="TEXT", prompt_tuning_init_text=virtual.init_text,
                                  tokenizer_name_or_path=str(model.name_or_path))
    return PromptTuningConfig(task_type=_task_type(model), num_virtual_tokens=virtual.tokens)


def _prefix_tuning_config(model: Module, params: FinetuneParams):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=_task_type(model), num_virtual_tokens=params.virtual.tokens)


def _p_tuning_config(model: Module, params: FinetuneParams):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type=_task_type(model), num_virtual_tokens=params.virtual.tokens)


def _adapter(model: Module, params: FinetuneParams) -> Module:
    model.requires_grad_(False)
    return attach_bottlenecks(model, params.adapter.bottleneck)


def passthrough_peft_config(model: Module | None, params: FinetuneParams):
    """`finetune.peft: {type: LOHA, config: {...}}` -> that PEFT method's config, for a causal LM."""
    from peft import PeftType, get_peft_config

    kind = (params.peft.type or "").upper()
    valid = [t.value for t in PeftType]
    if kind not in valid:
        raise MethodError(f"finetune.peft.type {params.peft.type!r} is not a PEFT method; valid: {', '.join(valid)}")
    reserved = {"peft_type", "task_type"} & params.peft.config.keys()
    if reserved:
        raise MethodError(f"finetune.peft.config sets {sorted(reserved)}; tunekit sets those (peft.type, CAUSAL_LM): remove them")
    try:
        return get_peft_config({"peft_type": kind, "task_type": _task_type(model).value, **params.peft.config})
    except (TypeError, ValueError) as exc:
        raise MethodError(f"finetune.peft.config is not a valid {kind} config: {exc}") from exc


def _passthrough_flags(method: Method, params: FinetuneParams) -> Method:
    config = passthrough_peft_config(None, params)
    virtual = config.is_prompt_learning or config.is_adaption_prompt
    return dataclasses.replace(method, mergeable=not virtual, full_forward=config.is_prompt_learning)


VIRTUAL_TOKENS_NOT_MERGEABLE = (
    "its virtual tokens are inputs prepended to every sequence, not changes to weights, so there is nothing to fold "
    "into the base. Serve it as base + adapter: PeftModel.from_pretrained(base, adapter_dir) (what the evaluate stage does).")
BOTTLENECK_NOT_MERGEABLE = (
    "its bottleneck adapters have a non-linearity (GELU) between their projections, so they cannot be folded into "
    "the base's linear weights. Serve it as base + adapters: tunekit.methods.load_bottlenecks(adapter_dir, load_base) "
    "(what the evaluate stage does).")

METHODS: dict[str, Method] = {m.name: m for m in [
    # Nothing to merge: the checkpoint is already standalone, and merge writes it through.
    Method("full", _full, FULL_WEIGHTS, mergeable=False),
    Method("freeze", _freeze, FULL_WEIGHTS, mergeable=False),
    Method("head", _head, FULL_WEIGHTS, mergeable=False),
    Method("lora", _peft(lambda model, params: _lora_config(params, model)), PEFT_ADAPTER, mergeable=True),
    Method("dora", _peft(lambda model, params: _lora_config(params, model, use_dora=True)), PEFT_ADAPTER, mergeable=True),
    Method("ia3", _peft(_ia3_config), PEFT_ADAPTER, mergeable=True),
    Method("qlora", _qlora, PEFT_ADAPTER, mergeable=True, load_base=load_4bit),
    Method("adapter", _adapter, BOTTLENECK_ADAPTER, mergeable=False, why_not_mergeable=BOTTLENECK_NOT_MERGEABLE),
    Method("prompt_tuning", _peft(_prompt_tuning_config), PEFT_ADAPTER, mergeable=False,
           why_not_mergeable=VIRTUAL_TOKENS_NOT_MERGEABLE, full_forward=True),
    Method("prefix_tuning", _peft(_prefix_tuning_config), PEFT_ADAPTER, mergeable=False,
           why_not_mergeable=VIRTUAL_TOKENS_NOT_MERGEABLE, full_forward=True),
    Method("p_tuning", _peft(_p_tuning_config), PEFT_ADAPTER, mergeable=False,
           why_not_mergeable=VIRTUAL_TOKENS_NOT_MERGEABLE, full_forward=True),
    # Only prompt-learning PEFT types are not mergeable; specialise settles which this one is.
    Method("peft", _peft(passthrough_peft_config), PEFT_ADAPTER, mergeable=True,
           why_not_mergeable=VIRTUAL_TOKENS_NOT_MERGEABLE, specialise=_passthrough_flags),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"finetune.method {name!r} is not known; valid: {', '.join(METHODS)}")
    return METHODS[name]


def method_for(params: FinetuneParams) -> Method:
    """The registry entry `finetune.method` names, with everything that depends on params settled."""
    method = get_method(params.method)
    return method.specialise(method, params) if method.specialise else method


def method_of_checkpoint(meta: dict[str, Any]) -> Method:
    """The entry that wrote a finetune checkpoint, with the flags its meta.json recorded."""
    method = get_method(meta.get("method", "lora"))
    return dataclasses.replace(method, mergeable=meta.get("mergeable", method.mergeable),
                               full_forward=meta.get("full_forward", method.full_forward))


def _logical_numel(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit weights per byte; its quant_state keeps the real shape.
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return shape.numel() if shape is not None else p.numel()


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    total = sum(_logical_numel(p) for p in model.parameters())
    trainable = sum(_logical_numel(p) for p in model.parameters() if p.requires_grad)
    return {"trainable_parameters": trainable, "total_parameters": total, "trainable_fraction": trainable / max(total, 1)}


@dataclass
class Tuned:
    model: torch.nn.Module
    base_dir: Path
    method: Method

    def base(self) -> AbstractContextManager[torch.nn.Module]:
        """The base beside the tuned model: the adapter switched off, or the base loaded from disk when
        the method trained full weights."""
        return self.method.checkpoint.as_base(self.model, lambda: self.method.load_base(self.base_dir))


def load_tuned(model_dir: Path, retarget: Callable[[Method, dict[str, Any]], Method] | None = None) -> Tuned:
    """The fine-tuned model as its method saved it (adapter on its base, or full weights), with the base
    read from meta.json lineage. The base is loaded as for training (4-bit for qlora). `retarget`: the
    entry re-targeted at the checkpoint's task models (meta.json "task"); tunekit.tasks.load_tuned passes
    the one of the checkpoint's task kind."""
    meta = CheckpointMeta.of_tuned(model_dir)
    method = method_of_checkpoint(meta.raw)
    if retarget is not None:
        method = retarget(method, meta.task)
    model = method.checkpoint.load(model_dir, lambda: method.load_base(meta.parent))
    return Tuned(model, meta.parent, method)
