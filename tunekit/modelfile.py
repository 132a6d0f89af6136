"""Ollama Modelfiles: the chat template in Ollama's Go template syntax, stop tokens and the system prompt.

Ollama does not run the Jinja chat template inside a GGUF; it renders its own Go template. A Modelfile
that says FROM ./model.gguf and nothing else leaves the prompt format to Ollama's guess, which is how
exported models end up answering to a different template than the one they were trained on. So the
template is written here, for the families whose Go equivalent is known, and only after checking it:
each family also renders probe conversations in Python the way its Go template does, and the family
is chosen only if that text is character-for-character what the training template (Jinja) renders.

The system prompt: the one every training conversation started with, if there was one; else the one
the template inserts when a conversation has none (SmolLM2's "You are a helpful AI assistant named
SmolLM..."), so an Ollama chat without a system message is rendered the way training rendered it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tunekit.chat import render

MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ChatFamily:
    name: str
    template: str                            # Ollama Go template
    prefix: str                              # text before the first turn
    turn: Callable[[str, str], str]          # (role, content) -> one rendered turn
    generation_prompt: str                   # what opens the assistant's answer
    stops: tuple[str, ...]                   # PARAMETER stop: end of turn and the start of another

    def render(self, system: str | None, messages: Iterable[dict]) -> str:
        """What the Go template renders for `system` (.System) and the non-system `messages` (.Messages)."""
        turns = ([self.turn("system", system)] if system else []) + [
            self.turn(m["role"], m["content"]) for m in messages if m["role"] != "system"]
        return self.prefix + "".join(turns) + self.generation_prompt


# System messages are rendered from .System only: Ollama gathers a chat's system messages there (and
# the Modelfile's SYSTEM when the chat has none), so the range skips them to write each one once.
CHATML = ChatFamily(
    "chatml",
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}{{- end }}<|im_start|>assistant\n",
    "", lambda role, content: f"<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n",
    ("<|im_start|>", "<|im_end|>"))

LLAMA3 = ChatFamily(
    "llama3",
    "<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|begin_of_text|>",
    lambda role, content: f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"))

FAMILIES = (CHATML, LLAMA3)

_PROBE_SYSTEM = "tunekit probe system"
_PROBES = ([{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "first question"}],
           [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second question"}])


def default_system(family: ChatFamily, rendered: str, messages: list[dict]) -> str | bool | None:
    """The system prompt the template inserted into `rendered` (a conversation without one): None if it
    inserted none, False if `rendered` is not this family's rendering with any system prompt."""
    if rendered == family.render(None, messages):
        return None
    opening, closing = family.turn("system", "\0").split("\0")
    head = family.prefix + opening
    if rendered.startswith(head):
        end = rendered.find(closing, len(head))
        if end >= 0 and family.render(rendered[len(head):end], messages) == rendered:
            return rendered[len(head):end]
    return False


def match_family(tokenizer, chat_template: str) -> tuple[ChatFamily | None, str | None]:
    """(the family whose Go template renders what `chat_template` renders, the template's default system
    prompt), or (None, None) when none does."""
    for family in FAMILIES:
        if all(render(p, tokenizer, chat_template, True) == family.render(_PROBE_SYSTEM, p) for p in _PROBES):
            no_system = [{"role": "user", "content": "first question"}]
            system = default_system(family, render(no_system, tokenizer, chat_template, True), no_system)
            if system is not False:
                return family, system
    return None, None


def training_system_prompt(conversations: Iterable[dict]) -> str | None:
    """The system message every training conversation starts with, or None (none, or they differ)."""
    prompts = set()
    for record in conversations:
        messages = record.get("messages") or []
        prompts.add(messages[0]["content"] if messages and messages[0].get("role") == "system" else None)
        if len(prompts) > 1:
            return None
    return next(iter(prompts), None)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError(f"cannot write {text[:40]!r}... into a Modelfile: it contains \"\"\"")
    return f'"""{text}"""'


def modelfile(gguf_file: str, family: ChatFamily | None, system: str | None, stops: Iterable[str] = ()) -> str:
    """The Modelfile text. Without a family, no TEMPLATE is written and Ollama falls back to its own
    detection from the GGUF's chat template (the export's metrics say so)."""
    lines = [f"FROM ./{gguf_file}", ""]
    if family is not None:
        lines += [f"TEMPLATE {_quoted(family.template)}", ""]
    for stop in dict.fromkeys([*(family.stops if family else ()), *stops]):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    lines.append("PARAMETER temperature 0")  # the evaluation's greedy decoding; raise it for varied answers
    if system:
        lines += ["", f"SYSTEM {_quoted(system)}"]
    return "\n".join(lines) + "\n"
