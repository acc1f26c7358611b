"""How much of y2 = relu(y1)^2 each activation-sparsity format keeps, on the activations of a trained model.

    python benchmarks/vnm_mass.py RUN_DIR [--tokens 8192] [--out FILE.json]

RUN_DIR: a run of a dense ReLU^2 model (e.g. `elas train --preset llama-tiny-relu2`). For every FFN, y1 is taken
on validation tokens and the kept fraction of sum(y2) is measured for: 2:4 per token (50% dense); the weight
gradient's operand of relu2-24 (2:4 per token, then 2:4 along 4-token groups, consecutive or shuffled as the
method does; 25%) and a transposable 4x4 2:4 mask (2 per row and column of every 4x4 block: one selection for
both directions, 50%); V:N:M at
m=8 (25% dense) by blocks of v consecutive tokens with the exhaustive column choice (no router); V:N:M by the
neuron router (router.py) in its two modes with each similarity metric (clusters from the layer's own
up-projection): group mode at 2-16 clusters, own mode, and for own mode a random routing (the control) and the
best cluster per token chosen from y2 itself (what no router can beat). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from elas.data.loader import TokenWindows
from elas.kernels import reference as ref
from elas.sparsity import router as rt
from elas.sparsity.act24 import permutation_keys, token_permutation
from elas.sparsity.vnm import up_rows
from elas.train.checkpoint import latest_checkpoint, load_checkpoint
from elas.train.trainer import load_run_config
from elas.build import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--v", type=int, default=64)
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()
    cfg = load_run_config(args.run)
    model = build_model(cfg.model, "cpu")
    load_checkpoint(latest_checkpoint(Path(args.run)), model)
    model.eval()
    win = TokenWindows(cfg.data_dir, "val", cfg.seq_len)
    n = max(1, min(win.n, args.tokens // cfg.seq_len))
    x, _ = win.get(list(range(n)))
    captured = []  # (ffn input [T, d], y1 [T, d_ff], up module) per layer

    def hook(mod, inp, out):
        captured.append((inp[0].reshape(-1, inp[0].shape[-1]), out.reshape(-1, out.shape[-1]), mod))
    handles = [blk.ffn.up.register_forward_hook(hook) for blk in model.blocks]
    with torch.no_grad():
        model(x, x)
    for h in handles:
        h.remove()
    c = args.m // 4
    rows = []
    g = torch.Generator().manual_seed(0)
    for layer, (xin, y1, up) in enumerate(captured):
        y2 = torch.relu(y1.float()) ** 2
        total = y2.sum()
        y2s = y2 * ref.mask24(y2)
        seq = cfg.seq_len
        perm, _ = token_permutation(permutation_keys(), seq)  # relu2-24's shuffle of each sequence's tokens
        y2p = y2.reshape(-1, seq, y2.shape[-1])[:, perm].reshape(y2.shape)
        y2ps = y2s.reshape(-1, seq, y2.shape[-1])[:, perm].reshape(y2.shape)
        kept = {"2:4 (50%)": y2s.sum() / total,
                # the weight gradient's operand in relu2-24 (before its 5% dense features): y2s, 2:4 along tokens
                "2:4 along d_ff, then 2:4 along consecutive tokens": (y2s * ref.mask24(y2s, dim=0)).sum() / total,
                "2:4 along d_ff, then 2:4 along permuted tokens": (y2ps * ref.mask24(y2ps, dim=0)).sum() / total,
                # one mask for both directions (the forward then loses what the along-token 2:4 drops)
                "transposable 4x4 2:4, consecutive tokens": (y2 * ref.transposable24_mask(y2)).sum() / total,
                "transposable 4x4 2:4, permuted tokens": (y2p * ref.transposable24_mask(y2p)).sum() / total,
                f"V:N:M v={args.v} m={args.m}, consecutive blocks": (y2 * ref.vnm_mask(y2, args.v, args.m)).sum() / total}
        for metric in rt.METRICS:
            assign, mu = rt.cluster_neurons(up_rows(up), c, metric)
            feats = rt.cluster_features(assign, c)
            cid = rt.route_tokens(xin, mu, metric)
            kept[f"router own mode, {metric}, {c} clusters"] = (y2 * ref.routed_vnm_mask(y2, cid, feats)).sum() / total
            for groups in (2, 4, 8, 16):  # group mode: blocks of one cluster's tokens, columns by search
                _, gmu = rt.cluster_neurons(up_rows(up), groups, metric)
                gid = rt.route_tokens(xin, gmu, metric)
                grouped = rt.grouped_vnm_mask(y2, gid, groups, args.v, args.m)
                kept[f"router group mode, {metric}, {groups} clusters"] = (y2 * grouped).sum() / total
            if metric == "dot":
                rnd = torch.randint(0, c, cid.shape, generator=g)
                kept["own mode, random routing (control)"] = (y2 * ref.routed_vnm_mask(y2, rnd, feats)).sum() / total
                oracle = torch.stack([(y2 * ref.routed_vnm_mask(y2, torch.full_like(cid, k), feats)).sum(-1)
                                      for k in range(c)], -1).argmax(-1)  # best cluster per token, by y2 itself
                kept["own mode, best cluster per token from y2 (oracle)"] = (y2 * ref.routed_vnm_mask(y2, oracle, feats)).sum() / total
        rows.append({"layer": layer, "y2_zero_frac": float((y2 == 0).float().mean()),
                     **{k: float(v) for k, v in kept.items()}})
    names = [k for k in rows[0] if k not in ("layer", "y2_zero_frac")]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in names}
    print(f"{args.run}: {n * cfg.seq_len} validation tokens, {len(rows)} FFNs, y2 zeros "
          f"{sum(r['y2_zero_frac'] for r in rows) / len(rows):.1%}")
    for k in names:
        print(f"  {k:50s} keeps {mean[k]:.1%} of y2's mass")
    if args.out:
        Path(args.out).write_text(json.dumps({"run": Path(args.run).name, "tokens": n * cfg.seq_len, "v": args.v,
                                              "m": args.m, "mean": mean, "layers": rows}, indent=1))


if __name__ == "__main__":
    main()
