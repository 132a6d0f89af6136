"""llama.cpp itself on tunekit's GGUF files of the Llama family beyond byte-level BPE: tiny Llamas with SentencePiece
tokenizers in both prefix styles (Llama 2's `legacy`, and Mistral v0.3's Metaspace "first") and with llama3 and
linear rope scaling, exported by `tunekit.gguf_export.export_gguf` as the export stage does, then tokenised and run by
llama-cpp-python. Reported per file: how many strings llama.cpp tokenises to the Hugging Face tokenizer's ids, the
largest logit difference and top-1 agreement against the model in fp32, and tunekit's own gate figures beside them.

    TUNEKIT_LLAMA_CPP_PYTHON=/tmp/llamavenv/bin/python python bench/gguf_llama_cpp_families.py

The interpreter named must have `llama_cpp` (docs/export.md: building llama-cpp-python here takes about an hour);
this script's own part runs in the project's venv. Results: bench/results/gguf_families/latest.{json,md}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
CASES = {"llama2-legacy": (True, {}), "mistral-v03-first": (False, {}),
         "llama3-rope": (True, {"rope_scaling": LLAMA3, "rope_theta": 10000.0}),
         "linear-rope": (True, {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_theta": 10000.0})}


def export_cases(work: Path) -> None:
    """Each case's GGUF file, and expected.json: the HF tokenizer's ids of every test string, the fp32 logits."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaForCausalLM

    import tests.tunekit.test_gguf_families as families
    from tests.conftest import train_sentencepiece
    from tunekit.models import load_tokenizer

    torch.set_num_threads(1)
    sp_model = train_sentencepiece(work / "tokenizer.model", normalization_rule_name="identity")
    for name, (legacy, extra) in CASES.items():
        case = work / name
        case.mkdir()
        tokenizer = families.spm_tokenizer(sp_model, case / "tok", legacy)
        torch.manual_seed(0)
        model = LlamaForCausalLM(families.llama_config(len(tokenizer), **extra)).eval()
        path, gate = families.export_f16(model, tokenizer, case)
        loaded = load_tokenizer(case / "checkpoint")
        chats = families.texts_for(loaded)
        texts = families.PLAIN + families.LEADING_SPACE + families.CHAT + chats
        ids = {text: loaded(text, add_special_tokens=False).input_ids for text in texts}
        logits = []
        for text in chats:
            with torch.no_grad():
                logits.append({"ids": ids[text], "logits": model(torch.tensor([ids[text]])).logits[0].tolist()})
        gate = {key: value for key, value in gate.items() if isinstance(value, (int, float, str, bool))}
        (case / "expected.json").write_text(json.dumps({"gguf": str(path), "ids": ids, "logits": logits, "gate": gate}))


def check_cases(work: Path) -> dict:
    """Run under the llama_cpp interpreter: llama.cpp's tokens and logits against expected.json."""
    import numpy as np
    from llama_cpp import Llama

    report = {}
    for name in CASES:
        expected = json.loads((work / name / "expected.json").read_text())
        llm = Llama(model_path=expected["gguf"], n_ctx=512, logits_all=True, verbose=False, n_threads=1)
        differ = []
        for text, ids in expected["ids"].items():
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if got != ids:
                differ.append({"text": text, "hf": ids[:8], "llama_cpp": got[:8]})
        diffs, top1, positions = [], 0, 0
        for case in expected["logits"]:
            llm.reset()
            llm.eval(case["ids"])
            scores = np.array(llm.scores[:len(case["ids"])], dtype=np.float64)
            reference = np.array(case["logits"], dtype=np.float64)
            diffs.append(float(np.abs(scores - reference).max()))
            top1 += int((scores.argmax(-1) == reference.argmax(-1)).sum())
            positions += len(case["ids"])
        report[name] = {"strings": len(expected["ids"]), "same_ids": len(expected["ids"]) - len(differ),
                        "differ": differ, "max_logit_difference": max(diffs), "top1_agreement": top1 / positions,
                        "positions": positions, "gate": expected["gate"]}
    return report


def markdown(result: dict) -> str:
    lines = [f"# llama.cpp on tunekit's GGUF files: SentencePiece vocabularies and rope scaling ({result['date']})", "",
             f"llama-cpp-python {result['llama_cpp']}, commit {result['commit']}; tiny Llamas (2 layers, 64 wide, "
             "1000-token SentencePiece BPE trained on Python's docs), f16.", "",
             "| case | llama.cpp ids = HF ids | strings that differ | max logit diff (llama.cpp vs fp32) | top-1 agreement "
             "| gate: max logit diff (transformers reader) | gate: tokenizer round trip |", "|---|---|---|---|---|---|---|"]
    for name, row in result["cases"].items():
        differ = ", ".join(repr(d["text"][:24]) for d in row["differ"]) or "none"
        lines.append(f"| {name} | {row['same_ids']}/{row['strings']} | {differ} | {row['max_logit_difference']:.4f} | "
                     f"{row['top1_agreement']:.3f} | {row['gate']['max_logit_difference']:.4f} | "
                     f"{row['gate']['tokenizer_round_trip']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--check"]:
        print(json.dumps(check_cases(Path(sys.argv[2]))))
        return
    interpreter = os.environ.get("TUNEKIT_LLAMA_CPP_PYTHON")
    if not interpreter:
        sys.exit("set TUNEKIT_LLAMA_CPP_PYTHON to an interpreter that has llama_cpp (see this script's docstring)")
    work = Path(tempfile.mkdtemp(prefix="gguf-families-"))
    try:
        export_cases(work)
        done = subprocess.run([interpreter, __file__, "--check", str(work)], capture_output=True, text=True, check=True)
        version = subprocess.run([interpreter, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit, "llama_cpp": version,
              "cases": json.loads(done.stdout.strip().splitlines()[-1])}
    out = ROOT / "bench/results/gguf_families"
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    (out / "latest.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
