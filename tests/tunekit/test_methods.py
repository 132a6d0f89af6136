"""Every fine-tuning method in the registry, through one parametrised matrix on a tiny Llama.

Each method is trained with the real loop (tunekit.train.train) on four short conversations, saved by
the finetune stage's writer, reloaded the way evaluate does, and merged (or refused) by the merge
stage. Per method: the loss drops, exactly the promised parameters train, the reload reproduces the
logits, the base seen beside it is the untouched base, and merge either reproduces the logits in a
checkpoint plain transformers loads or refuses saying why.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from stages import finetune, merge
from tests.conftest import tiny_llama
from tunekit.chat import encode_conversation, pack, resolve_chat_template
from tunekit.generate import Prompt, generate
from tunekit.data import write_rows
from tunekit.io import NOT_MERGED, is_merged, not_merged_reason
from tunekit.methods import METHODS, Bottleneck, MethodError, method_for, parameter_counts
from tunekit.params import FinetuneParams, MergeParams, ParamsError, validate_section
from tunekit.tasks import load_tuned
from tunekit.train import (PackingWithVirtualTokens, TrainConfig, accumulate_gradients, collate, evaluate_loss,
                           token_loss_sum, train)

torch.set_num_threads(1)  # tiny models: threads only add overhead, and the machine is shared

CONVERSATIONS = [
    ("What colour is the sky?", "Blue, mostly."),
    ("Name a prime number.", "Seven."),
    ("Capital of Portugal?", "Lisbon."),
    ("Say hello.", "Hello there!"),
]
# The matrix's base: tiny_llama twice as wide and with initializer_range 0.1, so that the methods that
# train a few thousand parameters against a frozen random model (ia3, prompt and p-tuning) still lower
# the loss clearly within a few dozen steps.
HIDDEN, HEAD_DIM, LAYERS, INTERMEDIATE = 64, 16, 2, 128
KV_DIM = 2 * HEAD_DIM  # two key/value heads


@pytest.fixture(scope="module")
def rows(smollm2_tokenizer):
    template = resolve_chat_template("chatml", smollm2_tokenizer)
    encoded = [encode_conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                   smollm2_tokenizer, template) for q, a in CONVERSATIONS]
    return [{"id": str(i), "input_ids": e.input_ids, "labels": e.labels} for i, e in enumerate(encoded)]


@pytest.fixture(scope="module")
def base_dirs(smollm2_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The matrix's base checkpoints: "tied" (head = input embeddings, like SmolLM2) and "untied" (its
    own output head, for linear probing)."""
    dirs = {}
    for kind in ("tied", "untied"):
        config = tiny_llama(len(smollm2_tokenizer)).config
        config.hidden_size, config.head_dim, config.intermediate_size = HIDDEN, HEAD_DIM, INTERMEDIATE
        config.initializer_range, config.tie_word_embeddings = 0.1, kind == "tied"
        torch.manual_seed(0)
        dirs[kind] = tmp_path_factory.mktemp(f"tiny-llama-{kind}")
        LlamaForCausalLM(config).save_pretrained(dirs[kind], safe_serialization=True)
        smollm2_tokenizer.save_pretrained(dirs[kind])
    return dirs


@pytest.fixture(scope="module")
def held_out(rows, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("tokenized")
    write_rows(data / "test", rows)
    return data


def names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- what each method promises to train


def trains_everything(model, counts):
    assert counts["trainable_parameters"] == counts["total_parameters"]


def trains_top_layer_and_norm(model, counts):
    # tied head = the frozen embeddings, so it stays frozen; layer 0 of 2 is frozen
    assert counts["trainable_parameters"] == numel(model.model.layers[1]) + numel(model.model.norm)
    assert all(n.startswith(("model.layers.1.", "model.norm.")) for n in names(model))


def trains_only_the_head(model, counts):
    assert names(model) == {"lm_head.weight"}
    assert counts["trainable_parameters"] == model.config.vocab_size * HIDDEN


def only(*markers: str, count: int | None = None):
    def check(model, counts):
        trained = names(model)
        assert trained and all(any(m in n for m in markers) for n in trained), sorted(trained)[:5]
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        if count is not None:
            assert counts["trainable_parameters"] == count
    return check


def virtual_embedding(dim: int, extra: Callable[[object], int] = lambda model: 0):
    def check(model, counts):
        assert all(n.startswith("prompt_encoder.") for n in names(model))
        tokens = model.peft_config["default"].num_virtual_tokens
        assert counts["trainable_parameters"] == tokens * dim + extra(model)
    return check


def p_tuning_encoder(model) -> int:
    return numel(model.prompt_encoder["default"].mlp_head)


@dataclass
class Case:
    params: dict
    lr: float
    trainable: Callable
    steps: int = 30
    max_loss_ratio: float = 0.75  # loss after training / before, on the training conversations
    untied: bool = False
    merge: str = "merges"  # merges | writes through | refusal text
    extra: list[Callable] = field(default_factory=list)  # further checks(model, base_dir, weights_before)


def freeze_keeps_bottom_layers(model, base_dir, before):
    after = dict(model.named_parameters())
    for name, value in before.items():
        same = torch.equal(after[name], value)
        if name.startswith(("model.embed_tokens.", "model.layers.0.")):
            assert same, f"{name} changed although frozen"
        elif name.startswith("model.layers.1.") and name.endswith("proj.weight"):
            assert not same, f"{name} did not train"


def head_leaves_the_rest(model, base_dir, before):
    after = dict(model.named_parameters())
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert all(torch.equal(after[n], v) for n, v in before.items() if n != "lm_head.weight")


def qlora_base_is_4bit(model, base_dir, before):
    import bitsandbytes as bnb

    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"


LORA = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
# Virtual tokens steer a random two-layer model only through attention: a smaller, still clear, drop.
VIRTUAL = {"max_loss_ratio": 0.9, "merge": "virtual tokens are inputs"}
CASES = {
    "full": Case({}, 3e-3, trains_everything, steps=20, merge="writes through"),
    "freeze": Case({"freeze": {"layers": 1}}, 3e-2, trains_top_layer_and_norm, merge="writes through",
                   extra=[freeze_keeps_bottom_layers]),
    "head": Case({}, 3e-2, trains_only_the_head, steps=20, untied=True, merge="writes through",
                 extra=[head_leaves_the_rest]),
    "lora": Case(LORA, 3e-2, only("lora_A", "lora_B")),
    "dora": Case(LORA, 3e-2, only("lora_A", "lora_B", "lora_magnitude_vector")),
    "ia3": Case({}, 0.15, only("ia3_l", count=LAYERS * (2 * KV_DIM + INTERMEDIATE)), max_loss_ratio=0.8),
    "qlora": Case(LORA, 3e-2, only("lora_A", "lora_B"), extra=[qlora_base_is_4bit]),
    "adapter": Case({"adapter": {"bottleneck": 8}}, 3e-2,
                    only(".bottleneck.", count=LAYERS * 2 * (2 * HIDDEN * 8 + 8 + HIDDEN)), merge="non-linearity"),
    "prompt_tuning": Case({"virtual": {"tokens": 8, "init": "text", "init_text": "Answer briefly and exactly."}}, 3e-2,
                          virtual_embedding(HIDDEN), steps=40, **VIRTUAL),
    "prefix_tuning": Case({"virtual": {"tokens": 8}}, 9e-2, virtual_embedding(LAYERS * 2 * KV_DIM), **VIRTUAL),
    "p_tuning": Case({"virtual": {"tokens": 8}}, 3e-3, virtual_embedding(HIDDEN, p_tuning_encoder), steps=40, **VIRTUAL),
    "peft": Case({"peft": {"type": "LOHA", "config": {"r": 4, "target_modules": "all-linear"}}}, 3e-2, only("hada_")),
}


def test_the_matrix_covers_every_registered_method():
    assert set(CASES) == set(METHODS)


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def answers(model, tokenizer) -> list[str]:
    """Greedy answers as the evaluate stage generates them (left-padded batch, KV cache)."""
    prompts = [Prompt(str(i), f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", a)
               for i, (q, a) in enumerate(CONVERSATIONS)]
    return generate(model, tokenizer, prompts, "<|im_end|>", max_new_tokens=4, batch_size=4)


@pytest.mark.parametrize("name", list(CASES))
def test_method_trains_saves_reloads_and_merges(name, rows, held_out, base_dirs, smollm2_tokenizer, tmp_path):
    case = CASES[name]
    base_dir = base_dirs["untied" if case.untied else "tied"]
    pad = smollm2_tokenizer.pad_token_id
    batch = collate(rows, pad)
    params = FinetuneParams(method=name, **case.params)
    method = method_for(params)

    torch.manual_seed(0)
    base = method.load_base(base_dir)
    base_logits = logits(base, batch)
    base_answers = answers(base, smollm2_tokenizer)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = method.prepare(base, params)
    case.trainable(model, parameter_counts(model))

    loss_before = evaluate_loss(model, rows, pad, 4, method.full_forward)["loss"]
    cfg = TrainConfig(epochs=1, max_steps=case.steps, lr=case.lr, batch_size=4, schedule="constant",
                      checkpoint_every=10_000, eval_every=10_000, seed=0, full_forward=method.full_forward)
    train(model, rows, [], cfg, pad, tmp_path / "checkpoints")
    loss_after = evaluate_loss(model, rows, pad, 4, method.full_forward)["loss"]
    assert loss_after < case.max_loss_ratio * loss_before, (loss_before, loss_after)
    for check in case.extra:
        check(model, base_dir, before)
    tuned_logits = logits(model, batch)

    out = tmp_path / "finetune"
    out.mkdir()
    finetune.write_output(out, method, model, smollm2_tokenizer, params.model_dump(), base_dir, {})
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["method"], meta["mergeable"], meta["saves_adapter"]) == (name, method.mergeable, method.saves_adapter)
    assert (out / "model.safetensors").is_file() != method.saves_adapter  # full weights xor an adapter

    tuned = load_tuned(out)
    torch.testing.assert_close(logits(tuned.model, batch), tuned_logits, rtol=0, atol=1e-5)
    assert len(answers(tuned.model, smollm2_tokenizer)) == len(CONVERSATIONS)  # evaluate's generation runs
    with tuned.base() as reloaded_base:
        torch.testing.assert_close(logits(reloaded_base, batch), base_logits, rtol=0, atol=1e-5)
        assert answers(reloaded_base, smollm2_tokenizer) == base_answers
    del tuned

    merged_dir = tmp_path / "merged"
    if case.merge in ("merges", "writes through"):
        metrics = merge.run(MergeParams(atol=1e-4), out, held_out, merged_dir)
        assert metrics["max_logit_difference"] <= 1e-4
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True)
        assert not hasattr(merged, "peft_config") and getattr(merged.config, "quantization_config", None) is None
        assert all(type(m) in (torch.nn.Linear,) for n, m in merged.named_modules() if n.endswith("_proj"))
        assert all(p.dtype == torch.float32 for p in merged.parameters())
        merged_logits = logits(merged, batch)
        assert (merged_logits - base_logits).abs().max() > 1e-3  # the training is in the weights
        if name != "qlora":  # qlora trained on 4-bit weights; its merge is into the full-precision ones
            torch.testing.assert_close(merged_logits, tuned_logits, rtol=0, atol=1e-4)
    else:
        assert merge.run(MergeParams(), out, held_out, merged_dir) == {"merged": 0}
        assert not is_merged(merged_dir) and not list(merged_dir.glob("*.safetensors"))
        assert re.search(f"cannot be merged.*{case.merge}.*Serve it", (merged_dir / NOT_MERGED).read_text(), re.S)
        assert re.search(f"cannot be merged.*{case.merge}.*Serve it", not_merged_reason(merged_dir), re.S)


# ---------------------------------------------------------------- refusals and the loss path


def test_head_refuses_a_head_tied_to_the_embeddings(tiny_model_dir):  # tiny_llama ties them, as SmolLM2 does
    params = FinetuneParams(method="head")
    with pytest.raises(MethodError, match=r"tied to its input embeddings.*Use method freeze.*or lora"):
        method_for(params).prepare(method_for(params).load_base(tiny_model_dir), params)


def test_freeze_refuses_more_layers_than_the_model_has(tiny_model_dir):
    params = FinetuneParams(method="freeze", freeze={"layers": 3})
    with pytest.raises(MethodError, match="freeze.layers is 3 but the model has 2 transformer layers"):
        method_for(params).prepare(method_for(params).load_base(tiny_model_dir), params)


def test_method_names_are_checked_against_the_registry():
    with pytest.raises(ParamsError, match=r"finetune\.method: value 'lorra'.*valid: full, freeze, head, lora"):
        validate_section("finetune", {"method": "lorra"}, FinetuneParams)
    with pytest.raises(ParamsError, match=r"finetune\.peft: .*needs peft\.type"):
        validate_section("finetune", {"method": "peft"}, FinetuneParams)
    with pytest.raises(MethodError, match="'NOPE' is not a PEFT method; valid: .*LOHA"):
        method_for(FinetuneParams(method="peft", peft={"type": "NOPE"}))


def test_passthrough_peft_takes_its_flags_from_the_config():
    virtual = method_for(FinetuneParams(method="peft", peft={"type": "PROMPT_TUNING", "config": {"num_virtual_tokens": 4}}))
    assert virtual.full_forward and not virtual.mergeable
    assert method_for(FinetuneParams(method="peft", peft={"type": "LOKR", "config": {}})).mergeable


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_virtual_token_loss_matches_peft_and_counts_only_real_tokens(name, rows, smollm2_tokenizer):
    """The full-forward loss path aligns labels past the prepended virtual positions (prompt and
    p-tuning lengthen the logits, prefix tuning does not) and equals PEFT's own loss."""
    params = FinetuneParams(method=name, virtual={"tokens": 5})
    torch.manual_seed(0)
    model = method_for(params).prepare(tiny_llama(len(smollm2_tokenizer)), params).eval()
    batch = collate(rows, smollm2_tokenizer.pad_token_id)
    loss_sum, count = token_loss_sum(model, batch, full_forward=True)
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        reference = model(**batch).loss  # PEFT pads the labels for its virtual positions itself
    torch.testing.assert_close(loss_sum / count, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="full_forward=True"):
        token_loss_sum(model, batch)


def test_full_forward_loss_equals_the_decoder_path_without_virtual_tokens(rows, smollm2_tokenizer):
    model = tiny_llama(len(smollm2_tokenizer))
    batch = collate(rows, smollm2_tokenizer.pad_token_id)
    fast, n_fast = token_loss_sum(model, batch)
    full, n_full = token_loss_sum(model, batch, full_forward=True)
    assert n_fast == n_full
    torch.testing.assert_close(full, fast, rtol=1e-5, atol=1e-5)


def test_packing_with_virtual_tokens_is_refused(rows, smollm2_tokenizer):
    params = FinetuneParams(method="prompt_tuning", virtual={"tokens": 4})
    model = method_for(params).prepare(tiny_llama(len(smollm2_tokenizer)), params)
    template = resolve_chat_template("chatml", smollm2_tokenizer)
    encoded = [encode_conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                   smollm2_tokenizer, template) for q, a in CONVERSATIONS]
    packed = collate(pack(encoded, max_length=256), smollm2_tokenizer.pad_token_id)
    with pytest.raises(PackingWithVirtualTokens, match="template.packing: false"):
        token_loss_sum(model, packed, full_forward=True)


def test_bottleneck_adapters_start_as_the_base_and_switch_off(rows, smollm2_tokenizer):
    params = FinetuneParams(method="adapter")
    base = tiny_llama(len(smollm2_tokenizer))
    batch = collate(rows, smollm2_tokenizer.pad_token_id)
    expected = logits(base, batch)
    model = method_for(params).prepare(base, params)
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 2 * LAYERS
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)  # up-projection starts at zero


def test_qlora_gradients_are_unchanged_by_an_evaluation_pass(base_dirs, rows, smollm2_tokenizer):
    """A validation pass (eval mode, no grad) must not switch the 4-bit layers to an inference-only
    kernel that later training steps would backpropagate through wrongly."""
    params = FinetuneParams(method="qlora", **LORA)
    method = method_for(params)
    torch.manual_seed(0)
    model = method.prepare(method.load_base(base_dirs["tied"]), params)
    batch = collate(rows, smollm2_tokenizer.pad_token_id)

    def gradients():
        model.train()
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, [batch])
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    evaluate_loss(model, rows, smollm2_tokenizer.pad_token_id, 4)
    after = gradients()
    assert any(g.abs().max() > 0 for n, g in before.items() if "layers.0." in n)
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)
