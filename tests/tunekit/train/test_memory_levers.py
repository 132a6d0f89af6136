"""The training loop's memory levers that are always on: the chunked LM head + cross-entropy, LoRA
dropout whose mask is redrawn in backward, and grouped-query SDPA on the CPU.

Each must compute exactly what the plain code computes (loss, gradients, outputs) and keep less for
backward; the second is checked by counting the bytes autograd saves, never by timing or RSS.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_llama
from tunekit.methods import method_for
from tunekit.params import FinetuneParams
from tests.conftest import REPO
from tunekit.train import (IGNORE, TrainConfig, checkpoint_mlps, collate, grouped_query_sdpa, linear_cross_entropy_sum,
                           regenerate_lora_dropout, token_loss_sum, train)
from tunekit.train.memory import _dropout_drop, _DroppedLinear, _keep_rate


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while `fn` runs (parameters excluded)."""
    params: set[int] = set()
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(params)
    return sum(seen.values()), out


def rows_for(vocab: int, lengths=(9, 17, 5, 12)) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2:]})
    return rows


# ---------------------------------------------------------------- chunked LM head + cross-entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("head_trains", [False, True])
def test_chunked_head_cross_entropy_equals_the_whole_logits_loss_and_gradients(chunk, head_trains):
    torch.manual_seed(0)
    hidden = torch.randn(150, 24, requires_grad=True)
    weight = torch.randn(300, 24, requires_grad=head_trains)
    targets = torch.randint(0, 300, (150,))
    reference = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (reference / 3).backward()
    want_hidden, want_weight = hidden.grad, weight.grad
    hidden.grad = weight.grad = None

    loss = linear_cross_entropy_sum(hidden, weight, targets, chunk=chunk)
    (loss / 3).backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad, want_hidden, rtol=1e-4, atol=1e-6)
    if head_trains:
        torch.testing.assert_close(weight.grad, want_weight, rtol=1e-4, atol=1e-5)
    else:
        assert weight.grad is None
    with torch.no_grad():  # evaluation: the same chunks, no gradients
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, targets, chunk=chunk), reference.detach(),
                                   rtol=1e-5, atol=1e-4)


def test_full_fine_tuning_through_the_fused_head_matches_transformers_gradients_with_tied_embeddings(smollm2_tokenizer):
    model = tiny_llama(len(smollm2_tokenizer)).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: both paths feed one gradient
    twin = copy.deepcopy(model)
    batch = collate(rows_for(len(smollm2_tokenizer)), smollm2_tokenizer.pad_token_id)
    loss_sum, count = token_loss_sum(model, batch)
    (loss_sum / count).backward()
    twin(**batch).loss.backward()  # transformers: whole logits, mean over the trained tokens
    ours, theirs = dict(model.named_parameters()), dict(twin.named_parameters())
    for name, p in theirs.items():
        torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_fused_head_keeps_nothing_vocab_sized_for_backward():
    torch.manual_seed(0)
    hidden = torch.randn(200, 16, requires_grad=True)
    weight = torch.randn(5000, 16)
    targets = torch.randint(0, 5000, (200,))
    whole, _ = saved_bytes(lambda _: F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"))
    fused, _ = saved_bytes(lambda _: linear_cross_entropy_sum(hidden, weight, targets, chunk=64))
    assert whole >= 200 * 5000 * 4  # the log-softmax of every row
    assert fused <= 200 * 16 * 4  # d loss / d hidden only


# ---------------------------------------------------------------- LoRA dropout, mask redrawn in backward


def test_dropout_masks_are_reproducible_from_the_seed_and_drop_at_the_configured_rate():
    x = torch.empty(400, 500)
    drop = _dropout_drop(x, 0.1, seed=5)
    assert drop.dtype == torch.bool and drop.shape == x.shape
    assert torch.equal(drop, _dropout_drop(x, 0.1, seed=5))
    assert not torch.equal(drop, _dropout_drop(x, 0.1, seed=6))
    assert abs((~drop).float().mean().item() - _keep_rate(0.1)) < 0.003  # 200k draws: sd ~0.0007
    assert abs(_keep_rate(0.1) - 0.9) < 1e-5 and _keep_rate(0.0) == 1.0
    odd = torch.empty(3, 7)  # a size that is not a multiple of the four draws per 64-bit number
    assert _dropout_drop(odd, 0.5, seed=1).shape == (3, 7)


def test_the_dropped_linear_backward_uses_the_forward_mask():
    torch.manual_seed(0)
    x = torch.randn(2, 30, 24, requires_grad=True)
    weight = torch.randn(8, 24, requires_grad=True)
    out = _DroppedLinear.apply(x, weight, 0.3, 11)
    out.pow(2).sum().backward()
    ours = x.grad, weight.grad

    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference = F.linear(x2 * ~_dropout_drop(x2, 0.3, 11) / _keep_rate(0.3), w2)
    # Same values up to rounding: the 1/(1-p) scale is applied to the other side of the product.
    close = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(out, reference, **close)
    reference.pow(2).sum().backward()
    torch.testing.assert_close(ours[0], x2.grad, **close)
    torch.testing.assert_close(ours[1], w2.grad, **close)
    assert 0 < (x2.grad == 0).float().mean() < 0.5  # dropped inputs get no gradient: the mask really applied


def lora_model(vocab: int, dropout: float):
    params = FinetuneParams(method="lora", lora={"r": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear"})
    model = method_for(params).prepare(tiny_llama(vocab), params)
    gen = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, where dropout before A could not change any output
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def test_regenerated_dropout_changes_only_plain_lora_adapters_and_keeps_evaluation_identical(smollm2_tokenizer):
    model = lora_model(len(smollm2_tokenizer), 0.1)
    batch = collate(rows_for(len(smollm2_tokenizer)), smollm2_tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        before = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert regenerate_lora_dropout(model) == 7 * len(model.get_base_model().model.layers)
    assert regenerate_lora_dropout(model) == 0  # idempotent: the dropouts are gone
    with torch.no_grad():
        after = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert regenerate_lora_dropout(lora_model(len(smollm2_tokenizer), 0.0)) == 0  # nothing to drop
    dora = method_for(FinetuneParams(method="dora")).prepare(tiny_llama(len(smollm2_tokenizer)), FinetuneParams(method="dora"))
    assert regenerate_lora_dropout(dora) == 0  # PEFT variants keep their own forward


def test_regenerated_dropout_keeps_less_for_backward_and_still_drops(smollm2_tokenizer):
    batch = collate(rows_for(len(smollm2_tokenizer), (40, 40, 40, 40)), smollm2_tokenizer.pad_token_id)

    def run(fuse: bool):
        model = lora_model(len(smollm2_tokenizer), 0.1).train()
        if fuse:
            regenerate_lora_dropout(model)
        torch.manual_seed(3)

        def step(params):
            params.update(p.data_ptr() for p in model.parameters())
            return token_loss_sum(model, batch)[0]
        return saved_bytes(step)

    plain_bytes, plain_loss = run(False)
    fused_bytes, fused_loss = run(True)
    # Per layer and token the plain path keeps a dropped copy (4 bytes per element) and a mask (1 byte)
    # for each of 7 adapters (q, k, v, o, gate, up read 32 features, down 64); the fused path keeps each
    # distinct input once instead (q/k/v share one, gate/up another, o and down their own: 3 x 32 + 64).
    per_token_and_layer = (6 * 32 + 64) * 5 - (3 * 32 + 64) * 4
    assert plain_bytes - fused_bytes >= 0.9 * per_token_and_layer * 2 * 160
    # Still dropout: the training-mode loss differs from the evaluation-mode loss.
    model = lora_model(len(smollm2_tokenizer), 0.1).eval()
    with torch.no_grad():
        clean = token_loss_sum(model, batch)[0]
    assert abs(float(fused_loss) - float(clean)) > 1e-4 and abs(float(plain_loss) - float(clean)) > 1e-4


# ---------------------------------------------------------------- grouped-query SDPA on the CPU


def test_grouped_query_sdpa_keeps_keys_and_values_at_their_own_head_count_with_identical_outputs(smollm2_tokenizer):
    model = tiny_llama(len(smollm2_tokenizer)).train()  # 4 query heads, 2 key/value heads
    batch = collate(rows_for(len(smollm2_tokenizer)), smollm2_tokenizer.pad_token_id)  # padded: a mask is passed
    width = batch["input_ids"].shape[1]
    repeated_kv = 2 * len(model.model.layers) * 4 * 4 * width * 8 * 4  # k and v: 4 rows x 4 heads x 8 dims, fp32

    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    plain_bytes, plain = saved_bytes(lambda _: token_loss_sum(model, batch)[0])
    with grouped_query_sdpa(torch.device("cpu")):
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
        gqa_bytes, grouped = saved_bytes(lambda _: token_loss_sum(model, batch)[0])
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ  # scoped to training
    torch.testing.assert_close(grouped, plain)
    assert plain_bytes - gqa_bytes >= 0.9 * repeated_kv / 2  # half the repeated heads were copies
    with grouped_query_sdpa(torch.device("cuda")):  # CUDA kernels would fall back to the math path
        assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ


# ---------------------------------------------------------------- defaults: feed-forward checkpointing, allocator


def checkpointed_mlps(model) -> int:
    return sum(bool(getattr(m, "_tunekit_checkpointed", False)) for name, m in model.named_modules() if name.endswith(".mlp"))


def _frozen_mlp_model(vocab: int):
    model = tiny_llama(vocab).train()
    for name, p in model.named_parameters():
        p.requires_grad_(".self_attn." in name)  # feed-forward blocks frozen: down_proj is a plain frozen Linear
    return model


def _dora_model(vocab: int):
    params = FinetuneParams(method="dora", lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"})
    return method_for(params).prepare(tiny_llama(vocab), params)


@pytest.mark.parametrize("kind, down_runs", [("lora", 1), ("frozen", 1), ("full", 2), ("dora", 2)])
def test_checkpointed_feed_forward_gives_the_plain_gradients_and_skips_a_frozen_down_projection(smollm2_tokenizer, kind,
                                                                                                 down_runs):
    """Plain LoRA or a frozen down_proj: the recomputation stops at down_proj's input (one down_proj matmul per
    step, not two); a trained down_proj or a PEFT variant falls back to recomputing the whole block. Either way
    the loss and every gradient equal those of the block without checkpointing, dropout masks included."""
    vocab = len(smollm2_tokenizer)
    build = {"lora": lambda: lora_model(vocab, 0.1), "frozen": lambda: _frozen_mlp_model(vocab),
             "full": lambda: tiny_llama(vocab).train(), "dora": lambda: _dora_model(vocab)}[kind]
    batch = collate(rows_for(vocab, (40, 33, 40, 21)), smollm2_tokenizer.pad_token_id)

    def run(checkpointed: bool):
        model = build().train()
        regenerate_lora_dropout(model)
        if checkpointed:
            assert checkpoint_mlps(model) == 2
        downs = [m for name, m in model.named_modules() if name.endswith("mlp.down_proj")]
        base = [getattr(d, "base_layer", d) for d in downs]
        calls = []
        for layer in base:
            layer.register_forward_pre_hook(lambda *_: calls.append(1))  # at entry: a recomputation may stop inside
        torch.manual_seed(3)

        def step(params):
            params.update(p.data_ptr() for p in model.parameters())
            loss, n = token_loss_sum(model, batch)
            return loss / n
        kept, loss = saved_bytes(step)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        return loss, grads, kept, len(calls) / len(base)

    plain_loss, plain_grads, plain_kept, plain_runs = run(False)
    loss, grads, kept, runs = run(True)
    assert plain_runs == 1 and runs == down_runs
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6)
    # The intermediate-size activations (64 wide here) are not kept: well under the plain block's bytes.
    tokens = batch["input_ids"].numel()
    assert plain_kept - kept >= 0.9 * 2 * tokens * 64 * 4 * 2


def test_auto_checkpointing_recomputes_feed_forward_blocks_where_there_are_any(smollm2_tokenizer, tmp_path):
    rows = rows_for(len(smollm2_tokenizer))
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=2, gradient_checkpointing="auto")
    model = lora_model(len(smollm2_tokenizer), 0.05)
    train(model, rows, [], cfg, smollm2_tokenizer.pad_token_id, tmp_path / "a")
    assert checkpointed_mlps(model) == 2
    # Whole layers recomputed already (what QLoRA's preparation turns on): the blocks are left alone.
    layers = lora_model(len(smollm2_tokenizer), 0.05)
    layers.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train(layers, rows, [], cfg, smollm2_tokenizer.pad_token_id, tmp_path / "b")
    assert checkpointed_mlps(layers) == 0


def test_every_stage_process_starts_with_huge_page_cpu_allocation():
    import subprocess
    import sys

    code = "import stages, os, torch; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    kept = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                          capture_output=True, text=True, check=True)
    assert kept.stdout.strip() == "0"  # a user's own setting wins
