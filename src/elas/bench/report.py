"""Render benchmark JSON (benchmarks/results/<gpu>/*.json) into the tables of docs/performance.md."""
from __future__ import annotations

import json
import re
import unicodedata
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
        h = doc["host_overhead"]  # times in µs (keys *_us, or older files' bare names) and the workspace's bytes
        out += ["", "Host time per eager call (µs, tiny problem, wall clock): "
                + ", ".join(f"{k.removesuffix('_us')} {v:.1f}" for k, v in h.items() if not k.endswith("_bytes"))]
        out += [f"cuSPARSELt workspace of that call: {v:,.0f} bytes" for k, v in h.items() if k == "workspace_bytes"]
    return "\n".join(out)


def sparsify_table(doc: dict) -> str:
    out = [_env_line(doc), "",
           "| M | K | elas Triton ms | TB/s | copy TB/s | torch masked-dense reference ms | `_cslt_compress` alone ms |",
           "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        out.append(f"| {r['M']} | {r['K']} | {r['ms']:.4f} | **{r['tb_per_s']:.2f}** | {r['copy_tb_per_s']:.2f} | "
                   f"{r['reference_torch_ms']:.3f} | {r['torch_cslt_compress_ms']:.3f} |")
    bwd = [r for r in doc["rows"] if "backward" in r]
    if bwd:  # the backward pointwise kernel in its three uses (default launch; variants in the JSON)
        uses = list(bwd[0]["backward"])
        out += ["", "Backward pointwise kernel, ms (TB/s):", "",
                "| M | K | " + " | ".join(uses) + " |", "|---|---|" + "---|" * len(uses)]
        for r in bwd:
            out.append(f"| {r['M']} | {r['K']} | " + " | ".join(
                f"{r['backward'][u]['ms']:.4f} ({r['backward'][u]['tb_per_s']:.2f})" for u in uses) + " |")
    return "\n".join(out)


def sste_table(doc: dict) -> str:
    out = [_env_line(doc), "",
           "| W [R x C] | dtype | packs | ms | TB/s | copy TB/s | fastest variant (ms) |", "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        best = min(r["variants_ms"].items(), key=lambda kv: kv[1]) if r.get("variants_ms") else None
        out.append(f"| {r['R']} x {r['C']} | {r['dtype']} | {'S(W^T)' if r['transpose'] else 'S(W)'} | "
                   f"{r['ms']:.4f} | **{r['tb_per_s']:.2f}** | {r['copy_tb_per_s']:.2f} | "
                   + (f"{best[0]} ({best[1]:.4f})" if best else "-") + " |")
    return "\n".join(out)


def epilogue_table(doc: dict) -> str:
    out = [_env_line(doc), "",
           "| kernel | M | K (q) | N (d_ff) | cuBLAS GEMM ms | GEMM + separate kernel ms | fused ms | speed-up | "
           "fused ms, y1 not written | speed-up | best tiles |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        head = f"| {r['kernel']} | {r['M']} | {r['K']} | {r['N']} | {r['cublas_ms']:.4f} | {r['separate_ms']:.4f} |"
        if not r.get("best"):
            out.append(head + " no configuration ran exactly | | | | |")
            continue
        no_y1 = (f"{r['fused_no_y1_ms']:.4f} | {r['speedup_no_y1']:.2f}x" if "fused_no_y1_ms" in r else "- | -")
        out.append(head + f" {r['fused_ms']:.4f} | **{r['speedup']:.2f}x** | {no_y1} | {r['best']} |")
    return "\n".join(out)


def _decode_compiled(r: dict) -> str:
    """The compiled decode's two cells: ms and ratio, its error, or dashes where it was not measured."""
    v = r.get("decode_compiled_ms_per_token")
    if v is None:
        return "- | -"
    if not isinstance(v, float):
        return f"failed: {v[:60]} | -"
    return f"{v:.3f} | " + (f"{r['decode_compiled_vs_twin']:.2f}x" if "decode_compiled_vs_twin" in r else "-")


def infer_table(doc: dict) -> str:
    out = [_env_line(doc), "",
           "| model | variant | prefill batch x prompt | prefill ms | prefill tokens/s | vs dense twin (its best mode) | "
           "decode ms/token (batch 1, CUDA graph) | vs dense twin | decode FFN path | prefill GPU idle ms | prefill "
           "ms, CUDA graph | vs dense twin (its best mode) | decode ms/token, compiled + graph | vs dense twin |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            out.append(f"| {r['model']} | {r['variant']} | {r['error']} | | | | | | | | | | | |")
            continue
        idle = r.get("prefill_breakdown_ms", {}).get("idle")
        tm = f" ({r['twin_prefill_mode']})" if "twin_prefill_mode" in r else ""
        pv = f"**{r['prefill_vs_twin']:.2f}x**{tm}" if "prefill_vs_twin" in r else "-"
        dv = f"{r['decode_vs_twin']:.2f}x" if "decode_vs_twin" in r else "-"
        graph = f"{r['prefill_graph_ms']:.2f}" if "prefill_graph_ms" in r else "-"
        gv = f"**{r['prefill_graph_vs_twin']:.2f}x**{tm}" if "prefill_graph_vs_twin" in r else "-"
        out.append(f"| {r['model']} | {r['variant']} | {r['batch']}x{r['prompt']} | {r['prefill_ms']:.2f} | "
                   f"{r['prefill_tokens_per_s']:,.0f} | {pv} | {r['decode_ms_per_token']:.3f} | {dv} | "
                   f"{r['decode_path']} | {'-' if idle is None else f'{idle:.2f}'} | {graph} | {gv} | "
                   f"{_decode_compiled(r)} |")
    return "\n".join(out)


def twin_of(variant: str) -> str:
    """The dense twin of a bench row's variant ("relu2-w24+sste24.backend=cuda" -> "relu2"), from the registry;
    "" for a dense variant or one the registry no longer has."""
    from ..config import VARIANTS, split_variant
    v = VARIANTS.get(split_variant(variant)[0])
    return (v.twin or "") if v else ""


def ffn_table(doc: dict) -> str:
    """elas bench ffn: one FFN block per row, against its dense twin."""
    rows = doc["rows"]
    by = {(r["model"], r["variant"]): r for r in rows}
    eager_cols = all("ffn_ms_eager" in r for r in rows)  # results of older versions timed the FFN one way only
    comp_cols = all("ffn_ms_compiled" in r for r in rows)  # ... and not compiled
    out = [_env_line(doc), "",
           "FFN block forward+backward (bf16 weights; GPU time from CUDA-graph replay"
           + (", uncompiled and compiled" if comp_cols else "")
           + (", and eager with host overhead" if eager_cols else "") + ") and the activation memory autograd saves "
           "for it:", "",
           "| model | variant | tokens | FFN fwd+bwd ms | vs dense twin" + (" (both uncompiled)" if comp_cols else "")
           + " | " + ("compiled ms | best vs dense twin's best | " if comp_cols else "")
           + ("eager ms | vs dense twin (eager) | " if eager_cols else "") + "FFN act. memory GB | vs dense twin | path |",
           "|---|---|---|---|---|---|---|---|" + ("---|---|" if comp_cols else "") + ("---|---|" if eager_cols else "")]
    def timing(r: dict) -> str:
        return r.get("ffn_timing", "graph")

    def best(r: dict) -> float | None:
        """The faster graph-replayed timing (uncompiled or compiled); None where neither captured. (Files before
        2026-12-07 stored `ffn_ms_best` with the eager time among the candidates: recomputed here.)"""
        ts = [t for t in (r["ffn_ms"] if timing(r) == "graph" else None, r.get("ffn_ms_compiled")) if t is not None]
        return min(ts) if ts else None

    for r in rows:
        twin = by.get((r["model"], twin_of(r["variant"])))
        # a ratio only between two timings of one kind: a row whose capture failed holds an eager time, which
        # against the twin's graph replay would count the host's overhead as the method's cost
        sp = f"{twin['ffn_ms'] / r['ffn_ms']:.2f}x" if twin and timing(twin) == timing(r) else "-" if twin else ""
        if twin and not comp_cols and sp != "-":  # older files: the only ratio they have (their notes say which mode)
            sp = f"**{sp}**"
        mem = f"{100 * (r['ffn_act_mem_gb'] / twin['ffn_act_mem_gb'] - 1):+.0f}%" if twin else ""
        mark = "" if timing(r) == "graph" else " (eager)"
        comp = ""
        if comp_cols:
            c = r["ffn_ms_compiled"]
            b, tb = best(r), best(twin) if twin else None
            best_cell = f"**{tb / b:.2f}x**" if b and tb else "-" if twin else ""
            comp = f"{'-' if c is None else f'{c:.3f}'} | {best_cell} | "
        eager = ""
        if eager_cols:
            vs = f"{twin['ffn_ms_eager'] / r['ffn_ms_eager']:.2f}x" if twin else ""
            eager = f"{r['ffn_ms_eager']:.3f} | {vs} | "
        out.append(f"| {r['model']} | {r['variant']} | {r['batch'] * r['seq']} | {r['ffn_ms']:.3f}{mark} | {sp} | "
                   f"{comp}{eager}{r['ffn_act_mem_gb']:.3f} | {mem} | {r['path']} |")
    return "\n".join(out)


def step_tables(doc: dict) -> str:
    rows = doc["rows"]
    by = {(r["model"], r["variant"]): r for r in rows}
    out = [ffn_table(doc)]
    out += ["", "Training step (whole model, bf16 autocast, fused AdamW; the trainer's step: forward+backward "
            "replayed from a CUDA graph unless marked eager, and the same step run eagerly):", "",
            "| model | variant | batch x seq | step ms | tokens/s | vs dense twin | vs SwiGLU | eager step ms | "
            "graph gain | MFU | peak GB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        twin = by.get((r["model"], twin_of(r["variant"])))
        base = by.get((r["model"], "swiglu"))
        same = lambda o: o.get("step_timing", "graph") == r.get("step_timing", "graph")  # noqa: E731
        # ratios only between steps timed alike (a capture out of memory leaves an eager time: host included)
        ratio = (f"**{r['tokens_per_s'] / twin['tokens_per_s']:.2f}x**" if same(twin) else "-") if twin else ""
        vs_base = (f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if same(base) else "-") if base else ""
        eager = r.get("step_ms_eager")  # absent in results of older versions
        mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.3f}"  # None: a GPU of unknown peak
        timing = " (eager: capture out of memory)" if r.get("step_timing") == "eager" else ""
        eager_cells = f"{eager:.1f} | {eager / r['step_ms']:.3f}x" if eager else " | "
        out.append(f"| {r['model']} | {r['variant']} | {r['batch']}x{r['seq']} | {r['step_ms']:.1f}{timing} | "
                   f"{r['tokens_per_s']:,.0f} | {ratio} | {vs_base} | "
                   f"{eager_cells} | {mfu} | {r['peak_mem_gb']:.1f} |")
    return "\n".join(out)


def _ratio(r: dict, key: str) -> str:
    return f"{r[key]:.2f}x" if key in r else "-"


def mode_step_tables(doc: dict) -> str:
    """elas bench step (rows with a `mode`): each variant in elas's default mode beside plain torch.compile and
    eager, the ratios, and where each row's GPU time goes."""
    from .profile import CATEGORIES
    from .step import ratios
    from ..config import VARIANTS, split_variant
    # every file's ratios by today's rules (bench.step.ratios): the busy-time ratio against plain compile (added
    # 2026-12-06), and vs_twin against the twin's fastest row in any kernel form (2026-12-06; before, the row named
    # exactly as the twin), whatever the file stored
    fresh = ratios([{k: v for k, v in r.items() if k not in ("vs_twin", "twin_mode", "twin_variant")}
                    for r in doc["rows"]])
    rows = []
    for r, x in zip(doc["rows"], fresh):
        r = {k: v for k, v in r.items() if k not in ("vs_twin", "twin_mode", "twin_variant")}
        rows.append({**r, **{k: x[k] for k in ("vs_twin", "twin_mode", "twin_variant", "vs_torch_compile_busy")
                              if k in x and (k != "vs_torch_compile_busy" or k not in r)}})
    modes: dict[tuple, set] = {}  # the modes each (model, batch, variant) was measured in, in this file
    for r in rows:
        if "error" not in r:
            modes.setdefault((r["model"], r["batch"], r["variant"]), set()).add(r["mode"])

    def twin_cell(r: dict) -> str:
        """'1.44x (elas)'; 'only mode run' where the twin ran in one mode here: its best mode is then not
        established by this file (another file may have compared its modes)."""
        if "twin_mode" not in r:
            return _ratio(r, "vs_twin")
        name = split_variant(r["variant"])[0]
        twin = VARIANTS[name].twin if name in VARIANTS else None
        alone = len(modes.get((r["model"], r["batch"], r.get("twin_variant", twin)), ())) == 1
        form = f", {r['twin_variant']}" if r.get("twin_variant", twin) != twin else ""  # a kernel form of the twin
        return f"{_ratio(r, 'vs_twin')} ({r['twin_mode']}{form}{', its only mode run here' if alone else ''})"

    def busy_cell(r: dict) -> str:  # against plain compile's GPU-busy time, where its row was profiled
        return f" (busy {r['vs_torch_compile_busy']:.3f}x)" if "vs_torch_compile_busy" in r else ""

    out = [_env_line(doc), "",
           "| model | batch x seq | variant | mode | step ms | tokens/s | vs dense twin (its best mode) | "
           "vs torch.compile (dense rows; busy: its GPU-busy time) | vs SwiGLU-aligned (its best mode) | peak GB | "
           "compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['batch']}x{r['seq']} | {r['variant']} | {r['mode']} | {r['error']} "
                       f"| | | | | | |")
            continue
        graph = "" if r.get("graph", True) else " (capture failed: eager)"
        out.append(f"| {r['model']} | {r['batch']}x{r['seq']} | {r['variant']} | {r['mode']}{graph} | "
                   f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {twin_cell(r)} | "
                   f"{_ratio(r, 'vs_torch_compile')}{busy_cell(r)} | {_ratio(r, 'vs_swiglu_aligned')} | "
                   f"{r['peak_mem_gb']:.1f} | "
                   f"{r['compile_s']:.0f} |")
    cats = [c for c, _ in CATEGORIES] + ["idle"]
    prof = [r for r in rows if "breakdown_ms" in r]
    if prof:
        # gaps (files from 2026-12-06 on): the time no kernel ran within the profiled steps
        gaps = any("profiled_gap_ms" in r for r in prof)
        out += ["", "GPU ms per step by kernel category (torch profiler, 3 steps; idle = step time - kernel time; "
                + ("gaps: the time between kernels within the profiled steps (where kernels do not overlap, idle - "
                   "gaps is the timed step less the profiled one: the profiled kernels ran faster); " if gaps else "")
                + "kernels: launches per step, where recorded):",
                "", "| model | batch | variant | mode | " + " | ".join(cats + ["gaps"] * gaps) + " | kernels |",
                "|---|---|---|---|" + "---|" * (len(cats) + gaps + 1)]
        for r in prof:
            b = r["breakdown_ms"]
            cells = [f"{b[c]:.1f}" if c in b else "-" for c in cats]
            if gaps:
                cells.append(f"{r['profiled_gap_ms']:.1f}" if "profiled_gap_ms" in r else "-")
            out.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['mode']} | " + " | ".join(cells)
                       + f" | {r.get('kernel_launches', '-')} |")
    return "\n".join(out)


def plot_step(doc: dict, png: Path, gpu: str = "H100") -> bool:
    """Bar charts of tokens/s (relative to SwiGLU) and FFN activation memory per model and variant; False without
    matplotlib, rows, or a SwiGLU row for every model."""
    rows = doc["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not rows or not all((m, "swiglu") in {(r["model"], r["variant"]) for r in rows} for m in models):
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["model"], r["variant"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    w = 0.8 / len(variants)
    for ax, key, title in ((axes[0], "tokens_per_s", f"training tokens/s ({gpu.upper()}, bf16)"),
                           (axes[1], "ffn_act_mem_gb", "FFN activation memory per layer (GB)")):
        for i, v in enumerate(variants):
            base = [by[(m, "swiglu")][key] if key == "tokens_per_s" else 1.0 for m in models]
            vals = [by[(m, v)][key] / b for m, b in zip(models, base)]
            ax.bar([j + i * w for j in range(len(models))], vals, w, label=v)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(models))], models)
        ax.set_title(title + (" relative to SwiGLU" if key == "tokens_per_s" else ""))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def compile_table(doc: dict) -> str:
    """elas bench compile: graphs/breaks per mode and the compiled step beside the dense twin."""
    cmd = doc.get("command")
    doc = {**doc, "command": " ; ".join(cmd) if isinstance(cmd, list) else cmd}
    out = [_env_line(doc), "",
           "| model | variant | batch x seq | graphs / breaks per mode | compiled step ms | dense twin ms | vs twin (both plain torch.compile) | "
           "compile s | peak GB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        modes = ", ".join(f"{'/'.join(b['modes']) or 'dense'}: {b['graphs']} / {b['breaks']}" for b in r["breaks"])
        twin = f"{r['dense_twin_step_ms']:.1f} ({r['dense_twin']})" if "dense_twin_step_ms" in r else "-"
        ratio = f"**{r['ratio_vs_dense']:.3f}x**" if "ratio_vs_dense" in r else "-"
        out.append(f"| {r['model']} | {r['variant']} | {r['batch']} x {r['seq']} | {modes} | "
                   f"{r['compiled_step_ms']:.1f} | {twin} | {ratio} | {r['compile_s']:.0f} | {r['peak_mem_gb']:.1f} |")
    if doc.get("note"):
        out += ["", doc["note"]]
    return "\n".join(out)


def loss_table(doc: dict) -> str:
    """elas bench loss: the chunked LM-head loss beside fp32 logits into F.cross_entropy."""
    rows = doc["rows"]
    by = {(r["tokens"], r["compiled"], r["impl"]): r for r in rows}
    out = [_env_line(doc), "", "| tokens | d_model x vocab | mode | logits ms | chunked ms | speed-up | logits GB | "
           "chunked GB |", "|---|---|---|---|---|---|---|---|"]
    for (n, comp, impl), r in by.items():
        if impl != "chunked" or (n, comp, "logits") not in by:
            continue
        lg = by[(n, comp, "logits")]
        out.append(f"| {n} | {r['d_model']} x {r['vocab']} | {'compiled' if comp else 'eager'} | {lg['ms']:.2f} | "
                   f"{r['ms']:.2f} | {lg['ms'] / r['ms']:.2f}x | {lg['peak_extra_gb']:.2f} | "
                   f"{r['peak_extra_gb']:.2f} |")
    return "\n".join(out)


RENDERERS = {"compile.json": ("torch.compile: graph breaks and the compiled step", compile_table),
             "gemm.json": ("2:4 GEMM", gemm_table), "sparsify.json": ("ReLU² + 2:4 sparsifier", sparsify_table),
             "sste.json": ("S-STE weight packing: soft-threshold + 2:4 pack per step", sste_table),
             "infer.json": ("Inference: prefill and graph-replayed decode against the dense twin", infer_table),
             "epilogue.json": ("d_ff-wide GEMMs with the 2:4 pointwise work in their epilogue, against cuBLAS + the "
                               "separate kernel", epilogue_table),
             "step.json": ("FFN and training step", step_tables),
             "ffn.json": ("FFN block forward+backward against its dense twin", ffn_table),
             "loss.json": ("LM head + cross-entropy (forward + backward; GB: peak above the inputs)", loss_table)}


def render(results: Path, img: Path = Path("docs/img")) -> str:
    """The tables of every result file under results/<gpu>/ that has a renderer, and the step files' plots (PNGs
    written to img, linked as img/NAME.png: img is the folder `img` beside the doc). ValueError naming the file
    where one cannot be read or rendered, and naming results where nothing under it renders (a wrong folder
    would otherwise empty the doc's generated part)."""
    parts = []
    if not Path(results).is_dir():
        raise ValueError(f"--results {results}: not a folder (expected the folder of <gpu>/*.json, e.g. "
                         f"benchmarks/results)")
    for gpu_dir in sorted(p for p in Path(results).iterdir() if p.is_dir()):
        for f in sorted(gpu_dir.glob("*.json")):
            try:
                parts += _render_file(f, gpu_dir.name, img)
            except (ValueError, KeyError, TypeError, IndexError, ZeroDivisionError, AttributeError) as e:
                # (AttributeError: valid JSON that is not an object, e.g. a list)
                raise ValueError(f"{f}: cannot render it ({type(e).__name__}: {e})") from None
    if not parts:
        raise ValueError(f"--results {results}: no result file to render (expected <gpu>/<kind>.json with kind one "
                         f"of {', '.join(k.removesuffix('.json') for k in RENDERERS)}); the doc is left as it was")
    return "\n".join(parts)


def _render_file(f: Path, gpu: str, img: Path) -> list[str]:
    """One result file's section(s): [] for a file no renderer reads."""
    parts: list[str] = []
    kind, _, scale = f.stem.partition("_batchx")  # e.g. ffn_batchx0.5.json: ffn at half the batch
    kind, _, part = kind.partition("_")  # e.g. step_variants.json: another call's step rows
    if kind + ".json" not in RENDERERS:
        return parts
    title, fn = RENDERERS[kind + ".json"]
    doc = json.loads(f.read_text())  # (a truncated file: its JSONDecodeError, a ValueError, names the file)
    if kind == "ffn" and not all("ffn_ms" in r for r in doc.get("rows", [{}])):
        return parts  # a profile or parts file of an FFN study: its own note renders it
    if kind == "step" and doc["rows"] and "mode" in doc["rows"][0]:  # elas bench step since the modes
        title, fn = "Training step: elas's default mode, torch.compile and eager", mode_step_tables
    note = f"\n{doc['note']}\n" if doc.get("note") and fn is not compile_table else ""
    parts.append(f"### {title}{f', {part}' if part else ''}{f', batch x{scale}' if scale else ''} "
                 f"({gpu})\n\n{fn(doc)}\n{note}")
    png = img / f"{f.stem}_{gpu}.png"
    if kind == "step" and fn is step_tables and plot_step(doc, png, gpu):
        parts.append(f"![tokens/s and FFN activation memory](img/{png.name})\n")
    return parts


GENERATED = ("<!-- BEGIN GENERATED: elas bench report -->", "<!-- END GENERATED -->")
CONTENTS = ("<!-- BEGIN CONTENTS: elas bench report -->", "<!-- END CONTENTS -->")


def slug(heading: str, seen: dict[str, int]) -> str:
    """GitHub's anchor for a heading's text: lower case; letters, marks, decimal digits, '_', '-' and spaces kept,
    every other character dropped (punctuation, symbols, other numbers such as '²'); spaces to '-'. A taken anchor
    gets -1, -2, ... (the first free one) in the order of the document. seen: the anchors so far."""
    def keep(c: str) -> bool:
        cat = unicodedata.category(c)
        return c in " -" or cat[0] in "LM" or cat in ("Nd", "Pc")
    base = "".join(c for c in heading.strip().lower() if keep(c)).replace(" ", "-")
    anchor, n = base, 0
    while anchor in seen:
        n += 1
        anchor = f"{base}-{n}"
    seen[anchor] = 1
    return anchor


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")


def contents(text: str) -> str:
    """A linked list of the ATX headings of levels 2-4, nested by level, outside fenced code and the generated
    tables (those appear as one line; their headings still count for the anchors' numbering, which runs through
    the whole document). A link in a heading counts as its text. (Setext headings, underlined, are not read: these
    docs have none.)"""
    out, seen, fence, generated = [], {}, None, False
    for line in text.splitlines():
        f = _FENCE.match(line)
        if fence is not None:  # inside a fence: only a fence of the same character, at least as long, closes it
            if f and f.group(1)[0] == fence[0] and len(f.group(1)) >= len(fence) and not line[f.end():].strip():
                fence = None
            continue
        if f:
            fence = f.group(1)
        elif line.startswith(GENERATED[0]):
            generated = True
            out.append("- The generated tables (`elas bench report`), at the end")
        elif line.startswith(GENERATED[1]):
            generated = False
        elif (h := _HEADING.match(line)):
            level, title = len(h.group(1)), _LINK.sub(r"\1", h.group(2) or "")
            anchor = slug(title, seen)
            if 2 <= level <= 4 and not generated:
                out.append(f"{'  ' * (level - 2)}- [{title}](#{anchor})")
    return "\n".join(out)


def _between(text: str, markers: tuple[str, str], doc_path: Path) -> tuple[int, int]:
    """Where the text between a BEGIN and its END marker starts and ends; ValueError naming a missing END."""
    a = text.index(markers[0]) + len(markers[0])
    b = text.find(markers[1], a)
    if b < 0:
        raise ValueError(f"{doc_path}: {markers[0]} has no {markers[1]} after it")
    return a, b


def update_doc(doc_path: Path, results: Path) -> bool:
    """Replace the text between the GENERATED markers of doc_path with freshly rendered tables, then the list
    between the CONTENTS markers with its headings; a doc may have either pair or both (ValueError: neither).
    -> whether the doc changed (an unchanged one is not rewritten)."""
    if not doc_path.is_file():
        raise ValueError(f"--doc {doc_path}: no such file (the default is the repository's docs/performance.md, "
                         f"relative to the current folder: run from the repository's root or give --doc)")
    text = old = doc_path.read_text()
    if GENERATED[0] not in text and CONTENTS[0] not in text:
        raise ValueError(f"{doc_path} has neither the tables' markers ({GENERATED[0]} ... {GENERATED[1]}) nor the "
                         f"contents' ({CONTENTS[0]} ... {CONTENTS[1]})")
    if GENERATED[0] in text:
        a, b = _between(text, GENERATED, doc_path)
        text = text[:a] + "\n" + render(results, doc_path.parent / "img") + text[b:]
    if CONTENTS[0] in text:
        a, b = _between(text, CONTENTS, doc_path)
        text = text[:a] + "\n" + contents(text) + "\n" + text[b:]
    if text == old:
        return False
    doc_path.write_text(text)
    return True
