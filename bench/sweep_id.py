"""A per-process id in Hydra's sweep folder name (``${fatr_run_id:}`` in ``conf/config.yaml``).

Hydra's default folder is a timestamp to the second, so two sweeps started in the same second
shared it: each listed the other's jobs and failures. Importing this module registers the
resolver; ``bench.run`` and ``bench.callbacks`` import it, so launcher processes that rebuild
the config (joblib, submitit) resolve it too (to the value cached in the parent's config).
"""

from __future__ import annotations

import os
import secrets

from omegaconf import OmegaConf

RESOLVER = "fatr_run_id"
_RUN_ID = f"{os.getpid()}-{secrets.token_hex(2)}"


def run_id() -> str:
    """Process id plus a random suffix (pids repeat across the nodes of a shared filesystem)."""
    return _RUN_ID


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, run_id, use_cache=True)
