"""The metrics of the evaluate stage as Hugging Face `evaluate` modules, kept in the repo and loaded by path.

Each built-in metric is `tunekit/metric_modules/<name>/<name>.py`, an `evaluate.Metric` that wraps the
field's reference library (sacrebleu, rouge-score, seqeval, scikit-learn, scipy, the SQuAD normalisation)
or, for pass@k, only the unbiased estimator over counts (code runs only in tunekit/sandbox.py). A user may
name their own module file (or a directory holding `<dir>.py`) in `evaluate.metrics`, or `hub:<name>` when
the machine can reach the Hugging Face Hub.

`evaluate.load` copies a module into a "dynamic modules" directory and imports it from there. tunekit
points that, and the modules' data cache, at a private temporary directory of this process (mode 0700,
removed at exit) unless HF_MODULES_CACHE / HF_EVALUATE_CACHE are set: never the project tree, so a
read-only or fresh clone works, DVC outputs hold nothing of it, and no other user can plant code there.
Loaded modules are cached per process; `compute` serialises calls on one module (an evaluate module keeps
its inputs on the instance while it computes), so threads may share them.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

MODULES_DIR = Path(__file__).resolve().parent
BUILTIN = ("exact_match", "bleu", "chrf", "rouge", "squad", "accuracy", "f1", "roc_auc", "confusion_matrix",
           "seqeval", "regression", "pass_at_k")
HUB_PREFIX = "hub:"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class MetricModuleError(Exception):
    """A metric module that cannot be found, loaded or computed, or gives a result that is not numbers."""


_lock = threading.Lock()
_loaded: dict[str, tuple[Any, threading.Lock]] = {}
_private: Path | None = None


def builtin_path(name: str) -> Path:
    if name not in BUILTIN:
        raise KeyError(f"no built-in metric module {name!r}; built-in: {', '.join(BUILTIN)}")
    return MODULES_DIR / name / f"{name}.py"


def module_file(path: str | os.PathLike) -> Path:
    """The module script a user's entry names: the .py file itself, or `<dir>/<dir>.py` (evaluate's rule)."""
    path = Path(path)
    if path.suffix == ".py":
        return path
    return path / f"{path.name}.py"


def offline() -> bool:
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_VARIABLES)


def _cache_dirs() -> tuple[str, str]:
    """(dynamic modules root, module data cache), created once per process."""
    global _private
    if _private is None:
        _private = Path(tempfile.mkdtemp(prefix="tunekit-evaluate-"))  # mode 0700
        atexit.register(shutil.rmtree, _private, True)
    modules = os.environ.get("HF_MODULES_CACHE") or str(_private / "modules")
    data = os.environ.get("HF_EVALUATE_CACHE") or str(_private / "data")
    return modules, data


def _load(spec: str) -> Any:
    import evaluate
    from evaluate.loading import evaluation_module_factory, import_main_class, init_dynamic_modules

    modules, data = _cache_dirs()
    if spec.startswith(HUB_PREFIX):
        # Hub scripts download through evaluate's own cache; only the import directory is ours.
        return evaluate.load(spec[len(HUB_PREFIX):], cache_dir=data, keep_in_memory=True)
    # evaluate.load(path) with the import directory made explicit: a package name of our own, so a module
    # loaded elsewhere in the process through evaluate's default directory cannot shadow ours.
    dynamic = init_dynamic_modules("tunekit_evaluate_modules", modules)
    found = evaluation_module_factory(spec, dynamic_modules_path=dynamic)
    cls = import_main_class(found.module_path)
    if cls is None:
        raise MetricModuleError(f"{spec} defines no evaluate.Metric subclass")
    return cls(cache_dir=data, keep_in_memory=True, hash=found.hash)


def load(spec: str | os.PathLike) -> tuple[Any, threading.Lock]:
    """The loaded module for a built-in name, a module path, or `hub:<name>`, and the lock its compute takes."""
    spec = str(spec)
    if spec in BUILTIN:
        spec = str(builtin_path(spec))
    elif not spec.startswith(HUB_PREFIX):
        spec = str(module_file(spec).resolve())
    with _lock:
        if spec not in _loaded:
            if spec.startswith(HUB_PREFIX) and offline():
                raise MetricModuleError(
                    f"{spec} is a Hugging Face Hub metric, and this process is offline "
                    f"({', '.join(v for v in OFFLINE_VARIABLES if os.environ.get(v))} set): nothing may download here. "
                    "Copy the metric's script into the project and name that file instead (a path ending in .py, "
                    "or a directory holding <dir>.py)")
            if not spec.startswith(HUB_PREFIX) and not Path(spec).is_file():
                raise MetricModuleError(f"no metric module at {spec}")
            try:
                _loaded[spec] = (_load(spec), threading.Lock())
            except MetricModuleError:
                raise
            except Exception as exc:
                hint = (" (no network? offline, name a local module file instead)"
                        if spec.startswith(HUB_PREFIX) and isinstance(exc, ConnectionError | FileNotFoundError) else "")
                raise MetricModuleError(f"cannot load {spec}: {type(exc).__name__}: {exc}{hint}") from exc
        return _loaded[spec]


_pairs: contextvars.ContextVar[bool] = contextvars.ContextVar("tunekit_metric_pairs", default=False)


@contextlib.contextmanager
def one_pair_at_a_time():
    """Inside it (this thread or task only), `compute` runs the module's own `_compute` on the inputs as
    given, skipping evaluate's Arrow round trip of them (encode, write, read back): for per-sample scores,
    thousands of one-pair calls whose input types the corpus-level `compute` of the same data has just
    checked. Same module code, same numbers; ~10-30 ms less per call (bench/metric_overhead.py)."""
    token = _pairs.set(True)
    try:
        yield
    finally:
        _pairs.reset(token)


def compute(spec: str | os.PathLike, **inputs: Any) -> dict[str, Any]:
    """`module.compute(**inputs)` of the loaded module, one call at a time per module."""
    module, lock = load(spec)
    with lock:
        if _pairs.get():
            from datasets.utils.py_utils import temp_seed

            with temp_seed(module.seed):  # as compute does
                return module._compute(**inputs)
        return module.compute(**inputs)


def python_module(spec: str | os.PathLike):
    """The Python module a loaded metric was imported as (its helper functions, e.g. SQuAD's normalisation)."""
    import sys

    module, _ = load(spec)
    return sys.modules[type(module).__module__]
