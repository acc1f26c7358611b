"""The benchmark report: the committed result files render, and the ratios in the tables are the JSON's."""
import json
from pathlib import Path

from elas.bench.report import render, step_tables

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_committed_results_render():
    text = render(RESULTS)
    for title in ("### 2:4 GEMM (h100)", "### FFN and training step (h100)", "### FFN and training step, batch x0.5"):
        assert title in text


def test_step_table_ratios_come_from_the_rows():
    doc = json.loads((RESULTS / "h100" / "step.json").read_text())
    by = {(r["model"], r["variant"]): r for r in doc["rows"]}
    e, d = by[("llama-1b", "elas")], by[("llama-1b", "lowrank-relu2")]
    line = next(ln for ln in step_tables(doc).splitlines() if ln.startswith("| llama-1b | elas | 64x256"))
    assert f"**{e['tokens_per_s'] / d['tokens_per_s']:.2f}x**" in line
    assert f"{e['step_ms_eager']:.1f}" in line
    # a row whose capture failed says so, and a row without eager timings (older files) still renders
    rows = [dict(r) for r in doc["rows"]]
    rows[0]["step_timing"] = "eager"
    for r in rows[1:]:
        r.pop("step_ms_eager", None)
    text = step_tables({**doc, "rows": rows})
    assert "(eager: capture out of memory)" in text and "| llama-1b | elas |" in text
