"""Tool-calling conversations: ingest's checks and rejects, and exact masks with a tools-capable template
(Qwen2.5 / Hermes style: ChatML with <tool_call> JSON) on the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import template as template_stage
from tunekit.chat import IGNORE_INDEX, encode_conversation, render, resolve_chat_template
from tunekit.generate import prompts_from_conversations
from tunekit.ingest import Record, Reject, ingest, read_file
from tunekit.data import read_split
from tunekit.params import TemplateParams

from tests.tunekit.test_chat import assert_trained_exactly, decode

# Modelled on Qwen2.5-Instruct's template: tools listed in the system turn, each call as <tool_call> JSON
# after the assistant header, consecutive tool results grouped into one user turn of <tool_response>s.
QWEN25 = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags.<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def call(name: str, arguments, call_id: str | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}, **({"id": call_id} if call_id else {})}


def tool_line(messages: list[dict], tools: list[dict] | None = (WEATHER, TIME)) -> bytes:
    return json.dumps({"messages": messages, **({"tools": list(tools)} if tools else {})}).encode()


USER = {"role": "user", "content": "Weather in Oslo and the time?"}
CALLS = {"role": "assistant", "content": None,
         "tool_calls": [call("get_weather", '{"city": "Oslo"}', "c1"), call("get_time", {}, "c2")]}
RESULTS = [{"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": '{"temp": 3}'},
           {"role": "tool", "tool_call_id": "c2", "content": "14:05"}]
ANSWER = {"role": "assistant", "content": "3 degrees in Oslo; it is 14:05."}
GOOD = [USER, CALLS, *RESULTS, ANSWER]

# (expected reason, None for an accepted line; the raw line)
CORPUS: list[tuple[str | None, bytes]] = [
    (None, tool_line(GOOD)),
    (None, tool_line([USER, CALLS], tools=None)),  # no tools given: any function name, ends with the call
    ("tool_result_without_call", tool_line([USER, RESULTS[0], ANSWER])),
    ("tool_result_without_call", tool_line([USER, CALLS, {"role": "user", "content": "wait"}, RESULTS[0], ANSWER])),
    ("unknown_tool_call_id", tool_line([USER, CALLS, {**RESULTS[0], "tool_call_id": "c9"}, ANSWER])),
    ("unknown_tool_call_id", tool_line([USER, CALLS, {**RESULTS[0], "name": "get_time"}, ANSWER])),
    ("malformed_tool_arguments", tool_line([USER, {**CALLS, "tool_calls": [call("get_weather", '{"city": Oslo}')]}])),
    ("malformed_tool_arguments", tool_line([USER, {**CALLS, "tool_calls": [call("get_weather", '["Oslo"]')]}])),
    ("unknown_tool", tool_line([USER, {**CALLS, "tool_calls": [call("get_wether", {"city": "Oslo"})]}])),
    ("wrong_type", tool_line([USER, {**CALLS, "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}])),
    ("wrong_type", tool_line([USER, {**CALLS, "tool_calls": [{"type": "function", "function": {"name": "get_time"}}]}])),
    ("wrong_type", tool_line([USER, {**CALLS, "tool_calls": []}])),  # [] is no calls: then content null is wrong
    ("wrong_type", json.dumps({"messages": [USER, ANSWER], "tools": {"name": "get_time"}}).encode()),
    ("wrong_type", tool_line([USER, {"role": "assistant", "tool_calls": [call("get_time", {})]},
                              {"role": "tool", "tool_call_id": 7, "content": "x"}, ANSWER])),
]


def test_tool_data_rejects_name_line_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    path.write_bytes(b"".join(line + b"\n" for _, line in CORPUS))
    items = list(read_file(path))
    assert [(item.line, item.reason if isinstance(item, Reject) else None) for item in items] == [
        (n, reason) for n, (reason, _) in enumerate(CORPUS, 1)]
    details = {item.line: item.detail for item in items if isinstance(item, Reject)}
    assert details[3].startswith("messages[1] is a tool result but no assistant message with tool_calls")
    assert 'messages[2].tool_call_id is "c9" but the calls before it have ids "c1", "c2"' in details[5]
    assert "messages[1].tool_calls[0].function.arguments is not valid JSON" in details[7]
    assert 'messages[1].tool_calls[0].function.name is "get_wether", which is not in the record\'s tools' in details[9]
    assert "messages[1].tool_calls[0].function.name is missing" in details[10]
    assert "messages[1].tool_calls[0].function.arguments is missing" in details[11]

    record = items[0]
    assert isinstance(record, Record) and record.tools == [WEATHER, TIME]
    # OpenAI's JSON-string arguments become the object templates render; a text-less call has content "".
    assert record.messages[1] == {"role": "assistant", "content": "",
                                  "tool_calls": [call("get_weather", {"city": "Oslo"}, "c1"), call("get_time", {}, "c2")]}
    assert record.messages[2] == {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "c1", "name": "get_weather"}


def test_ingest_writes_tools_and_hashes_them(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    plain = [USER, ANSWER]
    # Empty tools and tool_calls, as exports write them, are no tools: a duplicate of the plain record.
    empty = json.dumps({"tools": [], "messages": [USER, {**ANSWER, "tool_calls": []}]}).encode()
    lines = [tool_line(GOOD), tool_line(plain), tool_line(plain, tools=None), empty]
    (tmp_path / "in/a.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    metrics = ingest(tmp_path / "in", tmp_path / "out", validation=0, test=0)
    assert metrics["accepted"] == 3 and metrics["duplicates"] == 1  # the same messages with and without tools differ
    rows = list(read_split(tmp_path / "out", "train"))
    assert [row.get("tools") for row in rows] == [[WEATHER, TIME], [WEATHER, TIME], None]
    assert len({row["id"] for row in rows}) == 3


def parsed(tmp_path: Path, line: bytes) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools ingest makes of one line."""
    path = tmp_path / "one.jsonl"
    path.write_bytes(line + b"\n")
    [record] = read_file(path)
    return record.messages, record.tools


def test_tool_calls_are_trained_and_tool_results_are_not(smollm2_tokenizer, tmp_path: Path) -> None:
    messages, tools = parsed(tmp_path, tool_line(GOOD))
    encoded = encode_conversation(messages, smollm2_tokenizer, QWEN25, tools=tools)
    calls_text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                  '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>')
    assert_trained_exactly(smollm2_tokenizer, encoded, [calls_text, ANSWER["content"] + "<|im_end|>"])
    assert encoded.eot_trained
    text = decode(smollm2_tokenizer, encoded.input_ids)
    # The schemas and the results are in the prompt, untrained.
    assert '"description": "Current weather of a city"' in text
    assert "<tool_response>\n{\"temp\": 3}\n</tool_response>\n<tool_response>\n14:05\n</tool_response>" in text
    trained = decode(smollm2_tokenizer, [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])
    assert "temp" not in trained and "14:05\n</tool_response>" not in trained and "Current weather" not in trained

    # A call with text before it trains both; train: false keeps the call out of the loss.
    with_text = [USER, {**messages[1], "content": "Let me look."}, *messages[2:]]
    encoded = encode_conversation(with_text, smollm2_tokenizer, QWEN25, tools=tools)
    assert_trained_exactly(smollm2_tokenizer, encoded, ["Let me look.\n" + calls_text, ANSWER["content"] + "<|im_end|>"])
    untrained_call = [USER, {**messages[1], "train": False}, *messages[2:]]
    encoded = encode_conversation(untrained_call, smollm2_tokenizer, QWEN25, tools=tools)
    assert_trained_exactly(smollm2_tokenizer, encoded, [ANSWER["content"] + "<|im_end|>"])


@pytest.mark.parametrize("spec,named", [("chatml", "builtin chat template 'chatml'"),
                                        ("model", "the model's own chat template")])
def test_template_without_tool_support_is_refused(smollm2_tokenizer, tmp_path: Path, spec, named) -> None:
    messages, tools = parsed(tmp_path, tool_line(GOOD))
    template = resolve_chat_template(spec, smollm2_tokenizer)
    with pytest.raises(ValueError, match=f"{named} cannot render tool calls: messages\\[1\\] calls 'get_weather'"):
        encode_conversation(messages, smollm2_tokenizer, template, tools=tools)
    # The same template still encodes conversations without tool calls.
    assert encode_conversation([USER, ANSWER], smollm2_tokenizer, template).eot_trained


def test_template_stage_renders_the_records_tools(tiny_model_dir, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    lines = [tool_line([{**USER, "content": f"Weather in city {i}?"}, *GOOD[1:]]) for i in range(6)]
    (tmp_path / "in/a.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    ingest(tmp_path / "in", tmp_path / "ingested")
    (tmp_path / "qwen.jinja").write_text(QWEN25, encoding="utf-8")
    params = TemplateParams(chat_template=str(tmp_path / "qwen.jinja"), max_length=1024)
    metrics = template_stage.run(params, tiny_model_dir, tmp_path / "ingested", tmp_path / "tok", tmp_path / "preview")
    assert metrics["eot_trained_fraction"] == 1.0 and metrics["dropped_no_trained_tokens"] == 0
    rows = {row["id"]: row for split in ("train", "validation", "test") for row in read_split(tmp_path / "tok", split)}
    records = [r for split in ("train", "validation", "test") for r in read_split(tmp_path / "ingested", split)]
    assert len(rows) == len(records) == 6
    tokenizer = template_stage.load_tokenizer(tiny_model_dir)
    for record in records:
        expected = encode_conversation(record["messages"], tokenizer, QWEN25, tools=record["tools"])
        assert rows[record["id"]]["labels"] == expected.labels
        trained = [t for t, label in zip(expected.input_ids, expected.labels) if label != IGNORE_INDEX]
        assert '"name": "get_weather"' in decode(tokenizer, trained)


def test_evaluation_prompt_keeps_tools_calls_and_results(smollm2_tokenizer, tmp_path: Path) -> None:
    messages, tools = parsed(tmp_path, tool_line(GOOD))
    [prompt] = prompts_from_conversations([{"id": "x", "messages": messages, "tools": tools}], smollm2_tokenizer, QWEN25)
    assert prompt.text == render(messages[:-1], smollm2_tokenizer, QWEN25, add_generation_prompt=True, tools=tools)
    assert '"name": "get_weather"' in prompt.text and "<tool_response>" in prompt.text and "# Tools" in prompt.text
    assert prompt.reference == ANSWER["content"]
