"""Exact-token tests for tunekit.chat with the real SmolLM2 tokenizer (fixture in conftest.py)."""

import re
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunekit.chat import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    Encoded,
    encode_conversation,
    pack,
    preview_html,
    resolve_chat_template,
)

# (template spec, end-of-turn marker it writes after each message)
TEMPLATES = [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("model", "<|im_end|>")]

SYSTEM = {"role": "system", "content": "You are terse."}
MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And in words,\nplease?"},
    {"role": "assistant", "content": "Four.\nThat's it — ünïcode 日本."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome!"},
]


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of trained positions."""
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def assert_trained_exactly(tokenizer, encoded: Encoded, expected_texts: list[str]) -> None:
    """The trained positions are exactly one contiguous span per expected text, each decoding to it."""
    runs = trained_runs(encoded.labels)
    assert [decode(tokenizer, encoded.input_ids[s:e]) for s, e in runs] == expected_texts
    for s, e in runs:
        assert encoded.labels[s:e] == encoded.input_ids[s:e]
    assert sum(label != IGNORE_INDEX for label in encoded.labels) == sum(e - s for s, e in runs)
    assert len(encoded.labels) == len(encoded.input_ids)


def encode(messages, tokenizer, spec, **kwargs) -> Encoded:
    return encode_conversation(messages, tokenizer, resolve_chat_template(spec, tokenizer), **kwargs)


@pytest.mark.parametrize("spec,eot", TEMPLATES)
def test_single_turn_with_system_prompt(smollm2_tokenizer, spec, eot):
    messages = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    encoded = encode(messages, smollm2_tokenizer, spec)
    assert_trained_exactly(smollm2_tokenizer, encoded, ["Hello there." + eot])
    assert not encoded.truncated and encoded.eot_trained
    # The token stream is the full rendering, with no BOS added on top of the template's own.
    rendered = smollm2_tokenizer.apply_chat_template(
        messages, chat_template=resolve_chat_template(spec, smollm2_tokenizer), tokenize=False
    )
    assert decode(smollm2_tokenizer, encoded.input_ids) == rendered


@pytest.mark.parametrize("spec,eot", TEMPLATES)
def test_no_system_prompt(smollm2_tokenizer, spec, eot):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    encoded = encode(messages, smollm2_tokenizer, spec)
    assert_trained_exactly(smollm2_tokenizer, encoded, ["Hello there." + eot])
    text = decode(smollm2_tokenizer, encoded.input_ids)
    # Only the model's template injects its default system prompt; it must stay untrained.
    assert ("You are a helpful AI assistant named SmolLM" in text) == (spec == "model")


@pytest.mark.parametrize("spec,eot", TEMPLATES)
def test_multi_turn_trains_every_assistant_turn(smollm2_tokenizer, spec, eot):
    encoded = encode(MULTI_TURN, smollm2_tokenizer, spec)
    expected = [m["content"] + eot for m in MULTI_TURN if m["role"] == "assistant"]
    assert len(expected) == 3
    assert_trained_exactly(smollm2_tokenizer, encoded, expected)
    assert encoded.eot_trained


@pytest.mark.parametrize("spec,eot", TEMPLATES)
def test_train_false_on_middle_turn(smollm2_tokenizer, spec, eot):
    messages = [dict(m) for m in MULTI_TURN]
    messages[4]["train"] = False
    encoded = encode(messages, smollm2_tokenizer, spec)
    assert_trained_exactly(smollm2_tokenizer, encoded, ["4" + eot, "You're welcome!" + eot])
    # The flag is ours: it changes the mask, not the rendered text. (Token ids may differ: the
    # untrained turn is tokenised together with the prompt around it, as a history is at inference.)
    full_text = decode(smollm2_tokenizer, encode(MULTI_TURN, smollm2_tokenizer, spec).input_ids)
    assert decode(smollm2_tokenizer, encoded.input_ids) == full_text


@pytest.mark.parametrize("spec,eot", TEMPLATES)
def test_train_on_last(smollm2_tokenizer, spec, eot):
    encoded = encode(MULTI_TURN, smollm2_tokenizer, spec, train_on="last")
    assert_trained_exactly(smollm2_tokenizer, encoded, ["You're welcome!" + eot])
    assert encoded.eot_trained


def test_train_on_last_respects_train_false(smollm2_tokenizer):
    messages = [dict(m) for m in MULTI_TURN]
    messages[-1]["train"] = False
    encoded = encode(messages, smollm2_tokenizer, "model", train_on="last")
    assert set(encoded.labels) == {IGNORE_INDEX}
    assert not encoded.eot_trained


def test_marker_inside_content_does_not_split_the_turn(smollm2_tokenizer):
    # A marker search would end the turn early here; message boundaries do not.
    content = "Write <|im_end|> to stop, or <|im_start|>user to fake a turn."
    messages = [{"role": "user", "content": "How?"}, {"role": "assistant", "content": content}]
    encoded = encode(messages, smollm2_tokenizer, "model")
    assert_trained_exactly(smollm2_tokenizer, encoded, [content + "<|im_end|>"])


def test_default_template_trains_end_of_turn_token_equal_to_pad_and_eos(smollm2_tokenizer):
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == smollm2_tokenizer.pad_token_id == smollm2_tokenizer.eos_token_id
    encoded = encode(MULTI_TURN, smollm2_tokenizer, "model")
    assert encoded.labels.count(im_end) == 3  # one per assistant turn, none elsewhere
    for _s, e in trained_runs(encoded.labels):
        assert encoded.labels[e - 1] == im_end


@pytest.mark.parametrize("spec,eot", TEMPLATES)
def test_truncation_inside_last_assistant_turn(smollm2_tokenizer, spec, eot):
    full = encode(MULTI_TURN, smollm2_tokenizer, spec)
    _last_start, last_end = trained_runs(full.labels)[-1]
    max_length = last_end - 1  # drops the end-of-turn marker's last token
    cut = encode(MULTI_TURN, smollm2_tokenizer, spec, max_length=max_length)
    assert cut.truncated and not cut.eot_trained
    assert cut.input_ids == full.input_ids[:max_length] and cut.labels == full.labels[:max_length]
    texts = [decode(smollm2_tokenizer, cut.input_ids[s:e]) for s, e in trained_runs(cut.labels)]
    assert texts[:2] == ["4" + eot, MULTI_TURN[4]["content"] + eot]
    assert not texts[2].endswith(eot)


@pytest.mark.parametrize("spec,eot", TEMPLATES)
def test_truncation_before_any_assistant_turn_leaves_nothing_trained(smollm2_tokenizer, spec, eot):
    full = encode(MULTI_TURN, smollm2_tokenizer, spec)
    first_start = trained_runs(full.labels)[0][0]
    cut = encode(MULTI_TURN, smollm2_tokenizer, spec, max_length=first_start)
    assert cut.truncated and not cut.eot_trained
    assert len(cut.input_ids) == first_start
    assert set(cut.labels) == {IGNORE_INDEX}  # left for the caller to detect and drop


def test_no_truncation_at_exact_length(smollm2_tokenizer):
    full = encode(MULTI_TURN, smollm2_tokenizer, "chatml")
    exact = encode(MULTI_TURN, smollm2_tokenizer, "chatml", max_length=len(full.input_ids))
    assert exact == full and not exact.truncated and exact.eot_trained


def test_template_that_rewrites_earlier_turns_is_rejected(smollm2_tokenizer):
    # Numbering turns from the end changes every earlier turn when a message is appended.
    template = "{% for m in messages %}{{ m.role }} {{ loop.revindex }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(ValueError, match="not prefix-stable.*chatml"):
        encode_conversation(MULTI_TURN, smollm2_tokenizer, template)


def test_encode_rejects_bad_arguments(smollm2_tokenizer):
    template = BUILTIN_TEMPLATES["chatml"]
    with pytest.raises(ValueError, match="train_on='first'"):
        encode_conversation(MULTI_TURN, smollm2_tokenizer, template, train_on="first")
    with pytest.raises(ValueError, match="starts with an assistant message"):
        encode_conversation([{"role": "assistant", "content": "Hi"}], smollm2_tokenizer, template)


def test_resolve_chat_template(smollm2_tokenizer, tmp_path):
    assert resolve_chat_template("model", smollm2_tokenizer) == smollm2_tokenizer.chat_template
    assert resolve_chat_template("llama3", smollm2_tokenizer) == BUILTIN_TEMPLATES["llama3"]
    path = tmp_path / "mine.jinja"
    path.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert resolve_chat_template(str(path), smollm2_tokenizer) == "{{ messages[0]['content'] }}"
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        resolve_chat_template(str(tmp_path / "missing.jinja"), smollm2_tokenizer)
    with pytest.raises(ValueError, match="chatml"):
        resolve_chat_template("model", SimpleNamespace(chat_template=None))


def test_builtin_templates_generation_prompt(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]

    def render(name: str) -> str:
        return smollm2_tokenizer.apply_chat_template(
            messages, chat_template=BUILTIN_TEMPLATES[name], tokenize=False, add_generation_prompt=True
        )

    assert render("chatml") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render("llama3") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


# --- packing ---------------------------------------------------------------------------------


def conversations(n: int) -> list[list[dict]]:
    return [
        [
            {"role": "user", "content": f"Question {i}: " + "why? " * i},
            {"role": "assistant", "content": "Because. " * (i + 1)},
        ]
        for i in range(n)
    ]


def split_row(row: dict, key: str) -> list[list[int]]:
    pieces, offset = [], 0
    for length in row["seq_lens"]:
        pieces.append(row[key][offset : offset + length])
        offset += length
    return pieces


def test_pack_rows(smollm2_tokenizer):
    examples = [encode(c, smollm2_tokenizer, "model") for c in conversations(8)]
    max_length = 2 * max(len(e.input_ids) for e in examples)
    rows = pack(examples, max_length)
    assert len(rows) < len(examples)
    seen = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= max_length
        assert sum(row["seq_lens"]) == len(row["input_ids"])
        assert row["position_ids"] == [p for n in row["seq_lens"] for p in range(n)]
        # A trained label at t is predicted from token t-1: both must be in the same example.
        for t, label in enumerate(row["labels"]):
            if label != IGNORE_INDEX:
                assert row["position_ids"][t] > 0
        seen += list(zip(split_row(row, "input_ids"), split_row(row, "labels")))
    originals = [(e.input_ids, [IGNORE_INDEX] + e.labels[1:]) for e in examples]
    assert sorted(seen) == sorted(originals)  # every example once, whole, labels intact but the first


def test_pack_is_greedy_best_fit_and_pads(smollm2_tokenizer):
    lengths = [6, 5, 4, 3, 2]
    examples = [{"input_ids": [7] * n, "labels": [7] * n} for n in lengths]
    rows = pack(examples, 10)
    assert [row["seq_lens"] for row in rows] == [[6, 4], [5, 3, 2]]
    pad = smollm2_tokenizer.pad_token_id
    padded = pack(examples[:2], 10, pad_token_id=pad)
    assert [row["seq_lens"] for row in padded] == [[6], [5]]
    row = padded[1]
    assert row["input_ids"] == [7] * 5 + [pad] * 5
    assert row["labels"] == [IGNORE_INDEX] + [7] * 4 + [IGNORE_INDEX] * 5
    assert row["position_ids"] == list(range(5)) + list(range(5))


def test_pack_rejects_overlong_example():
    with pytest.raises(ValueError, match="example 1 has 5 tokens.*max_length=4"):
        pack([{"input_ids": [1], "labels": [1]}, {"input_ids": [1] * 5, "labels": [1] * 5}], 4)


def tiny_llama(tokenizer, attn_implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_row_logits_equal_separate_logits(smollm2_tokenizer, attn_implementation):
    """transformers 5 builds block-diagonal causal attention from restarting position_ids when no
    attention_mask and no cache is given (masking_utils.find_packed_sequence_indices)."""
    model = tiny_llama(smollm2_tokenizer, attn_implementation)
    examples = [encode(c, smollm2_tokenizer, "model") for c in conversations(3)]
    max_length = sum(len(e.input_ids) for e in examples) + 5  # one row, plus padding
    (row,) = pack(examples, max_length, pad_token_id=smollm2_tokenizer.pad_token_id)
    assert row["seq_lens"] == [len(e.input_ids) for e in examples]
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([row["input_ids"]]),
            position_ids=torch.tensor([row["position_ids"]]),
            use_cache=False,
        ).logits[0]
        offset = 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[offset : offset + len(alone)], alone, atol=1e-5, rtol=0)
            offset += len(alone)


def test_packed_row_leaks_across_examples_with_kv_cache(smollm2_tokenizer):
    """Why the stage must pass use_cache=False: config.use_cache defaults to True, the model then
    creates a cache and transformers skips packed-sequence detection, so examples see each other."""
    model = tiny_llama(smollm2_tokenizer, "sdpa")
    examples = [encode(c, smollm2_tokenizer, "model") for c in conversations(2)]
    (row,) = pack(examples, 1000)
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([row["input_ids"]]), position_ids=torch.tensor([row["position_ids"]])
        ).logits[0]
        second = model(input_ids=torch.tensor([examples[1].input_ids])).logits[0]
    leak = (packed[len(examples[0].input_ids) :] - second).abs().max().item()
    assert leak > 1e-3, "transformers now isolates packed examples even with a cache; drop the use_cache caveat"


# --- preview ---------------------------------------------------------------------------------


def test_preview_html_escapes_and_marks_trained_tokens(smollm2_tokenizer):
    messages = [
        {"role": "user", "content": "<script>alert('user')</script>"},
        {"role": "assistant", "content": "Sure: <script>alert(1)</script> & done"},
    ]
    encoded = encode(messages, smollm2_tokenizer, "model")
    page = preview_html([encoded], smollm2_tokenizer)
    assert "<script" not in page
    assert "alert" in page and "&lt;" in page and "&amp;" in page
    token_classes = re.findall(r'<span class="tok (trained|untrained)[^"]*" title=', page)
    trained = sum(label != IGNORE_INDEX for label in encoded.labels)
    assert token_classes.count("trained") == trained
    assert len(token_classes) == len(encoded.input_ids)
    assert f"{trained} trained / {len(encoded.input_ids)} total tokens" in page
    # The end-of-turn special token is visible, escaped, and marked trained.
    assert re.search(r'<span class="tok trained special" title="[^"]*">&lt;\|im_end\|&gt;</span>', page)


def test_mask_ignores_truncation_and_padding_left_on_the_tokenizer_by_earlier_calls(smollm2_tokenizer):
    """transformers keeps the truncation and padding of its last call on the backend tokenizer (a QA window
    sets `only_second`); the mask, which calls the backend directly, must not inherit them, and leaves them."""
    clean = encode(MULTI_TURN, smollm2_tokenizer, "model")
    smollm2_tokenizer("a question", "a long context " * 50, truncation="only_second", max_length=16, padding="max_length")
    truncation, padding = smollm2_tokenizer.backend_tokenizer.truncation, smollm2_tokenizer.backend_tokenizer.padding
    assert truncation is not None and padding is not None
    try:
        again = encode(MULTI_TURN, smollm2_tokenizer, "model")
        assert (again.input_ids, again.labels) == (clean.input_ids, clean.labels)
        assert smollm2_tokenizer.backend_tokenizer.truncation == truncation
        assert smollm2_tokenizer.backend_tokenizer.padding == padding
    finally:
        smollm2_tokenizer.backend_tokenizer.no_truncation()
        smollm2_tokenizer.backend_tokenizer.no_padding()
