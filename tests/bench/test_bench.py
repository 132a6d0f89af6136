"""The benchmark against TRL (bench/sft_vs_trl.py) and the training levers it measures.

Speed is never asserted here (the benchmark measures it side by side); these tests keep the script's
pieces working on a tiny model so it cannot rot, and prove the levers do not change what is trained.
"""

import importlib.util
import json
import sys

import pytest
import torch

from tests.conftest import REPO, tiny_llama
from tunekit.methods import method_for
from tunekit.params import FinetuneParams
from tunekit.train import IGNORE, TrainConfig, checkpoint_mlps, release_freed_memory, train

spec = importlib.util.spec_from_file_location("sft_vs_trl", REPO / "bench" / "sft_vs_trl.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_generated_chats_are_deterministic_and_within_the_word_ranges():
    first, again = bench.variable_chats(20, seed=3), bench.variable_chats(20, seed=3)
    assert first == again
    for chat in first:
        assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
        assert all(5 <= len(m["content"].split()) <= 200 for m in chat["messages"])
    for chat in bench.multiturn_chats(10, seed=3):
        system, *turns = chat["messages"]
        assert system["role"] == "system" and 120 <= len(system["content"].split()) <= 260
        assert 4 <= len(turns) <= 8 and all(5 <= len(m["content"].split()) <= 40 for m in turns)


def test_flop_count_of_a_lora_model(smollm2_tokenizer):
    model = method_for(FinetuneParams(method="lora")).prepare(tiny_llama(len(smollm2_tokenizer)), FinetuneParams())
    c = bench.flops_model(model)
    # tiny Llama: 2 layers of q,o 32x32, k,v 32x16, gate,up 32x64, down 64x32; LoRA r=16 on each of them
    assert c["frozen"] == 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)
    assert c["lora"] == 2 * 16 * (2 * 64 + 2 * 48 + 3 * 96)
    assert c["head"] == len(smollm2_tokenizer) * 32 and c["attn"] == 2 * 32
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}]
    assert bench.epoch_flops(rows, c) == 3 * (4 * c["frozen"] + 6 * c["lora"]) + 2 * 4 * c["head"] + 12 * c["attn"] * 6


def _lora_run(tokenizer, rows, tmp_path, **cfg):
    torch.manual_seed(0)
    params = FinetuneParams(method="lora")
    model = method_for(params).prepare(tiny_llama(len(tokenizer)), params)
    train(model, rows, [], TrainConfig(epochs=1, lr=1e-2, batch_size=2, seed=0, **cfg), tokenizer.pad_token_id, tmp_path)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_and_allocator_settings_train_the_same_weights(smollm2_tokenizer, tmp_path):
    assert release_freed_memory() in (True, False)  # glibc here: True; elsewhere a no-op
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in (9, 17, 5, 12, 20, 7):
        ids = torch.randint(10, len(smollm2_tokenizer), (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2:]})
    plain = _lora_run(smollm2_tokenizer, rows, tmp_path / "a", release_memory=False)
    levers = _lora_run(smollm2_tokenizer, rows, tmp_path / "b", gradient_checkpointing=True, release_memory=True)
    assert plain.keys() == levers.keys()
    for name in plain:  # dropout masks are replayed in the recomputation, so the weights agree
        torch.testing.assert_close(levers[name], plain[name], rtol=1e-5, atol=1e-6)
    mlp_only = _lora_run(smollm2_tokenizer, rows, tmp_path / "c", gradient_checkpointing="mlp")
    for name in plain:
        torch.testing.assert_close(mlp_only[name], plain[name], rtol=1e-5, atol=1e-6)


def test_mlp_checkpointing_wraps_each_feed_forward_once_and_refuses_models_without_one(smollm2_tokenizer, tmp_path):
    model = tiny_llama(len(smollm2_tokenizer))
    assert checkpoint_mlps(model) == checkpoint_mlps(model) == len(model.model.layers)  # idempotent
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=1, gradient_checkpointing="mlp")
    with pytest.raises(ValueError, match="found no feed-forward block named `mlp`.*gradient_checkpointing: true"):
        train(plain, [{"input_ids": [1, 2], "labels": [1, 2]}], [], cfg, 0, tmp_path)


@pytest.mark.slow
def test_quick_benchmark_runs_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    pytest.importorskip("trl", reason="pip install -r requirements-bench.txt")
    bench.main(["--quick", "--reps", "1", "--sets", "variable", "demo", "--model", str(tiny_model_dir),
                "--no-pipeline", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "latest.json").read_text())
    assert [s["set"] for s in report["sets"]] == ["variable", "demo"]
    for s in report["sets"]:
        for trainer in ("ours", "trl", "trl-nogc"):
            p = s["per_trainer"][trainer]
            assert p["tokens_per_s"]["median"] > 0 and p["peak_rss_mb"]["median"] > 0
            assert p["val_loss"]["median"] == p["val_loss"]["median"]  # not NaN
        assert set(s["ratios"]) == {"trl", "trl-nogc"} and 0 < s["flops"]["fraction_of_peak"]
        assert all(r["speed"]["median"] > 0 and r["peak_rss"]["median"] > 0 for r in s["ratios"].values())
        assert [r["trl-nogc"]["gradient_checkpointing"] for r in s["runs"]] == [False]
        assert [r["trl"]["gradient_checkpointing"] for r in s["runs"]] == [True]
    assert [t["met"] in (True, False) for t in report["targets"]] == [True, True, True]  # measured on set (a)
    table = (tmp_path / "latest.md").read_text()
    assert "gradient_checkpointing=False" in table and "speed ours/ref" in table and "CPU targets" in table


def test_cuda_precision_benchmark_smoke_runs_on_the_cpu(tmp_path, capsys):
    """bench/cuda_precision.py is meant for a GPU; its CPU smoke mode keeps it from rotting."""
    spec = importlib.util.spec_from_file_location("cuda_precision", REPO / "bench" / "cuda_precision.py")
    precision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(precision)
    out = tmp_path / "precision.json"
    precision.main(["--device", "cpu", "--tiny", "--precisions", "fp32", "--steps", "2", "--warmup", "1",
                    "--batch-size", "2", "--length", "16", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [(r["method"], r["precision"], r["steps"], r["tokens"]) for r in results] == [
        ("lora", "fp32", 2, 2 * 2 * 15), ("full", "fp32", 2, 2 * 2 * 15)]
    assert all(r["tokens_per_second"] > 0 for r in results)
    assert "| lora | fp32 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="CUDA only"):
        precision.main(["--device", "cpu", "--tiny"])


def test_long_chats_are_deterministic_and_within_the_word_ranges():
    first = bench.long_chats(30, seed=3)
    assert first == bench.long_chats(30, seed=3) and first != bench.long_chats(30, seed=4)
    exchanges = set()
    for chat in first:
        roles = [m["role"] for m in chat["messages"]]
        n = len(roles) // 2
        exchanges.add(n)
        assert roles == ["user", "assistant"] * n and 1 <= n <= 3
        assert all(5 <= len(m["content"].split()) <= 850 // n for m in chat["messages"])
    assert exchanges == {1, 2, 3}


def test_trl_best_is_refused_on_the_cpu_before_any_work(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--trainers", "ours", "trl-best", "--no-pipeline"])
    assert "trainer trl-best needs --device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="liger-kernel"):
        bench.refuse_cuda_only("trl-best", "cpu")
    bench.refuse_cuda_only("trl-best", "cuda")  # allowed there


def _gpu_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = suite  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(suite)
    return suite


def test_random_checkpoint_is_written_a_tensor_at_a_time_and_loads_as_the_shape(smollm2_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    suite = _gpu_suite()
    smollm2_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "model"
    built = suite.write_random_checkpoint(suite.TINY_8B, out, tmp_path / "tok", "cpu", shard_bytes=2**21)
    assert built["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert sum(p.numel() for p in model.parameters()) == built["parameters"]
    assert model.config.hidden_size == 64 and not model.config.tie_word_embeddings
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=model.model.norm.weight.dtype))
    assert abs(model.model.layers[0].mlp.up_proj.weight.float().std().item() - 0.02) < 2e-3
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # untied, as Llama-3.1-8B
    assert (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_part_on_the_cpu(smollm2_tokenizer, tmp_path):
    """bench/gpu_suite.py --tiny: every part on the CPU with tiny shapes (trl-best refused with its reason)."""
    import dataclasses

    suite = _gpu_suite()
    smollm2_tokenizer.save_pretrained(tmp_path / "tok")
    # A budget no slow machine reaches: every part must run here (the default 480 s is sized for the H200).
    suite.main(["--tiny", "--trainers", "ours", "trl-best", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
                "--tokenizer", str(tmp_path / "tok"), "--budget", "3600"])
    report = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert report["complete"] and report["device"] == "cpu" and report["preflight"]["packages"]["torch"]["imports"]
    lora = report["parts"]["lora"]["runs"]
    assert lora["ours"]["tokens_per_s"] > 0 and 0 < lora["ours"]["mfu"] < 1
    assert "GPUs only" in lora["trl-best"]["skipped"]
    qlora = report["parts"]["qlora"]["result"]
    assert qlora["steps"] == 2 and qlora["trained_tokens_per_s"] > 0 and qlora["trainable_parameters"] > 0
    rows = {r["label"]: r for r in report["parts"]["generate"]["result"]["rows"]}
    prompts = report["parts"]["generate"]["result"]["prompts"]
    assert all(r["new_tokens"] > 0 for r in rows.values())
    # Our harness reorders prompts by length; greedy outputs must still be those of plain model.generate.
    assert rows["model.generate, prompts in order (float32)"]["same_outputs"] == prompts
    levers = report["parts"]["levers"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert [n["field"] for n in levers["not_implemented"]] == [n for n, _, _ in suite.LEVERS if n not in fields]
    ran = [r for r in levers["runs"] if "options" in r]
    assert [r["options"] for r in ran] == [{n: v} for n, v, _ in suite.LEVERS if n in fields]
    assert all(r["tokens_per_s"] > 0 for r in ran)
    table = (tmp_path / "out" / "latest.md").read_text()
    assert "QLoRA, Llama-3.1-8B's shape" in table and "| lever (ours) |" in table and "(complete)" in table


def test_gpu_targets_read_the_strongest_trl_run_and_failed_runs_stay_one_table_row():
    suite = _gpu_suite()
    runs = {"ours": {"tokens_per_s": 13000.0, "peak_gpu_mb": 11000.0, "peak_rss_mb": 3000.0},
            "trl-best": {"tokens_per_s": 10000.0, "peak_gpu_mb": 10000.0, "peak_rss_mb": 3000.0},
            "trl": {"tokens_per_s": 8000.0, "peak_gpu_mb": 9000.0, "peak_rss_mb": 3000.0}}
    speed, memory = suite.lora_targets(runs, "cuda")
    assert "trl-best" in speed["name"] and speed["value"] == pytest.approx(1.3) and speed["met"]
    assert memory["value"] == pytest.approx(1.1) and not memory["met"]
    assert suite.lora_targets(runs, "cpu")[0]["met"] is None
    assert suite.lora_targets({"ours": runs["ours"], "trl": {"error": "boom"}}, "cuda")[0]["why"] == "needs ours and a TRL run"
    report = {"command": "c", "date": "d", "machine": "m", "device": "cuda", "precision": "bf16", "peak_label": "p",
              "matmul_peak_tflops": 790.0, "preflight": {"packages": {}}, "sizes": {"batch_size": 8}, "skipped": [],
              "wall_seconds": 1.0, "budget_seconds": 480.0,
              "parts": {"lora": {"runs": {"ours": {"error": "ours run failed (exit 1):\nTraceback\nOutOfMemoryError: | x"},
                                          "trl": {"skipped": "not run: 10 s of the budget left"}},
                                 "targets": suite.lora_targets({}, "cuda")},
                        "qlora": {"error": "RuntimeError: qlora killed at its time cap of 170 s:\nlog"}}}
    table = suite.markdown(report)
    row = next(line for line in table.splitlines() if line.startswith("| tunekit |"))
    assert row.count("|") == 9 and "OutOfMemoryError: / x" in row  # the first and last lines, pipes escaped
    assert "| TRL SFTTrainer (defaults: gradient checkpointing) | not run: 10 s of the budget left |" in table
    assert "QLoRA: failed: RuntimeError: qlora killed at its time cap of 170 s: ... log" in table
    assert "(still running or cut off)" in table
