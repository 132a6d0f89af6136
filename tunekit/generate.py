"""Batched generation for evaluation: prompts rendered with the training chat template, left-padded,
KV cache on, stopped at the end-of-turn marker and any extra stop sequences; n samples per prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from tunekit.chat import render

if TYPE_CHECKING:
    from tunekit.params import CodeTaskParams


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    reference: str


def prompts_from_conversations(records: Sequence[dict], tokenizer, chat_template: str) -> list[Prompt]:
    """The prompt is everything before the final assistant turn plus the generation prompt; the
    reference is that turn's content."""
    prompts = []
    for record in records:
        messages = record["messages"]
        # Everything but our `train` flag: tool calls and tool results are part of the history.
        history = [{key: value for key, value in m.items() if key != "train"} for m in messages[:-1]]
        text = render(history, tokenizer, chat_template, add_generation_prompt=True, tools=record.get("tools"))
        prompts.append(Prompt(record.get("id", str(len(prompts))), text, messages[-1]["content"]))
    return prompts


def stop_token_ids(tokenizer, eot_marker: str) -> list[int]:
    ids = {tokenizer.eos_token_id}
    marker = tokenizer.encode(eot_marker, add_special_tokens=False)
    if len(marker) == 1:
        ids.add(marker[0])
    return sorted(i for i in ids if i is not None)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The text before the earliest occurrence of any stop sequence (the stop itself is dropped)."""
    end = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            end = min(end, at)
    return text[:end]


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: Sequence[Prompt], eot_marker: str, max_new_tokens: int,
                     batch_size: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     samples: int = 1, stop: Sequence[str] = (), strip: bool = True, seed: int | None = None,
                     desc: str = "generate") -> list[list[str]]:
    """`samples` completions per prompt (in input order), each cut at the end-of-turn marker and at the
    first of the `stop` sequences. `strip=False` keeps leading whitespace (code completions start with
    their indentation). With sampling, `seed` makes the draws reproducible."""
    if samples > 1 and not do_sample:
        raise ValueError(f"{samples} samples per prompt with greedy decoding would be {samples} identical copies")
    model.eval()
    tokenizer.padding_side = "left"
    stops = stop_token_ids(tokenizer, eot_marker)
    cut = [eot_marker, *stop]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    if stop:
        # Halt a sequence as soon as it writes a stop string (the text is still cut below: the string
        # may end inside a token, and a batch runs until its last sequence stops).
        sampling.update(stop_strings=list(stop), tokenizer=tokenizer)
    if do_sample and seed is not None:
        torch.manual_seed(seed)
    # Longest prompts first: batches hold similar lengths, so little compute goes to padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].text))
    # Fewer prompts per batch when each brings several sequences, so a batch stays ~batch_size rows.
    per_batch = max(1, batch_size // samples)
    outputs: dict[int, list[str]] = {}
    for start in tqdm(range(0, len(order), per_batch), desc=desc, unit="batch", dynamic_ncols=True):
        chunk = order[start:start + per_batch]
        enc = tokenizer([prompts[i].text for i in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        generated = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                   pad_token_id=tokenizer.pad_token_id, use_cache=True,
                                   num_return_sequences=samples, **sampling)
        new_tokens = generated[:, enc["input_ids"].shape[1]:]
        for row_index, row in enumerate(new_tokens):
            text = tokenizer.decode(row, skip_special_tokens=True)
            # Markers that are not single tokens in this vocabulary are cut as text, like the stops.
            text = cut_at_stops(text, cut)
            outputs.setdefault(chunk[row_index // samples], []).append(text.strip() if strip else text.rstrip())
    return [outputs[i] for i in range(len(prompts))]


def generate(model, tokenizer, prompts: Sequence[Prompt], eot_marker: str, max_new_tokens: int, batch_size: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, desc: str = "generate",
             stop: Sequence[str] = ()) -> list[str]:
    """One completion per prompt (see generate_samples)."""
    return [s[0] for s in generate_samples(model, tokenizer, prompts, eot_marker, max_new_tokens, batch_size, do_sample,
                                           temperature, top_p, stop=stop, desc=desc)]


# ---------------------------------------------------------------- few-shot prompts


def _without_system(messages: Sequence[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]


def choose_demonstrations(train: Sequence[dict], record_id: str, k: int, seed: int) -> list[dict]:
    """k train records for one test record: a seeded draw per record, the same on every run."""
    import random

    if k > len(train):
        raise ValueError(f"few-shot k={k} needs at least {k} train records, the train split has {len(train)}")
    rng = random.Random(f"{seed}:{record_id}")
    return [train[i] for i in sorted(rng.sample(range(len(train)), k))]


def few_shot_messages(record: dict, demonstrations: Sequence[dict]) -> list[dict]:
    """The test conversation with each demonstration's turns prepended as earlier user/assistant turns,
    after the test conversation's own system prompt (a demonstration's system prompt is dropped).
    Demonstration answers carry `train: false`, so a loss over this conversation scores only the test's."""
    messages = record["messages"]
    system = [{"role": "system", "content": messages[0]["content"]}] if messages[0]["role"] == "system" else []
    shots = [{**m, "train": False} if m["role"] == "assistant" else m
             for demo in demonstrations for m in _without_system(demo["messages"])]
    own = [dict(m) for m in messages if m["role"] != "system"]
    return system + shots + own


def few_shot_records(records: Sequence[dict], train: Sequence[dict], k: int, seed: int) -> list[dict]:
    """Each test record with k demonstrations from `train` in its messages (see few_shot_messages)."""
    out = []
    for i, record in enumerate(records):
        demonstrations = choose_demonstrations(train, record.get("id", str(i)), k, seed)
        out.append({**record, "messages": few_shot_messages(record, demonstrations),
                    "demonstrations": [d.get("id") for d in demonstrations]})
    return out


# ---------------------------------------------------------------- scoring generations


def _metric_functions():
    from tunekit import metrics as m

    return {
        "exact_match": lambda p, r: {"exact_match": m.exact_match(p, r)},
        "bleu": lambda p, r: {"bleu": m.bleu(p, r)},
        "rouge_l": lambda p, r: {"rouge_l": m.rouge_l(p, r)},
        "chrf": lambda p, r: {"chrf": m.chrf(p, r)},
        "rouge": m.rouge,
        "squad": lambda p, r: {f"squad_{k}": v for k, v in m.squad(p, r).items()},
    }


GENERATION_METRICS = ("exact_match", "bleu", "rouge_l", "chrf", "rouge", "squad")
METRICS_KEY = "evaluate.metrics"


def user_metric_name(entry: str) -> str:
    """The prefix of a user module's result keys: the module's file stem (`hub:<owner>/<name>`: <name>)."""
    from tunekit.metric_modules import HUB_PREFIX, module_file

    if entry.startswith(HUB_PREFIX):
        return entry[len(HUB_PREFIX):].rstrip("/").split("/")[-1]
    return module_file(entry).stem


def _where(entry: str, index: int) -> str:
    from tunekit.metric_modules import HUB_PREFIX, module_file

    source = entry if entry.startswith(HUB_PREFIX) else str(module_file(entry).resolve())
    return f"params.yaml: {METRICS_KEY}[{index}] = {entry!r} ({source})"


def load_metrics(names: Sequence[str]) -> None:
    """Load every metric module `names` needs now, before any model generates: a missing file, a module
    that does not import or a hub metric while offline fails here, naming the params key and the file."""
    from tunekit.metric_modules import MetricModuleError, load

    for index, entry in enumerate(names):
        if entry in GENERATION_METRICS:
            continue
        try:
            load(entry)
        except MetricModuleError as exc:
            raise MetricModuleError(f"{_where(entry, index)}: {exc}") from None


def _user_metric(entry: str, index: int):
    """A user's module (file or hub) as a metric function: its compute(predictions=, references=), whose
    result must be a dict of numbers; each key is reported as `<module name>_<key>` (or the name alone
    when the key is the name)."""
    import numbers

    from tunekit.metric_modules import MetricModuleError, compute

    prefix = user_metric_name(entry)

    def score(predictions: list[str], references: list[str]) -> dict[str, float]:
        try:
            result = compute(entry, predictions=predictions, references=references)
        except MetricModuleError as exc:
            raise MetricModuleError(f"{_where(entry, index)}: {exc}") from None
        except Exception as exc:
            raise MetricModuleError(f"{_where(entry, index)}: compute(predictions=..., references=...) on "
                                    f"{len(predictions)} example(s) raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, dict) or not result:
            raise MetricModuleError(f"{_where(entry, index)}: compute returned {result!r}; a metric module must "
                                    "return a non-empty dict of numbers, e.g. {\"score\": 0.5}")
        bad = {k: v for k, v in result.items() if isinstance(v, bool) or not isinstance(v, numbers.Real)}
        if bad:
            raise MetricModuleError(f"{_where(entry, index)}: compute returned non-numeric value(s) "
                                    f"{ {k: type(v).__name__ for k, v in bad.items()} }; every value must be a number "
                                    "(a float or int), one per key")
        return {(prefix if key == prefix else f"{prefix}_{key}"): float(value) for key, value in result.items()}

    return score


def score_generations(predictions: Sequence[Sequence[str]], references: Sequence[str],
                      names: Sequence[str]) -> tuple[dict[str, float], list[list[dict[str, float]]]]:
    """The chosen metrics over the whole set, and per sample: built-in names (tunekit.metrics) and users'
    evaluate modules (a .py path, a directory holding <dir>.py, or hub:<name>; see tunekit.metric_modules).

    With n samples per prompt the set score is the mean over j of the score of the j-th samples: the
    expected score of one sampled answer. Per-sample scores are each metric on that one pair (the
    module's own code, without evaluate's Arrow round trip per pair: tunekit.metric_modules.one_pair_at_a_time).
    """
    from tunekit.metric_modules import MetricModuleError, one_pair_at_a_time

    builtin = _metric_functions()
    unknown = [n for n in names if n not in builtin and not _is_module_entry(n)]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; valid: {', '.join(GENERATION_METRICS)}, or an evaluate "
                         "module (a .py path, a directory holding <dir>.py, hub:<name>)")
    functions = {name: builtin.get(name) or _user_metric(name, i) for i, name in enumerate(names)}
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} prediction lists for {len(references)} references")
    n = {len(samples) for samples in predictions}
    if len(n) > 1:
        raise ValueError(f"every prompt needs the same number of samples, got {sorted(n)}")
    n_samples = n.pop() if n else 1
    corpus: dict[str, float] = {}
    owner: dict[str, str] = {}
    for j in range(n_samples):
        column = [samples[j] for samples in predictions]
        for name in names:
            for key, value in functions[name](column, list(references)).items():
                if owner.setdefault(key, name) != name:
                    raise MetricModuleError(f"{METRICS_KEY}: {name!r} and {owner[key]!r} both report {key!r}; "
                                            "rename one module file (its name prefixes its keys)")
                corpus[key] = corpus.get(key, 0.0) + value / n_samples
    with one_pair_at_a_time():  # the corpus calls above went through evaluate's compute on the same data
        per_sample = [[{key: value for name in names for key, value in functions[name]([p], [r]).items()}
                       for p in samples] for samples, r in zip(predictions, references)]
    return corpus, per_sample


def _is_module_entry(name: str) -> bool:
    from tunekit.metric_modules import HUB_PREFIX

    path = Path(name)
    return name.startswith(HUB_PREFIX) or path.suffix == ".py" or path.is_dir() or len(path.parts) > 1


# ---------------------------------------------------------------- code (HumanEval pass@k)

# A HumanEval completion is the function body: cut where the next top-level statement starts.
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")


def code_scores(problems: list[dict], completions: list[list[str]], code: CodeTaskParams,
                label: str = "") -> tuple[dict, list[dict]]:
    """Run completions through the sandbox (never in this process) and report unbiased pass@k per k,
    with every sample's pass/fail reason."""
    from tunekit.sandbox import check_humaneval, pass_at_k_report

    results = check_humaneval(problems, completions, timeout=code.timeout)
    report = pass_at_k_report(results, code.ks)
    metrics = {f"pass_at_{k}": report[f"pass@{k}"] for k in code.ks}  # MLflow metric names allow no "@"
    metrics.update({key: report[key] for key in ("problems", "samples", "passed", "reasons")})
    rows = [{"task_id": problem["task_id"], "model": label, "completions": samples,
             "results": [{"passed": r.passed, "reason": r.reason, "duration_s": round(r.duration_s, 3)} for r in outcome]}
            for problem, samples, outcome in zip(problems, completions, results)]
    return metrics, rows


def score_code(model, tokenizer, problems: list[dict], eot: str, code: CodeTaskParams, batch_size: int, label: str,
               seed: int = 0) -> tuple[dict, list[dict]]:
    """HumanEval as raw completion: the problem prompt as is (no chat template), cut at the stops."""
    prompts = [Prompt(p["task_id"], p["prompt"], "") for p in problems]
    completions = generate_samples(model, tokenizer, prompts, eot, code.max_new_tokens, batch_size, code.do_sample,
                                   code.temperature, code.top_p, code.samples, CODE_STOPS, strip=False, seed=seed,
                                   desc=f"code ({label})")
    return code_scores(problems, completions, code, label)
