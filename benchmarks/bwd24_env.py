"""The launch settings `run_gpu.sh bwd24` found fastest for one mode of the 2:4 FFN, as environment assignments
(one per line) for `run_gpu.sh bwd24_step`: the backward's (ELAS_BWD24_CONFIG, that mode's fastest form at K),
and the forward sparsifier's form (ELAS_SPARSIFY_CONFIG): its word form where a word form beat every tile launch
of the same kind (with the mask bits for mask mode, without them for ste), else {"words": false}. Exit 1, with a
line, when the file has no row for K.

    python benchmarks/bwd24_env.py benchmarks/results/h100/bwd24/sparsify.json mask [K (default 8192)]
"""
from __future__ import annotations

import json
import re
import sys


# a backward form's name in the sweep (bench/kernels.py _backward_sweep): its launch, and whether it is the word form
BWD_FORM = re.compile(r"rows(\d+)_warps(\d+)(_words)?")


def backward_env(use: dict, mode: str = "mask") -> str | None:
    """ELAS_BWD24_CONFIG for the fastest backward form of one use's sweep (None where none was timed), in the
    form `elas bench sparsify` prints it, rebuilt from the forms' names rather than taken from its `best`: the
    committed sweeps (h100/sparsify_bwd24.json) also timed the backward's persistent form, removed since, whose
    keys (per_sm, prefetch) the kernel's module now rejects and which some of them name fastest. Those rows
    (rows64_warps8_persistent2_prefetch, ...) are ignored: the fastest of the remaining forms is taken. So are
    `ste` mode's word rows: that word form tied the grid form and was removed (words=True no longer changes
    what `ste` runs)."""
    timed = {name: ms for name, ms in use.get("variants_ms", {}).items()
             if (m := BWD_FORM.fullmatch(name)) and not (mode == "ste" and m[3])}
    if not timed:
        return None
    m = BWD_FORM.fullmatch(min(timed, key=timed.get))
    return "ELAS_BWD24_CONFIG=" + json.dumps({"rows": int(m[1]), "num_warps": int(m[2]), "words": bool(m[3])})


def assignments(doc: dict, mode: str, k: int = 8192) -> list[str]:
    rows = [r for r in doc["rows"] if r["K"] == k]
    if not rows:
        raise SystemExit(f"bwd24_env: no row for K={k} (rows for K={sorted(r['K'] for r in doc['rows'])})")
    r = rows[0]
    out = []
    env = backward_env(r["backward"][mode], mode)
    if env:
        out.append(env)
    bits = mode == "mask"  # ste never reads the mask bits: its forward skips them
    timed = {name: ms for name, ms in r.get("variants_ms", {}).items() if name.endswith("_nobits") != bits}
    if timed:
        fastest = min(timed, key=timed.get)
        m = re.fullmatch(r"words_groups(\d+)_warps(\d+)(_nobits)?", fastest)
        # (a tile launch that won says so too: the swept process must not take the module's DEFAULT_WORDS)
        out.append("ELAS_SPARSIFY_CONFIG=" + json.dumps({"words": True, "groups": int(m[1]), "num_warps": int(m[2])}
                                                        if m else {"words": False}))
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[2] not in ("mask", "ste"):
        raise SystemExit("usage: bwd24_env.py SPARSIFY_JSON mask|ste [K]")
    print("\n".join(assignments(json.load(open(sys.argv[1])), sys.argv[2],
                                int(sys.argv[3]) if len(sys.argv) == 4 else 8192)))
