"""The neuron-level router of V:N:M activations (Madhyastha et al., part 2): clusters of FFN neurons, tokens routed
to a cluster, and the token permutation a block-sparse kernel needs.

V:N:M keeps, in each block of V tokens x M features, 4 features shared by the block's tokens and 2 of those per
token. Natural ReLU^2 activations do not share features across neighbouring tokens; the router makes them:

- **clusters** (`cluster_neurons`): the d_ff neurons (rows of W_up, [d_ff, d]) are split into C = M/4 clusters of
  equal size d_ff/C by balanced k-means, so that each cluster can own 4 of every M features: cluster c's features,
  in ascending order, fill positions 4c..4c+3 of the consecutive M-groups of a fixed feature order.
- **routing** (`route_tokens`): each token goes to one cluster and may keep only that cluster's features, 2 of
  every 4 of them (2:4 in the cluster's order): per token exactly 2/M of the features, and any V tokens of one
  cluster share their 4-of-M columns: a V:N:M block by construction, whatever V is.
- **permutation** (`route_permutation`): the tokens of each cluster made contiguous and padded to a multiple of V
  (the row blocks of a grouped GEMM over clusters), and its inverse.

Choices the paper leaves open (weight24_vnm.md, 2.4), made here and each a config key of VNMConfig:
- C = M/4 (each cluster owns 4 of every M features): density 2/M exactly, no feature left unowned;
- the similarity metric `route_metric`: "dot" (default) routes a token to the cluster whose neurons' mean
  pre-activation x.mu_c is largest (mu_c the mean W_up row of the cluster: x.mu_c is exactly that mean), the
  quantity the cluster's kept ReLU^2 mass grows with; "cosine" (the paper's text) and "l2" (its pseudocode) are
  there for comparison. Clusters are found with the same geometry (spherical k-means for cosine);
- re-clustering every `recluster_steps` steps, from the weights of that step (a new mode of the method, so a
  resumed run keeps the clustering it saved);
- routing is fixed per step (argmax, no gradient through it), like the 2:4 selection: gradients pass straight
  through the kept features (`ste`) or are masked (`mask`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("dot", "cosine", "l2")


def _scores(x: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """Similarity [n, C] of rows x [n, d] to centroids [C, d] (larger: closer)."""
    if metric == "dot":
        return x @ centroids.T
    if metric == "cosine":
        return F.normalize(x, dim=-1) @ F.normalize(centroids, dim=-1).T
    if metric == "l2":  # -|x - mu|^2 up to a per-row constant
        return 2 * x @ centroids.T - (centroids * centroids).sum(-1)[None, :]
    raise ValueError(f"unknown route metric {metric!r}: expected one of {', '.join(METRICS)}")


def balanced_assign(score: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each row of score [F, C] to one column, every column taking exactly `capacity` rows (F = C * capacity):
    rows propose to their best open column, a column accepts its best proposals up to what it has left; at most
    C rounds. Returns the column of each row, int64 [F]."""
    n, c = score.shape
    if n != c * capacity:
        raise ValueError(f"balanced_assign: {n} rows do not fill {c} columns of {capacity}")
    assign = torch.full((n,), -1, dtype=torch.long, device=score.device)
    left = torch.full((c,), capacity, dtype=torch.long)
    for _ in range(c):
        todo = assign < 0
        if not bool(todo.any()):
            break
        s = score.masked_fill(~(left > 0).to(score.device)[None, :], float("-inf"))
        best = s.argmax(1)
        for col in range(c):
            cand = torch.nonzero(todo & (best == col)).flatten()
            if cand.numel() == 0 or left[col] == 0:
                continue
            take = cand[score[cand, col].argsort(descending=True, stable=True)[: int(left[col])]]
            assign[take] = col
            left[col] -= take.numel()
    return assign


def cluster_neurons(rows: torch.Tensor, clusters: int, metric: str = "dot", iters: int = 10, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced k-means of the neurons' weight rows [F, d] (F % clusters == 0) -> (cluster of each neuron int64
    [F], centroids [clusters, d] fp32: the mean row of each cluster, what tokens are routed by). Deterministic."""
    x = rows.detach().float()
    if metric == "cosine":
        x = F.normalize(x, dim=-1)
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    mu = x[torch.randperm(n, generator=g)[:clusters].to(x.device)]
    assign = None
    for _ in range(iters):
        new = balanced_assign(_scores(x, mu, "cosine" if metric == "cosine" else "l2"), n // clusters)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        mu = torch.stack([x[assign == c].mean(0) for c in range(clusters)])
    if metric == "cosine":
        mu = F.normalize(mu, dim=-1)
    return assign, mu


def cluster_features(assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """[C, F/C] int64: each cluster's features in ascending order (its 2:4 groups are 4 consecutive of these)."""
    return torch.stack([torch.nonzero(assign == c).flatten() for c in range(clusters)])


def route_tokens(x: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """The cluster of each token x [T, d] (the FFN's input): int64 [T]."""
    return _scores(x.float(), centroids.float(), metric).argmax(-1)


def route_permutation(token_cluster: torch.Tensor, clusters: int, v: int):
    """Tokens grouped by cluster, each group padded to a multiple of v.

    Returns (perm [P] int64: the source token of each row, -1 for padding; inv [T] int64: the row of each token;
    counts [clusters] int64: tokens per cluster). P = sum of ceil(count / v) * v. Gathering x[perm] (padding rows
    zero) and taking rows inv of the result undoes it. The order inside a cluster is the tokens' order."""
    t = token_cluster.numel()
    counts = torch.bincount(token_cluster, minlength=clusters)
    padded = (counts + v - 1) // v * v
    starts = torch.cumsum(padded, 0) - padded  # first row of each cluster's block
    order = torch.argsort(token_cluster, stable=True)  # tokens by cluster, in token order
    rank = torch.arange(t, device=token_cluster.device) - (torch.cumsum(counts, 0) - counts)[token_cluster[order]]
    rows = starts[token_cluster[order]] + rank  # row of each token of `order`
    perm = torch.full((int(padded.sum()),), -1, dtype=torch.long, device=token_cluster.device)
    perm[rows] = order
    inv = torch.empty(t, dtype=torch.long, device=token_cluster.device)
    inv[order] = rows
    return perm, inv, counts
