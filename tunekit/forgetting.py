"""Forgetting: what fine-tuning cost a model on general text outside its task.

A probe set of general-domain passages is scored with plain language-modelling loss (every token
after the first of each passage) by the base checkpoint and each later one; the change against the
base is the forgetting. The default probe is English prose that nobody in this project wrote: the
paragraphs of the Python Language Reference that CPython ships for `help()` in the standard-library
module `pydoc_data.topics`, so it is always installed and needs no download.

Base scores depend only on the base checkpoint, the probe and the truncation length, so they are
cached in a small JSON file keyed by those three; re-running after a new fine-tune skips the base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunekit.io import write_json
from tunekit.models import load_causal_lm
from tunekit.text import TextError, load_documents
from tunekit.train import evaluate_loss

log = logging.getLogger("tunekit")

PYDOC = "pydoc"
PROBE_PARAM = "forgetting.probe"
# Bump when the way a probe is scored changes, so cached base scores from older code are not reused.
SCORER_VERSION = 1
CACHE_FILE = "base_scores.json"
CACHE_ENTRIES = 64  # oldest entries beyond this are dropped; each entry is a few numbers
MIN_WORDS = 25      # pydoc paragraphs shorter than this are headings, notes or fragments


class ProbeError(ValueError):
    """The probe set named by `forgetting.probe` cannot be read or holds no text."""


@dataclass(frozen=True)
class Probe:
    source: str            # "pydoc" or the file it was read from
    passages: list[str]    # the selected passages, in scoring order
    available: int         # passages found before selection

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.passages, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------- the probe text


_HEADING_RULE = re.compile(r"[*=^~\-]{3,}")


def pydoc_paragraphs() -> list[str]:
    """Prose paragraphs of the Python Language Reference as shipped in `pydoc_data.topics`.

    Kept: flush-left paragraphs of at least MIN_WORDS words that read as sentences (start with a
    capital letter, end with a full stop). Dropped: headings, indented grammar and code examples,
    tables and list items (their continuation lines are indented).
    """
    from pydoc_data.topics import topics

    paragraphs: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        for block in re.split(r"\n[ \t]*\n", topics[key]):
            lines = block.strip("\n").split("\n")
            if any(line[:1] in (" ", "\t") for line in lines):
                continue
            if len(lines) > 1 and _HEADING_RULE.fullmatch(lines[-1].strip()):
                continue
            text = re.sub(r"\s+", " ", " ".join(line.strip() for line in lines)).strip()
            if len(text.split()) < MIN_WORDS or not text[:1].isupper() or not text.endswith("."):
                continue
            if text not in seen:  # some sections repeat a paragraph verbatim
                seen.add(text)
                paragraphs.append(text)
    return paragraphs


def select(passages: Sequence[str], count: int) -> list[str]:
    """`count` passages chosen by the hash of their text: deterministic, independent of file order,
    spread over the whole source, and stable when passages are added elsewhere."""
    ranked = sorted(set(passages), key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    return ranked[:count]


def load_probe(spec: str, count: int) -> Probe:
    """The probe named by `forgetting.probe`: "pydoc", a .txt file (passages separated by blank
    lines) or a .jsonl file (one {"text": ...} per line); at most `count` passages."""
    if spec == PYDOC:
        found = pydoc_paragraphs()
        if not found:
            raise ProbeError(f"{PROBE_PARAM}: '{PYDOC}': no prose found in pydoc_data.topics of this Python")
        return Probe(PYDOC, select(found, count), len(found))
    path = Path(spec).expanduser()
    if path.suffix not in (".txt", ".jsonl"):
        raise ProbeError(f"{PROBE_PARAM}: {spec!r}: use '{PYDOC}', a .txt file or a .jsonl file")
    if not path.is_file():
        raise ProbeError(f"{PROBE_PARAM}: probe file {path} does not exist (set {PROBE_PARAM} to '{PYDOC}' or an existing .txt/.jsonl file)")
    try:
        # The same reader as DAPT's domain text: one format, one parser.
        found = [document.text for document in load_documents(path)]
    except TextError as exc:
        raise ProbeError(f"{PROBE_PARAM}: probe file {exc}") from None
    return Probe(str(path), select(found, count), len(found))


def tokenize_probe(probe: Probe, tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """One row per passage, cut to `max_length` tokens, every token a label (the shift in the loss
    leaves out only the first). Passages of a single token have nothing to predict and are dropped."""
    rows = []
    for passage in probe.passages:
        ids = tokenizer(passage, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            rows.append({"input_ids": ids, "labels": list(ids)})
    if not rows:
        raise ProbeError(f"{PROBE_PARAM}: {probe.source}: no passage has two tokens or more to score")
    return rows


# ---------------------------------------------------------------- scores


def score(model: torch.nn.Module, rows: Sequence[dict], pad_id: int, batch_size: int,
          full_forward: bool = False) -> dict[str, float]:
    """Mean next-token loss over every scored probe token, its perplexity and the token count."""
    result = evaluate_loss(model, rows, pad_id, batch_size, full_forward)
    return {"loss": result["loss"], "perplexity": result["perplexity"], "tokens": int(result["tokens"])}


def compare(base: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    """`other`'s scores with its forgetting against `base`: positive = worse on general text."""
    delta = other["loss"] - base["loss"]
    return {**other, "loss_delta": delta, "relative_loss_change": delta / base["loss"],
            "perplexity_ratio": other["perplexity"] / base["perplexity"]}


def cache_key(base_hash: str, probe_hash: str, max_length: int) -> str:
    blob = json.dumps({"base": base_hash, "probe": probe_hash, "max_length": max_length, "scorer": SCORER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class BaseScoreCache:
    """Base-model probe scores in one small JSON file outside DVC's outputs."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / CACHE_FILE

    def _entries(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable forgetting cache %s", self.path)
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> dict[str, float] | None:
        entry = self._entries().get(key)
        return entry["scores"] if isinstance(entry, dict) and "scores" in entry else None

    def put(self, key: str, scores: dict[str, float], **about: Any) -> None:
        entries = self._entries()
        entries.pop(key, None)
        entries[key] = {"scores": scores, **about}
        write_json(self.path, dict(list(entries.items())[-CACHE_ENTRIES:]))


def base_scores(base_dir: Path, rows: Sequence[dict], pad_id: int, batch_size: int, key: str,
                cache: BaseScoreCache, about: dict[str, Any]) -> tuple[dict[str, float], bool]:
    """The base checkpoint's probe scores, from the cache when they are there; (scores, cached)."""
    cached = cache.get(key)
    if cached is not None:
        log.info("base scores on the probe from the cache %s", cache.path)
        return cached, True
    scores = score(load_causal_lm(base_dir), rows, pad_id, batch_size)
    cache.put(key, scores, **about)
    return scores, False


# ---------------------------------------------------------------- reports


COLUMNS = ("loss", "perplexity", "loss_delta", "relative_loss_change", "perplexity_ratio", "tokens")


def markdown_report(results: dict[str, dict], probe: Probe, max_length: int, base_cached: bool) -> str:
    lines = [
        "# Forgetting on a general-text probe",
        "",
        f"Probe: {'the prose of the Python Language Reference (`pydoc_data.topics`)' if probe.source == PYDOC else f'`{probe.source}`'}, "
        f"{len(probe.passages)} of {probe.available} passages, each cut to {max_length} tokens "
        f"(probe hash `{probe.hash[:16]}`). Loss is the mean next-token cross-entropy over every probe token "
        "but the first of each passage; each model is compared with the base.",
        "",
        "| model | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[key]:.4g}" for key in COLUMNS) + " |")
    lines += [
        "",
        "loss_delta = loss - base loss; relative_loss_change = loss_delta / base loss; "
        "perplexity_ratio = perplexity / base perplexity. Positive deltas (ratios above 1) mean the model got worse "
        "at general text: that is the forgetting.",
        "",
        f"Base scores {'came from the cache (same base checkpoint, probe and max_length)' if base_cached else 'were computed in this run'}.",
        "",
    ]
    return "\n".join(lines)


def loss_bar_png(path: Path, results: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    losses = [results[name]["loss"] for name in names]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    bars = ax.bar(names, losses, color=["#888888"] + ["#d62728" if results[n]["loss_delta"] > 0 else "#2ca02c" for n in names[1:]])
    for bar, name in zip(bars, names):
        label = f"{results[name]['loss']:.3f}" + ("" if name == names[0] else f"\n({100 * results[name]['relative_loss_change']:+.1f}%)")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("probe loss per token (lower is better)")
    ax.set_ylim(0, max(losses) * 1.2)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
