"""Render benchmark JSON (benchmarks/results/<gpu>/*.json) into the tables of docs/performance.md."""
from __future__ import annotations

import json
from pathlib import Path


def _env_line(doc: dict) -> str:
    e = doc.get("env", {})
    return (f"{e.get('gpu', '?')}, torch {e.get('torch', '?')}, CUDA {e.get('cuda', '?')}, cuSPARSELt "
            f"{e.get('cusparselt', '?')}, Triton {e.get('triton', '?')}, {e.get('date', '?')}; "
            f"command: `{doc.get('command', '?')}`")


def gemm_table(doc: dict) -> str:
    out = [_env_line(doc), "",
           "| M | K (d_ff) | N | B layout | cuBLAS dense ms | elas 2:4 ms | speed-up | alg | torch `_cslt_sparse_mm` alg 0 ms |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        out.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['b_layout']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | "
                   f"**{r['speedup']:.2f}x** | {r['alg_id']} | {r['torch_cslt_alg0_ms']:.4f} |")
    if "host_overhead" in doc:
        h = doc["host_overhead"]
        out += ["", "Host time per eager call (µs, tiny problem, wall clock): "
                + ", ".join(f"{k.removesuffix('_us')} {v:.1f}" for k, v in h.items())]
    return "\n".join(out)


def sparsify_table(doc: dict) -> str:
    out = [_env_line(doc), "",
           "| M | K | elas Triton ms | TB/s | copy TB/s | torch masked-dense reference ms | `_cslt_compress` alone ms |",
           "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        out.append(f"| {r['M']} | {r['K']} | {r['ms']:.4f} | **{r['tb_per_s']:.2f}** | {r['copy_tb_per_s']:.2f} | "
                   f"{r['reference_torch_ms']:.3f} | {r['torch_cslt_compress_ms']:.3f} |")
    return "\n".join(out)


RENDERERS = {"gemm.json": ("2:4 GEMM", gemm_table), "sparsify.json": ("ReLU² + 2:4 sparsifier", sparsify_table)}


def render(results: Path) -> str:
    parts = []
    for gpu_dir in sorted(p for p in Path(results).iterdir() if p.is_dir()):
        for name, (title, fn) in RENDERERS.items():
            f = gpu_dir / name
            if f.exists():
                parts.append(f"### {title} ({gpu_dir.name})\n\n" + fn(json.loads(f.read_text())) + "\n")
    return "\n".join(parts)


def update_doc(doc_path: Path, results: Path) -> None:
    """Replace the text between the BEGIN/END markers of doc_path with freshly rendered tables."""
    text = doc_path.read_text()
    begin, end = "<!-- BEGIN GENERATED: elas bench report -->", "<!-- END GENERATED -->"
    a, b = text.index(begin) + len(begin), text.index(end)
    doc_path.write_text(text[:a] + "\n" + render(results) + text[b:])
