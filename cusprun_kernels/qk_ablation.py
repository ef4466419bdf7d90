"""Exact q/k-row ablation through attention: the block-measure scores of q and k rows.

Removing row i of q_proj (query head h, head dimension d) zeroes q[:, h, d] *before* RoPE, so the
rotated query changes in d and in its rotary partner p(d); the causal softmax is recomputed and the
change of the attention block output is taken after o_proj:

    ΔA = (softmax(S - ΔS_d) - softmax(S)) V_g W_o,hᵀ,   score² = Σ_t ΔA[t] ΔA[t]ᵀ
                                                          = Σ_t ΔO[t] (W_o,hᵀ W_o,h) ΔO[t]ᵀ

with ΔS_d = scale·(q_d·cos_d ⊗ k̃_d + s(d)·q_d·sin_p(d) ⊗ k̃_p(d)) a sum of two outer products.
Removing row i of k_proj (k/v head g, dimension d) changes the scores of every query head sharing
g; their ΔO are concatenated and folded through the group's Gram matrix W_o,gᵀ W_o,g.

o_proj enters only through the Gram matrix, never as a matmul per dimension. Cost per document of
length L: q and k rows each take (heads · head_dim) masked attention passes, i.e. about
2 · heads · head_dim · (2 · L² · head_dim) FLOPs for the P·V products plus as many softmaxes.
Memory: query rows are processed in blocks that visit only the keys they can see (the causal or
sliding-window band), and head dimensions in chunks sized so that the live ``[chunk, rows, keys]``
temporaries stay under ``chunk_bytes``; ``[heads, head_dim, L, L]`` is never built.
"""

from __future__ import annotations

import torch

from .projection_energy import segment_sums
from .rope import apply_rope, rope_partner
from .segments import Segments, as_segments

DEFAULT_CHUNK_BYTES = 256 * 2**20
DEFAULT_BLOCK = 128  # query rows per block: rows t see keys s <= t only, so blocks skip the masked triangle


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


def _ablated_delta(s: torch.Tensor, p: torch.Tensor, ds: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """s, p [L, L]; ds [c, L, L]; v [L, hd] -> ΔO [c, L, hd] = (softmax(s - ds) - p) v."""
    return (torch.softmax(s - ds, dim=-1) - p) @ v


def _query_blocks(length: int, block: int, sliding_window: int | None):
    """(t0, t1, k0): query rows [t0, t1) see only keys [k0, t1) — the causal (and windowed) band."""
    for t0 in range(0, length, block):
        t1 = min(length, t0 + block)
        yield t0, t1, 0 if sliding_window is None else max(0, t0 - sliding_window + 1)


def _score_document(q, k, v, cos, sin, w_o, n_rep, scaling, sliding_window, chunk_bytes, block):
    L, nh, hd = q.shape
    nkv = k.shape[1]
    q, k, v, cos, sin, w_o = (t.float() for t in (q, k, v, cos, sin, w_o))
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    partner, sign = rope_partner(hd, q.device)
    mask = attention_mask(L, sliding_window, q.device)
    q_sq = torch.zeros(nh, hd, dtype=torch.float32, device=q.device)
    k_sq = torch.zeros(nkv, hd, dtype=torch.float32, device=q.device)
    for t0, t1, k0 in _query_blocks(L, block, sliding_window):
        rows, keys = slice(t0, t1), slice(k0, t1)
        # ~4 live [chunk, rows, keys] float32 temporaries
        chunk = max(1, min(hd, chunk_bytes // (4 * 4 * (t1 - t0) * (t1 - k0))))
        for g in range(nkv):
            heads = range(g * n_rep, (g + 1) * n_rep)
            w_og = w_o[:, g * n_rep * hd:(g + 1) * n_rep * hd]
            gram = w_og.T @ w_og  # [n_rep·hd, n_rep·hd]; diagonal blocks are the per-head Grams
            vg, krg = v[keys, g], kr[keys, g]
            scores = [scaling * qr[rows, h] @ krg.T + mask[rows, keys] for h in heads]
            probs = [torch.softmax(s, dim=-1) for s in scores]
            for r, h in enumerate(heads):
                gram_h = gram[r * hd:(r + 1) * hd, r * hd:(r + 1) * hd]
                for d0 in range(0, hd, chunk):
                    dims = torch.arange(d0, min(hd, d0 + chunk), device=q.device)
                    pd = partner[dims]
                    a = (q[rows, h][:, dims] * cos[rows][:, dims]).T  # [c, rows]
                    b = (sign[dims] * q[rows, h][:, dims] * sin[rows][:, pd]).T
                    ds = scaling * (a[:, :, None] * krg[:, dims].T[:, None, :]
                                    + b[:, :, None] * krg[:, pd].T[:, None, :])
                    do = _ablated_delta(scores[r], probs[r], ds, vg)
                    q_sq[h, dims] += torch.einsum("cti,ij,ctj->c", do, gram_h, do)
            for d0 in range(0, hd, chunk):
                dims = torch.arange(d0, min(hd, d0 + chunk), device=q.device)
                pd = partner[dims]
                kc = (k[keys, g][:, dims] * cos[keys][:, dims]).T[:, None, :]  # [c, 1, keys]
                ks = (sign[dims] * k[keys, g][:, dims] * sin[keys][:, pd]).T[:, None, :]
                do = torch.cat([
                    _ablated_delta(scores[r], probs[r], scaling * (qr[rows, h][:, dims].T[:, :, None] * kc
                                                                   + qr[rows, h][:, pd].T[:, :, None] * ks), vg)
                    for r, h in enumerate(heads)
                ], dim=-1)  # [c, rows, n_rep·hd]
                k_sq[g, dims] += torch.einsum("cti,ij,ctj->c", do, gram, do)
    return q_sq.reshape(-1), k_sq.reshape(-1)


def qk_row_ablation_torch(q, k, v, cos, sin, w_o, offsets, *, n_rep: int, scaling: float | None = None,
                          sliding_window: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                          block: int = DEFAULT_BLOCK):
    """Plain-PyTorch reference of the exact q/k-row ablation.

    Args (packed documents, T = T_total):
        q [T, heads, hd], k/v [T, kv_heads, hd]: pre-RoPE projections (biases included);
        cos, sin [T, hd]: the model's rotary tables at each token's position;
        w_o [hidden, heads·hd]: o_proj weight; offsets [n_docs + 1]: document segments.
    Returns:
        q_sq [n_docs, heads·hd], k_sq [n_docs, kv_heads·hd]: float32 squared scores ‖ΔA‖².
    """
    segments = _check(q, k, v, cos, sin, w_o, offsets, n_rep)
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    per_doc = [
        _score_document(q[s:e], k[s:e], v[s:e], cos[s:e], sin[s:e], w_o, n_rep, scaling, sliding_window,
                        chunk_bytes, block)
        for s, e in segments.spans()
    ]
    return torch.stack([p[0] for p in per_doc]), torch.stack([p[1] for p in per_doc])




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


def qk_row_ablation_triton(q, k, v, cos, sin, w_o, offsets, *, n_rep: int, scaling: float | None = None,
                           sliding_window: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                           block: int | None = None, block_n: int | None = None):
    """Triton launcher of the exact q/k-row ablation (same contract as :func:`qk_row_ablation_torch`).

    Precision: the attention runs in float32 with both products (QKᵀ and PV) on tensor cores as 3×TF32
    (``input_precision="tf32x3"``: each operand split into a TF32 high and low part, three TF32 products,
    ≈ float32 accuracy) up to head_dim 128 and in float32 FMA (``ieee``) above; exp through libdevice (not
    ``ex2.approx``) and FP fusion disabled, so that the unperturbed and the perturbed pass round S
    identically and cancel exactly in ΔO.

    Tile sizes, warps and pipeline stages come from :func:`cusprun_kernels.triton_configs.attention_config`
    for this head_dim and the device's shared memory (``block`` / ``block_n`` override the tile sizes, as
    the CPU tests do).

    FLOPs per document of length L (causal band ≈ L²/2 score entries per pass): every q row
    (heads·hd of them) and every k row once per query head of its group (kv_heads·n_rep·hd = heads·hd)
    is one attention pass of 2·(L²/2)·hd for QKᵀ and as many for P·V, so ≈ 4·heads·hd²·L² in all,
    plus one unperturbed pass per head — about head_dim attention passes per head, twice.
    """
    from .devices import launch_on, require_same_device
    from .triton_configs import attention_config, shared_memory_of

    segments = _check(q, k, v, cos, sin, w_o, offsets, n_rep)
    T, nh, hd = q.shape
    dev = q.device
    require_same_device(dev, k=k, v=v, cos=cos, sin=sin, w_o=w_o)
    cfg = attention_config(hd, shared_memory_of(dev))
    block, block_n = block or cfg.block_m, block_n or cfg.block_n
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
    w = w_o.float().reshape(w_o.shape[0], nkv, n_rep * hd)
    gram = torch.einsum("kgi,kgj->gij", w, w)  # [nkv, rep·hd, rep·hd]
    gram_heads = torch.stack([gram[h // n_rep, (h % n_rep) * hd:(h % n_rep + 1) * hd,
                                   (h % n_rep) * hd:(h % n_rep + 1) * hd] for h in range(nh)])
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
