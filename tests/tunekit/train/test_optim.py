"""Optimisation options of the training loop: discriminative learning rates, L2 toward the starting
weights, replay of general text inside every batch, the forgetting curve, and bf16 only on CUDA."""

import math

import pytest
import torch

from stages.finetune import general_text_rows
from tests.conftest import tiny_llama
from tunekit.chat import encode_conversation, resolve_chat_template
from tunekit.forgetting import pydoc_paragraphs
from tunekit.methods import load_4bit, method_for
from tunekit.models import compute_device
from tunekit.params import FinetuneParams, ParamsError, validate_section
from tunekit.train import (BF16_ON_CPU, BatchPlan, TrainConfig, accumulate_gradients, add_l2_to_init_gradient,
                           collate, evaluate_loss, l2_anchors, l2_to_init_penalty, make_optimizer, make_scheduler,
                           replay_per_batch, train, trainable_state)

torch.set_num_threads(1)  # tiny models: threads only add overhead, and the machine is shared


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i} " + "word " * (i % 5)},
            {"role": "assistant", "content": f"answer {i}" + " more" * (i % 4)}]


@pytest.fixture(scope="module")
def rows(smollm2_tokenizer):
    template = resolve_chat_template("chatml", smollm2_tokenizer)
    encoded = [encode_conversation(conversation(i), smollm2_tokenizer, template) for i in range(12)]
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


@pytest.fixture(scope="module")
def general(smollm2_tokenizer):
    """(replay rows, probe rows) as the finetune stage builds them from pydoc."""
    params = FinetuneParams(replay={"ratio": 0.25}, forgetting_every_n_steps=2, probe={"passages": 6, "max_length": 32})
    return general_text_rows(params, smollm2_tokenizer, replay_max_length=48)


def lora(vocab: int, dropout: float = 0.0, seed: int = 0):
    params = FinetuneParams(method="lora", lora={"r": 4, "alpha": 8, "dropout": dropout})
    torch.manual_seed(seed)
    return method_for(params).prepare(tiny_llama(vocab, seed=seed), params)


def rate_of(optimizer, param) -> tuple[float, float]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group["lr"], group["weight_decay"]
    raise AssertionError("parameter in no group")


# ---------------------------------------------------------------- discriminative learning rates


def test_layer_decay_gives_each_depth_its_rate_and_keeps_the_weight_decay_split(smollm2_tokenizer):
    model = tiny_llama(len(smollm2_tokenizer)).requires_grad_(True)  # full fine-tuning, 2 layers, tied head
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=2, layer_lr_decay=0.5, weight_decay=0.1, warmup_ratio=0.5)
    optimizer = make_optimizer(model, cfg)
    inner = model.model
    expected = {  # top layer lr, the one below lr*0.5, embeddings (and the head tied to them) lr*0.5^2
        inner.layers[1].self_attn.q_proj.weight: (1e-2, 0.1), inner.layers[1].input_layernorm.weight: (1e-2, 0.0),
        inner.layers[0].mlp.up_proj.weight: (5e-3, 0.1), inner.layers[0].post_attention_layernorm.weight: (5e-3, 0.0),
        inner.embed_tokens.weight: (2.5e-3, 0.1), inner.norm.weight: (1e-2, 0.0),
    }
    for param, (lr, wd) in expected.items():
        assert rate_of(optimizer, param) == pytest.approx((lr, wd))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))

    # After scheduler steps (warmup, then cosine) every group keeps its ratio to the top layer.
    scheduler = make_scheduler(optimizer, cfg, total_steps=10)
    optimizer.step()
    scheduler.step()
    scheduler.step()
    top = rate_of(optimizer, inner.layers[1].self_attn.q_proj.weight)[0]
    assert 0 < top < 1e-2
    for param, (lr, _) in expected.items():
        assert rate_of(optimizer, param)[0] / top == pytest.approx(lr / 1e-2)


def test_head_lr_goes_to_what_the_method_added_and_decays_with_its_layer(smollm2_tokenizer):
    model = lora(len(smollm2_tokenizer))
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=2, layer_lr_decay=0.5, head_lr=4e-2)
    optimizer = make_optimizer(model, cfg)
    named = dict(model.named_parameters())
    for name, param in named.items():
        if "lora_" in name:
            layer = 1 if ".layers.1." in name else 0
            assert rate_of(optimizer, param)[0] == pytest.approx(4e-2 * 0.5 ** (1 - layer)), name
    # Virtual tokens sit outside the layers: head_lr, undecayed.
    params = FinetuneParams(method="prompt_tuning", virtual={"tokens": 4})
    prompt = method_for(params).prepare(tiny_llama(len(smollm2_tokenizer)), params)
    optimizer = make_optimizer(prompt, cfg)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(4e-2)]
    # Both off: the two plain groups at lr, as before these options existed.
    plain = make_optimizer(model, TrainConfig(epochs=1, lr=1e-3, batch_size=2))
    assert [g["name"] for g in plain.param_groups] == ["decay"] and plain.param_groups[0]["lr"] == 1e-3


# ---------------------------------------------------------------- L2 toward the starting weights


def test_l2_to_init_is_zero_at_the_start_positive_after_a_step_and_its_gradient_is_2_lambda_delta(
        rows, smollm2_tokenizer):
    lam = 0.3
    for model in (lora(len(smollm2_tokenizer)), tiny_llama(len(smollm2_tokenizer)).requires_grad_(True)):
        anchors = l2_anchors(model)
        assert float(l2_to_init_penalty(model, anchors, lam).detach()) == 0.0
        # LoRA B starts at zero: no copy is kept for it.
        assert all((anchors[n] is None) == ("lora_B" in n) for n in anchors)
        start = trainable_state(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        accumulate_gradients(model, [collate(rows[:4], smollm2_tokenizer.pad_token_id)])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        penalty = l2_to_init_penalty(model, anchors, lam)
        assert float(penalty) > 0
        params = [p for p in model.parameters() if p.requires_grad]
        autograd = torch.autograd.grad(penalty, params)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for (name, p), g in zip(named.items(), autograd):
            torch.testing.assert_close(g, 2 * lam * (p.detach() - start[name]), msg=name)
        # What the training loop adds once per optimizer step is the same gradient and value.
        value = add_l2_to_init_gradient(model, anchors, lam)
        assert value == pytest.approx(float(penalty), rel=1e-6)
        for p, g in zip(params, autograd):
            torch.testing.assert_close(p.grad, g)


# ---------------------------------------------------------------- replay and the forgetting curve


def test_replay_rows_are_real_held_out_text_and_take_their_share_of_every_batch(general, rows, smollm2_tokenizer):
    replay_rows, probe_rows = general
    paragraphs = pydoc_paragraphs()
    for row in replay_rows[:20]:
        assert row["labels"] == row["input_ids"] and 2 <= len(row["input_ids"]) <= 48
        text = smollm2_tokenizer.decode(row["input_ids"])
        assert len(text.split()) >= 10 and any(p.startswith(text[:60]) for p in paragraphs)
    probe_text = {smollm2_tokenizer.decode(r["input_ids"])[:60] for r in probe_rows}
    assert not probe_text & {smollm2_tokenizer.decode(r["input_ids"])[:60] for r in replay_rows}  # probe held out

    cfg = TrainConfig(epochs=3, lr=1e-3, batch_size=8, replay_ratio=0.25, seed=5)
    assert replay_per_batch(cfg) == 2
    plan = BatchPlan([len(r["input_ids"]) for r in rows], cfg, 1, len(replay_rows))
    for index in range(3 * plan.per_epoch):
        picked = plan.global_rows(index)
        kinds = [kind for kind, _ in picked]
        assert kinds.count("replay") / 8 == 0.25 or (len(picked) < 8 and kinds.count("replay") == 2)
        assert len({i for kind, i in picked if kind == "replay"}) == 2  # without replacement
    assert plan.replay_rows(3) == BatchPlan([1] * 12, cfg, 1, len(replay_rows)).replay_rows(3)  # deterministic
    # Two processes with batch_size 4 see the same global batches as one with 8, split row by row.
    two = BatchPlan([len(r["input_ids"]) for r in rows], TrainConfig(**{**cfg.__dict__, "batch_size": 4}), 2,
                    len(replay_rows))
    assert all(two.global_rows(i) == plan.global_rows(i) for i in range(5))
    assert two.shard(1, 0) == plan.global_rows(1)[0::2] and two.shard(1, 1) == plan.global_rows(1)[1::2]
    with pytest.raises(ValueError, match="at least 1 replay row"):
        replay_per_batch(TrainConfig(epochs=1, lr=1e-3, batch_size=8, replay_ratio=0.05))


class Interrupt(Exception):
    pass


def test_all_options_together_resume_exactly_and_record_the_forgetting_curve(general, rows, smollm2_tokenizer,
                                                                            tmp_path):
    """Dropout on, replay, L2, layer decay, head_lr and the probe: a run stopped after its checkpoint and
    resumed by a fresh process-like start ends with the weights and history of an uninterrupted run."""
    replay_rows, probe_rows = general
    pad = smollm2_tokenizer.pad_token_id
    cfg = TrainConfig(epochs=1, max_steps=7, lr=1e-2, batch_size=4, grad_accum=2, replay_ratio=0.25, l2_to_init=0.05,
                      layer_lr_decay=0.8, head_lr=2e-2, forgetting_every=3, checkpoint_every=3, eval_every=2,
                      seed=11, schedule="cosine", warmup_ratio=0.2)

    def run(ckpt, on_step=None):
        model = lora(len(smollm2_tokenizer), dropout=0.1, seed=3)
        state = train(model, rows, rows[:4], cfg, pad, ckpt, on_step=on_step, replay_rows=replay_rows,
                      probe_rows=probe_rows)
        return model, state

    reference, ref_state = run(tmp_path / "a")

    def crash(state):
        if state.step == 4:  # one step past the checkpoint at 3: that step is redone after the resume
            raise Interrupt
    with pytest.raises(Interrupt):
        run(tmp_path / "b", crash)
    resumed, state = run(tmp_path / "b")

    for name, value in trainable_state(reference).items():
        torch.testing.assert_close(trainable_state(resumed)[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert [h["train_loss"] for h in state.history] == pytest.approx([h["train_loss"] for h in ref_state.history], rel=1e-6)
    assert all(h["replay_tokens"] > 0 and h["l2_penalty"] >= 0 for h in ref_state.history)
    assert ref_state.history[0]["l2_penalty"] == 0 and ref_state.history[-1]["l2_penalty"] > 0
    # The forgetting curve: the untrained model, every 3 steps, and the end.
    assert [p["step"] for p in ref_state.probes] == [0, 3, 6, 7]
    assert [p["probe_loss"] for p in state.probes] == pytest.approx([p["probe_loss"] for p in ref_state.probes], rel=1e-6)
    untrained = lora(len(smollm2_tokenizer), seed=3)
    assert ref_state.probes[0]["probe_loss"] == pytest.approx(evaluate_loss(untrained, probe_rows, pad, 4)["loss"], rel=1e-6)
    assert all(math.isfinite(p["probe_loss"]) for p in ref_state.probes)


# ---------------------------------------------------------------- params and precision


def test_new_params_are_validated_and_off_by_default():
    params = FinetuneParams()
    assert (params.layer_lr_decay, params.head_lr, params.l2_to_init, params.replay.ratio,
            params.forgetting_every_n_steps, params.processes, params.precision) == (None, None, 0.0, 0.0, None, 1, "fp32")
    with pytest.raises(ParamsError) as error:
        validate_section("finetune", {"layer_lr_decay": 1.5, "replay": {"ratio": 1.0, "source": "x.csv"},
                                      "processes": 0, "precision": "fp16"}, FinetuneParams)
    for key in ("finetune.layer_lr_decay", "finetune.replay.ratio", "finetune.replay", "finetune.processes",
                "finetune.precision"):
        assert key in str(error.value)


def test_bf16_is_refused_on_the_cpu_with_the_reason(rows, smollm2_tokenizer, tmp_path):
    cfg = TrainConfig(epochs=1, max_steps=1, lr=1e-3, batch_size=2, precision="bf16")
    with pytest.raises(ValueError, match="500x slower"):
        train(tiny_llama(len(smollm2_tokenizer)), rows, [], cfg, smollm2_tokenizer.pad_token_id, tmp_path)
    assert "use precision: fp32" in BF16_ON_CPU


def test_compute_device_follows_tunekit_device_and_says_what_is_wrong(monkeypatch):
    monkeypatch.setenv("TUNEKIT_DEVICE", "cpu")
    assert compute_device() == torch.device("cpu")
    monkeypatch.setenv("TUNEKIT_DEVICE", "tpu")
    with pytest.raises(SystemExit, match="TUNEKIT_DEVICE='tpu' is not a device; use cpu, cuda or cuda:N"):
        compute_device()
    monkeypatch.setenv("TUNEKIT_DEVICE", "cuda:0")
    if torch.cuda.is_available():
        assert compute_device() == torch.device("cuda", 0)
    else:
        with pytest.raises(SystemExit, match="torch sees no CUDA device; unset it or use TUNEKIT_DEVICE=cpu"):
            compute_device()
    monkeypatch.delenv("TUNEKIT_DEVICE")
    assert compute_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_dapt_refuses_bf16_on_the_cpu(tiny_model_dir, tmp_path):
    from stages import dapt
    from tunekit.params import DaptParams

    params = DaptParams(enabled=True, inputs=str(tmp_path), precision="bf16")
    with pytest.raises(SystemExit, match=r"dapt\.precision: bf16 autocasts on CUDA only"):
        dapt.run(params, 0, tiny_model_dir, tmp_path / "packed", tmp_path / "out", tmp_path / "plots", tmp_path / "ckpt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_trains_in_bf16_on_cuda(tiny_model_dir, rows, smollm2_tokenizer, tmp_path):
    params = FinetuneParams(method="qlora", lora={"r": 4, "alpha": 8, "dropout": 0.0}, precision="bf16")
    method = method_for(params)
    model = method.prepare(load_4bit(tiny_model_dir, device="cuda"), params)
    pad = smollm2_tokenizer.pad_token_id
    before = evaluate_loss(model, rows, pad, 4)["loss"]
    cfg = TrainConfig(epochs=1, max_steps=8, lr=3e-2, batch_size=4, schedule="constant", precision="bf16",
                      checkpoint_every=1000, eval_every=1000)
    state = train(model, rows, [], cfg, pad, tmp_path / "ckpt")
    assert state.step == 8 and all(math.isfinite(h["train_loss"]) for h in state.history)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).device.type == "cuda"
    assert evaluate_loss(model, rows, pad, 4)["loss"] < before
