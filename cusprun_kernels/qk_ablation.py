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

from .rope import apply_rope, rope_partner

DEFAULT_CHUNK_BYTES = 256 * 2**20
DEFAULT_BLOCK = 256  # query rows per block: rows t see keys s <= t only, so blocks skip the masked triangle


def attention_mask(length: int, sliding_window: int | None, device) -> torch.Tensor:
    """[L, L] additive mask: 0 where query t may attend key s (s ≤ t, and t - s < window), else -inf."""
    t = torch.arange(length, device=device)
    allowed = t[None, :] <= t[:, None]
    if sliding_window is not None:
        allowed &= (t[:, None] - t[None, :]) < sliding_window
    return torch.zeros(length, length, device=device).masked_fill_(~allowed, float("-inf"))


def _check(q, k, v, cos, sin, w_o, offsets, n_rep):
    T, nh, hd = q.shape
    if k.shape != (T, nh // n_rep, hd) or v.shape != k.shape or nh % n_rep:
        raise ValueError(f"qk_row_ablation: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, n_rep={n_rep}")
    if cos.shape != (T, hd) or sin.shape != (T, hd):
        raise ValueError(f"qk_row_ablation: cos/sin must be [T={T}, head_dim={hd}], got {tuple(cos.shape)}")
    if w_o.dim() != 2 or w_o.shape[1] != nh * hd:
        raise ValueError(f"qk_row_ablation: w_o {tuple(w_o.shape)} must have {nh * hd} columns")
    if offsets.dim() != 1 or int(offsets[-1]) != T:
        raise ValueError(f"qk_row_ablation: offsets must run from 0 to T={T}")


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
    _check(q, k, v, cos, sin, w_o, offsets, n_rep)
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    per_doc = [
        _score_document(q[s:e], k[s:e], v[s:e], cos[s:e], sin[s:e], w_o, n_rep, scaling, sliding_window,
                        chunk_bytes, block)
        for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist())
    ]
    return torch.stack([p[0] for p in per_doc]), torch.stack([p[1] for p in per_doc])


