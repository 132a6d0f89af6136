"""One DVC stage per module: `python -m stages.<name>`."""

import os

# PyTorch's CPU allocator: buffers of 2 MB and more are page-aligned and marked for transparent huge pages
# (madvise). Read once, when torch loads, hence here, before any stage imports it. With glibc, training's
# activations of ever-changing sizes otherwise leave freed blocks of the wrong sizes resident: SmolLM2-135M
# LoRA, one epoch of benchmark set (a), peak RSS 5.3 -> 3.9 GB (2.7 GB with the default feed-forward
# checkpointing) for ~5 % more time (bench/README.md). THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
