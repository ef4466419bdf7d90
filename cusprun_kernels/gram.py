"""Gram matrices of a projection's input, the statistics of closed-form compensation (``--compensate``).

For the input X [T, n] of o_proj or down_proj over a batch of tokens (every document of the batch),

    G = Xᵀ X  [n, n],  G[i, j] = Σ_t X[t, i] X[t, j].

Summed over a corpus, G fixes the least-squares refit of the output projection after some of its input
columns are removed (:mod:`cusprun.experts.compensate`). The engine calls it once per document and adds the results
in float64; each call computes with float32 products and float32 accumulation.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend needs no Triton
    triton = None


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"gram: x must be [T, n], got {tuple(x.shape)}")


def gram_torch(x: torch.Tensor) -> torch.Tensor:
    """x [T, n] (any float dtype) -> Xᵀ X [n, n] float32 (the plain-PyTorch reference and CPU path)."""
    _check(x)
    x = x.float()
    return x.T @ x


if triton is not None:
    @triton.jit
    def _gram_kernel(x_ptr, out_ptr, T, N, stride_t, stride_n, PRECISION: tl.constexpr, BN: tl.constexpr,
                     BT: tl.constexpr):
        """One [BN, BN] tile of XᵀX: rows i of the tile, columns j, summed over every token in BT chunks."""
        pi = tl.program_id(0)
        pj = tl.program_id(1)
        cols_i = pi * BN + tl.arange(0, BN)
        cols_j = pj * BN + tl.arange(0, BN)
        acc = tl.zeros((BN, BN), dtype=tl.float32)
        for t0 in range(0, T, BT):
            t = t0 + tl.arange(0, BT)
            rows = t.to(tl.int64)[:, None] * stride_t  # int64: T·stride overflows int32 on long batches
            a = tl.load(x_ptr + rows + cols_i[None, :] * stride_n, mask=(t[:, None] < T) & (cols_i[None, :] < N),
                        other=0.0).to(tl.float32)
            b = tl.load(x_ptr + rows + cols_j[None, :] * stride_n, mask=(t[:, None] < T) & (cols_j[None, :] < N),
                        other=0.0).to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        out = out_ptr + cols_i.to(tl.int64)[:, None] * N + cols_j[None, :]
        tl.store(out, acc, mask=(cols_i[:, None] < N) & (cols_j[None, :] < N))


GRAM_BLOCK_N, GRAM_BLOCK_T, GRAM_WARPS, GRAM_STAGES = 64, 32, 4, 2


def gram_triton(x: torch.Tensor, block_n: int = GRAM_BLOCK_N, block_t: int = GRAM_BLOCK_T) -> torch.Tensor:
    """Triton launcher (same contract as :func:`gram_torch`): products in 3×TF32 (≈ float32) on tensor cores,
    float32 accumulation; the output is poisoned with NaN before the launch, so a tile left unwritten shows."""
    from .devices import launch_on

    _check(x)
    if triton is None:
        raise RuntimeError("gram (triton): triton is not installed")
    T, N = x.shape
    out = torch.full((N, N), float("nan"), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(N, block_n))
    with launch_on(x.device):
        _gram_kernel[grid](x, out, T, N, x.stride(0), x.stride(1), PRECISION="tf32x3", BN=block_n, BT=block_t,
                           num_warps=GRAM_WARPS, num_stages=GRAM_STAGES)
    return out
