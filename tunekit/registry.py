"""The MLflow model registry's `candidate` alias: set by the export stage, only on a model that passed its gates.

The merge stage registers every merged checkpoint as a new version of `merge.registered_model`, tagged
with the checkpoint's content hash (meta.json `hash`). Whether that version becomes the `candidate` that
serving and promotion pick is decided later, by the export stage's quality gates: a model that did not
learn gets a version (the record of the run) but never the alias.
"""

from __future__ import annotations

import logging

log = logging.getLogger("tunekit")

REGISTRY_ALIAS = "candidate"
HASH_TAG = "checkpoint.hash"


def promote_candidate(client, name: str, checkpoint_hash: str, forced: bool = False) -> str | None:
    """Point `candidate` at the newest version of `name` registered from the checkpoint with this hash;
    returns the version, or None when no version has it (registration was off, or merge ran elsewhere)."""
    versions = client.search_model_versions(f"name = '{name}' and tag.`{HASH_TAG}` = '{checkpoint_hash}'")
    if not versions:
        log.warning("no version of registered model %s has %s=%s: alias %r not set", name, HASH_TAG,
                    checkpoint_hash[:16], REGISTRY_ALIAS)
        return None
    version = str(max(int(v.version) for v in versions))
    client.set_registered_model_alias(name, REGISTRY_ALIAS, version)
    client.set_model_version_tag(name, version, "export.gates", "forced" if forced else "passed")
    log.info("registered model %s version %s is now %r (gates %s)", name, version, REGISTRY_ALIAS,
             "failed, exported with export.force" if forced else "passed")
    return version
