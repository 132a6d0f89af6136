# ruff: noqa: F811  (fixtures imported from other test modules are parameters here)
"""The CUDA paths, run where a GPU is present and skipped elsewhere (marker `gpu`).

Every stage computes on `tunekit.models.compute_device()`: the GPU when CUDA is present. These tests
set `TUNEKIT_DEVICE=cuda` (the suite pins the CPU by default, see conftest.py) and run the stages' own
`run` functions: every fine-tuning method under bf16 autocast, bf16 against fp32, and the SFT and task
pipelines from DAPT to forgetting, with what each stage writes read back and checked.
"""

import pytest
import torch
import yaml

from stages import dapt, evaluate, finetune, forgetting, merge
from tests.conftest import REPO
from tests.stages.test_dapt import domain_corpus, small_params
from tests.stages.test_evaluate_stage import conversation
from tests.tunekit.tasks.test_heads import llama_dir, tokenized  # noqa: F401 (fixtures)
from tests.tunekit.test_methods import CASES, base_dirs, rows  # noqa: F401 (fixtures)
from tunekit.chat import encode_conversation, resolve_chat_template
from tunekit.data import write_rows
from tunekit.io import is_merged, read_jsonl
from tunekit.methods import load_tuned, method_for
from tunekit.params import EvaluateParams, FinetuneParams, ForgettingParams, MergeParams, TaskParams, TemplateParams
from tunekit.train import TrainConfig, evaluate_loss, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def on_cuda(monkeypatch):
    monkeypatch.setenv("TUNEKIT_DEVICE", "cuda")


@pytest.fixture(scope="module")
def split_dir(rows, tmp_path_factory):
    data = tmp_path_factory.mktemp("tokenized")
    for split in ("train", "validation", "test"):
        write_rows(data / split, rows)
    return data


def on_device(model) -> set[str]:
    return {p.device.type for p in model.parameters()}


@pytest.mark.parametrize("name", list(CASES))
def test_every_method_trains_in_bf16_on_cuda_through_the_stage(name, rows, split_dir, base_dirs, smollm2_tokenizer, tmp_path):
    case = CASES[name]
    base_dir = base_dirs["untied" if case.untied else "tied"]
    params = FinetuneParams(method=name, **case.params, lr=case.lr, max_steps=case.steps, batch_size=4,
                            schedule="constant", warmup_ratio=0.0, eval_every=10_000, checkpoint_every=10_000,
                            early_stopping_patience=None, precision="bf16")
    out = tmp_path / "finetune"
    metrics, curves = finetune.run(params, 0, base_dir, split_dir, out, tmp_path / "plots", tmp_path / "ckpt")
    assert metrics["steps"] == case.steps and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in curves["history"])

    pad = smollm2_tokenizer.pad_token_id
    tuned = load_tuned(out)  # as evaluate loads it: on the GPU, qlora's base in 4-bit
    assert on_device(tuned.model) == {"cuda"}
    method = method_for(params)
    loss_after = evaluate_loss(tuned.model, rows, pad, 4, method.full_forward)["loss"]
    with tuned.base() as base:
        assert on_device(base) == {"cuda"}
        loss_before = evaluate_loss(base, rows, pad, 4, method.full_forward)["loss"]
    assert loss_after < case.max_loss_ratio * loss_before, (loss_before, loss_after)

    merged = tmp_path / "merged"
    result = merge.run(MergeParams(atol=1e-4), out, split_dir, merged)
    assert is_merged(merged) == method.mergeable or case.merge == "writes through"
    if is_merged(merged):
        assert result["max_logit_difference"] <= 1e-4


def test_bf16_autocast_follows_the_fp32_curve_on_cuda(rows, base_dirs, smollm2_tokenizer, tmp_path):
    params = FinetuneParams(method="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    method = method_for(params)
    pad = smollm2_tokenizer.pad_token_id
    curves, seen = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = method.prepare(method.load_base(base_dirs["tied"]), params)
        q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
        hook = q_proj.register_forward_hook(lambda module, args, output, p=precision: seen.setdefault(p, output.dtype) and None)
        cfg = TrainConfig(epochs=1, max_steps=12, lr=3e-2, batch_size=4, schedule="constant", precision=precision,
                          checkpoint_every=10_000, eval_every=10_000, seed=0)
        state = train(model, rows, [], cfg, pad, tmp_path / precision)
        hook.remove()
        curves[precision] = [h["train_loss"] for h in state.history]
        # master weights stay fp32 under autocast
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert curves["bf16"][-1] < 0.75 * curves["bf16"][0]
    assert curves["bf16"] == pytest.approx(curves["fp32"], rel=0.05)


def sft_data(smollm2_tokenizer, root):
    data, tokenized_dir = root / "ingested", root / "tokenized"
    data.mkdir()
    tokenized_dir.mkdir()
    template = resolve_chat_template("model", smollm2_tokenizer)
    for split, count in (("train", 12), ("validation", 4), ("test", 4)):
        records = [conversation(i, split) for i in range(count)]
        write_rows(data / split, records)
        encoded = [encode_conversation(r["messages"], smollm2_tokenizer, template) for r in records]
        write_rows(tokenized_dir / split, [{"id": r["id"], "input_ids": e.input_ids, "labels": e.labels}
                                                       for r, e in zip(records, encoded)])
    return data, tokenized_dir


def test_sft_stages_from_dapt_to_forgetting_on_cuda(tiny_model_dir, smollm2_tokenizer, tmp_path):
    dapt_out = tmp_path / "dapt"
    dapt_metrics, _ = dapt.run(small_params(domain_corpus(tmp_path), precision="bf16"), 1234, tiny_model_dir, dapt_out,
                               tmp_path / "dapt-plots", tmp_path / "ckpt")
    assert dapt_metrics["perplexity_after"] < dapt_metrics["perplexity_before"]
    assert (dapt_out / "model.safetensors").is_file()

    data, tokenized_dir = sft_data(smollm2_tokenizer, tmp_path)
    params = FinetuneParams(method="lora", lora={"r": 8, "alpha": 16, "dropout": 0.0}, lr=2e-2, max_steps=30, batch_size=4,
                            eval_every=10, checkpoint_every=10, early_stopping_patience=None, precision="bf16")
    out = tmp_path / "finetune"
    metrics, curves = finetune.run(params, 0, dapt_out, tokenized_dir, out, tmp_path / "plots", tmp_path / "ckpt")
    assert metrics["final_train_loss"] < curves["history"][0]["train_loss"] and (out / "adapter_model.safetensors").is_file()

    merged = tmp_path / "merged"
    assert merge.run(MergeParams(atol=1e-4), out, tokenized_dir, merged)["max_logit_difference"] <= 1e-4

    report = tmp_path / "report"
    results = evaluate.run(EvaluateParams(max_new_tokens=6, metrics=["exact_match", "chrf"], few_shot=None), TemplateParams(),
                           out, data, tokenized_dir, report, merged_dir=merged)
    assert {"base", "dapt", "tuned", "merged"} <= set(results)
    assert results["tuned"]["loss"] < results["base"]["loss"]
    assert results["merged"]["loss"] == pytest.approx(results["tuned"]["loss"], rel=1e-4)
    tuned_rows = list(read_jsonl(report / "predictions_tuned.jsonl"))
    assert [r["prediction"] for r in tuned_rows] == [r["prediction"] for r in read_jsonl(report / "predictions_merged.jsonl")]

    gone = forgetting.run(ForgettingParams(probe_passages=12, max_length=48, batch_size=12), out, merged,
                          tmp_path / "forgetting", tmp_path / "cache")
    assert abs(gone["merged"]["loss"] - gone["tuned"]["loss"]) <= 1e-3 * gone["tuned"]["loss"]
    assert gone["tuned"]["loss"] != gone["base"]["loss"] and (tmp_path / "forgetting" / "report.md").is_file()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_task_head_stages_on_cuda(method, llama_dir, smollm2_tokenizer, tmp_path):
    ingested, data = tokenized("classification", smollm2_tokenizer, tmp_path)
    task = TaskParams(type="classification")
    params = FinetuneParams(method=method, epochs=40, lr=5e-3, batch_size=8, eval_every=10, checkpoint_every=10,
                            early_stopping_patience=None, lora={"r": 8, "alpha": 16, "dropout": 0.0}, precision="bf16")
    out = tmp_path / "finetune"
    finetune.run(params, 0, llama_dir, data, out, tmp_path / "plots", tmp_path / "ckpts", 64, task)
    merged = tmp_path / "merged"
    check = merge.run(MergeParams(registered_model=None, check_examples=8), out, data, merged)
    assert is_merged(merged) and (check["predictions_identical"] == 1 or method == "qlora")
    results = evaluate.run(EvaluateParams(batch_size=8), TemplateParams(), out, ingested, data, tmp_path / "report", merged,
                           task=task)
    assert results["tuned"]["accuracy"] >= 0.9 > results["base"]["accuracy"], results
    assert results["merged"]["accuracy"] >= 0.9


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="with two GPUs, two workers are allowed")
def test_more_workers_than_gpus_is_refused_before_launching(tmp_path, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["finetune"]["processes"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    args = [f"--{name}={tmp_path / name}" for name in ("model", "data", "out", "metrics", "plots", "checkpoints")]
    with pytest.raises(SystemExit, match=r"processes is 2 but 1 GPU\(s\) are visible.*TUNEKIT_DEVICE=cpu"):
        finetune.main(args)
