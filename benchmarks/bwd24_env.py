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


def assignments(doc: dict, mode: str, k: int = 8192) -> list[str]:
    rows = [r for r in doc["rows"] if r["K"] == k]
    if not rows:
        raise SystemExit(f"bwd24_env: no row for K={k} (rows for K={sorted(r['K'] for r in doc['rows'])})")
    r = rows[0]
    out = []
    best = r["backward"][mode].get("best", {})
    if "env" in best:
        out.append(best["env"])
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
