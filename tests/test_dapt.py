"""The dapt stage: raw-text loading, block packing, continued pretraining that lowers domain
perplexity, LoRA output merged into a plain checkpoint, and the weightless pass-through."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from stages import dapt
from tunekit.demo import generate_domain
from tunekit.io import read_meta, write_meta
from tunekit.methods import load_tuned
from tunekit.models import ModelSourceError, load_causal_lm, load_tokenizer, resolve_checkpoint
from tunekit.params import DaptParams, ParamsError, validate_section
from tunekit.text import TextError, load_documents, pack, pack_documents, split_blocks, token_stream

# ---------------------------------------------------------------- packing


def test_pack_gives_fixed_blocks_with_every_token_labelled_and_drops_the_tail():
    blocks = pack(list(range(23)), 5)
    assert [b["input_ids"] for b in blocks] == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert all(b["labels"] == b["input_ids"] for b in blocks)  # the loss's shift leaves out only each block's first
    assert pack(list(range(4)), 5) == []


def test_documents_are_joined_with_eos_between_them(smollm2_tokenizer):
    tok = smollm2_tokenizer
    texts = ["Order shipped to Porto.", "Refund approved.", "Call the customer."]
    stream = token_stream(texts, tok, tok.eos_token_id)
    pieces = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert stream == pieces[0] + [tok.eos_token_id] + pieces[1] + [tok.eos_token_id] + pieces[2]
    blocks, total = pack_documents(texts, tok, 4)
    assert total == len(stream) and all(len(b["input_ids"]) == 4 for b in blocks)
    assert [t for b in blocks for t in b["input_ids"]] == stream[:len(blocks) * 4]
    again, _ = pack_documents(texts, tok, 4)
    assert again == blocks


def test_split_is_deterministic_and_by_content():
    blocks = pack(list(range(200)), 10)
    train, val = split_blocks(blocks, 0.2)
    assert len(val) == 4 and len(train) == 16 and not {tuple(b["input_ids"]) for b in val} & {tuple(b["input_ids"]) for b in train}
    assert split_blocks(list(reversed(blocks)), 0.2)[1] == sorted(val, key=lambda b: -b["input_ids"][0])
    assert split_blocks(blocks, 0.0) == (blocks, [])


# ---------------------------------------------------------------- loading


def test_txt_and_jsonl_documents(tmp_path):
    (tmp_path / "a.txt").write_bytes("First note,\r\nstill the first.\r\n\r\nSecond note.\n \n\n".encode("utf-8-sig"))
    (tmp_path / "b.jsonl").write_text('{"text": "Third."}\n\n{"text": "  "}\n{"text": "Fourth.", "id": 4}\n')
    (tmp_path / "ignored.md").write_text("not text input")
    docs = load_documents(tmp_path)
    assert [d.text for d in docs] == ["First note,\nstill the first.", "Second note.", "Third.", "Fourth."]
    assert docs[3].source == f"{tmp_path / 'b.jsonl'}:4"
    assert [d.text for d in load_documents(tmp_path / "b.jsonl")] == ["Third.", "Fourth."]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "bad.jsonl:2: not valid JSON"),
    ('{"body": "no text key"}', "bad.jsonl:2: each line must be an object with a \"text\" key"),
    ('["text"]', "bad.jsonl:2: each line must be an object"),
    ('{"text": 3}', "bad.jsonl:2: \"text\" must be a string"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(TextError, match=message.replace("[", r"\[")):
        load_documents(bad)


def test_missing_or_empty_inputs_are_clear(tmp_path):
    with pytest.raises(TextError, match="does not exist"):
        load_documents(tmp_path / "nope")
    with pytest.raises(TextError, match="no .txt or .jsonl files"):
        load_documents(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(TextError, match="no text found"):
        load_documents(tmp_path)


def test_params_validation_reports_every_bad_key():
    with pytest.raises(ParamsError) as err:
        validate_section("dapt", {"method": "ia3", "block_size": 2, "replay": 0.1}, DaptParams)
    text = str(err.value)
    assert "dapt.method" in text and "dapt.block_size" in text and "dapt.replay: unknown key" in text
    assert DaptParams(method="lora").learning_rate == 1e-4 and DaptParams(method="full").learning_rate == 2e-5
    assert DaptParams(lr=3e-4).learning_rate == 3e-4


# ---------------------------------------------------------------- the stage


def domain_corpus(tmp_path):
    path = tmp_path / "domain" / "corpus.txt"
    path.parent.mkdir()
    path.write_text("\n\n".join(generate_domain(24, 7)) + "\n")
    return path.parent


def small_params(inputs, **overrides) -> DaptParams:
    values = dict(enabled=True, inputs=str(inputs), block_size=32, batch_size=4, max_steps=12, eval_every=4,
                  checkpoint_every=4, threads=1, lr=2e-2, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    return DaptParams(**{**values, **overrides})


def test_lora_dapt_lowers_domain_perplexity_and_writes_a_merged_plain_checkpoint(tiny_model_dir, tmp_path):
    params = small_params(domain_corpus(tmp_path), replay_ratio=0.25)
    out, plots = tmp_path / "dapt", tmp_path / "plots"
    metrics, curves = dapt.run(params, 1234, tiny_model_dir, out, plots, tmp_path / "ckpt")

    assert metrics["enabled"] == 1 and metrics["validation_blocks"] >= 1
    assert metrics["replay_blocks"] == round(0.25 * metrics["train_blocks"]) > 0
    assert metrics["perplexity_after"] < 0.95 * metrics["perplexity_before"]  # a random tiny model: LoRA moves it slowly
    assert 0 < metrics["trainable_fraction"] < 0.5 and metrics["steps"] == len(curves["history"])
    assert (plots / "loss.png").is_file() and (plots / "val_loss.csv").read_text().startswith("step,val_loss")
    assert not any((tmp_path / "ckpt").iterdir())  # resumable checkpoints are removed once the output exists

    # A plain transformers checkpoint: full weights, no adapter, the tokenizer and its chat template.
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert (out / "chat_template.jinja").is_file() or "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    meta = read_meta(out)
    assert meta["stage"] == "dapt" and meta["parent"]["path"] == str(tiny_model_dir) and meta["merged"] is True
    base = load_causal_lm(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values()))


def test_full_dapt_trains_every_weight(tiny_model_dir, tmp_path):
    params = small_params(domain_corpus(tmp_path), method="full", lr=1e-2, max_steps=6)
    metrics, _ = dapt.run(params, 1234, tiny_model_dir, tmp_path / "dapt", tmp_path / "plots", tmp_path / "ckpt")
    assert metrics["trainable_fraction"] == 1.0 and metrics["perplexity_after"] < 0.5 * metrics["perplexity_before"]
    assert read_meta(tmp_path / "dapt")["merged"] is False


def test_passthrough_writes_no_weights_and_loads_as_the_base(tiny_model_dir, tmp_path):
    out, plots = tmp_path / "dapt", tmp_path / "plots"
    metrics, _ = dapt.run(DaptParams(enabled=False), 1234, tiny_model_dir, out, plots, tmp_path / "ckpt")
    assert metrics == {"enabled": 0}
    assert [p.name for p in out.iterdir()] == ["meta.json"]
    assert (plots / "loss.png").is_file() and (plots / "train_loss.csv").read_text().strip() == "step,train_loss"

    meta = read_meta(out)
    base_hash = dapt.checkpoint_hash(tiny_model_dir)
    assert meta["passthrough"] == str(tiny_model_dir) and meta["parent"]["path"] == str(tiny_model_dir)
    assert meta["hash"] == meta["parent"]["hash"] == base_hash  # the same model: the base's hash, not an empty dir's
    assert resolve_checkpoint(out) == tiny_model_dir
    model, base = load_causal_lm(out), load_causal_lm(tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert load_tokenizer(out).get_vocab() == load_tokenizer(tiny_model_dir).get_vocab()

    # A later checkpoint whose lineage names the pass-through loads its base through it (evaluate, merge, forgetting).
    from peft import LoraConfig, get_peft_model

    tuned_dir = tmp_path / "finetune"
    get_peft_model(load_causal_lm(out), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tuned_dir)
    write_meta(tuned_dir, "finetune", {}, parent=out, extra={"method": "lora"})
    assert read_meta(tuned_dir)["parent"]["hash"] == base_hash
    tuned = load_tuned(tuned_dir)
    assert tuned.base_dir == out and tuned.model.get_base_model().config.vocab_size == base.config.vocab_size


def test_passthrough_chains_resolve_and_broken_ones_say_why(tiny_model_dir, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for path, target in ((first, tiny_model_dir), (second, first)):
        path.mkdir()
        (path / "meta.json").write_text(json.dumps({"passthrough": str(target)}))
    assert resolve_checkpoint(second) == tiny_model_dir
    (first / "meta.json").write_text(json.dumps({"passthrough": str(tmp_path / "gone")}))
    with pytest.raises(ModelSourceError, match="gone, which does not exist"):
        resolve_checkpoint(second)
    (first / "meta.json").write_text(json.dumps({"passthrough": str(second)}))
    with pytest.raises(ModelSourceError, match="cycle"):
        resolve_checkpoint(second)


def test_bad_inputs_stop_the_stage_with_the_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: not valid JSON"):
        dapt.run(small_params(bad), 1234, tiny_model_dir, tmp_path / "dapt", tmp_path / "plots", tmp_path / "ckpt")
    assert not (tmp_path / "dapt").exists()
