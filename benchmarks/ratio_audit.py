"""Are the committed step tables' sparse-vs-twin ratios against the dense twin in its best mode? For every
`elas bench step` file under benchmarks/results: the ratio the tables show (bench.step.ratios, today's rule: the
twin's fastest row of the file in any kernel form) beside the one the file stored, where they differ (an older
rule); elas mode must be the fastest mode of every variant timed in several modes; and each ratio's twin row is
listed with its ReLU^2, norm and loss kernels as recorded (none recorded: the torch ops of its day). Prints one
table; exit 1 where elas mode is not the fastest.

    PYTHONPATH=src python benchmarks/ratio_audit.py
"""
from __future__ import annotations

import glob
import json
import sys
from pathlib import Path


def audit(paths: list[str]) -> dict:
    from elas.bench.step import ratios
    from elas.config import VARIANTS, split_variant
    out = {"files": 0, "ratios": 0, "restated": [], "elas_not_fastest": [], "twins": {}}
    for f in paths:
        rows = json.loads(Path(f).read_text()).get("rows", [])
        if not rows or "mode" not in rows[0]:
            continue
        out["files"] += 1
        modes: dict[tuple, dict] = {}
        for r in rows:
            if "error" not in r and "step_ms" in r:
                modes.setdefault((r["model"], r["batch"], r["variant"]), {})[r["mode"]] = r["step_ms"]
        out["elas_not_fastest"] += [(f, k, m) for k, m in modes.items()
                                    if "elas" in m and len(m) > 1 and min(m, key=m.get) != "elas"]
        fresh = {(r["model"], r["batch"], r["variant"], r["mode"]): r for r in ratios(
            [{k: v for k, v in r.items() if not k.startswith("vs_") and k != "twin_mode"} for r in rows])}
        for r in rows:
            if "vs_twin" not in r:
                continue
            out["ratios"] += 1
            x = fresh[(r["model"], r["batch"], r["variant"], r["mode"])]
            if abs(x["vs_twin"] - r["vs_twin"]) > 1e-9:
                out["restated"].append((f, r["variant"], r["vs_twin"], x["vs_twin"], x["twin_variant"]))
            twin = x.get("twin_variant", VARIANTS[split_variant(r["variant"])[0]].twin)
            t = next((y for y in rows if y.get("variant") == twin and y.get("mode") == x.get("twin_mode")
                      and (y["model"], y["batch"]) == (r["model"], r["batch"])), {})
            out["twins"].setdefault(f, set()).add((twin, x.get("twin_mode"), t.get("relu2_kernel") or "-",
                                                   t.get("norm_kernel") or "-", t.get("ce_kernel") or "-"))
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    a = audit(sorted(glob.glob(str(root / "*" / "step*.json")) + glob.glob(str(root / "*" / "*" / "step.json"))))
    print(f"{a['files']} step files, {a['ratios']} sparse-vs-twin ratios; restated by today's rule: "
          f"{len(a['restated'])}; elas mode not the fastest mode: {len(a['elas_not_fastest'])}")
    for f, v, stored, now, twin in a["restated"]:
        print(f"  {Path(f).relative_to(root)} {v}: stored {stored:.3f}x, shown {now:.3f}x (against {twin})")
    print("| file | twin, its mode, ReLU^2 / norm / loss kernels |\n|---|---|")
    for f, s in a["twins"].items():
        print(f"| {Path(f).relative_to(root)} | " + "; ".join(f"{t} ({m}), {rk} / {nk} / {ck}"
                                                         for t, m, rk, nk, ck in sorted(s)) + " |")
    sys.exit(1 if a["elas_not_fastest"] else 0)
