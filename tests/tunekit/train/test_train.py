"""The training loop: loss normalisation, gradient accumulation, batching, early stopping."""

import copy

import pytest
import torch

from tests.conftest import tiny_llama
from tunekit.chat import encode_conversation, pack, resolve_chat_template
from tunekit.train import (IGNORE, TrainConfig, accumulate_gradients, collate, epoch_batches, evaluate_loss,
                           token_loss_sum, train, trained_tokens)


def conversation(i: int) -> list[dict]:
    # Lengths vary a lot on purpose: a mean of per-batch means would weight them wrongly.
    return [
        {"role": "user", "content": f"question {i} " + "word " * (i % 7)},
        {"role": "assistant", "content": f"answer {i}" + " more" * (3 * (i % 5))},
    ]


@pytest.fixture(scope="module")
def rows(smollm2_tokenizer):
    template = resolve_chat_template("chatml", smollm2_tokenizer)
    encoded = [encode_conversation(conversation(i), smollm2_tokenizer, template) for i in range(8)]
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_matches_transformers_mean_over_trained_tokens(rows, smollm2_tokenizer):
    model = tiny_llama(len(smollm2_tokenizer))
    batch = collate(rows, smollm2_tokenizer.pad_token_id)
    loss_sum, count = token_loss_sum(model, batch)
    reference = model(**batch).loss  # transformers shifts labels and averages over non-ignored tokens
    assert count == trained_tokens(batch) > 0
    torch.testing.assert_close(loss_sum / count, reference, rtol=1e-5, atol=1e-6)


def test_accumulating_four_batches_of_two_equals_one_batch_of_eight(rows, smollm2_tokenizer):
    pad = smollm2_tokenizer.pad_token_id
    model = tiny_llama(len(smollm2_tokenizer))
    twin = copy.deepcopy(model)

    loss_one, tokens_one = accumulate_gradients(model, [collate(rows, pad)])
    micro = [collate(rows[i:i + 2], pad) for i in range(0, 8, 2)]
    loss_acc, tokens_acc = accumulate_gradients(twin, micro)

    assert tokens_one == tokens_acc
    assert loss_one == pytest.approx(loss_acc, rel=1e-5)
    one, acc = grads(model), grads(twin)
    assert one.keys() == acc.keys() and one
    for name in one:
        torch.testing.assert_close(acc[name], one[name], rtol=1e-4, atol=1e-7, msg=name)

    # The check has teeth: the common mean-of-means normalisation gives different gradients here.
    naive = copy.deepcopy(tiny_llama(len(smollm2_tokenizer)))
    for batch in micro:
        loss_sum, n = token_loss_sum(naive, batch)
        (loss_sum / n / len(micro)).backward()
    differs = any(not torch.allclose(grads(naive)[n], one[n], rtol=1e-3, atol=1e-6) for n in one)
    assert differs


def test_packed_rows_give_the_same_loss_as_separate_rows(rows, smollm2_tokenizer):
    model = tiny_llama(len(smollm2_tokenizer))
    template = resolve_chat_template("chatml", smollm2_tokenizer)
    encoded = [encode_conversation(conversation(i), smollm2_tokenizer, template) for i in range(8)]
    packed = pack(encoded, max_length=256)
    assert len(packed) < len(encoded)
    # pack() drops each example's first label; the same positions are never trained unpacked either.
    separate = evaluate_loss(model, rows, smollm2_tokenizer.pad_token_id, batch_size=8)
    together = evaluate_loss(model, packed, smollm2_tokenizer.pad_token_id, batch_size=8)
    assert separate["tokens"] == together["tokens"]
    assert together["loss"] == pytest.approx(separate["loss"], rel=1e-5)


def test_epoch_batches_are_deterministic_grouped_and_cover_every_row():
    lengths = [(i * 37) % 101 + 1 for i in range(300)]
    first = epoch_batches(lengths, 8, seed=3, epoch=0)
    assert first == epoch_batches(lengths, 8, seed=3, epoch=0)
    assert first != epoch_batches(lengths, 8, seed=3, epoch=1)
    assert sorted(i for batch in first for i in batch) == list(range(300))
    # Grouping by length: padding waste is far below that of random batches.
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in first)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(300, generator=gen).tolist()
    random_batches = [order[i:i + 8] for i in range(0, 300, 8)]
    random_waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in random_batches)
    assert waste < random_waste / 3
    # The batch with the most padded tokens comes first (an out-of-memory shows at once; the heap is
    # sized for it), and the rest are not in length order.
    cost = [len(b) * max(lengths[i] for i in b) for b in first]
    assert cost[0] == max(cost) and cost[1:] != sorted(cost[1:], reverse=True)
    assert epoch_batches([], 8, seed=3, epoch=0) == []


def test_training_lowers_the_loss_and_early_stopping_restores_the_best_weights(rows, smollm2_tokenizer, tmp_path):
    pad = smollm2_tokenizer.pad_token_id
    model = tiny_llama(len(smollm2_tokenizer))
    before = evaluate_loss(model, rows, pad, 8)["loss"]
    cfg = TrainConfig(epochs=30, lr=3e-3, batch_size=4, eval_every=2, early_stopping_patience=2,
                      checkpoint_every=1000, seed=0, schedule="constant")
    # Validate on data unlike the training data so validation loss soon gets worse.
    val = [{"input_ids": r["input_ids"], "labels": [IGNORE] + r["input_ids"][1:]} for r in rows[:2]]
    state = train(model, rows, val, cfg, pad, tmp_path / "ckpt")
    assert evaluate_loss(model, rows, pad, 8)["loss"] < before
    assert state.stopped_early
    assert state.best_step < state.step
    restored = evaluate_loss(model, val, pad, 8)["loss"]
    assert restored == pytest.approx(state.best_loss, rel=1e-5)


@pytest.mark.parametrize("every, checkpoints", [(10, [10]), ("auto", [4, 6, 8, 10, 12, 14, 16, 18])])
def test_checkpoint_every_auto_bounds_the_work_a_kill_loses(rows, smollm2_tokenizer, tmp_path, monkeypatch, every,
                                                            checkpoints):
    """A fixed checkpoint_every of half the run: a kill in the first half lost everything. auto checkpoints every
    tenth of the run when that is sooner than every CHECKPOINT_TARGET_SECONDS, from the step after the timed
    ones on (the 30 s floor is lifted here: the tiny model's whole run is shorter than that)."""
    from tunekit.train import checkpointing

    monkeypatch.setattr(checkpointing, "CHECKPOINT_MIN_SECONDS", 0.0)
    saved = []

    def record(state):
        saved.extend(step for step in (int(p.name.split("-")[1]) for p in (tmp_path / "ckpt").glob("step-*"))
                     if step not in saved)

    cfg = TrainConfig(epochs=1, max_steps=20, lr=1e-3, batch_size=4, eval_every=1000, checkpoint_every=every, seed=0)
    train(tiny_llama(len(smollm2_tokenizer)), rows, [], cfg, smollm2_tokenizer.pad_token_id, tmp_path / "ckpt",
          on_step=record)
    assert saved == checkpoints


def test_auto_checkpoint_interval_loses_at_most_a_few_minutes_and_never_checkpoints_in_a_rush():
    from tunekit.train import CHECKPOINT_MIN_SECONDS, CHECKPOINT_TARGET_SECONDS, auto_checkpoint_interval

    assert (CHECKPOINT_MIN_SECONDS, CHECKPOINT_TARGET_SECONDS) == (30, 180)
    assert auto_checkpoint_interval(10.0, 10_000) == 18      # slow steps: every 3 minutes
    assert auto_checkpoint_interval(6.0, 40) == 5            # a tenth of the run would be every 24 s: every 30 s
    assert auto_checkpoint_interval(0.5, 100_000) == 360     # long fast run: every 3 minutes
    assert auto_checkpoint_interval(0.5, 1_000) == 100       # 8-minute run: every tenth
    assert auto_checkpoint_interval(0.01, 1_000) == 3000     # a 10 s run is not worth a checkpoint
    assert auto_checkpoint_interval(600.0, 10) == 1          # 10-minute steps: every step
