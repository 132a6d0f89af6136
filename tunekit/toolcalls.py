"""OpenAI-style tool calling in chat records: validation and normalisation for ingest.

A record may carry `tools` (the function schemas offered to the model), assistant messages may carry
`tool_calls` instead of (or besides) text, and `tool` messages carry a call's result:

    {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}],
     "messages": [{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                      "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 3}"},
                  {"role": "assistant", "content": "3 degrees."}]}

Arguments given as a JSON string (OpenAI's wire format) are parsed into an object, which is what the
chat templates of tool-capable models (Qwen2.5, Llama-3.1, Hermes) render with `tojson`; equal calls
then hash equal whichever way they were written. The checks raise ToolDataError with a stable reason
code and a detail naming the field and the fix; ingest turns it into the line's reject.
"""

from __future__ import annotations

import json
from typing import Any


class ToolDataError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is _ABSENT else ("empty" if isinstance(value, str) else _kind(value))
        raise ToolDataError("wrong_type", f"{where} is {got}; it must be the function's name, a non-empty string")
    return value


_ABSENT = object()


def _check_type(item: dict, where: str) -> None:
    if item.get("type", "function") != "function":
        raise ToolDataError("wrong_type", f"{where}.type is {json.dumps(item['type'])}; only \"function\" tools "
                                          "are supported (drop the field or set it to \"function\")")


def normalise_tools(value: Any) -> list[dict]:
    """The record's `tools`: a list of {"type": "function", "function": {"name", "description"?,
    "parameters"?}} objects with unique names."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else _kind(value)
        raise ToolDataError("wrong_type", f"tools is {got}; it must be a non-empty list of "
                                          "{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}} "
                                          "objects (or leave tools out)")
    tools, names = [], set()
    for index, item in enumerate(value):
        where = f"tools[{index}]"
        function = _function_of(item, where, "function's name and its parameters' JSON schema")
        name = _name(function.get("name", _ABSENT), f"{where}.function.name")
        if name in names:
            raise ToolDataError("wrong_type", f"{where}.function.name {json.dumps(name)} is also an earlier tool's "
                                              "name; give each tool a unique name")
        names.add(name)
        for key, kind in (("description", str), ("parameters", dict)):
            if key in function and not isinstance(function[key], kind):
                raise ToolDataError("wrong_type", f"{where}.function.{key} is {_kind(function[key])}; it must be "
                                                  f"{'a string' if kind is str else 'a JSON schema object'}")
        tools.append({"type": "function", "function": dict(function)})
    return tools


def _function_of(item: Any, where: str, holds: str) -> dict:
    """The `function` object of a tool or a tool call at `where`, checked: {"type": "function", "function": {...}}."""
    if not isinstance(item, dict):
        raise ToolDataError("wrong_type", f"{where} is {_kind(item)}; it must be an object "
                                          "{\"type\": \"function\", \"function\": {...}}")
    _check_type(item, where)
    function = item.get("function", _ABSENT)
    if not isinstance(function, dict):
        got = "missing" if function is _ABSENT else _kind(function)
        raise ToolDataError("wrong_type", f"{where}.function is {got}; it must be an object with the {holds}")
    return function


def normalise_tool_calls(value: Any, where: str, tools: list[dict] | None) -> list[dict]:
    """An assistant message's `tool_calls`, each {"type": "function", "function": {"name", "arguments":
    object}, "id"?}; a call must name a function of `tools` when the record has tools."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else _kind(value)
        raise ToolDataError("wrong_type", f"{where} is {got}; it must be a non-empty list of "
                                          "{\"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": ...}} "
                                          "objects (or leave tool_calls out)")
    known = None if tools is None else [tool["function"]["name"] for tool in tools]
    calls = []
    for index, item in enumerate(value):
        call_where = f"{where}[{index}]"
        function = _function_of(item, call_where, "called function's name and arguments")
        name = _name(function.get("name", _ABSENT), f"{call_where}.function.name")
        if known is not None and name not in known:
            raise ToolDataError("unknown_tool", f"{call_where}.function.name is {json.dumps(name)}, which is not "
                                                f"in the record's tools ({', '.join(map(json.dumps, known))}); add "
                                                "its schema to tools or fix the name")
        arguments = function.get("arguments", _ABSENT)
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise ToolDataError("malformed_tool_arguments",
                                    f"{call_where}.function.arguments is not valid JSON ({exc.msg} at character "
                                    f"{exc.pos + 1}); write the arguments as a JSON object or a string holding one") from None
            if not isinstance(arguments, dict):
                raise ToolDataError("malformed_tool_arguments",
                                    f"{call_where}.function.arguments holds {_kind(arguments)}, not a JSON object; "
                                    "arguments are named: write {\"name\": value, ...}")
        elif not isinstance(arguments, dict):
            got = "missing" if arguments is _ABSENT else _kind(arguments)
            raise ToolDataError("wrong_type", f"{call_where}.function.arguments is {got}; it must be a JSON object "
                                              "or a string holding one ({} for a call without arguments)")
        call: dict = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if "id" in item:
            if not isinstance(item["id"], str) or not item["id"]:
                raise ToolDataError("wrong_type", f"{call_where}.id is {_kind(item['id'])}; it must be a non-empty "
                                                  "string (the tool_call_id its result refers to) or left out")
            call["id"] = item["id"]
        calls.append(call)
    return calls


def tool_result_fields(item: dict, where: str) -> dict:
    """The optional `tool_call_id` and `name` of a tool message, checked to be strings."""
    fields = {}
    for key in ("tool_call_id", "name"):
        if key in item:
            if not isinstance(item[key], str) or not item[key]:
                raise ToolDataError("wrong_type", f"{where}.{key} is {_kind(item[key])}; it must be a non-empty "
                                                  "string or left out")
            fields[key] = item[key]
    return fields


def check_tool_results(messages: list[dict], where: str) -> None:
    """Every tool message answers a call of the assistant message before it (only tool messages in
    between), by tool_call_id when it gives one and by function name when it gives one."""
    pending: list[dict] | None = None
    for index, message in enumerate(messages):
        if message["role"] == "tool":
            if pending is None:
                raise ToolDataError("tool_result_without_call",
                                    f"{where}[{index}] is a tool result but no assistant message with tool_calls "
                                    "comes right before it (only tool results may come in between); add the "
                                    "assistant's call or drop the result")
            call_id = message.get("tool_call_id")
            ids = [call["id"] for call in pending if "id" in call]
            if call_id is not None and call_id not in ids:
                shown = ", ".join(map(json.dumps, ids)) if ids else "none: the calls have no id"
                raise ToolDataError("unknown_tool_call_id",
                                    f"{where}[{index}].tool_call_id is {json.dumps(call_id)} but the calls before "
                                    f"it have ids {shown}; use the id of the call this result answers")
            name = message.get("name")
            names = [call["function"]["name"] for call in pending
                     if call_id is None or call.get("id") == call_id]
            if name is not None and name not in names:
                raise ToolDataError("unknown_tool_call_id",
                                    f"{where}[{index}].name is {json.dumps(name)} but the call it answers is "
                                    f"{' or '.join(map(json.dumps, names))}; fix the name or the tool_call_id")
        elif message["role"] == "assistant" and message.get("tool_calls"):
            pending = message["tool_calls"]
        else:
            pending = None
