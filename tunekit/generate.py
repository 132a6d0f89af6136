"""Batched generation for evaluation: prompts rendered with the training chat template, left-padded,
KV cache on, stopped at the end-of-turn marker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tunekit.chat import render


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
        history = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        text = render(history, tokenizer, chat_template, add_generation_prompt=True)
        prompts.append(Prompt(record.get("id", str(len(prompts))), text, messages[-1]["content"]))
    return prompts


def stop_token_ids(tokenizer, eot_marker: str) -> list[int]:
    ids = {tokenizer.eos_token_id}
    marker = tokenizer.encode(eot_marker, add_special_tokens=False)
    if len(marker) == 1:
        ids.add(marker[0])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Prompt], eot_marker: str, max_new_tokens: int, batch_size: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, desc: str = "generate") -> list[str]:
    model.eval()
    tokenizer.padding_side = "left"
    stops = stop_token_ids(tokenizer, eot_marker)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    # Longest prompts first: batches hold similar lengths, so little compute goes to padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].text))
    outputs: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        chunk = order[start:start + batch_size]
        enc = tokenizer([prompts[i].text for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                   pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)
        new_tokens = generated[:, enc["input_ids"].shape[1]:]
        for i, row in zip(chunk, new_tokens):
            text = tokenizer.decode(row, skip_special_tokens=True)
            # Markers that are not single tokens in this vocabulary are cut as text.
            outputs[i] = text.split(eot_marker)[0].strip()
    return [outputs[i] for i in range(len(prompts))]
