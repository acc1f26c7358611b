"""Launch settings a process takes from its environment: ELAS_<KERNEL>_CONFIG='{"key": value, ...}' (a JSON object).

The benchmarks that sweep a kernel's launch settings print the fastest in this form, so that a step can be timed
with them without a code change. The kernel's module reads its variable once, at import, and checks it there: an
unknown key or a bad value fails with one line naming the variable, not at the first launch (a check that needs
the shapes, e.g. the loss kernel's one block against the vocabulary, runs where the model is built). Used by attention.py (ELAS_ATTN_CONFIG), xent.py
(ELAS_XENT_CONFIG), rmsnorm.py (ELAS_RMSNORM_CONFIG) and sparsify.py (ELAS_SPARSIFY_CONFIG, ELAS_BWD24_CONFIG: the
2:4 sparsifier and its backward).
"""
from __future__ import annotations

import json
import os
from typing import Iterable


def env_config(var: str, keys: Iterable[str]) -> dict:
    """The JSON object in the environment variable var ({} where unset or empty); ValueError, naming the value and
    the valid keys, for anything but an object whose keys are among keys."""
    raw = os.environ.get(var)
    if not raw:
        return {}
    keys = tuple(keys)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{var}={raw!r}: not JSON ({e.msg}); expected an object with keys among "
                         f"{', '.join(keys)}") from None
    if not isinstance(value, dict) or set(value) - set(keys):
        bad = sorted(set(value) - set(keys)) if isinstance(value, dict) else None
        raise ValueError(f"{var}={raw!r}: " + (f"unknown key {bad[0]!r}; " if bad else "not a JSON object; ")
                         + f"expected an object with keys among {', '.join(keys)}")
    return value


__all__ = ["env_config"]
