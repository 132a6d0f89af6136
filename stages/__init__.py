"""One DVC stage per module: `python -m stages.<name>`."""

import os
import sys

# PyTorch's CPU allocator: buffers of 2 MB and more are page-aligned and marked for transparent huge pages
# (madvise). Read once, when torch loads, hence here, before any stage imports it. With glibc, training's
# activations of ever-changing sizes otherwise leave freed blocks of the wrong sizes resident: SmolLM2-135M
# LoRA, one epoch of benchmark set (a), peak RSS 5.3 -> 3.9 GB (2.7 GB with the default feed-forward
# checkpointing) for ~5 % more time (bench/README.md). THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# `python -m stages.<name>` (sys.argv[0] is "-m" while Python imports the package for it, as documented):
# expected errors print as one message, and under DVC the stage lives and publishes only while its dvc does
# (tunekit/process.py). Tests that import the stages as modules are left alone.
if sys.argv[:1] == ["-m"]:
    from tunekit.process import start_stage_process

    start_stage_process()
