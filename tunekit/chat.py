"""Chat formatting for supervised fine-tuning: render conversations with a chat template, mask
everything but the trained assistant turns, pack examples into fixed-length rows, and preview
the result as HTML.

The loss mask is derived from message boundaries (renders of conversation prefixes), never by
searching the text for marker strings: markers can occur inside message content, and templates
differ in what surrounds a turn.
"""

from __future__ import annotations

import bisect
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers' loss) skips

# Content is rendered verbatim (no `| trim`, unlike Meta's official Llama-3 template) so that what
# is trained is exactly the dataset text. The Llama-3 template writes <|begin_of_text|> itself
# rather than using `bos_token`, so it stays correct with tokenizers whose bos is something else.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    "llama3": (
        "{{- '<|begin_of_text|>' -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
        "{%- endif -%}"
    ),
}

TRAIN_ON_CHOICES = ("all", "last")


def resolve_chat_template(spec: str, tokenizer: Any) -> str:
    """Turn a template spec into jinja source: "model" (the tokenizer's own template), a builtin
    name ("chatml", "llama3"), or a path to a .jinja file."""
    if spec == "model":
        if not tokenizer.chat_template:
            raise ValueError(
                "chat template 'model' was requested but the tokenizer has no chat_template; "
                "use chat template 'chatml' (or 'llama3', or a path to a .jinja file) instead"
            )
        return tokenizer.chat_template
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"chat template {spec!r} is not 'model', a builtin ({', '.join(BUILTIN_TEMPLATES)}), "
            "or an existing .jinja file; pass one of those"
        )
    return path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained
    truncated: bool  # the conversation was cut at max_length
    eot_trained: bool  # the last trained assistant turn's end-of-turn token is present and trained


def _describe_template(chat_template: str, tokenizer: Any) -> str:
    """Name a template for error messages (the caller only hands us its source)."""
    for name, source in BUILTIN_TEMPLATES.items():
        if chat_template == source:
            return f"builtin chat template {name!r}"
    if chat_template == tokenizer.chat_template:
        return "the model's own chat template"
    return f"chat template starting {chat_template[:60]!r}"


def render(messages: list[dict], tokenizer: Any, chat_template: str, add_generation_prompt: bool) -> str:
    """The conversation as text, exactly as the template writes it (special tokens as text)."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def end_of_turn_marker(tokenizer: Any, chat_template: str) -> str:
    """The text a template writes after an assistant's content to close the turn (e.g. <|im_end|>),
    found from message boundaries: what follows the content in a rendered assistant turn."""
    probe = "tunekit-probe-answer"
    history = [{"role": "user", "content": "q"}]
    prompt = render(history, tokenizer, chat_template, add_generation_prompt=True)
    turn = render(history + [{"role": "assistant", "content": probe}], tokenizer, chat_template, add_generation_prompt=False)
    segment = turn[len(prompt):].rstrip()
    if not segment.startswith(probe) or segment == probe:
        raise ValueError(f"{_describe_template(chat_template, tokenizer)} writes no end-of-turn marker after an "
                         "assistant message, so generation could not know where a turn ends; use 'chatml' or 'llama3'")
    return segment[len(probe):]


def _trained_char_spans(
    messages: list[dict], tokenizer: Any, chat_template: str, train_on: str, full_text: str
) -> list[tuple[int, int]]:
    """Character spans of `full_text` to train on, one per trained assistant turn, in order.

    A turn's span starts where the rendered prompt (history + generation prompt) ends, i.e. where
    generation would start at inference, and ends where the render including that turn ends, minus
    trailing whitespace: that keeps the content plus its end-of-turn marker and drops the newline
    some templates write after the marker (the model never generates it; it stops at the marker).
    """
    assistant_indices = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
    if train_on == "last":
        assistant_indices = assistant_indices[-1:]
    spans = []
    for k in assistant_indices:
        if messages[k].get("train") is False:
            continue
        if k == 0:
            raise ValueError(
                "the conversation starts with an assistant message, so there is no prompt to render "
                "before it; add the system/user message it answers, or mark it with train: False"
            )
        history = [_without_train_flag(m) for m in messages[:k]]
        turn = _without_train_flag(messages[k])
        prompt = render(history, tokenizer, chat_template, add_generation_prompt=True)
        with_turn = render(history + [turn], tokenizer, chat_template, add_generation_prompt=False)
        renders = {
            f"the first {k} messages with the generation prompt": prompt,
            f"the first {k + 1} messages": with_turn,
        }
        for what, text in renders.items():
            if not full_text.startswith(text):
                raise ValueError(
                    f"{_describe_template(chat_template, tokenizer)} is not prefix-stable: rendering {what} "
                    "does not give a prefix of the whole conversation's rendering (the template rewrites "
                    "earlier turns, or renders the generation prompt differently from a finished assistant "
                    "turn), so assistant turns cannot be located by message boundaries; use a template that "
                    "renders each turn independently of later ones, e.g. 'chatml'"
                )
        # max(): a turn rendering as whitespace only gives an empty span, not a backwards one.
        spans.append((len(prompt), max(len(prompt), len(with_turn.rstrip()))))
    return spans


def _without_train_flag(message: dict) -> dict:
    # `train` is our annotation, not something a chat template should see.
    return {key: value for key, value in message.items() if key != "train"}


def encode_conversation(
    messages: list[dict],
    tokenizer: Any,
    chat_template: str,
    train_on: str = "all",
    max_length: int | None = None,
) -> Encoded:
    """Render and tokenise one conversation, training only on assistant turns.

    train_on="all" trains every assistant turn whose `train` is not False; "last" trains only the
    final assistant message (still skipped if it has train: False). Truncation cuts from the right;
    the result may then have no trained token at all (labels all IGNORE_INDEX), which is left for
    the caller to detect and drop rather than being patched here.
    """
    if train_on not in TRAIN_ON_CHOICES:
        raise ValueError(f"train_on={train_on!r} is not supported; use one of {TRAIN_ON_CHOICES}")
    if not messages:
        raise ValueError("cannot encode an empty conversation; every example needs at least one message")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length={max_length} must be a positive number of tokens, or None for no limit")

    full_text = render(
        [_without_train_flag(m) for m in messages], tokenizer, chat_template, add_generation_prompt=False
    )
    spans = _trained_char_spans(messages, tokenizer, chat_template, train_on, full_text)

    # Tokenise piecewise so that a token boundary falls exactly at each span edge, as at inference
    # (the prompt is tokenised up to the generation prompt, then the model generates). Special
    # tokens come only from the template text: add_special_tokens=False avoids a second BOS.
    input_ids: list[int] = []
    labels: list[int] = []
    trained_end = 0  # token index just past the last trained span
    cursor = 0
    for start, end in spans + [(len(full_text), len(full_text))]:
        prompt_ids = tokenizer.encode(full_text[cursor:start], add_special_tokens=False)
        turn_ids = tokenizer.encode(full_text[start:end], add_special_tokens=False)
        input_ids += prompt_ids + turn_ids
        # Labels are the token ids themselves, never masked by pad id: pad == eos == end-of-turn for
        # many chat models, and that token must be trained or the model never learns to stop.
        labels += [IGNORE_INDEX] * len(prompt_ids) + turn_ids
        if turn_ids:
            trained_end = len(input_ids)
        cursor = end

    # Guard the piecewise assumption: tokenisers that add something to every piece (e.g. a
    # SentencePiece "dummy prefix" space) would silently train on text that is not in the data.
    decoded = tokenizer.decode(input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if decoded != full_text:
        raise ValueError(
            "the tokenizer does not reproduce the rendered conversation when it is tokenised piece by piece "
            "(it changes the text at piece boundaries, e.g. adds a prefix space to each piece), so the "
            "trained tokens would not match the data; use a tokenizer without add_prefix_space/legacy "
            "SentencePiece behaviour (byte-level BPE such as Llama-3, Qwen or SmolLM tokenizers works)"
        )

    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    # Each span ends with its end-of-turn marker, so the marker survived iff the span's last token did.
    eot_trained = trained_end > 0 and trained_end <= len(input_ids)
    return Encoded(input_ids=input_ids, labels=labels, truncated=truncated, eot_trained=eot_trained)


def pack(
    examples: list[Encoded] | list[dict],
    max_length: int,
    pad_token_id: int | None = None,
) -> list[dict]:
    """Pack examples (Encoded or dicts with input_ids and labels) into rows of at most max_length.

    Greedy best-fit: each example goes into the open row with the least room that still fits it,
    else into a new row; examples are never split. Each row has input_ids, labels, position_ids
    (restarting at 0 per example) and seq_lens. With pad_token_id, rows are right-padded to
    max_length (labels IGNORE_INDEX, position_ids restarting at 0 so the padding is its own block
    and seq_lens excludes it), which lets rows be stacked into a batch.

    The model must get these rows with position_ids and WITHOUT attention_mask and with
    use_cache=False: transformers then detects the position restarts and builds block-diagonal
    causal attention. An attention_mask, or a KV cache (created by default when
    config.use_cache is True, even in training mode), switches that detection off and lets
    examples attend to each other. Trainer sets use_cache from TrainingArguments (False by default).
    """
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be a positive number of tokens")
    pairs = []
    for index, example in enumerate(examples):
        ids, labels = (
            (example.input_ids, example.labels)
            if isinstance(example, Encoded)
            else (example["input_ids"], example["labels"])
        )
        if len(ids) != len(labels):
            raise ValueError(
                f"example {index} has {len(ids)} input_ids but {len(labels)} labels; they must have equal length"
            )
        if not ids:
            raise ValueError(f"example {index} is empty; drop empty examples before packing")
        if len(ids) > max_length:
            raise ValueError(
                f"example {index} has {len(ids)} tokens, more than max_length={max_length}; "
                "truncate with encode_conversation(..., max_length=...) before packing"
            )
        pairs.append((ids, labels))

    rows: list[list[int]] = []  # example indices per row
    open_rows: list[tuple[int, int]] = []  # (free tokens, row index), sorted, only rows with room
    for index, (ids, _) in enumerate(pairs):
        slot = bisect.bisect_left(open_rows, (len(ids), -1))
        if slot == len(open_rows):
            row, free = len(rows), max_length
            rows.append([])
        else:
            free, row = open_rows.pop(slot)
        rows[row].append(index)
        if free - len(ids) > 0:
            bisect.insort(open_rows, (free - len(ids), row))

    packed = []
    for members in rows:
        row_ids: list[int] = []
        row_labels: list[int] = []
        position_ids: list[int] = []
        seq_lens: list[int] = []
        for index in members:
            ids, labels = pairs[index]
            row_ids += ids
            # The first token's label would be predicted from the previous example's last token;
            # ignoring it keeps every trained prediction inside its own example.
            row_labels += [IGNORE_INDEX] + list(labels[1:])
            position_ids += range(len(ids))
            seq_lens.append(len(ids))
        if pad_token_id is not None:
            padding = max_length - len(row_ids)
            row_ids += [pad_token_id] * padding
            row_labels += [IGNORE_INDEX] * padding
            position_ids += range(padding)
        packed.append(
            {"input_ids": row_ids, "labels": row_labels, "position_ids": position_ids, "seq_lens": seq_lens}
        )
    return packed


_PREVIEW_CSS = """
body { font-family: sans-serif; margin: 2em; }
.example { border: 1px solid #ccc; border-radius: 6px; padding: 1em; margin-bottom: 1.5em; }
.tokens { font-family: monospace; white-space: pre-wrap; line-height: 1.9; }
.tok { border: 1px solid #ddd; border-radius: 3px; padding: 0 1px; margin-right: 1px; }
.trained { background: #b6f2b0; color: #000; }
.untrained { background: #f3f3f3; color: #999; }
.special { font-weight: bold; border-color: #555; }
.warning { color: #b00; font-weight: bold; }
"""


def _token_span(token_id: int, label: int, tokenizer: Any, special_ids: set[int]) -> str:
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    # Show newlines as a visible symbol but keep the line break so the layout reads like the chat.
    shown = html.escape(text).replace("\n", "\u21b5\n")
    classes = ["tok", "untrained" if label == IGNORE_INDEX else "trained"]
    if token_id in special_ids:
        classes.append("special")
    raw = tokenizer.convert_ids_to_tokens(token_id)
    title = html.escape(f"id {token_id} {raw!r}", quote=True)
    return f'<span class="{" ".join(classes)}" title="{title}">{shown}</span>'


def preview_html(examples: list[Encoded], tokenizer: Any, n: int = 5) -> str:
    """A self-contained HTML page showing the first n examples token by token, trained tokens
    highlighted, so a human can check the mask before spending GPU time on it."""
    special_ids = set(tokenizer.all_special_ids)
    sections = []
    for number, example in enumerate(examples[:n]):
        trained = sum(label != IGNORE_INDEX for label in example.labels)
        notes = [f"{trained} trained / {len(example.input_ids)} total tokens"]
        if example.truncated:
            notes.append("truncated")
        if not example.eot_trained:
            notes.append('<span class="warning">end-of-turn token not trained</span>')
        if trained == 0:
            notes.append('<span class="warning">no trained tokens</span>')
        tokens = "".join(
            _token_span(token_id, label, tokenizer, special_ids)
            for token_id, label in zip(example.input_ids, example.labels)
        )
        sections.append(
            f'<div class="example"><h2>Example {number}</h2><p>{" · ".join(notes)}</p>'
            f'<div class="tokens">{tokens}</div></div>'
        )
    legend = (
        '<p>Legend: <span class="tok trained">trained</span> '
        '<span class="tok untrained">not trained</span> '
        '<span class="tok special trained">special token</span> '
        "(hover a token for its id; \u21b5 is a newline)</p>"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Chat training preview</title>'
        f"<style>{_PREVIEW_CSS}</style></head><body><h1>Chat training preview</h1>"
        f"<p>Showing {min(n, len(examples))} of {len(examples)} examples.</p>{legend}"
        f'{"".join(sections)}</body></html>\n'
    )
