"""optim_state_dtype=bf16 against fp32 Adam moments: the validation curves of two finished runs that differ only in
that setting (run_gpu.sh moments), and the largest gap between them, as JSON.

    python benchmarks/moments.py RUN_FP32 RUN_BF16 OUT.json
"""
import json
import sys
from pathlib import Path


def val_curve(run: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}


def main(a: str, b: str, out: str) -> None:
    ca, cb = val_curve(Path(a)), val_curve(Path(b))
    steps = sorted(set(ca) & set(cb))
    if not steps:
        raise SystemExit(f"no validation step in both {a} and {b}")
    rows = [{"step": s, "fp32": ca[s], "bf16": cb[s], "rel": cb[s] / ca[s] - 1} for s in steps]
    last = rows[-1]
    result = {"runs": [a, b], "curve": rows, "final_rel": last["rel"],
              "max_abs_rel": max(abs(r["rel"]) for r in rows)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(f"step {r['step']:>6}  val loss fp32 moments {r['fp32']:.4f}  bf16 moments {r['bf16']:.4f}  "
              f"({r['rel']:+.2%})")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    main(*sys.argv[1:])
