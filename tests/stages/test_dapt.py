"""The dapt stage: raw-text loading, block packing, continued pretraining that lowers domain
perplexity, LoRA output merged into a plain checkpoint, and the weightless pass-through."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from stages import dapt
from stages import pack as pack_stage
from tunekit.demo import generate_domain
from tunekit.io import read_meta, write_meta
from tunekit.methods import load_tuned
from tunekit.models import ModelSourceError, load_causal_lm, load_tokenizer, resolve_checkpoint
from tunekit.params import DaptParams, ParamsError, validate_section
from tunekit import text
from tunekit.text import Blocks, Chained, TextError, load_documents, pack, pack_documents, split_blocks, token_stream

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


def domain_corpus(tmp_path, documents: int = 24):
    path = tmp_path / "domain" / "corpus.txt"
    path.parent.mkdir()
    path.write_text("\n\n".join(generate_domain(documents, 7)) + "\n")
    return path.parent


def small_params(inputs, **overrides) -> DaptParams:
    values = dict(enabled=True, inputs=str(inputs), block_size=32, batch_size=4, max_steps=12, eval_every=4,
                  checkpoint_every=4, threads=1, lr=2e-2, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    return DaptParams(**{**values, **overrides})


def run_dapt(params: DaptParams, model_dir, tmp_path, num_proc: int = 1):
    """The pack stage, then dapt on its blocks, as `dvc repro dapt` runs them."""
    pack_stage.run(params, model_dir, tmp_path / "packed", num_proc)
    return dapt.run(params, 1234, model_dir, tmp_path / "packed", tmp_path / "dapt", tmp_path / "plots", tmp_path / "ckpt")


def test_lora_dapt_lowers_domain_perplexity_and_writes_a_merged_plain_checkpoint(tiny_model_dir, tmp_path):
    params = small_params(domain_corpus(tmp_path), replay_ratio=0.25)
    out, plots = tmp_path / "dapt", tmp_path / "plots"
    metrics, curves = run_dapt(params, tiny_model_dir, tmp_path)

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
    metrics, _ = run_dapt(params, tiny_model_dir, tmp_path)
    assert metrics["trainable_fraction"] == 1.0 and metrics["perplexity_after"] < 0.5 * metrics["perplexity_before"]
    assert read_meta(tmp_path / "dapt")["merged"] is False


def test_passthrough_writes_no_weights_and_loads_as_the_base(tiny_model_dir, tmp_path):
    out, plots = tmp_path / "dapt", tmp_path / "plots"
    metrics, _ = dapt.run(DaptParams(enabled=False), 1234, tiny_model_dir, tmp_path / "packed", out, plots, tmp_path / "ckpt")
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
        run_dapt(small_params(bad), tiny_model_dir, tmp_path)
    assert not (tmp_path / "dapt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing half-written, no temporary left


# ---------------------------------------------------------------- the pack stage: streamed, cached, on disk


def reference_split(inputs, tokenizer, block_size: int, validation: float):
    """The in-memory path dapt took before the pack stage: every block in a list, split by hash."""
    blocks, tokens = pack_documents([d.text for d in load_documents(inputs)], tokenizer, block_size)
    return split_blocks(blocks, validation), tokens


def ids_of(rows) -> list[list[int]]:
    return [[int(t) for t in row["input_ids"]] for row in rows]


def tree_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_txt_documents_are_streamed_with_the_same_paragraphs_as_splitting_the_whole_file(tmp_path):
    import re

    text = "\ufeff  \nFirst,\r\nstill first.  \n\t \n\n\nSecond\n \t\nthird\r\n\r\n  \r\nfourth\n  x\n\n"
    (tmp_path / "a.txt").write_bytes(text.encode())
    whole = text.lstrip("\ufeff").replace("\r\n", "\n")
    expected = [block.strip() for block in re.split(r"\n[ \t]*\n", whole) if block.strip()]
    assert [d.text for d in load_documents(tmp_path / "a.txt")] == expected == ["First,\nstill first.", "Second", "third", "fourth\n  x"]


@pytest.mark.parametrize("block_size, batch", [(256, 1000), (32, 7), (5, 1), (300, 3)])  # 256: the default
def test_packed_blocks_equal_the_in_memory_path_on_the_demo_domain_text(smollm2_tokenizer, tmp_path, monkeypatch,
                                                                          block_size, batch):
    """Same documents, eos between them, same blocks, same hash-chosen validation share, whatever the map's
    batches (blocks that run on into the next batch's documents) and its number of processes."""
    monkeypatch.setattr(text, "PACK_BATCH", batch)
    inputs = domain_corpus(tmp_path, 200)  # the demo stage's domain text (demo.domain_documents)
    (train, val), tokens = reference_split(inputs, smollm2_tokenizer, block_size, 0.1)
    assert len(train) > 3 and len(val) >= 1
    outputs = []
    for procs in (1, 2):
        out = tmp_path / f"clone{procs}" / "packed"  # two clones in different directories
        counts = text.pack_corpus(inputs, smollm2_tokenizer, block_size, 0.1, out, out.parent / "scratch", procs)
        assert counts == {"documents": len(load_documents(inputs)), "tokens": tokens, "blocks": len(train) + len(val),
                          "train_blocks": len(train), "validation_blocks": len(val)}
        assert ids_of(Blocks(out / "train")) == ids_of(train) and ids_of(Blocks(out / "validation")) == ids_of(val)
        outputs.append(tree_bytes(out))
    assert outputs[0] == outputs[1]  # byte-identical: no path, random fingerprint or num_proc in any file


def test_pack_stage_writes_datasets_a_user_can_load_and_leaves_no_cache_files(tiny_model_dir, tmp_path):
    import datasets

    inputs = domain_corpus(tmp_path)
    params = small_params(inputs)
    metrics = pack_stage.run(params, tiny_model_dir, tmp_path / "packed", 2)
    out = tmp_path / "packed"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train", "validation"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    assert sorted(p.name for p in inputs.iterdir()) == ["corpus.txt"]  # no map cache beside the inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["domain", "packed"]  # no temporary left
    train = datasets.load_from_disk(str(out / "train"))
    assert train.features["input_ids"].length == 32 and train.cache_files  # memory-mapped from the output's Arrow file
    assert len(train) == metrics["train_blocks"] and train.split == "train"
    meta = read_meta(out)
    assert meta["params"] == {"enabled": True, "inputs": str(inputs), "block_size": 32, "validation": 0.1}
    assert meta["documents"] == metrics["documents"] == len(load_documents(inputs))

    (tm, tv), _ = reference_split(inputs, load_tokenizer(tiny_model_dir), 32, 0.1)
    meta, rows, val = text.open_packed(out, {"inputs": str(inputs), "block_size": 32, "validation": 0.1})
    assert ids_of(rows) == ids_of(tm) and ids_of(val) == ids_of(tv)
    assert ids_of(rows[2:5]) == ids_of(tm[2:5]) and ids_of([rows[-1]]) == ids_of([tm[-1]])
    with pytest.raises(TextError, match=r"dapt.block_size 64 \(packed with 32\); re-run the pack stage"):
        text.open_packed(out, {"block_size": 64})


def test_training_on_the_packed_blocks_is_the_training_on_the_in_memory_blocks(tiny_model_dir, tmp_path):
    from tunekit.train import TrainConfig, train

    inputs = domain_corpus(tmp_path)
    pack_stage.run(small_params(inputs), tiny_model_dir, tmp_path / "packed", 1)
    tokenizer = load_tokenizer(tiny_model_dir)
    (ref_train, ref_val), _ = reference_split(inputs, tokenizer, 32, 0.1)
    _, rows, val = text.open_packed(tmp_path / "packed", {})
    replay = dapt.replay_blocks(tokenizer, 32, 5)
    histories = []
    for train_rows, val_rows, name in ((ref_train + replay, ref_val, "lists"), (Chained(rows, replay), val, "packed")):
        model = load_causal_lm(tiny_model_dir)
        cfg = TrainConfig(epochs=1, batch_size=4, max_steps=4, eval_every=2, lr=1e-2, seed=3)
        state = train(model, train_rows, val_rows, cfg, tokenizer.pad_token_id, tmp_path / f"ckpt-{name}")
        histories.append((state.history, state.evals))
    assert histories[0] == histories[1]


def test_pack_is_cheap_when_dapt_is_off_and_dapt_refuses_its_marker(tiny_model_dir, tmp_path):
    out = tmp_path / "packed"
    # Nothing is read: neither the inputs nor the tokenizer (neither exists here).
    assert pack_stage.run(DaptParams(enabled=False, inputs=str(tmp_path / "huge")), tmp_path / "no-model", out) == {"enabled": 0}
    assert [p.name for p in out.iterdir()] == ["meta.json"] and read_meta(out)["enabled"] is False
    with pytest.raises(SystemExit, match="written with dapt.enabled false"):
        dapt.run(small_params(domain_corpus(tmp_path)), 1234, tiny_model_dir, out, tmp_path / "dapt", tmp_path / "plots", tmp_path / "c")
    with pytest.raises(SystemExit, match="not the output of the pack stage"):
        dapt.run(small_params(tmp_path), 1234, tiny_model_dir, tmp_path / "nothing", tmp_path / "dapt", tmp_path / "plots", tmp_path / "c")


@pytest.mark.slow
def test_dvc_keeps_the_packed_blocks_when_only_training_params_change(tiny_model_dir, tmp_path):
    """Real DVC in a copy of the project: a new dapt.lr or epochs leaves pack cached; a new block size re-runs it."""
    import subprocess

    import yaml

    from tests.tiny_project import build_project, write_params

    root, env = build_project(tmp_path / "project", tiny_model_dir, dapt={"enabled": True, "block_size": 32})

    def dvc(*args) -> str:
        done = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    dvc("repro", "pack")
    assert json.loads((root / "metrics/pack.json").read_text())["train_blocks"] > 0
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["pack"]
    assert set(lock["params"]["params.yaml"]) == {"dapt.enabled", "dapt.inputs", "dapt.block_size", "dapt.validation"}
    write_params(root, tiny_model_dir, dapt={"lr": 3e-3, "epochs": 2, "batch_size": 2, "replay_ratio": 0.1})
    assert "Data and pipelines are up to date" in dvc("status", "pack")
    write_params(root, tiny_model_dir, dapt={"block_size": 16})
    assert "changed" in dvc("status", "pack") and "dapt.block_size" in dvc("status", "pack")


def test_pack_without_validation_or_without_a_single_block(smollm2_tokenizer, tiny_model_dir, tmp_path):
    inputs = domain_corpus(tmp_path)
    counts = text.pack_corpus(inputs, smollm2_tokenizer, 64, 0.0, tmp_path / "a", tmp_path / "a-scratch")
    assert counts["validation_blocks"] == 0 and len(Blocks(tmp_path / "a/validation")) == 0  # an empty split loads
    assert ids_of(Blocks(tmp_path / "a/train")) == ids_of(reference_split(inputs, smollm2_tokenizer, 64, 0.0)[0][0])
    with pytest.raises(SystemExit, match="make no block of dapt.block_size 100000 to train on"):
        pack_stage.run(small_params(inputs, block_size=100_000), tiny_model_dir, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()
