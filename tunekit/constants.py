"""Names every layer shares: a leaf module (no imports from tunekit, no torch), so params validation,
ingest and the registries can all read them.

The registries (tunekit.methods.METHODS, tunekit.tasks.TASKS) are the truth about what each name does;
tests check that these tuples list exactly their entries."""

from __future__ import annotations

# Label value that torch's cross-entropy (and transformers' losses) skip.
IGNORE_INDEX = -100

SPLITS = ("train", "validation", "test")

# task.type: generative SFT, the single-head kinds, and several heads on one backbone.
HEAD_TASK_KINDS = ("classification", "token_classification", "qa", "regression")
TASK_KINDS = ("sft", *HEAD_TASK_KINDS, "multi_task")
# The kinds a task of a multi-task run may be (task.tasks.<name>.type).
MULTI_TASK_KINDS = ("classification", "token_classification", "qa")

# finetune.method
METHOD_NAMES = ("full", "freeze", "head", "lora", "dora", "ia3", "qlora", "adapter", "prompt_tuning", "prefix_tuning",
                "p_tuning", "peft")
# The methods whose checkpoint is a PEFT adapter (peft loads it on its base).
PEFT_METHODS = ("lora", "dora", "ia3", "qlora", "prompt_tuning", "prefix_tuning", "p_tuning", "peft")

# The tokenised task data's label sets, written by the template stage beside the split files.
LABELS_FILE = "labels.json"

# The models an evaluation scores, in report order (each task kind scores some of them).
MODEL_ORDER = ("base", "dapt", "few_shot", "tuned", "merged")
