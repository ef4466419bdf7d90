"""Exact q/k-row ablation through attention: the block-measure scores of q and k rows.

Removing row i of q_proj (query head h, head dimension d) zeroes q[:, h, d] *before* RoPE, so the
rotated query changes in d and in its rotary partner p(d); the causal softmax is recomputed and the
change of the attention block output is taken after o_proj:

    ΔA = (softmax(S - ΔS_d) - softmax(S)) V_g W_o,hᵀ,   score² = Σ_t ΔA[t] ΔA[t]ᵀ
                                                          = Σ_t ΔO[t] (W_o,hᵀ W_o,h) ΔO[t]ᵀ

with ΔS_d = scale·(q_d·cos_d ⊗ k̃_d + s(d)·q_d·sin_p(d) ⊗ k̃_p(d)) a sum of two outer products.
Removing row i of k_proj (k/v head g, dimension d) changes the scores of every query head sharing
g; their ΔO are concatenated and folded through the group's Gram matrix W_o,gᵀ W_o,g.

Three implementations compute this, each exact (the unperturbed output always comes from the same
call on the same shapes, so rounding in the logits and the softmax cancels in ΔO = O_ablated - O):

* :func:`qk_row_ablation_shared`, the torch backend: S is computed once per head and query tile and
  each removed row adds only its rank-2 term, a softmax and P·V, batched over removed dimensions on
  the CPU's GEMM kernels (about half the FLOPs of an attention pass per removed row);
* :func:`qk_row_ablation_sdpa`: the ablated logits are those of ordinary attention with the rotated
  query (or key) changed in d and p(d) — rope(q with q_d = 0) has q̃_d = rot(q)_d·sin_d and
  q̃_p(d) = q_p(d)·cos_p(d) — so each removed row is one pass of ``scaled_dot_product_attention``
  (the flash kernels on CPUs and GPUs): the anchor what a user would pick instead is measured by;
* the Triton and CUDA kernels (below): a flash attention with the two extra logit terms.

Cost per document of length L: q and k rows each take heads·head_dim ablations, ≈ 4·heads·hd²·L²
FLOPs as attention passes (the causal band halves L²), about half that on shared logits. Memory: no
``[L, L]`` tensor is built per removed row; removed rows are batched under ``chunk_bytes``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
from torch.nn.functional import scaled_dot_product_attention

from .cuda_tuning import choose, cuda_event_ms, token_bucket
from .projection_energy import segment_sums
from .rope import apply_rope, rope_partner
from .segments import Segments, as_segments

DEFAULT_CHUNK_BYTES = 256 * 2**20
_LIVE_PER_ROW = 5  # [L, hd] tensors alive per removed row in a batch: query or key, output, ΔO, ΔO·Gram, slack


def attention_mask(length: int, sliding_window: int | None, device) -> torch.Tensor:
    """[L, L] additive mask: 0 where query t may attend key s (s ≤ t, and t - s < window), else -inf."""
    t = torch.arange(length, device=device)
    allowed = t[None, :] <= t[:, None]
    if sliding_window is not None:
        allowed &= (t[:, None] - t[None, :]) < sliding_window
    return torch.zeros(length, length, device=device).masked_fill_(~allowed, float("-inf"))


def _check(q, k, v, cos, sin, w_o, offsets, n_rep) -> Segments:
    """The op's arguments checked; returns the documents' :class:`Segments`."""
    segments = as_segments(offsets, q.device)
    T, nh, hd = q.shape
    if k.shape != (T, nh // n_rep, hd) or v.shape != k.shape or nh % n_rep:
        raise ValueError(f"qk_row_ablation: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, n_rep={n_rep}")
    if cos.shape != (T, hd) or sin.shape != (T, hd):
        raise ValueError(f"qk_row_ablation: cos/sin must be [T={T}, head_dim={hd}], got {tuple(cos.shape)}")
    if w_o.dim() != 2 or w_o.shape[1] != nh * hd:
        raise ValueError(f"qk_row_ablation: w_o {tuple(w_o.shape)} must have {nh * hd} columns")
    if segments.total != T:
        raise ValueError(f"qk_row_ablation: offsets must run from 0 to T={T}")
    return segments


def _rope_terms(x, cos, sin):
    """x [L, heads, hd] pre-RoPE -> (x·cos, rot(x)·sin), each [heads, L, hd]; RoPE(x) is their sum.

    Zeroing x_d leaves RoPE(x) unchanged but in two coordinates, which become exactly what RoPE makes
    of the zeroed vector: d -> (rot(x)·sin)_d (its x·cos term is 0) and p(d) -> (x·cos)_p(d) (its
    rotated term, ±x_d·sin, is 0)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos[:, None, :]).permute(1, 0, 2).contiguous(), (rot * sin[:, None, :]).permute(1, 0, 2).contiguous()


def _ablated(rotated, x_cos, rot_sin, d0, d1):
    """rotated, x_cos, rot_sin [heads, L, hd] -> [heads, 1 + d1 - d0, L, hd]: RoPE(x) itself, then RoPE(x) with
    x_d zeroed for each d in [d0, d1), a range within one half of the head (so the partners p(d) are one too)."""
    hd = rotated.shape[-1]
    p0, n = (d0 + hd // 2) % hd, d1 - d0
    out = rotated[:, None].repeat(1, 1 + n, 1, 1)
    # out[:, 1 + j, :, d0 + j] for each j: a diagonal view [heads, L, n]
    out[:, 1:, :, d0:d1].diagonal(dim1=1, dim2=3).copy_(rot_sin[..., d0:d1])
    out[:, 1:, :, p0:p0 + n].diagonal(dim1=1, dim2=3).copy_(x_cos[..., p0:p0 + n])
    return out


def _folded(d_o, factor):
    """Σ_t ΔO[..., t, :] G ΔO[..., t, :]ᵀ = ‖ΔO F‖² with G = F Fᵀ: d_o [..., L, w], factor [..., w, r] -> [...]."""
    return (d_o @ factor).square_().sum(dim=(-1, -2))


def _o_grams(w_o, nh, nkv):
    """o_proj's Gram matrices W_oᵀW_o per head and per k/v group, in w_o's dtype: w_o [hidden, heads·hd] ->
    [heads, hd, hd], [kv_heads, rep·hd, rep·hd] (a group's heads side by side)."""
    w = w_o.reshape(w_o.shape[0], nkv, -1)
    groups = torch.einsum("kgi,kgj->gij", w, w)
    hd, rep = w_o.shape[1] // nh, nh // nkv
    heads = torch.stack([groups[h // rep, (h % rep) * hd:(h % rep + 1) * hd, (h % rep) * hd:(h % rep + 1) * hd]
                         for h in range(nh)])
    return heads, groups


def _factors(w_o, nh, nkv):
    """The Gram matrices G of :func:`_o_grams` as factors F Fᵀ = G, F = Q·sqrt(Λ) from G's eigendecomposition
    in float64 (exact for the semidefinite G of a rank-deficient W_o, where Cholesky fails), cast back."""
    def factor(gram):
        values, vectors = torch.linalg.eigh(gram.double())
        return (vectors * values.clamp_min(0).sqrt()[..., None, :]).to(gram.dtype)
    return tuple(factor(g) for g in _o_grams(w_o, nh, nkv))


def _score_document(q, k, v, cos, sin, f_heads, f_groups, n_rep, scaling, sliding_window, chunk_bytes):
    """One document: q [L, heads, hd], k/v [L, kv_heads, hd] (working dtype) -> q_sq [heads·hd], k_sq [kv_heads·hd]."""
    L, nh, hd = q.shape
    nkv = k.shape[1]
    mask = None if sliding_window is None else attention_mask(L, sliding_window, q.device).to(q.dtype)
    q_cos, q_sin = _rope_terms(q, cos, sin)
    k_cos, k_sin = _rope_terms(k, cos, sin)
    qr, kr = q_cos + q_sin, k_cos + k_sin  # [heads, L, hd], [kv_heads, L, hd]
    causal = mask is None

    def attend(query, key, value):  # [B, H, L, hd] each (keys and values may be broadcast views)
        return scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling)

    # per removed row ≈ _LIVE_PER_ROW [L, hd] tensors of n_rep heads; a chunk of c dimensions of one group
    row_bytes = _LIVE_PER_ROW * n_rep * L * hd * q.element_size()
    c = max(1, min(hd // 2, chunk_bytes // row_bytes))
    chunks = [(d0, min(d0 + c, end)) for start, end in ((0, hd // 2), (hd // 2, hd)) for d0 in range(start, end, c)]
    q_sq = torch.empty(nkv, n_rep, hd, dtype=q.dtype, device=q.device)
    k_sq = torch.empty(nkv, hd, dtype=q.dtype, device=q.device)
    for g in range(nkv):
        heads = slice(g * n_rep, (g + 1) * n_rep)
        q_g, k_g, v_g = qr[heads], kr[g], v[:, g]  # [rep, L, hd], [L, hd], [L, hd]
        for d0, d1 in chunks:
            n = d1 - d0
            # q rows (h, d) of the group, batch [rep, 1 + n]: the unablated query first, so the base output
            # comes from the same call on the same shapes and its rounding cancels in ΔO
            out = attend(_ablated(q_g, q_cos[heads], q_sin[heads], d0, d1), k_g.expand(n_rep, n + 1, L, hd),
                         v_g.expand(n_rep, n + 1, L, hd))
            d_o = out[:, 1:] - out[:, :1]  # [rep, n, L, hd]
            del out
            q_sq[g, :, d0:d1] = _folded(d_o, f_heads[heads, None])
            del d_o
            # k rows (g, d): every query head of the group sees the changed keys; batch [1 + n, rep]
            k_abl = _ablated(kr[g:g + 1], k_cos[g:g + 1], k_sin[g:g + 1], d0, d1)[0]  # [1 + n, L, hd]
            out = attend(q_g.expand(n + 1, n_rep, L, hd), k_abl[:, None].expand(n + 1, n_rep, L, hd),
                         v_g.expand(n + 1, n_rep, L, hd))
            del k_abl
            d_o = (out[1:] - out[:1]).permute(0, 2, 1, 3).reshape(n, L, n_rep * hd)  # the group's heads side by side
            del out
            k_sq[g, d0:d1] = _folded(d_o, f_groups[g])
    return q_sq.reshape(-1), k_sq.reshape(-1)


def qk_row_ablation_sdpa(q, k, v, cos, sin, w_o, offsets, *, n_rep: int, scaling: float | None = None,
                         sliding_window: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """The exact q/k-row ablation on PyTorch's fused attention, one pass per removed row: the anchor
    every backend is measured against (``bench_kernels.py``'s sdpa column).

    Args (packed documents, T = T_total):
        q [T, heads, hd], k/v [T, kv_heads, hd]: pre-RoPE projections (biases included);
        cos, sin [T, hd]: the model's rotary tables at each token's position;
        w_o [hidden, heads·hd]: o_proj weight; offsets: :class:`Segments` or [n_docs + 1] document segments.
    Returns:
        q_sq [n_docs, heads·hd], k_sq [n_docs, kv_heads·hd]: float32 squared scores ‖ΔA‖².

    Computed in float32 (float64 for float64 inputs), one document at a time: a document's scores do
    not depend on the other documents of the batch, bit for bit.
    """
    segments = _check(q, k, v, cos, sin, w_o, offsets, n_rep)
    return _per_document(_score_document, segments, q, k, v, cos, sin, w_o, n_rep, scaling, sliding_window,
                         chunk_bytes)


def _per_document(score_document, segments, q, k, v, cos, sin, w_o, n_rep, scaling, sliding_window, chunk_bytes):
    """The torch implementations' common frame: working dtype, o_proj's Gram factors per head and per
    k/v group, and ``score_document`` on each document -> q_sq [n_docs, heads·hd], k_sq [n_docs, kv_heads·hd]."""
    T, nh, hd = q.shape
    nkv = k.shape[1]
    scaling = hd ** -0.5 if scaling is None else scaling
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, cos, sin, w_o = (t.to(work) for t in (q, k, v, cos, sin, w_o))
    f_heads, f_groups = _factors(w_o, nh, nkv)
    q_sq = torch.empty(segments.n_docs, nh * hd, dtype=torch.float32, device=q.device)
    k_sq = torch.empty(segments.n_docs, nkv * hd, dtype=torch.float32, device=q.device)
    for i, (s, e) in enumerate(segments.spans()):
        if e == s:  # an empty document: nothing attends, nothing changes
            q_sq[i], k_sq[i] = 0, 0
            continue
        # fresh copies: each document's data starts at the allocator's alignment wherever it lies in the
        # batch, so vectorized kernels round it the same way (scores independent of the batch, bit for bit)
        doc = [t[s:e].clone() for t in (q, k, v, cos, sin)]
        q_sq[i], k_sq[i] = score_document(*doc, f_heads, f_groups, n_rep, scaling, sliding_window, chunk_bytes)
    return q_sq, k_sq


def sdpa_where_faster(kernel: Callable, backend: str, *, timer: Callable | None = None,
                      tag: Callable[[torch.Tensor], str] | None = None) -> Callable:
    """``kernel`` (a flash launcher: the Triton or CUDA one) with each document routed to whichever of it and
    :func:`qk_row_ablation_sdpa` measured faster for documents of its length on the GPU at hand.

    Why: on an H200 the kernels beat PyTorch's fused attention 1.8-2.2x at L = 512 but lost 1.5-1.8x at
    L = 2048 (``benchmarks/bench_kernels.py``, 2026-11-27); after tuning its tiles on that GPU, the Triton
    kernel wins at 2048 too (1.21x, ``benchmarks/tune_qk_attention.py``), but the margin depends on the
    GPU, the shape and the configuration its table holds for the GPU. Both are exact, so each document goes
    to the faster. The choice is made per (GPU, backend and its launch configuration, dtype, heads, kv heads,
    head_dim, window, length bucket) by :func:`cusprun_kernels.cuda_tuning.choose` on the first document of
    that bucket, and stored: the implementation a document gets depends only on its own length, never on its
    batch (sdpa's scores are then batch-independent bit for bit; the kernels' are within their tolerance, as
    before).
    ``CUSPRUN_CUDA_QK_ROW_ABLATION=kernel|sdpa`` forces one. ``tag(q)`` names the kernel's launch
    configuration in the stored key, so that a choice measured with another configuration (an earlier
    release's tiles) is measured again. ``.kernel`` is the unrouted launcher, which the backend check
    verifies. Off CUDA devices (the Triton interpreter) ``kernel`` runs alone unless a ``timer`` is given
    (tests).
    """
    candidates = {"kernel": kernel, "sdpa": qk_row_ablation_sdpa}

    def routed(q, k, v, cos, sin, w_o, offsets, *, n_rep: int, scaling: float | None = None,
               sliding_window: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        segments = _check(q, k, v, cos, sin, w_o, offsets, n_rep)
        kw = dict(n_rep=n_rep, scaling=scaling, sliding_window=sliding_window, chunk_bytes=chunk_bytes)
        if q.device.type != "cuda" and timer is None:
            return kernel(q, k, v, cos, sin, w_o, segments, **kw)
        spans = segments.spans()
        lengths = [e - s for s, e in spans]
        kernel_key = backend if tag is None else f"{backend}|{tag(q)}"
        choice = _route(candidates, kernel_key, timer, q, k, v, cos, sin, w_o, segments, kw)
        used = {choice[token_bucket(n)] for n in lengths if n}
        if len(used) == 1:  # one implementation for the whole batch: no gathering
            return candidates[used.pop()](q, k, v, cos, sin, w_o, segments, **kw)
        _, nh, hd = q.shape
        q_sq = torch.zeros(segments.n_docs, nh * hd, dtype=torch.float32, device=q.device)
        k_sq = torch.zeros(segments.n_docs, k.shape[1] * hd, dtype=torch.float32, device=q.device)
        for name in sorted(used):  # empty documents keep their zero scores (a batch of only those: all zero)
            docs = [i for i, n in enumerate(lengths) if n and choice[token_bucket(n)] == name]
            rows = torch.cat([torch.arange(*spans[i], device=q.device) for i in docs])
            sub = Segments.of_lengths([lengths[i] for i in docs], q.device)
            q_sq[docs], k_sq[docs] = candidates[name](*(t[rows] for t in (q, k, v, cos, sin)), w_o, sub, **kw)
        return q_sq, k_sq

    routed.kernel = kernel
    routed.__name__ = routed.__qualname__ = f"{kernel.__name__}_or_sdpa"
    routed.__doc__ = f"{kernel.__name__}, with documents routed to sdpa where it measured faster (sdpa_where_faster)."
    return routed


def _route(candidates, kernel_key: str, timer, q, k, v, cos, sin, w_o, segments: Segments, kw) -> dict[int, str]:
    """{length bucket: implementation name} for the batch's non-empty documents, each bucket timed once on
    its first document (then cached by :func:`cusprun_kernels.cuda_tuning.choose` under ``kernel_key``, the
    backend and its launch configuration, and the shape)."""
    _, nh, hd = q.shape
    case = (f"{kernel_key}|{str(q.dtype).removeprefix('torch.')}|heads={nh}|kv={k.shape[1]}|hd={hd}|"
            f"window={kw['sliding_window']}")
    device_name = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else str(q.device)
    choice: dict[int, str] = {}
    for s, e in segments.spans():
        bucket = token_bucket(e - s)
        if e == s or bucket in choice:
            continue
        doc, one = [t[s:e] for t in (q, k, v, cos, sin)], Segments([0, e - s], q.device)
        calls = {name: partial(f, *doc, w_o, one, **kw) for name, f in candidates.items()}
        # the timing events record on this device's current stream
        with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
            choice[bucket] = choose("qk_row_ablation", f"{case}|L<={bucket}", calls, device_name=device_name,
                                    timer=timer or cuda_event_ms)
    return choice


# ---------------------------------------------------------------------------------------------------
# Shared logits (the torch backend). The ablated logits differ from S = scale·q̃k̃ᵀ by a rank-2 term:
#   q row (h, d): ΔS = scale·(q_cos_d ⊗ k̃_d + q_sin_p(d) ⊗ k̃_p(d))   (the rotated query loses q_cos_d
#                 in d and q_sin_p(d) in p(d), see _rope_terms);
#   k row (g, d): ΔS = scale·(q̃_d ⊗ k_cos_d + q̃_p(d) ⊗ k_sin_p(d))   for every head of group g.
# So S is computed once per head and query tile, and each removed row costs one rank-2 update
# (baddbmm), a softmax and P·V, all batched over the removed dimensions of a chunk: about half the
# FLOPs of a fused attention pass per removed row (QKᵀ is shared), on the CPU's GEMM kernels. Query
# rows go in tiles, each against the keys it may see (its causal / sliding-window band), which skips
# most of the masked triangle; memory is O(chunk · tile · L), never [L, L] per removed row. o_proj is
# folded in through factors F Fᵀ = W_oᵀW_o: for a q row into the values (‖ΔP·V·F_h‖²), for a k row
# after the group's heads are side by side.
# ---------------------------------------------------------------------------------------------------
TILE_BYTES = 4 * 2**20  # a chunk's perturbed logits per query tile, sized for the CPU's caches: on a 2-core EPYC,
#                         L = 512: 4 MB (32-row tiles) and 8 MB ran 0.29 s per SmolLM2 layer, 16 MB (128 rows, a
#                         quarter of them masked keys) 0.35 s, 2 MB (16 rows) 0.32 s; L = 2048: 34 MB tiles ran
#                         1.8x slower than 8 MB ones


def _tile_rows(length, batch, element_size):
    """Query rows per tile: the largest power of two in [16, 128] keeping [batch, rows, length] within
    TILE_BYTES, 16 when none does (long documents)."""
    rows = max(1, TILE_BYTES // (batch * length * element_size))
    return min(length, max(16, min(128, 1 << (rows.bit_length() - 1))))


def _tile_mask(i0, i1, k0, sliding_window, device, dtype):
    """[i1 - i0, i1 - k0] additive mask of query rows [i0, i1) over keys [k0, i1)."""
    t = torch.arange(i0, i1, device=device)[:, None]
    s = torch.arange(k0, i1, device=device)[None, :]
    allowed = s <= t
    if sliding_window is not None:
        allowed &= (t - s) < sliding_window
    return torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def _pairs(a, b):
    """a, b [L, n] -> [1 + n, L, 2]: for each of n removed rows its two factors side by side, after a zero
    pair (the unablated batch slot, so the base output comes from the same call)."""
    out = a.new_zeros(1 + a.shape[1], a.shape[0], 2)
    out[1:, :, 0], out[1:, :, 1] = a.T, b.T
    return out


def _perturbed(logits, rows, cols, values):
    """softmax(logits - rows·cols)·values, minus its unperturbed first slot.

    logits [t, m], rows [1 + n, t, 2], cols [1 + n, 2, m], values [m, hd] -> ΔO [n, t, hd]."""
    out = torch.baddbmm(logits, rows, cols, alpha=-1).softmax(dim=-1) @ values
    return out[1:] - out[:1]


def _score_document_shared(q, k, v, cos, sin, f_heads, f_groups, n_rep, scaling, sliding_window, chunk_bytes):
    """One document on shared logits: q [L, heads, hd], k/v [L, kv_heads, hd] -> q_sq [heads·hd], k_sq [kv_heads·hd]."""
    L, nh, hd = q.shape
    nkv, half = k.shape[1], hd // 2
    q_cos, q_sin = _rope_terms(q, cos, sin)
    k_cos, k_sin = _rope_terms(k, cos, sin)
    qr, kr = (q_cos + q_sin) * scaling, k_cos + k_sin  # the scale folded into the queries' terms
    q_cos, q_sin = q_cos * scaling, q_sin * scaling
    # the tile for a chunk of a whole half-head, then as many removed rows per chunk as keep their
    # [tile, L] perturbed logits and softmax (two per row) under chunk_bytes
    tile = _tile_rows(L, half + 1, q.element_size())
    n = max(1, min(half, chunk_bytes // (2 * tile * L * q.element_size()) - 1))
    chunks = [(d0, min(d0 + n, end)) for start, end in ((0, half), (half, hd)) for d0 in range(start, end, n)]
    q_sq = torch.zeros(nh, hd, dtype=q.dtype, device=q.device)
    k_sq = torch.zeros(nkv, hd, dtype=q.dtype, device=q.device)
    for i0 in range(0, L, tile):
        i1 = min(L, i0 + tile)
        k0 = 0 if sliding_window is None else max(0, i0 - sliding_window + 1)
        mask = _tile_mask(i0, i1, k0, sliding_window, q.device, q.dtype)
        for g in range(nkv):
            heads = range(g * n_rep, (g + 1) * n_rep)
            keys, values = kr[g, k0:i1], v[k0:i1, g]  # [m, hd]
            logits = [torch.addmm(mask, qr[h, i0:i1], keys.T) for h in heads]  # [t, m] per head
            # a q row's ‖ΔO F_h‖² is that of softmax(...)·(V F_h): o_proj folded into the values
            folded_values = [values @ f_heads[h] for h in heads]
            for d0, d1 in chunks:
                p0 = (d0 + half) % hd
                p1 = p0 + d1 - d0
                q_cols = _pairs(keys[:, d0:d1], keys[:, p0:p1]).transpose(1, 2)
                k_cols = _pairs(k_cos[g, k0:i1, d0:d1], k_sin[g, k0:i1, p0:p1]).transpose(1, 2)
                group_d_o = []
                for r, h in enumerate(heads):
                    rows = _pairs(q_cos[h, i0:i1, d0:d1], q_sin[h, i0:i1, p0:p1])
                    q_sq[h, d0:d1] += _perturbed(logits[r], rows, q_cols, folded_values[r]).square_().sum(dim=(1, 2))
                    rows = _pairs(qr[h, i0:i1, d0:d1], qr[h, i0:i1, p0:p1])
                    group_d_o.append(_perturbed(logits[r], rows, k_cols, values))
                k_sq[g, d0:d1] += _folded(torch.cat(group_d_o, dim=-1), f_groups[g])  # the group's heads side by side
    return q_sq.reshape(-1), k_sq.reshape(-1)


def qk_row_ablation_shared(q, k, v, cos, sin, w_o, offsets, *, n_rep: int, scaling: float | None = None,
                           sliding_window: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """The exact q/k-row ablation on shared logits (the torch backend): same contract as
    :func:`qk_row_ablation_sdpa`, which it beats on the CPU (``benchmarks/bench_score.py``).

    Computed in float32 (float64 for float64 inputs), one document at a time: a document's scores do
    not depend on the other documents of the batch, bit for bit.
    """
    segments = _check(q, k, v, cos, sin, w_o, offsets, n_rep)
    return _per_document(_score_document_shared, segments, q, k, v, cos, sin, w_o, n_rep, scaling, sliding_window,
                         chunk_bytes)


qk_row_ablation_torch = qk_row_ablation_shared  # the torch backend's implementation


# ---------------------------------------------------------------------------------------------------
# Triton. One flash-style program per (query tile, query head, ablated dimension j of the chunk):
# it streams the key blocks its rows can see (causal / sliding-window band of its own document),
# perturbs the scores by the rank-2 term of the removed row, keeps an online softmax, and writes
# ΔO = softmax(S - ΔS_j) V - O for its rows: [chunk, heads, T, hd] float32 in all, never L×L. The
# unperturbed O comes from the same kernel (PERTURB=False) with the identical block structure, so
# rounding in S and in the online softmax cancels in the difference. o_proj is folded in after the
# kernel through the Gram matrices, as batched matmuls: Σ_t ΔO[t] W_oᵀW_o ΔO[t]ᵀ.
#
# Both ablation kinds share the kernel: ΔS_j[t, s] = scale·(R1[t]·C1[s] + R2[t]·C2[s]) with
#   q row (h, d): R1 = q_d·cos_d, R2 = s(d)·q_d·sin_p(d) (pre-RoPE query), C1 = k̃_d, C2 = k̃_p(d);
#   k row (g, d): R1 = q̃_d, R2 = q̃_p(d) (every head h of group g), C1 = k_d·cos_d, C2 = s(d)·k_d·sin_p(d).
# FLOPs per document: 2 · heads · head_dim · (2·L²/2·hd · 2) ≈ 4·heads·hd²·L² for q and k rows (the
# causal band halves L²), plus one unperturbed pass per head.
# ---------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the torch backend works without triton
    triton = None

if triton is not None:
    @triton.jit
    def _exp(x, PRECISE: tl.constexpr):
        # tl.exp compiles to ex2.approx; libdevice's expf is accurate to 2 ulp. The interpreter has no
        # libdevice (its stub returns nothing) and computes tl.exp with numpy's exp, which is precise.
        if PRECISE:
            return libdevice.exp(x)
        else:
            return tl.exp(x)

    @triton.jit
    def _ablated_attention_kernel(qr_ptr, kr_ptr, v_ptr, r1_ptr, r2_ptr, c1_ptr, c2_ptr, base_ptr, out_ptr,
                                  tile_start_ptr, tile_end_ptr, tile_key_lo_ptr,
                                  T, NH, NKV, HD, N_REP, CHUNK, scale, window,
                                  PERTURB: tl.constexpr, WINDOWED: tl.constexpr, PRECISION: tl.constexpr,
                                  PRECISE_EXP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                  HDP: tl.constexpr):
        tile, h, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        g = h // N_REP
        m0, m1, lo = tl.load(tile_start_ptr + tile), tl.load(tile_end_ptr + tile), tl.load(tile_key_lo_ptr + tile)
        rm = m0 + tl.arange(0, BM)
        rd = tl.arange(0, HDP)
        mask_m, mask_d = rm < m1, rd < HD
        # int64 element offsets: heads·T·head_dim and chunk·heads·T·head_dim pass 2³¹ on long documents
        rm64, h64, g64, j64 = rm.to(tl.int64), h.to(tl.int64), g.to(tl.int64), j.to(tl.int64)
        q = tl.load(qr_ptr + (rm64[:, None] * NH + h64) * HD + rd[None, :], mask=mask_m[:, None] & mask_d[None, :],
                    other=0.0)
        if PERTURB:
            r1 = tl.load(r1_ptr + (rm64 * NH + h64) * CHUNK + j64, mask=mask_m, other=0.0)
            r2 = tl.load(r2_ptr + (rm64 * NH + h64) * CHUNK + j64, mask=mask_m, other=0.0)
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, HDP), dtype=tl.float32)
        for s0 in range(lo, m1, BN):
            rn = s0 + tl.arange(0, BN)
            rn64 = rn.to(tl.int64)
            mask_n = rn < m1
            kv_mask = mask_n[:, None] & mask_d[None, :]
            kt = tl.load(kr_ptr + (rn64[:, None] * NKV + g64) * HD + rd[None, :], mask=kv_mask, other=0.0)
            vt = tl.load(v_ptr + (rn64[:, None] * NKV + g64) * HD + rd[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale
            if PERTURB:
                c1 = tl.load(c1_ptr + (rn64 * NKV + g64) * CHUNK + j64, mask=mask_n, other=0.0)
                c2 = tl.load(c2_ptr + (rn64 * NKV + g64) * CHUNK + j64, mask=mask_n, other=0.0)
                s = s - scale * (r1[:, None] * c1[None, :] + r2[:, None] * c2[None, :])
            valid = (rn[None, :] <= rm[:, None]) & mask_n[None, :]
            if WINDOWED:
                valid = valid & ((rm[:, None] - rn[None, :]) < window)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
            alpha = _exp(m_i - m_safe, PRECISE_EXP)
            p = _exp(s - m_safe[:, None], PRECISE_EXP)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=PRECISION)
            m_i = m_new
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padded rows have no keys; they are not stored
        out_mask = mask_m[:, None] & mask_d[None, :]
        if PERTURB:
            o = o - tl.load(base_ptr + (h64 * T + rm64[:, None]) * HD + rd[None, :], mask=out_mask, other=0.0)
        tl.store(out_ptr + ((j64 * NH + h64) * T + rm64[:, None]) * HD + rd[None, :], o, mask=out_mask)


def _attention_tiles(segments: Segments, block, sliding_window):
    tiles = segments.tiles(block)
    key_lo = tiles.doc_start if sliding_window is None else torch.maximum(tiles.doc_start,
                                                                          tiles.start - sliding_window + 1)
    return tiles, key_lo.to(torch.int32)


def triton_config_tag(q: torch.Tensor) -> str:
    """The Triton launcher's configuration for ``q``'s head_dim and device, as the routing's stored key names it."""
    from .triton_configs import attention_config_for

    return attention_config_for(q.shape[-1], q.device).describe()


def qk_row_ablation_triton(q, k, v, cos, sin, w_o, offsets, *, n_rep: int, scaling: float | None = None,
                           sliding_window: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                           block: int | None = None, block_n: int | None = None, config=None):
    """Triton launcher of the exact q/k-row ablation (same contract as :func:`qk_row_ablation_torch`).

    Precision: the attention runs in float32 with both products (QKᵀ and PV) on tensor cores as 3×TF32
    (``input_precision="tf32x3"``: each operand split into a TF32 high and low part, three TF32 products,
    ≈ float32 accuracy) up to head_dim 128 and in float32 FMA (``ieee``) above; exp through libdevice (not
    ``ex2.approx``) and FP fusion disabled, so that the unperturbed and the perturbed pass round S
    identically and cancel exactly in ΔO.

    Tile sizes, warps and pipeline stages come from :func:`cusprun_kernels.triton_configs.attention_config`
    for this head_dim, the device's compute capability and its shared memory; ``config`` (an
    ``AttentionConfig``) replaces that choice, as ``benchmarks/tune_qk_attention.py`` does, and ``block`` /
    ``block_n`` override the tile sizes, as the CPU tests do.

    FLOPs per document of length L (causal band ≈ L²/2 score entries per pass): every q row
    (heads·hd of them) and every k row once per query head of its group (kv_heads·n_rep·hd = heads·hd)
    is one attention pass of 2·(L²/2)·hd for QKᵀ and as many for P·V, so ≈ 4·heads·hd²·L² in all,
    plus one unperturbed pass per head — about head_dim attention passes per head, twice.
    """
    from .devices import launch_on, require_same_device
    from .triton_configs import attention_config, known_fault, target_of

    segments = _check(q, k, v, cos, sin, w_o, offsets, n_rep)
    T, nh, hd = q.shape
    dev = q.device
    require_same_device(dev, k=k, v=v, cos=cos, sin=sin, w_o=w_o)
    capability, shared = target_of(dev)
    cfg = config or attention_config(hd, shared, capability)
    block, block_n = block or cfg.block_m, block_n or cfg.block_n
    fault = known_fault(replace(cfg, block_m=block, block_n=block_n), capability)
    if fault:
        raise ValueError(f"qk_row_ablation (triton): {cfg.describe()} at head_dim {hd} is known to fault on this "
                         f"GPU: {fault}")
    tiles, key_lo = _attention_tiles(segments, block, sliding_window)
    meta = dict(WINDOWED=sliding_window is not None, PRECISION=cfg.precision, PRECISE_EXP=dev.type == "cuda", BM=block,
                BN=block_n, HDP=cfg.head_dim_padded, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                enable_fp_fusion=False)

    def attention(qr, kr, v, r1, r2, c1, c2, base, chunk, perturb, scale):
        out = torch.full((chunk, nh, T, hd), float("nan"), dtype=torch.float32, device=dev)
        with launch_on(dev):
            _ablated_attention_kernel[(tiles.count, nh, chunk)](
                qr, kr, v, r1, r2, c1, c2, base, out, tiles.start, tiles.end, key_lo,
                T, nh, k.shape[1], hd, n_rep, chunk, scale, sliding_window or 0, PERTURB=perturb, **meta)
        return out
    return _flash_ablation(q, k, v, cos, sin, w_o, segments, n_rep, scaling, chunk_bytes, attention)


def qk_row_ablation_cuda(q, k, v, cos, sin, w_o, offsets, *, n_rep: int, scaling: float | None = None,
                         sliding_window: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """CUDA C++ launcher (csrc/ablated_attention.cu) of the exact q/k-row ablation; same contract and the
    same driver as the Triton launcher, with the extension's flash-style kernel for the attention passes."""
    from .cuda_ext import extension, pointer
    from .devices import launch_on, require_same_device

    segments = _check(q, k, v, cos, sin, w_o, offsets, n_rep)
    dev = q.device
    require_same_device(dev, k=k, v=v, cos=cos, sin=sin, w_o=w_o)
    ext = extension()[0]
    T, nh, hd = q.shape
    tiles, key_lo = _attention_tiles(segments, ext.attention_rows, sliding_window)
    f32 = torch.float32

    def attention(qr, kr, v, r1, r2, c1, c2, base, chunk, perturb, scale):
        out = torch.full((chunk, nh, T, hd), float("nan"), dtype=f32, device=dev)
        ptrs = [pointer(t, name, f32, dev) for t, name in ((qr, "qr"), (kr, "kr"), (v, "v"), (r1, "r1"),
                                                            (r2, "r2"), (c1, "c1"), (c2, "c2"), (base, "base"),
                                                            (out, "out"))]
        with launch_on(dev) as stream:
            ext.ablated_attention(*ptrs, pointer(tiles.start, "tile_start", device=dev),
                                  pointer(tiles.end, "tile_end", device=dev),
                                  pointer(key_lo, "tile_key_lo", device=dev), tiles.count, T, nh, k.shape[1], hd,
                                  n_rep, chunk, float(scale), sliding_window or 0, perturb, dev.index, stream)
        return out
    return _flash_ablation(q, k, v, cos, sin, w_o, segments, n_rep, scaling, chunk_bytes, attention)


def _flash_ablation(q, k, v, cos, sin, w_o, segments: Segments, n_rep, scaling, chunk_bytes, attention):
    """The driver shared by the Triton and CUDA launchers: RoPE, the rank-2 perturbation coefficients of
    every removed row, ``attention(...)`` passes giving ΔO [chunk, heads, T, hd], and the Gram folds."""
    T, nh, hd = q.shape
    nkv = k.shape[1]
    scaling = hd ** -0.5 if scaling is None else scaling
    dev = q.device
    qf, kf, vf, cosf, sinf = (t.float().contiguous() for t in (q, k, v, cos, sin))
    qr, kr = apply_rope(qf, cosf, sinf).contiguous(), apply_rope(kf, cosf, sinf).contiguous()
    partner, sign = rope_partner(hd, dev)

    def launch(r1, r2, c1, c2, base, chunk, perturb):
        return attention(qr, kr, vf, r1, r2, c1, c2, base, chunk, perturb, scaling)

    # [nh, T, hd]; coefficient arguments unused (contiguous float32 stand-ins for the pointer checks)
    base = launch(qr, qr, kr, kr, qr, 1, False)[0].contiguous()
    gram_heads, gram = _o_grams(w_o.float(), nh, nkv)  # [nh, hd, hd], [nkv, rep·hd, rep·hd]
    q_sq = torch.empty(segments.n_docs, nh, hd, dtype=torch.float32, device=dev)
    k_sq = torch.empty(segments.n_docs, nkv, hd, dtype=torch.float32, device=dev)
    chunk = max(1, min(hd, chunk_bytes // (nh * T * hd * 4)))
    for d0 in range(0, hd, chunk):
        dims = torch.arange(d0, min(hd, d0 + chunk), device=dev)
        pd, c = partner[dims], dims.numel()
        # q rows of every head, dimension chunk
        d_o = launch((qf[:, :, dims] * cosf[:, None, dims]).contiguous(),
                     (sign[dims] * qf[:, :, dims] * sinf[:, None, pd]).contiguous(),
                     kr[:, :, dims].contiguous(), kr[:, :, pd].contiguous(), base, c, True)
        e = torch.einsum("chti,hij,chtj->cht", d_o, gram_heads, d_o)
        q_sq[:, :, d0:d0 + c] = segment_sums(e, segments, dim=-1).permute(0, 2, 1)
        # k rows of every k/v head: the query heads of a group are concatenated before the Gram fold
        d_o = launch(qr[:, :, dims].contiguous(), qr[:, :, pd].contiguous(),
                     (kf[:, :, dims] * cosf[:, None, dims]).contiguous(),
                     (sign[dims] * kf[:, :, dims] * sinf[:, None, pd]).contiguous(), base, c, True)
        d_o = d_o.view(c, nkv, n_rep, T, hd).permute(0, 1, 3, 2, 4).reshape(c, nkv, T, n_rep * hd)
        e = torch.einsum("cgti,gij,cgtj->cgt", d_o, gram, d_o)
        k_sq[:, :, d0:d0 + c] = segment_sums(e, segments, dim=-1).permute(0, 2, 1)
    return q_sq.reshape(q_sq.shape[0], -1), k_sq.reshape(k_sq.shape[0], -1)
