"""Stage `base`: resolve `base.model` into a local safetensors checkpoint with tokenizer and chat template.

    python -m stages.base --out models/base --metrics metrics/base.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tunekit.io import atomic_dir, content_hash, write_json, write_meta
from tunekit.models import classify_source, is_encoder_config, load_source, portable_location
from tunekit.params import BaseModelParams, ProjectParams, load_section
from tunekit.tracking import configure_logging, log_metrics, stage_run

log = logging.getLogger("tunekit")


def run(params: BaseModelParams, out: Path) -> dict:
    model, tokenizer, kind, location = load_source(params.model, params.dtype, params.trust_remote_code)
    encoder = is_encoder_config(model.config)
    if encoder:
        # Encoders (base.model: minilm) serve the task heads (task.type); they neither chat nor generate.
        log.info("base model is an encoder (%s): usable for task heads, not for task.type: sft", model.config.model_type)
    else:
        if not tokenizer.chat_template:
            log.warning("the base tokenizer has no chat template: set template.chat_template to chatml, llama3 or a .jinja file")
        # Generation must stop at the end of an assistant turn, which for chat models is often not the
        # tokenizer's eos (e.g. <|im_end|> vs <|endoftext|>).
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source_hash = content_hash(Path(location)) if kind != "hub" else str(location)
        write_meta(tmp, "base", params.model_dump(),
                   extra={"source": {"spec": params.model, "kind": kind, "location": portable_location(params.model, location),
                                     "hash": source_hash}})

    parameters = sum(p.numel() for p in model.parameters())
    return {"parameters": parameters, "vocab_size": len(tokenizer), "layers": int(getattr(model.config, "num_hidden_layers", 0)),
            "encoder": int(encoder)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file to write")
    args = parser.parse_args(argv)
    configure_logging()
    project: ProjectParams = load_section("project")
    params: BaseModelParams = load_section("base")

    tags = {"base.model": params.model, "base.location": str(classify_source(params.model)[1])}
    with stage_run("base", project.experiment, params, tags=tags) as mlflow:
        metrics = run(params, args.out)
        write_json(args.metrics, metrics)
        log_metrics(mlflow, metrics)
    log.info("base checkpoint written to %s: %s", args.out, metrics)


if __name__ == "__main__":
    main()
