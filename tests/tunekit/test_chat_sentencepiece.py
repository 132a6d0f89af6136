"""Exact-token masks with SentencePiece tokenizers (the Llama-2 / Mistral / TinyLlama family), legacy and
not, with and without the dummy prefix, in Llama-2 and Mistral style chat templates.

The tokenizers are real: `sentencepiece` trains a small BPE model on Python's own documentation text
in the test, and transformers converts it to a fast tokenizer exactly as it converts a model's
tokenizer.model (Metaspace pre-tokenizer; legacy=True prepends the "▁" after every special token).
"""

from __future__ import annotations

import shutil

import pytest
from transformers import AddedToken, BertGenerationTokenizer, LlamaTokenizerFast

from tests.conftest import train_sentencepiece
from tests.tunekit.test_chat import trained_runs
from tunekit.chat import IGNORE_INDEX, encode_conversation, end_of_turn_marker, pack, render

# Modelled on meta-llama/Llama-2-7b-chat-hf's template: the system prompt inside the first [INST],
# each answer written as ' ' + content.strip() + ' ' + eos_token, no generation prompt.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Modelled on Mistral-7B-Instruct v0.1/v0.2: [INST] is plain text, the answer follows [/INST] directly.
MISTRAL_TEXT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Modelled on Mistral-7B-Instruct v0.3: [INST]/[/INST] are control (special) tokens, an answer is
# ' ' + content + eos_token. v0.3 writes the system prompt into the LAST user message (MISTRAL_V03_SYSTEM),
# which rewrites earlier turns as a conversation grows; this one writes it into the first.
MISTRAL_V03_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
MISTRAL_CONTROL = MISTRAL_V03_SYSTEM.replace("loop.last and system_message", "loop.first and system_message")

# (name, template, the text the template writes for an answer `c`: what must be trained)
TEMPLATES = [
    ("llama2", LLAMA2, lambda c: f" {c} </s>"),
    ("mistral-text", MISTRAL_TEXT, lambda c: f"{c}</s>"),
    ("mistral-control", MISTRAL_CONTROL, lambda c: f" {c}</s>"),
    # Mistral v0.1's template with [INST]/[/INST] as control tokens: the answer follows a special token.
    ("mistral-control-tight", MISTRAL_TEXT, lambda c: f"{c}</s>"),
]
# legacy: SentencePiece's historical behaviour (Llama-2, Mistral v0.1); add_prefix_space: the dummy prefix.
CONFIGS = [(True, True), (True, False), (False, True), (False, False)]

SYSTEM = {"role": "system", "content": "Answer briefly."}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "What does the return statement do?"},
    {"role": "assistant", "content": "It leaves the function with a value."},
    {"role": "user", "content": "And without an expression?"},
    {"role": "assistant", "content": "Then None is returned — ünïcode 日本 too."},
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    path = train_sentencepiece(tmp_path_factory.mktemp("sentencepiece") / "tokenizer.model")
    return str(path)


def tokenizer_for(sp_model: str, tmp_path, legacy: bool, add_prefix_space: bool, control_tokens: bool):
    directory = tmp_path / f"tok-{legacy}-{add_prefix_space}-{control_tokens}"
    directory.mkdir(exist_ok=True)
    shutil.copy(sp_model, directory / "tokenizer.model")
    tokenizer = LlamaTokenizerFast.from_pretrained(directory, legacy=legacy, add_prefix_space=add_prefix_space)
    assert tokenizer.is_fast and tokenizer.eos_token == "</s>" and tokenizer.bos_token == "<s>"
    # The behaviours under test are really there: the dummy prefix on text tokenised on its own, and
    # legacy's "▁" inserted after a special token.
    assert tokenizer.tokenize("It")[0].startswith("▁") == add_prefix_space
    assert tokenizer.tokenize("</s>It")[1].startswith("▁") == (legacy and add_prefix_space)
    if control_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": [
            AddedToken("[INST]", special=True, normalized=False), AddedToken("[/INST]", special=True, normalized=False)]})
    return tokenizer


def in_context(tokenizer, ids: list[int], start: int, stop: int) -> str:
    """The text tokens start..stop-1 stand for: what they add to the decoded prefix before them."""
    before = tokenizer.decode(ids[:start], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    through = tokenizer.decode(ids[:stop], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert through.startswith(before)
    return through[len(before):]



def assert_exact_mask(tokenizer, template: str, messages: list[dict], encoded, expected: list[str]) -> None:
    """Trained tokens: one run per expected text, standing for exactly it; labels equal to the ids there;
    the tokens before each run are exactly the ids inference feeds for that turn's prompt."""
    runs = trained_runs(encoded.labels)
    assert [in_context(tokenizer, encoded.input_ids, s, e) for s, e in runs] == expected
    for s, e in runs:
        assert encoded.labels[s:e] == encoded.input_ids[s:e]
    trained_turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and m.get("train") is not False]
    for (s, _), k in zip(runs, trained_turns):
        prompt = render(messages[:k], tokenizer, template, add_generation_prompt=True)
        assert encoded.input_ids[:s] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def answers(messages: list[dict], written) -> list[str]:
    return [written(m["content"]) for m in messages if m["role"] == "assistant" and m.get("train") is not False]


def refused(name: str, legacy: bool, add_prefix_space: bool) -> bool:
    # legacy SentencePiece prepends "▁" to text right after a special token: an answer written right
    # after the [/INST] control token would be trained with a space that is not in the data.
    return name == "mistral-control-tight" and legacy and add_prefix_space


@pytest.mark.parametrize("legacy,add_prefix_space", CONFIGS)
@pytest.mark.parametrize("name,template,written", TEMPLATES)
def test_multi_turn_with_system_prompt(sp_model, tmp_path, name, template, written, legacy, add_prefix_space):
    tokenizer = tokenizer_for(sp_model, tmp_path, legacy, add_prefix_space, name.startswith("mistral-control"))
    if refused(name, legacy, add_prefix_space):
        with pytest.raises(ValueError, match="decode to ' It leaves.*legacy=False"):
            encode_conversation(CONVERSATION, tokenizer, template)
        return
    encoded = encode_conversation(CONVERSATION, tokenizer, template)
    expected = answers(CONVERSATION, written)
    assert_exact_mask(tokenizer, template, CONVERSATION, encoded, expected)
    assert encoded.eot_trained and not encoded.truncated
    assert encoded.input_ids.count(tokenizer.eos_token_id) == 2
    # Both end-of-turn tokens are trained, and no other </s> is in the stream.
    untrained = [i for i, label in enumerate(encoded.labels) if label == IGNORE_INDEX]
    assert all(encoded.input_ids[i] != tokenizer.eos_token_id for i in untrained)


@pytest.mark.parametrize("name,template,written,legacy,add_prefix_space", [
    (*t, *c) for t in TEMPLATES for c in CONFIGS if not refused(t[0], *c)])
def test_train_false_and_truncation(sp_model, tmp_path, name, template, written, legacy, add_prefix_space):
    tokenizer = tokenizer_for(sp_model, tmp_path, legacy, add_prefix_space, name.startswith("mistral-control"))
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["train"] = False
    encoded = encode_conversation(messages, tokenizer, template)
    assert_exact_mask(tokenizer, template, messages, encoded, answers(messages, written))

    full = encode_conversation(CONVERSATION, tokenizer, template)
    last_start, last_end = trained_runs(full.labels)[-1]
    cut = encode_conversation(CONVERSATION, tokenizer, template, max_length=last_end - 1)
    assert cut.truncated and not cut.eot_trained
    assert cut.input_ids == full.input_ids[:last_end - 1] and cut.labels == full.labels[:last_end - 1]
    assert in_context(tokenizer, cut.input_ids, last_start, last_end - 1) == written(CONVERSATION[-1]["content"])[:-len("</s>")]


@pytest.mark.parametrize("name,template,written", TEMPLATES[:2])
def test_llama2_legacy_dummy_prefix_and_packing(sp_model, tmp_path, name, template, written):
    """The real Llama-2 / Mistral v0.1 configuration (legacy, dummy prefix), packed."""
    tokenizer = tokenizer_for(sp_model, tmp_path, True, True, False)
    conversations = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes. " * (i + 1)
                      + f"Number {i}."}] for i in range(4)]
    encoded = [encode_conversation(c, tokenizer, template) for c in conversations]
    for conversation, example in zip(conversations, encoded):
        assert_exact_mask(tokenizer, template, conversation, example, answers(conversation, written))
    rows = pack(encoded, max_length=2 * max(len(e.input_ids) for e in encoded))
    assert len(rows) < len(encoded)
    pieces = []
    for row in rows:
        offset = 0
        for length in row["seq_lens"]:
            pieces.append((row["input_ids"][offset:offset + length], row["labels"][offset:offset + length]))
            offset += length
    assert sorted(pieces) == sorted((e.input_ids, [IGNORE_INDEX] + e.labels[1:]) for e in encoded)


def test_exact_llama2_tokens(sp_model, tmp_path):
    """One case spelled out token by token: the answer's leading space is its first token's "▁", the
    space before </s> is its own "▁" token, and </s> is trained."""
    tokenizer = tokenizer_for(sp_model, tmp_path, True, True, False)
    messages = [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": "It is."}]
    encoded = encode_conversation(messages, tokenizer, LLAMA2)
    ((s, e),) = trained_runs(encoded.labels)
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids[s:e]) == ["▁It", "▁is", ".", "▁", "</s>"]
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids[:s])[-2:] == ["T", "]"]


def test_slow_tokenizer_is_refused(sp_model):
    slow = BertGenerationTokenizer(vocab_file=sp_model)
    assert not slow.is_fast
    with pytest.raises(ValueError, match="slow \\(Python\\) tokenizer.*no character offsets.*fast tokenizer"):
        encode_conversation(CONVERSATION[1:3], slow, MISTRAL_TEXT)


def test_system_prompt_in_the_last_user_turn_is_refused(sp_model, tmp_path):
    """Mistral v0.3's own placement writes the system prompt into the user message that is the last
    message, so a prompt (ending with the user turn) has it and the finished conversation (ending with
    the answer) does not: the prompt is not a prefix of the conversation, even for one turn, and masking
    by message boundaries refuses it rather than train on a rendering the model never sees at inference."""
    tokenizer = tokenizer_for(sp_model, tmp_path, False, True, True)
    for messages in (CONVERSATION, CONVERSATION[:3]):
        with pytest.raises(ValueError, match="not prefix-stable"):
            encode_conversation(messages, tokenizer, MISTRAL_V03_SYSTEM)
    assert SYSTEM["content"] not in render(CONVERSATION[:3], tokenizer, MISTRAL_V03_SYSTEM, add_generation_prompt=False)


@pytest.mark.parametrize("name,template,written", TEMPLATES)
def test_end_of_turn_marker(sp_model, tmp_path, name, template, written):
    """The stop string generation uses is what the template writes after an answer's content."""
    tokenizer = tokenizer_for(sp_model, tmp_path, False, True, name.startswith("mistral-control"))
    assert end_of_turn_marker(tokenizer, template) == written("x").split("x", 1)[1]


# A template whose generation prompt ends inside a word: the answer "re is ..." completes "the".
MID_WORD = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\\nA: the' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("add_prefix_space", [True, False])
def test_token_across_the_turn_edge(sp_model, tmp_path, add_prefix_space):
    """In one piece "the|re" is the token "▁there", half prompt and half answer. Without a dummy prefix
    the text is cut at the edge (as at inference); with one, tokenising "re ..." on its own would add a
    space, so the edge can be neither cut nor straddled, and the conversation is refused."""
    tokenizer = tokenizer_for(sp_model, tmp_path, False, add_prefix_space, False)
    messages = [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": "re is no value."}]
    assert "\u2581there" in tokenizer.tokenize("A: there is no value.")
    if add_prefix_space:
        with pytest.raises(ValueError, match="token straddles the edge.*' there' is one token"):
            encode_conversation(messages, tokenizer, MID_WORD)
        return
    encoded = encode_conversation(messages, tokenizer, MID_WORD)
    assert_exact_mask(tokenizer, MID_WORD, messages, encoded, ["re is no value.</s>"])
