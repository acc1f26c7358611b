"""The LLaMA decoder of the GaLore/ELAS benchmark: RMSNorm, RoPE, causal SDPA attention, untied embedding and
LM head, and a SwiGLU or ReLU^2 FFN; any attention/FFN linear optionally low-rank (W = A.B).

The decoder holds no method code: `elas.build.build_model` constructs it and then applies the methods listed in
`ModelConfig.methods`."""
from __future__ import annotations

import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .ffn import ReLU2FFN, SwiGLU
from .loss import linear_cross_entropy
from .lowrank import LowRankLinear, make_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # (x, w, eps) -> (x, norm(x)) with one backward for both uses of x; build_model installs it for
        # model.norm_kernel=fused (kernels/ops.py residual_rmsnorm; given, not imported: the model imports no kernels)
        self.residual_split = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32, returned in x's dtype: a bf16 residual stream gets bf16 norm outputs (one fused
        # kernel when compiled); an fp32 one gets exactly what (normed.type_as(x) * weight) gave before
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, self(x)) for a residual block, which normalises x and adds to it: the gradients of the two uses
        meet in one backward pass where residual_split is installed."""
        if self.residual_split is None:
            return x, self(x)
        return self.residual_split(x, self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_seq_len, head_dim/2] fp32 (rotate-half convention of HF LLaMA)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    ang = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [batch, seq, heads, head_dim] (the projection's own layout); cos/sin: [seq, head_dim/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]  # [seq, 1, head_dim/2]: one angle per position, for every head
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def sdpa_backends(name: str) -> list | None:
    """The SDPA backends to try, in order, for model.attn_backend=name (None: torch's own order). The named one
    comes first and torch's others follow, so a shape it cannot serve still runs."""
    if name in ("auto", "torch", "triton"):  # (triton: elas's own kernel where it applies, torch's order elsewhere)
        return None
    from torch.nn.attention import SDPBackend
    order = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return [order[name]] + [b for k, b in order.items() if k != name]


class KVCache:
    """Keys and values of the tokens generated so far, for decoding one token at a time (model/generate.py).

    k[i], v[i]: [batch, heads, max_len, head_dim] of layer i (allocated at the first write, in the dtype the
    attention computes in); `pos` tokens are filled. A forward with a cache starting at pos 0 is a prefill
    (causal among its tokens); later forwards pass one token, which attends to every cached one.

    static=True: every forward sees the whole [.., max_len, ..] buffers with a mask of the filled positions, and
    the position lives on the device too (`pos_t`, int64 [1]): a decode step then has the same shapes and the
    same tensors at every position, so it can be captured once and replayed from a CUDA graph. Each forward
    advances both positions (`advance`); a replay of a captured step advances only `pos_t`, so whoever replays
    it adds to `pos` (model/generate.py)."""

    def __init__(self, n_layers: int, max_len: int, static: bool = False):
        self.max_len, self.pos, self.static = max_len, 0, static
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos_t: torch.Tensor | None = None  # static: the position of the next token, on the device

    def positions(self, s: int, device) -> torch.Tensor:
        """Static: the positions of the next s tokens, int64 [s] on the device (pos_t + 0..s-1)."""
        if self.pos_t is None:
            self.pos_t = torch.zeros(1, dtype=torch.long, device=device)
        return self.pos_t + torch.arange(s, device=device)

    def host_pos(self) -> bool:
        """Whether this forward reads and moves the host-side position. Not in a compiled decode step over a static
        cache: its graph must not depend on (and be guarded on) the position, and its caller
        (generate.GraphDecoder) checks room and advances `pos` on the host."""
        return not (self.static and torch.compiler.is_compiling())

    def advance(self, s: int) -> None:
        if self.host_pos():
            self.pos += s
        if self.static:
            self.pos_t += s

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, heads, s, head_dim] at positions pos..pos+s; return all keys and values so far (static:
        the whole buffers, positions [s] on the device)."""
        b, h, s, hd = k.shape
        if self.host_pos() and self.pos + s > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {s} tokens exceed its {self.max_len} positions")
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(b, h, self.max_len, hd)
            self.v[layer] = v.new_zeros(b, h, self.max_len, hd)
        if self.static:
            self.k[layer].index_copy_(2, positions, k)
            self.v[layer].index_copy_(2, positions, v)
            return self.k[layer], self.v[layer]
        self.k[layer][:, :, self.pos:self.pos + s] = k
        self.v[layer][:, :, self.pos:self.pos + s] = v
        return self.k[layer][:, :, :self.pos + s], self.v[layer][:, :, :self.pos + s]

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Static: which cached positions each new token attends to, bool [1, 1, s, max_len] (j <= its own)."""
        return (torch.arange(self.max_len, device=positions.device)[None, :] <= positions[:, None])[None, None]


def _plain_linears(mods) -> bool:
    """Whether mods are all unmodified LowRankLinear or all unmodified nn.Linear modules of one shape (what
    Attention.qkv may fuse)."""
    from torch.nn.utils import parametrize
    kind = type(mods[0])
    return (kind in (LowRankLinear, nn.Linear) and all(type(m) is kind for m in mods)
            and not any(parametrize.is_parametrized(m) or m._forward_hooks or m._forward_pre_hooks for m in mods)
            and len({tuple(p.shape for p in m.parameters()) for m in mods}) == 1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        r = cfg.rank if cfg.lowrank_scope in ("all", "attn") else 0
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (make_linear(d, d, r, cfg.init_std) for _ in range(4))
        self.backends = sdpa_backends(cfg.attn_backend)
        # fuse_qkv acts on low-rank attention only (a rank that saves nothing builds nn.Linear): full-rank, one GEMM
        # against the weights' concatenation [3d, d] (a 3 d^2 copy each forward) was measured no faster than
        # three (0.996x the 1B ReLU^2 step, H200)
        self.fuse_qkv = cfg.fuse_qkv and isinstance(self.q, LowRankLinear)
        # (a, w, cos, sin, head_dim, rot_cols) -> the projection with rotary embeddings in its epilogue
        # (kernels/ops.py linear_rope): build_model installs it for model.rope_kernel=cutlass (given, not imported)
        self.rope_op = None
        # (x [.., d], [N_q, N_k, N_v], [M_q, M_k, M_v]) -> q, k, v: fuse_qkv's low-rank projections with a backward
        # that concatenates and copies nothing (kernels/ops.py low_rank_qkv; build_model installs it for
        # model.fuse_qkv)
        self.qkv_op = None
        # (q, k, v [b, s, heads, head_dim] before rotation, cos, sin) -> the causal attention [b, s, heads, head_dim]
        # with the rotation inside its kernels (kernels/ops.py rope_attention; build_model installs it for
        # model.attn_backend=triton)
        self.attn_op = None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections of x [b, s, d]: three [b, s, d] tensors.

        fuse_qkv: the three down-projections x N (low-rank, N [d, r] each) as one GEMM against their
        concatenation [d, 3r], h = x [N_q N_k N_v] [T, 3r]; each up-projection then reads its r columns of h in
        place (a strided view, leading dimension 3r), so q, k and v come out in the plain [b, s, d] layout that
        rotary and attention read. In the backward the three [T, r] gradients of h form one [T, 3r] block: one
        weight-gradient GEMM (x^T dh, N = 3r; with qkv_op a batched GEMM writing each N's gradient contiguous) and
        one input-gradient GEMM (dh [N_q N_k N_v]^T, K = 3r) instead of three of each and the sum of their three
        [T, d] outputs. Three GEMMs of width r = 512 (1B) fill about one
        wave of an H200's SMs, one of 3r fills three. The concatenation copies the weights each forward (3 r d
        elements: 6 MB per 1B layer in bf16). Modules that a method replaced or parametrised are not fused (they
        run as themselves)."""
        lins = (self.q, self.k, self.v)
        if not self.fuse_qkv or not _plain_linears(lins):
            return self.q(x), self.k(x), self.v(x)
        if self.qkv_op is not None:  # the same values; its backward concatenates and copies nothing
            return self.qkv_op(x, [m.weight_in for m in lins], [m.weight_out for m in lins])
        r = self.q.rank
        h = x @ torch.cat([m.weight_in for m in lins], dim=1)  # [b, s, 3r], one GEMM
        # (a batched up-projection [3, T, r] x [3, r, d] was measured slower: its [3, T, d] output layout cost
        # more elementwise work around attention than the one GEMM saved)
        return tuple(F.linear(hi, m.weight_out) for hi, m in zip(h.split(r, dim=-1), lins))

    def _qkv_roped(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k (rotated) and v of x [b, s, d] through rope_op: the rotation rides in the up-projection GEMM's
        epilogue, on column pairs. q and k come out with each head's two halves interleaved (column 2i holds
        feature i, 2i + 1 feature i + head_dim/2: the weights' rows are gathered so, a [d, r] copy per step, small
        beside the activations); q.k is unchanged by a permutation that q and k share, and v is not permuted, so attention
        computes exactly what apply_rope's layout gives. Training and prefill only (positions 0..s-1): a KV
        cache takes the plain path, whose k it must match."""
        b, s, d = x.shape
        lins = (self.q, self.k, self.v)
        hd, t = self.head_dim, b * s
        perm = torch.arange(d, device=x.device).view(self.n_heads, 2, hd // 2).transpose(1, 2).reshape(d)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        lowrank = isinstance(self.q, LowRankLinear)
        # per projection: the input of its d-wide GEMM [T, r or d] and that GEMM's weight [d, r or d], q's and k's
        # rows gathered into the interleaved order
        if self.fuse_qkv:  # (low-rank) one down-projection GEMM [T, 3r], viewed as [3, T, r] (strided)
            r = self.q.rank
            h3 = (x.reshape(t, d) @ torch.cat([m.weight_in for m in lins], dim=1)).view(t, 3, r).transpose(0, 1)
            hs = list(h3)
        else:
            hs = [x.reshape(t, d) @ m.weight_in for m in lins] if lowrank else [x.reshape(t, d)] * 3
        ws = [m.weight_out if lowrank else m.weight for m in lins]
        ws = [ws[0][perm], ws[1][perm], ws[2]]
        with torch.autocast(dev, enabled=False):  # the GEMMs run in the compute dtype, as autocast's would
            if not self.fuse_qkv:  # q and k each one GEMM with the rotation; v as it is
                q, k = (self.rope_op(hh.to(dtype)[None], ww.to(dtype)[None], cos, sin, hd, d)[0]
                        for hh, ww in zip(hs[:2], ws[:2]))
                return q.view(b, s, d), k.view(b, s, d), F.linear(hs[2].to(dtype), ws[2].to(dtype)).view(b, s, d)
            # (fuse_qkv is low-rank here) one batched GEMM [3, T, r] x [3, r, d] after the one down-projection GEMM
            # above (the first form of fuse_qkv, kept on this path: the rotary GEMM paid at the kernel only
            # batched, 1.08x against 0.51x for q and k apart: docs/performance.md)
            out = self.rope_op(h3.to(dtype), torch.stack(ws).to(dtype), cos, sin, hd, 2 * d)
            return out[0].view(b, s, d), out[1].view(b, s, d), out[2].view(b, s, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        roped = self.rope_op is not None and cache is None and _plain_linears((self.q, self.k, self.v))
        qkv = self._qkv_roped(x, cos, sin) if roped else self.qkv(x)
        q, k, v = (t.view(b, s, self.n_heads, self.head_dim) for t in qkv)
        if self.attn_op is not None and cache is None and not roped:  # (no KV cache: training, evaluation)
            return self.o(self.attn_op(q, k, v, cos, sin).reshape(b, s, d))
        # rotary embeddings in [b, s, heads, head_dim] (unless the GEMM applied them), then views as [b, heads, s,
        # head_dim]: q, k and v share one memory layout, so the attention's output is [b, s, heads, head_dim] in
        # memory (the o projection reads it without a copy) and its input gradients come back in the projections'
        # layout
        if not roped:
            q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.transpose(1, 2)
        causal, mask = True, None
        if cache is not None:
            if s > 1 and cache.pos > 0:  # (s first: a decode step's graph does not read the position)
                raise ValueError("KV cache: after the prefill, decode one token per forward")
            causal = not cache.static and cache.pos == 0
            k, v = cache.update(layer, k, v, positions)  # [b, heads, pos + s (static: max_len), head_dim]
            mask = cache.mask(positions) if cache.static else None
        if self.backends is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # [b, heads, s, head_dim]
        else:
            from torch.nn.attention import sdpa_kernel
            with sdpa_kernel(self.backends, set_priority=True):  # traced by torch.compile (no graph break)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o(y.transpose(1, 2).reshape(b, s, d))


class _Zeros(torch.autograd.Function):
    """Zeros like x in `dtype`, requiring grad where x does, with no gradient of their own (no leaf to accumulate
    into): model.defer_residual's first pending, the same kind of input as every later one (one compiled graph for
    every block)."""

    @staticmethod
    def forward(ctx, x, dtype):
        return torch.zeros_like(x, dtype=dtype)

    @staticmethod
    def backward(ctx, g):
        return None, None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        r = cfg.rank if cfg.lowrank_scope in ("all", "ffn") else 0
        ffn_cls = SwiGLU if cfg.ffn == "swiglu" else ReLU2FFN.of_width
        self.ffn = ffn_cls(cfg.d_model, cfg.ffn_width, r, cfg.init_std)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, positions=None, pending=None):
        """x [b, s, d] -> x + attention + FFN, [b, s, d]. pending (model.defer_residual): the previous block's FFN
        output, added to x here, where the add joins the norm's kernel; the block then returns (x, its FFN output)
        for the next one to add."""
        if pending is not None:
            x = x + pending
        x, h = self.attn_norm.split(x)
        x = x + self.attn(h, cos, sin, cache, layer, positions)
        x, h = self.ffn_norm.split(x)
        if pending is not None:
            return x, self.ffn(h)
        return x + self.ffn(h)


class LLaMA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if self.embed.weight.device.type != "meta":
            nn.init.normal_(self.embed.weight, std=cfg.init_std)
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        # the chunked loss's per-chunk softmax + logits' gradient (model/loss.py grad_kernel); build_model installs
        # torch.ops.elas.softmax_xent_grad (kernels/ops.py) for model.ce_kernel=triton (given, not imported: as
        # RMSNorm.residual_split)
        self.ce_grad = None

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter from its own generator, seeded by (seed, parameter name), with the
        constructors' distributions (embedding, LM head and full-rank linears N(0, init_std); low-rank factors
        Xavier-normal; norms 1), then every module's buffers (`init_buffers()`, for cores a method attached).
        The values do not depend on how the model is sharded: a sharded parameter (an FSDP2 DTensor, after
        `to_empty`) is drawn whole, one parameter at a time, and keeps its own shard; so a model built on the
        meta device and sharded never exists whole, yet holds what one process would hold."""
        owners = {n: m for n, m in self.named_modules()}
        for name, p in self.named_parameters():
            mod_name, _, attr = name.rpartition(".")
            owner = owners[mod_name]
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63)
            full = torch.empty(p.shape, dtype=torch.float32)  # [p's global shape], on the CPU
            if isinstance(owner, RMSNorm):
                full.fill_(1.0)
            elif isinstance(owner, LowRankLinear):
                nn.init.xavier_normal_(full, generator=g)
            else:  # embedding, LM head, full-rank linears (a weight method's linear included)
                nn.init.normal_(full, std=self.cfg.init_std, generator=g)
            if hasattr(p, "device_mesh"):  # a DTensor shard: keep this process's part of the whole
                from torch.distributed.tensor import distribute_tensor
                p.copy_(distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(full)
        for m in self.modules():
            if m is not self and hasattr(m, "init_buffers"):
                m.init_buffers()
        self._rope = None

    def rope(self, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != device or self._rope[0].shape[0] < seq:
            self._rope = rope_tables(self.cfg.head_dim, max(seq, self.cfg.max_seq_len), self.cfg.rope_theta, device)
        return self._rope[0][:seq], self._rope[1][:seq]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx: [batch, seq] token ids. Returns logits [batch, seq, vocab], or the mean loss if targets given.
        cache: a KVCache for decoding (idx then holds the tokens after the cached ones; logits only)."""
        start = cache.pos if cache is not None and cache.host_pos() else 0
        if start + idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + idx.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        positions = None
        if cache is not None and cache.static:  # positions from the device: the same step at every position
            positions = cache.positions(idx.shape[1], idx.device)
            cos, sin = self.rope(self.cfg.max_seq_len, idx.device)
            cos, sin = cos[positions], sin[positions]
        else:
            cos, sin = self.rope(start + idx.shape[1], idx.device)
            cos, sin = cos[start:], sin[start:]  # the positions of idx's tokens
        x = self.embed(idx)  # [batch, seq, d_model], fp32 (the embedding is not an autocast op)
        dev = x.device.type
        if self.cfg.residual_dtype == "compute" and torch.is_autocast_enabled(dev):
            # the residual stream in the compute dtype: every add, norm and cast of it moves half the bytes
            x = x.to(torch.get_autocast_dtype(dev))
        if cache is None and self.cfg.defer_residual:
            # (x, pending) through the blocks; zeros first, in the dtype and with the grad requirement of every
            # later pending (an FFN output: the autocast dtype), so that every block runs one compiled graph
            pending = _Zeros.apply(x, torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype)
            for blk in self.blocks:
                x, pending = blk(x, cos, sin, pending=pending)
            if targets is None:
                return self.lm_head(self.norm(x + pending))
            return self.loss(x, targets, pending)
        if cache is None:
            for blk in self.blocks:
                x = blk(x, cos, sin)
        else:
            for i, blk in enumerate(self.blocks):
                x = blk(x, cos, sin, cache, i, positions)
            cache.advance(idx.shape[1])
        if targets is None:
            return self.lm_head(self.norm(x))
        return self.loss(x, targets)

    def loss(self, x: torch.Tensor, targets: torch.Tensor, pending: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy of the final hidden states x [batch, seq, d_model] (+ pending, the last
        block's FFN output under model.defer_residual) against targets [batch, seq] (-100: ignored). A method of its
        own so that it can be compiled as one region."""
        h = self.norm(x if pending is None else x + pending)
        if self.cfg.lm_loss == "chunked":  # never holds [tokens, vocab] logits (model/loss.py)
            return linear_cross_entropy(h, self.lm_head.weight, targets, grad_kernel=self.ce_grad)
        logits = self.lm_head(h)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-100)
