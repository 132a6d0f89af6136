"""Stage `pack`: tokenise and pack the domain text for `dapt`, once, streamed, as `datasets` on disk.

    python -m stages.pack --model models/base --out data/packed --metrics metrics/pack.json [--num-proc N]

The documents of `dapt.inputs` (.txt: documents separated by blank lines; .jsonl: {"text": ...} per line)
are tokenised with the base's tokenizer, joined with eos between documents and cut into blocks of
`dapt.block_size` tokens (the incomplete tail dropped); `dapt.validation` of the blocks, chosen by the hash
of their tokens, are held out. <out>/train and <out>/validation are `datasets` directories (Arrow,
`datasets.load_from_disk` reads them) with one column, `input_ids`, a fixed-size list of int32;
<out>/meta.json records the counts and the hash of the inputs. Tokenising runs in `--num-proc` processes
(0 = every core this process may use), which changes nothing in the output. Only the params that change
the tokens are this stage's (`dapt.enabled`, `inputs`, `block_size`, `validation`, and the tokenizer in
models/base), so `dapt` re-runs with other training params without tokenising again.

With `dapt.enabled: false` nothing is read or tokenised: <out> holds only a meta.json saying so.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

from tunekit.io import atomic_dir, content_hash, read_meta, without_timings, write_json, write_meta
from tunekit.models import load_tokenizer
from tunekit.params import DaptParams, ProjectParams, load_section
from tunekit.text import TextError, pack_corpus
from tunekit.tracking import configure_logging, log_metrics, stage_run

log = logging.getLogger("tunekit")

TOKEN_PARAMS = ("enabled", "inputs", "block_size", "validation")  # the dapt params that change the blocks
SCRATCH = ".scratch"  # the intermediate Arrow files, inside the atomic output's temporary directory


def token_params(params: DaptParams) -> dict:
    return {key: getattr(params, key) for key in TOKEN_PARAMS}


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(params: DaptParams, model_dir: Path, out: Path, num_proc: int = 0) -> dict:
    started = time.perf_counter()
    if not params.enabled:
        log.info("dapt.enabled is false: %s records that, nothing is tokenised", out)
        with atomic_dir(out) as tmp:
            write_meta(tmp, "pack", token_params(params), extra={"enabled": False})
        return {"enabled": 0}
    procs = num_proc or available_cores()
    tokenizer = load_tokenizer(model_dir)
    with atomic_dir(out) as tmp:
        try:
            counts = pack_corpus(params.inputs, tokenizer, params.block_size, params.validation, tmp, tmp / SCRATCH, procs)
        except TextError as exc:
            raise SystemExit(f"dapt.inputs: {exc}") from None
        finally:
            shutil.rmtree(tmp / SCRATCH, ignore_errors=True)
        if not counts["train_blocks"]:
            raise SystemExit(f"dapt.inputs {params.inputs}: {counts['tokens']} tokens make no block of dapt.block_size "
                             f"{params.block_size} to train on; add text or lower dapt.block_size")
        write_meta(tmp, "pack", token_params(params), parent=model_dir,
                   data={"inputs": content_hash(Path(params.inputs))}, extra={"enabled": True, **counts})
    log.info("%d documents, %d tokens -> %d blocks of %d (%d train, %d validation) in %s", counts["documents"],
             counts["tokens"], counts["blocks"], params.block_size, counts["train_blocks"], counts["validation_blocks"], out)
    seconds = time.perf_counter() - started
    return {"enabled": 1, **counts, "num_proc": procs, "seconds": seconds, "tokens_per_second": counts["tokens"] / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint whose tokenizer to use")
    parser.add_argument("--out", type=Path, required=True, help="directory for the packed train/validation datasets")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--num-proc", type=int, default=0, help="tokenising processes (0 = every available core)")
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: DaptParams = load_section("dapt")

    with stage_run("pack", project.experiment, params, tags={"enabled": str(params.enabled).lower()}) as mlflow:
        metrics = run(params, args.model, args.out, args.num_proc)
        if metrics["enabled"]:  # the inputs' hash, computed once, for the meta.json
            mlflow.set_tag("data.inputs", read_meta(args.out)["data"]["inputs"][:16])
        write_json(args.metrics, without_timings({k: v for k, v in metrics.items() if k != "num_proc"}))
        log_metrics(mlflow, metrics)
    log.info("pack done: %s", {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()})


if __name__ == "__main__":
    main()
