"""Projection + per-document neuron energies.

For packed documents ``x [T_total, in]`` with segment ``offsets [n_docs + 1]`` (document d owns
rows ``offsets[d]:offsets[d+1]``) and a projection ``y = x Wᵀ (+ b)``, returns

* ``y        [T_total, out]`` in ``x``'s dtype — it goes on to the next op of the forward pass;
* ``row_sq   [n_docs, out]`` float32: Σ_t y[t, i]² per document (row / output-neuron energy);
* ``col_sq   [n_docs, in]``  float32: Σ_t x[t, j]² per document (column / input-neuron energy).

Scores follow as ``rows = sqrt(row_sq)`` and ``cols = ‖W[:, j]‖₂ · sqrt(col_sq)``.
"""

from __future__ import annotations

import torch


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offsets: torch.Tensor):
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"projection_energies: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"projection_energies: bias {tuple(bias.shape)} for weight {tuple(weight.shape)}")
    if offsets.dim() != 1 or offsets.numel() < 2 or int(offsets[-1]) != x.shape[0]:
        raise ValueError(f"projection_energies: offsets must run from 0 to T_total={x.shape[0]}")


def segment_sum_sq(t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[T_total, F] -> [n_docs, F] float32 sums of squares per document segment."""
    lengths = (offsets[1:] - offsets[:-1]).to(t.device)
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=t.device), lengths)
    out = torch.zeros(lengths.numel(), t.shape[1], dtype=torch.float32, device=t.device)
    return out.index_add_(0, seg, t.float().square())


def projection_energies_torch(x, weight, bias, offsets):
    """Plain-PyTorch reference (and CPU path) of the fused projection + energies op."""
    _check(x, weight, bias, offsets)
    y = torch.nn.functional.linear(x, weight, bias)
    return y, segment_sum_sq(y, offsets), segment_sum_sq(x, offsets)
