"""Which forms of the CUTLASS ReLU^2 library run on this GPU: each mode and the rotary GEMM in a process of its own.

    PYTHONPATH=src python benchmarks/cutlass_probe.py [LIB (default build/cutlass_relu2/libelas_cutlass_relu2.so)] \
        [OUT_DIR (default runs)]

A kernel that faults (an illegal address, a trap in an epilogue's layout check) ends its process, and every later
CUDA call in it fails: a benchmark or a training step that meets it loses all that follows. So, before those run,
this launches every configuration of each form once at the 1B shapes (and a small one) in a child process per
form, checks each output against the reference twin (cutlass_relu2._verify), and reports per form: "ok" (every
configuration that runs agrees), "wrong" (some disagree: the library's own check refuses those), "fault" (the
child died; the configuration it had started is named) or "absent" (the library lacks the form). It writes
OUT_DIR/cutlass_probe.json and OUT_DIR/cutlass_skip, one line: the faulting forms, comma-separated, for
$ELAS_CUTLASS_SKIP (cutlass_relu2.skipped), which run_gpu.sh's later stages export. Prints a table last.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# the forms, by cutlass_relu2.MODES name, and the rotary GEMM
FORMS = ("relu2", "grad", "grad_tma", "ste_grad", "ste_grad_y2s", "relu2_pack24", "relu2s_pack24", "grad_pack24",
         "rope")
# M (tokens), N, K of the probes: a small shape, then the 1B low-rank up-projection's
SHAPES = ((1024, 1024, 256), (8192, 8192, 512))


def probe_one(form: str) -> None:
    """Child: launch every configuration of `form` at SHAPES, printing one JSON line before each launch
    ({"start": ...}) and one after ({"config": ..., "rc": ..., "wrong": ...}), flushed, so that the parent knows
    which launch a fault ended."""
    import torch

    from elas.kernels import reference as ref
    from elas.kernels.cuda import cutlass_relu2 as cl
    from elas.model.llama import rope_tables

    def say(**kw):
        print(json.dumps(kw), flush=True)

    lib = cl.library()
    names = [lib.elas_cutlass_dense_config_name(c).decode() for c in range(lib.elas_cutlass_dense_configs())]
    dev = dict(device="cuda", dtype=torch.bfloat16)
    for m, n, k in SHAPES:
        torch.manual_seed(0)
        if form == "rope":  # the fused low-rank q/k/v up-projection: [3, T, r] (a strided view) x [3, d, r]
            hd, seq = 128, 256
            a = torch.randn(m, 3, k, **dev).transpose(0, 1)
            w = torch.randn(3, n // 4, k, **dev) / k ** 0.5
            cos, sin = (t.cuda() for t in rope_tables(hd, seq, 10000.0))
            d = torch.empty(3, m, n // 4, **dev)
            for c, name in enumerate(names):
                say(start=name, shape=[m, n, k])
                rc = cl._rope_launch(lib, c, a, w, d, cos, sin, hd, 2 * (n // 4))[0]
                torch.cuda.synchronize()
                say(config=name, shape=[m, n, k], rc=rc,
                    wrong=cl._verify_rope(a, w, d, cos, sin, hd, 2 * (n // 4)) if rc == 0 else None)
            continue
        mode = cl.MODES[form]
        a = torch.randn(m, k, **dev)
        b = torch.randn(n, k, **dev) / k ** 0.5
        y1 = torch.randn(m, n, **dev)
        aux = {2: torch.relu(y1) ** 2, 3: torch.relu(y1) ** 2, 4: y1, 5: y1, 8: ref.relu2_sparsify24(y1)[0]}.get(mode)
        aux_out = torch.empty(m, n, **dev) if mode == 5 else torch.empty(m, n * 9 // 16, **dev) if mode >= 6 else None
        d = torch.empty(m, n, **dev)
        for c, name in enumerate(names):
            say(start=name, shape=[m, n, k])
            rc = cl._launch(lib, c, mode, a, b, aux, d, aux_out=aux_out)[0]
            torch.cuda.synchronize()
            say(config=name, shape=[m, n, k], rc=rc, wrong=cl._verify(mode, a, b, aux, d, aux_out) if rc == 0 else None)


def verdict(form: str, returncode: int | None, lines: list[str], stderr: str) -> dict:
    """The parent's reading of one child: its exit status (None: timed out) and output lines."""
    events = [json.loads(x) for x in lines if x.startswith("{")]
    done = [e for e in events if "config" in e]
    ran = [e for e in done if e["rc"] == 0]
    row = {"form": form, "configs_ran": len(ran), "configs_refused_shape": len(done) - len(ran),
           "wrong": [f"{e['config']} {e['shape']}: {e['wrong']}" for e in ran if e["wrong"]]}
    if returncode != 0:
        started = [e for e in events if "start" in e]
        last = started[-1] if len(started) > len(done) else None
        row["status"] = "fault"
        row["fault"] = ((f"in {last['start']} at {last['shape']}: " if last else "")
                        + ("timed out" if returncode is None else f"exit {returncode}: ")
                        + " | ".join(stderr.strip().splitlines()[-3:])[:400])
    elif not ran:
        row["status"] = "absent"
    else:
        row["status"] = "wrong" if row["wrong"] else "ok"
    return row


def probe(forms=FORMS, argv=None, timeout: float = 180.0) -> list[dict]:
    """One child per form; argv(form) is its command line (default: this script with --one)."""
    argv = argv or (lambda f: [sys.executable, __file__, "--one", f])
    rows = []
    for form in forms:
        try:
            p = subprocess.run(argv(form), capture_output=True, text=True, timeout=timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as ex:
            rc = None
            out = ex.stdout.decode() if isinstance(ex.stdout, bytes) else (ex.stdout or "")
            err = ex.stderr.decode() if isinstance(ex.stderr, bytes) else (ex.stderr or "")
        rows.append(verdict(form, rc, out.splitlines(), err))
        print(f"{form:>13}: {rows[-1]['status']}", flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        probe_one(sys.argv[2])
        return
    lib = Path(sys.argv[1] if len(sys.argv) > 1 else "build/cutlass_relu2/libelas_cutlass_relu2.so")
    out_dir = Path(sys.argv[2] if len(sys.argv) > 2 else "runs")
    if not lib.is_file():
        sys.exit(f"no library at {lib}: build it with src/elas/kernels/cuda/cutlass/build.sh relu2")
    os.environ["ELAS_CUTLASS_RELU2"] = str(lib.resolve())  # the children inherit it
    os.environ.pop("ELAS_CUTLASS_SKIP", None)  # probe every form, whatever an earlier probe said
    rows = probe()
    skip = [r["form"] for r in rows if r["status"] == "fault"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cutlass_probe.json").write_text(json.dumps({"shapes": SHAPES, "rows": rows}, indent=1))
    (out_dir / "cutlass_skip").write_text(",".join(skip) + "\n")
    for r in rows:
        print(f"{r['form']:>13} {r['status']:>6}  ran {r['configs_ran']}, shape refused {r['configs_refused_shape']}"
              + (f"; {r['fault']}" if "fault" in r else "") + "".join(f"; wrong: {w}" for w in r["wrong"][:2]))
    print(f"ELAS_CUTLASS_SKIP={','.join(skip)}")


if __name__ == "__main__":
    main()
