"""The neuron-level router of V:N:M activations (Madhyastha et al., part 2): clusters of FFN neurons, tokens routed
to a cluster, and the token permutation a block-sparse kernel needs.

V:N:M keeps, in each block of V tokens x M features, 4 features shared by the block's tokens and 2 of those per
token. Natural ReLU^2 activations do not share features across neighbouring tokens; the router groups tokens
that activate the same neurons:

- **clusters** (`cluster_neurons`): the d_ff neurons (rows of W_up, [d_ff, d]) are split into C clusters of equal
  size by balanced k-means; **routing** (`route_tokens`): each token goes to the cluster whose neurons it
  activates most; **permutation** (`route_permutation`): the tokens of each cluster made contiguous and padded to
  a multiple of V (the row blocks of a grouped GEMM over clusters), and its inverse.
- two ways to turn that into V:N:M (VNMConfig.router_mode):
  - "group" (the default): the tokens of a cluster fill whole V-blocks, and each block takes the 4-of-M columns
    that keep the most of its y2 (the exhaustive choice of reference.vnm_mask), 2:4 inside (`grouped_vnm_mask`);
  - "own": C = M/4 clusters each own 4 of every M features (cluster c's features in ascending order fill
    positions 4c..4c+3 of the M-groups of a fixed feature order); a token keeps only its cluster's features, 2 of
    every 4 (reference.routed_vnm_mask): the columns are known before y1 is computed, so the up-projection could
    skip the others too (a neuron-level mixture of experts). With `topk` = k > 1 there are k*M/4 clusters of
    d_ff*4/(k*M) neurons and each token takes its k best (the union of their features, 2 of every 4): the same
    density 2/M, the same work, but a token's neurons are chosen from C(k*M/4, k) sets instead of M/4, as
    fine-grained experts with top-k routing are in a mixture of experts.
  Measured on the FFNs of a trained 4-layer ReLU^2 model (benchmarks/vnm_mass.py, docs/results.md): of y2's
  mass, 2:4 keeps 99.1%, V:N:M (v=64, m=8) over blocks of consecutive tokens 91.0%, "group" with 16 clusters
  93.9-94.0% (2 clusters: 92.0%), "own" only 63.6-66.6% (its best possible routing, chosen from y2 itself,
  68.3%): a fixed half of the neurons per token drops too much, which is why "group" is the default.

Choices the paper leaves open (weight24_vnm.md, 2.4), made here and each a config key of VNMConfig:
- how neurons are clustered (`clustering`): "kmeans" (the paper's: balanced k-means of W_up's rows) or "contiguous"
  (consecutive neurons, `contiguous_clusters`: in own mode the grouped GEMM then multiplies each cluster's weights in
  place instead of gathering them every step; whether training makes such blocks as good as k-means clusters is
  for the quality runs to say);
- the number of clusters: 16 in "group" mode (more clusters, more similar tokens per block; 16 measured best of
  2/4/8/16), M/4 in "own" mode;
- the similarity metric `route_metric`: "dot" (default) routes a token to the cluster whose neurons' mean
  pre-activation x.mu_c is largest (mu_c the mean W_up row of the cluster: x.mu_c is exactly that mean);
  "cosine" (the paper's text) and "l2" (its pseudocode) are there too. They kept the same mass within 0.1-0.3
  points in the measurement above. Clusters are found with the same geometry (spherical k-means for cosine);
- re-clustering every `recluster_steps` steps, from the weights of that step (a new mode of the method, so a
  resumed run keeps the clustering it saved);
- routing is fixed per step (argmax, no gradient through it), like the 2:4 selection: gradients pass straight
  through the kept features (`ste`) or are masked (`mask`); in "own" mode `ste` passes only through the token's
  own features (a token never reaches another cluster's neurons, which is what lets vnm.path=grouped skip them).
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


def contiguous_clusters(rows: torch.Tensor, clusters: int, metric: str = "dot") -> tuple[torch.Tensor, torch.Tensor]:
    """Clusters of consecutive neurons (vnm.clustering=contiguous): neuron i of rows [F, d] in cluster i // (F / C),
    centroids as cluster_neurons makes them (the mean row of each cluster; rows normalised first for cosine).
    Returns (assign int64 [F], centroids [clusters, d] fp32). No k-means: the neurons of a block become similar
    by training on the tokens routed to them, as a mixture of experts' experts do; the grouped GEMM then reads
    each cluster's weights in place (no gather)."""
    x = rows.detach().float()
    if metric == "cosine":
        x = F.normalize(x, dim=-1)
    n = x.shape[0]
    mu = x.view(clusters, n // clusters, -1).mean(1)
    if metric == "cosine":
        mu = F.normalize(mu, dim=-1)
    return torch.arange(n, device=x.device) // (n // clusters), mu


def cluster_features(assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """[C, F/C] int64: each cluster's features in ascending order (its 2:4 groups are 4 consecutive of these)."""
    return torch.stack([torch.nonzero(assign == c).flatten() for c in range(clusters)])


def route_tokens(x: torch.Tensor, centroids: torch.Tensor, metric: str, k: int = 1) -> torch.Tensor:
    """The cluster of each token x [T, d] (the FFN's input): int64 [T]; with k > 1 its k best clusters, int64
    [T, k] (best first). Scored in x's dtype when it is 16-bit (a bf16 GEMM with fp32 accumulation: an fp32 copy
    of x would cost a write and a read of [T, d] fp32 per layer for C columns of output); a token whose scores
    tie within that rounding may go either way, as near-ties of the 2:4 choice do."""
    if x.dtype in (torch.bfloat16, torch.float16):
        s = _scores(x, centroids.to(x.dtype), metric)
    else:
        s = _scores(x.float(), centroids.float(), metric)
    return s.argmax(-1) if k == 1 else s.topk(k, dim=-1).indices


def route_permutation(token_cluster: torch.Tensor, clusters: int, v: int, size: int | None = None):
    """Tokens grouped by cluster, each group padded to a multiple of v.

    Returns (perm [P] int64: the source token of each row, -1 for padding; inv [T] int64: the row of each token;
    counts [clusters] int64: tokens per cluster). P = sum of ceil(count / v) * v, or `size` rows (>= that; the
    rest padding) for a shape that does not depend on the routing (traced code: padded_rows(T, clusters, v)).
    Gathering x[perm] (padding rows zero) and taking rows inv of the result undoes it. The order inside a cluster
    is the tokens' order."""
    t = token_cluster.numel()
    counts = torch.zeros(clusters, dtype=torch.long, device=token_cluster.device).scatter_add_(
        0, token_cluster, torch.ones_like(token_cluster))  # (not bincount: its shape depends on the values)
    padded = (counts + v - 1) // v * v
    starts = torch.cumsum(padded, 0) - padded  # first row of each cluster's block
    order = torch.argsort(token_cluster, stable=True)  # tokens by cluster, in token order
    rank = torch.arange(t, device=token_cluster.device) - (torch.cumsum(counts, 0) - counts)[token_cluster[order]]
    rows = starts[token_cluster[order]] + rank  # row of each token of `order`
    perm = torch.full((int(padded.sum()) if size is None else size,), -1, dtype=torch.long,
                      device=token_cluster.device)
    perm[rows] = order
    inv = torch.empty(t, dtype=torch.long, device=token_cluster.device)
    inv[order] = rows
    return perm, inv, counts


def padded_rows(tokens: int, clusters: int, v: int) -> int:
    """The most rows route_permutation can need: every cluster padded by up to v - 1, in whole blocks of v."""
    return -(-(tokens + clusters * (v - 1)) // v) * v


def grouped_vnm_mask(y: torch.Tensor, token_cluster: torch.Tensor, clusters: int, v: int, m: int) -> torch.Tensor:
    """V:N:M of y [T, K] over blocks of v tokens of one cluster (tokens grouped by route_permutation, each cluster
    padded to whole blocks with zero rows): per block and m features, the exhaustive 4-of-m choice of
    reference.vnm_mask, 2:4 inside. Static shapes (traces). Returns bool [T, K]."""
    from ..kernels.reference import vnm_mask
    perm, inv, _ = route_permutation(token_cluster, clusters, v, padded_rows(y.shape[0], clusters, v))
    rows = torch.where(perm[:, None] >= 0, y[perm.clamp(min=0)], 0.0)
    return vnm_mask(rows, v, m)[inv]
