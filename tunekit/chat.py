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
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
import itertools

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


def render(messages: list[dict], tokenizer: Any, chat_template: str, add_generation_prompt: bool,
           tools: list[dict] | None = None) -> str:
    """The conversation as text, exactly as the template writes it (special tokens as text).
    `tools`: the function schemas offered to the model, for templates that render them."""
    return tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def end_of_turn_marker(tokenizer: Any, chat_template: str) -> str:
    """The text a template writes after an assistant's content to close the turn (e.g. <|im_end|>),
    found from message boundaries: what follows the content in a rendered assistant turn. Whitespace
    the template writes before the content (Llama-2's ' ' + content + ' </s>') is not part of it."""
    probe = "tunekit-probe-answer"
    history = [{"role": "user", "content": "q"}]
    prompt = render(history, tokenizer, chat_template, add_generation_prompt=True)
    turn = render(history + [{"role": "assistant", "content": probe}], tokenizer, chat_template, add_generation_prompt=False)
    segment = turn[len(prompt):].strip()
    if not segment.startswith(probe) or segment == probe:
        raise ValueError(f"{_describe_template(chat_template, tokenizer)} writes no end-of-turn marker after an "
                         "assistant message, so generation could not know where a turn ends; use 'chatml' or 'llama3'")
    return segment[len(probe):]


def _trained_char_spans(
    messages: list[dict], tokenizer: Any, chat_template: str, train_on: str, full_text: str,
    tools: list[dict] | None = None,
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
        prompt = render(history, tokenizer, chat_template, add_generation_prompt=True, tools=tools)
        with_turn = render(history + [turn], tokenizer, chat_template, add_generation_prompt=False, tools=tools)
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
        if turn.get("tool_calls"):
            _check_tool_calls_rendered(turn["tool_calls"], with_turn[len(prompt):], chat_template, tokenizer, k)
        # max(): a turn rendering as whitespace only gives an empty span, not a backwards one.
        spans.append((len(prompt), max(len(prompt), len(with_turn.rstrip()))))
    return spans


def _check_tool_calls_rendered(calls: list[dict], turn_text: str, chat_template: str, tokenizer: Any, k: int) -> None:
    """A template without tool support renders a tool-calling turn as its (often empty) content only:
    training on that would teach the model to answer with nothing. Each call's function name and
    argument names must appear in the turn's rendering."""
    for call in calls:
        function = call.get("function", call)
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        wanted = [function["name"], *(json.dumps(key, ensure_ascii=False) for key in arguments)]
        missing = [text for text in wanted if text not in turn_text]
        if missing:
            raise ValueError(
                f"{_describe_template(chat_template, tokenizer)} cannot render tool calls: messages[{k}] calls "
                f"{function['name']!r} but the rendered turn lacks {', '.join(map(repr, missing))}, so the trained "
                "tokens would not contain the call; use a chat template that renders `tool_calls` (e.g. the "
                "model's own template of a tool-capable model such as Qwen2.5 or Llama-3.1), or drop tool data"
            )


def _without_train_flag(message: dict) -> dict:
    # `train` is our annotation, not something a chat template should see.
    return {key: value for key, value in message.items() if key != "train"}


def encode_conversation(
    messages: list[dict],
    tokenizer: Any,
    chat_template: str,
    train_on: str = "all",
    max_length: int | None = None,
    tools: list[dict] | None = None,
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

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) is a slow (Python) tokenizer: it gives no character "
            "offsets per token, which the loss mask needs to map trained text to tokens exactly; load the "
            "model's fast tokenizer (a tokenizer.json, or AutoTokenizer with use_fast=True)"
        )
    full_text = render(
        [_without_train_flag(m) for m in messages], tokenizer, chat_template, add_generation_prompt=False, tools=tools
    )
    spans = _trained_char_spans(messages, tokenizer, chat_template, train_on, full_text, tools)

    input_ids, offsets = _tokenize_at_edges(full_text, spans, tokenizer)
    # Labels are the token ids themselves, never masked by pad id: pad == eos == end-of-turn for many
    # chat models, and that token must be trained or the model never learns to stop.
    labels = [IGNORE_INDEX] * len(input_ids)
    trained_end = 0  # token index just past the last trained token
    token = 0
    checks = []  # (first token, stop token, text they must decode to)
    for start, end in spans:
        while token < len(offsets) and offsets[token][1] <= start:
            token += 1
        first = token
        while token < len(offsets) and offsets[token][0] < end:
            token += 1
        labels[first:token] = input_ids[first:token]
        if token > first:
            trained_end = token
            checks.append((first, token, full_text[start:end]))
    for first, stop, text in checks:
        _check_decodes_to(input_ids, first, stop, text, tokenizer)

    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    # Each span ends with its end-of-turn marker, so the marker survived iff the span's last token did.
    eot_trained = trained_end > 0 and trained_end <= len(input_ids)
    return Encoded(input_ids=input_ids, labels=labels, truncated=truncated, eot_trained=eot_trained)


def _tokenize_at_edges(full_text: str, spans: list[tuple[int, int]], tokenizer: Any
                       ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of the whole rendering, with a token boundary at every span edge.

    Each span edge is a cut: the text on either side is tokenised separately, as at inference, where the
    prompt is tokenised up to the generation prompt and generation stops at the end-of-turn marker (a
    byte-level BPE merges "\n\n" into one token at the end of a prompt but not before "{"). A tokenizer
    that adds text to a piece tokenised on its own (a SentencePiece dummy prefix: "▁" before the
    piece) cannot be cut there; across such an edge the text is tokenised in one, which is how it
    tokenises the model's output after the prompt, and a token may then not straddle the edge
    (half prompt, half answer: it could neither be trained nor left out). Special tokens come only
    from the template text: add_special_tokens=False avoids a second BOS.
    """
    edges = sorted({edge for span in spans for edge in span} - {0, len(full_text)})
    ids, offsets = _tokenize_pieces(full_text, edges, tokenizer)
    cuts = [cut for cut in edges if _piece_keeps_text(full_text, ids, offsets, cut, tokenizer)]
    if cuts != edges:
        ids, offsets = _tokenize_pieces(full_text, cuts, tokenizer)
        for s, e in offsets:
            k = bisect.bisect_right(edges, s)
            if k < len(edges) and edges[k] < e:
                raise ValueError(
                    f"a token straddles the edge of a trained assistant turn at character {edges[k]} of the "
                    f"rendered conversation ({full_text[s:e]!r} is one token, part prompt or template text "
                    "and part answer), and this tokenizer changes text tokenised on its own (a dummy-prefix "
                    "space), so the edge cannot be cut either: exactly the answer and its end-of-turn marker "
                    "could not be trained; use a chat template with a newline, space or special token before "
                    "the answer and an end-of-turn special token after it"
                )
    return ids, offsets


def _tokenize_pieces(full_text: str, cuts: list[int], tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    bounds = [0, *cuts, len(full_text)]
    pieces = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if lo < hi]
    # The backend (Rust) tokenizer directly: what `tokenizer(..., return_offsets_mapping=True)` runs,
    # without its per-call Python overhead, which was most of the stage's time. transformers leaves the
    # truncation and padding of its last call (e.g. a QA window's `only_second`) set on the backend, so
    # they are lifted for these calls and put back after.
    backend = tokenizer.backend_tokenizer
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        encodings = [backend.encode(full_text[lo:hi], add_special_tokens=False) for lo, hi in pieces]
    finally:
        if truncation:
            backend.enable_truncation(**truncation)
        if padding:
            backend.enable_padding(**padding)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for (lo, _), encoding in zip(pieces, encodings):
        ids += encoding.ids
        offsets += [(lo + s, lo + e) for s, e in encoding.offsets]
    return ids, offsets


def _piece_keeps_text(full_text: str, ids: list[int], offsets: list[tuple[int, int]], cut: int, tokenizer: Any) -> bool:
    """Whether the first token of the piece starting at `cut` stands for just its own text."""
    k = bisect.bisect_left(offsets, (cut, -1))
    if k == len(offsets):
        return True
    return _decoded_text(ids, k, k + 1, tokenizer) == full_text[offsets[k][0]:offsets[k][1]]


_CONTEXT_TOKENS = 4  # decoded before the tokens checked; keeps the check's cost independent of the position


def _decoded_text(ids: list[int], first: int, stop: int, tokenizer: Any) -> str | None:
    """The text tokens first..stop-1 add to the decoded tokens just before them (None if decoding them
    changes those). Decoding a few tokens before them too keeps a decoder's strip of the first space of
    what it decodes (SentencePiece's dummy prefix) off the tokens checked."""
    context = max(0, first - _CONTEXT_TOKENS)
    before = tokenizer.decode(ids[context:first], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    through = tokenizer.decode(ids[context:stop], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return through[len(before):] if through.startswith(before) else None


def _check_decodes_to(ids: list[int], first: int, stop: int, text: str, tokenizer: Any) -> None:
    """Refuse unless tokens first..stop-1 stand for exactly `text`.

    The text they add to the tokens decoded just before them is compared, character for character.
    This catches tokenizers that add text the rendering lacks: a legacy SentencePiece tokenizer puts a
    "▁" space after every special token, so an answer right after one would be trained with a space
    that is not in the data; a SentencePiece dummy prefix does the same to a piece tokenised on its
    own; an unknown character becomes <unk>.
    """
    got = _decoded_text(ids, first, stop, tokenizer)
    if got != text:
        raise ValueError(
            f"the tokens for {text[:80]!r} in the rendered conversation decode to {(got or '')[:80]!r}: the tokenizer "
            "adds or changes text there (e.g. a legacy SentencePiece tokenizer inserts a '▁' space after "
            "special tokens, a dummy prefix adds one to a piece tokenised on its own, an unknown character "
            "becomes <unk>), so the trained tokens would not match the data; load the tokenizer with "
            "legacy=False, or use a chat template that writes plain text (a space or newline) rather than a "
            "special token right before the answer and an end-of-turn special token after it"
        )


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
