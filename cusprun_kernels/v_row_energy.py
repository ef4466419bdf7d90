"""Block-measure energies of v rows, from the attention output alone.

Removing row i of v_proj (k/v head g, dimension d) zeroes V[:, g, d] (bias included). Attention is
linear in V, so every query head h sharing g loses exactly its output column O_h[:, d], and the
block output changes by -Σ_h O_h[:, d] W_o[:, h·hd + d]ᵀ. Hence, with no attention recomputed,

    score²(g, d) = Σ_{h, h' ∈ g} (O_h[:, d] · O_h'[:, d]) · (W_o[:, h·hd+d] · W_o[:, h'·hd+d]).
"""

from __future__ import annotations

import torch

from .projection_energy import segment_sum_sq
from .segments import as_segments


def v_row_energies_torch(o_in: torch.Tensor, w_o: torch.Tensor, offsets, *, n_kv: int, n_rep: int):
    """o_in [T_total, heads·hd] (o_proj input), w_o [hidden, heads·hd] -> [n_docs, kv_heads·hd] float32."""
    T, width = o_in.shape
    hd = width // (n_kv * n_rep)
    if width != n_kv * n_rep * hd or w_o.shape[1] != width:
        raise ValueError(f"v_row_energies: o_in {tuple(o_in.shape)}, w_o {tuple(w_o.shape)}, "
                         f"n_kv={n_kv}, n_rep={n_rep}")
    w = w_o.float().reshape(-1, n_kv, n_rep, hd)
    w_cross = torch.einsum("kgad,kgbd->gdab", w, w)  # [g, hd, rep, rep]
    o = o_in.float().reshape(T, n_kv, n_rep, hd)
    if n_rep == 1:  # no cross terms: Σ_t O² per column
        return segment_sum_sq(o_in, offsets) * w_cross.reshape(1, -1)
    out = []
    for s, e in as_segments(offsets, o_in.device).spans():
        o_cross = torch.einsum("tgad,tgbd->gdab", o[s:e], o[s:e])
        out.append((o_cross * w_cross).sum(dim=(-1, -2)).reshape(-1))
    return torch.stack(out)
