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

from .segments import Segments, as_segments


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offsets) -> Segments:
    """The op's arguments checked; returns the documents' :class:`Segments` (offsets read to the host at most once)."""
    segments = as_segments(offsets, x.device)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"projection_energies: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"projection_energies: bias {tuple(bias.shape)} for weight {tuple(weight.shape)}")
    if segments.total != x.shape[0]:
        raise ValueError(f"projection_energies: offsets must run from 0 to T_total={x.shape[0]}")
    return segments


def segment_sums(t: torch.Tensor, offsets, dim: int = 0) -> torch.Tensor:
    """Sums over each document's segment of ``dim``, stacked as a new leading [n_docs] axis.

    Slice by slice in a fixed order (no atomics, unlike index_add_ on a GPU): results are identical
    run to run, which bit-identical score files rely on."""
    return torch.stack([t.narrow(dim, s, e - s).sum(dim) for s, e in as_segments(offsets).spans()])


def segment_sum_sq(t: torch.Tensor, offsets) -> torch.Tensor:
    """[T_total, F] -> [n_docs, F] float32 sums of squares per document segment."""
    return segment_sums(t.float().square(), offsets)


def projection_energies_torch(x, weight, bias, offsets):
    """Plain-PyTorch reference (and CPU path) of the fused projection + energies op."""
    segments = _check(x, weight, bias, offsets)
    y = torch.nn.functional.linear(x, weight, bias)
    return y, segment_sum_sq(y, segments), segment_sum_sq(x, segments)


# ---------------------------------------------------------------------------------------------------
# Triton: one pass computes Y and both energies. Programs own (row tile, column block) pairs; no
# tile spans two documents (segments.py), so each program writes its partial energies to its own slot
# and the per-document sums are deterministic. Column energies are taken from the X tiles the
# programs of the first column block load anyway; row energies from the float32 accumulator before
# Y is rounded to its dtype. FLOPs: 2·T·in·out; bytes: X, W and Y once each (+ the small partials).
# ---------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend works without triton
    triton = None

if triton is not None:
    @triton.jit
    def _projection_energy_kernel(x_ptr, w_ptr, b_ptr, y_ptr, row_part_ptr, col_part_ptr,
                                  tile_start_ptr, tile_end_ptr, N, K,
                                  stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                                  HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        tile, pid_n = tl.program_id(0), tl.program_id(1)
        m0, m1 = tl.load(tile_start_ptr + tile), tl.load(tile_end_ptr + tile)
        # int64 offsets: T·K passes 2³¹ at long documents (75k tokens at width 28,672)
        rm = m0.to(tl.int64) + tl.arange(0, BM)
        rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK).to(tl.int64)
        tile = tile.to(tl.int64)
        mask_m, mask_n = rm < m1, rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            mask_k = kk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :] * stride_wk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            if pid_n == 0:
                xf = x.to(tl.float32)
                tl.store(col_part_ptr + tile * K + kk, tl.sum(xf * xf, axis=0), mask=mask_k)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
        acc = tl.where(mask_m[:, None], acc, 0.0)
        tl.store(row_part_ptr + tile * N + rn, tl.sum(acc * acc, axis=0), mask=mask_n)


def projection_energies_triton(x, weight, bias, offsets, block_m: int | None = None, block_n: int | None = None,
                               block_k: int | None = None):
    """Triton launcher of the fused projection + energies op (same contract as the torch reference).

    Products on tensor cores: 3×TF32 for float32 inputs (``input_precision="tf32x3"``, ≈ float32 accuracy),
    the inputs' own 16-bit type otherwise, float32 accumulation. Tiles, warps and stages from
    :func:`cusprun_kernels.triton_configs.projection_config` for the device's shared memory (the block
    arguments override the tiles, as the CPU tests do)."""
    from .devices import launch_on, require_same_device
    from .triton_configs import projection_config, shared_memory_of

    segments = _check(x, weight, bias, offsets)
    require_same_device(x.device, weight=weight, bias=bias)
    T, K = x.shape
    N = weight.shape[0]
    cfg = projection_config(x.element_size(), shared_memory_of(x.device))
    block_m, block_n, block_k = block_m or cfg.block_m, block_n or cfg.block_n, block_k or cfg.block_k
    tiles = segments.tiles(block_m)
    y = torch.full((T, N), float("nan"), dtype=x.dtype, device=x.device)
    row_part = torch.full((tiles.count, N), float("nan"), dtype=torch.float32, device=x.device)
    col_part = torch.full((tiles.count, K), float("nan"), dtype=torch.float32, device=x.device)
    grid = (tiles.count, triton.cdiv(N, block_n))
    with launch_on(x.device):
        # FP fusion only merges the accumulations' multiply-adds here: no two passes must round alike
        _projection_energy_kernel[grid](
            x, weight, bias if bias is not None else weight, y, row_part, col_part, tiles.start, tiles.end, N, K,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32",
            BM=block_m, BN=block_n, BK=block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            enable_fp_fusion=True)
    return y, tiles.per_document(row_part), tiles.per_document(col_part)


# ---------------------------------------------------------------------------------------------------
# CUDA C++: two implementations, and the faster one for the GPU and shape at hand (cuda_tuning.py).
# * cublas: Y from cuBLAS through torch on the current stream, then the row energies (of Y) and the
#   column energies (of X) from one deterministic segmented reduction kernel each (csrc/segment_energy.cu),
#   reading the tensors in place through their strides. Y makes one extra round trip through memory.
# * fused: csrc/projection_energy.cu, one tensor-core pass like the Triton kernel: Y and both energies,
#   partial sums per row tile (segments.py), added per document in a fixed order.
# ---------------------------------------------------------------------------------------------------
def segment_sum_sq_cuda(t: torch.Tensor, offsets) -> torch.Tensor:
    """[T_total, F] (float32, float16 or bfloat16, any strides) -> [n_docs, F] float32, on the GPU."""
    from .cuda_ext import DTYPE_CODES, extension, pointer
    from .devices import launch_on

    if t.dtype not in DTYPE_CODES:
        raise ValueError(f"segment_sum_sq: dtype {t.dtype} is not float32, float16 or bfloat16")
    if t.device.type != "cuda":
        raise ValueError(f"segment_sum_sq: a CUDA tensor is needed, got {t.device}")
    dev = t.device
    offs = as_segments(offsets, dev).offsets
    out = torch.full((offs.numel() - 1, t.shape[1]), float("nan"), dtype=torch.float32, device=dev)
    offs_ptr, out_ptr = pointer(offs, "offsets", device=dev), pointer(out, "out", device=dev)
    with launch_on(dev) as stream:
        extension()[0].segment_sum_sq(t.data_ptr(), DTYPE_CODES[t.dtype], t.shape[0], t.shape[1], t.stride(0),
                                      t.stride(1), offs_ptr, offs.numel() - 1, out_ptr, dev.index, stream)
    return out


def projection_energies_cublas(x, weight, bias, offsets):
    """cuBLAS (through torch) for Y, then the extension's segmented reductions for both energies."""
    return _cublas(x, weight, bias, _check(x, weight, bias, offsets))


def _cublas(x, weight, bias, offsets):
    y = torch.nn.functional.linear(x, weight, bias)
    return y, segment_sum_sq_cuda(y, offsets), segment_sum_sq_cuda(x, offsets)


def projection_energies_fused(x, weight, bias, offsets):
    """The extension's fused tensor-core kernel: Y and both energies in one pass (sm_80 or newer).

    x [T, in] and weight [out, in] (any strides), bias [out] or None, all of one dtype (float32, float16 or
    bfloat16); returns what :func:`projection_energies_torch` returns."""
    return _fused(x, weight, bias, _check(x, weight, bias, offsets))


def _fused(x, weight, bias, segments: Segments):
    from .cuda_ext import DTYPE_CODES, extension, pointer
    from .devices import launch_on, require_same_device

    if x.dtype not in DTYPE_CODES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"projection_energies: x, weight and bias must share one of float32, float16, bfloat16; "
                         f"got {x.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")
    for t, name in ((x, "x"), (weight, "weight")):
        if t.device.type != "cuda":
            raise ValueError(f"projection_energies: {name} must be a CUDA tensor, got {t.device}")
    dev = x.device
    require_same_device(dev, weight=weight, bias=bias)
    ext = extension()[0]
    (T, K), N = x.shape, weight.shape[0]
    tiles = segments.tiles(ext.projection_rows)
    y = torch.full((T, N), float("nan"), dtype=x.dtype, device=x.device)
    row_part = torch.full((tiles.count, N), float("nan"), dtype=torch.float32, device=x.device)
    col_part = torch.full((tiles.count, K), float("nan"), dtype=torch.float32, device=x.device)
    ptrs = [0 if bias is None else pointer(bias, "bias", device=dev), pointer(y, "y", device=dev)]
    parts = [pointer(t, name, device=dev) for t, name in ((row_part, "row_part"), (col_part, "col_part"),
                                                          (tiles.start, "tile_start"), (tiles.end, "tile_end"))]
    with launch_on(dev) as stream:
        ext.projection_energy(x.data_ptr(), weight.data_ptr(), *ptrs, DTYPE_CODES[x.dtype], K, N, x.stride(0),
                              x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1), *parts,
                              tiles.count, dev.index, stream)
    return y, tiles.per_document(row_part), tiles.per_document(col_part)


# By name, without the argument checks: the launcher below checks once, not once per variant.
CUDA_VARIANTS = {"cublas": _cublas, "fused": _fused}


def projection_energies_cuda(x, weight, bias, offsets):
    """CUDA launcher (same contract as the torch reference): the variant that measured faster for this GPU,
    dtype and shape class (:mod:`cusprun_kernels.cuda_tuning`; ``CUSPRUN_CUDA_PROJECTION_ENERGIES`` forces one)."""
    from .cuda_tuning import choose, token_bucket

    segments = _check(x, weight, bias, offsets)
    T, K = x.shape
    shape = (f"{str(x.dtype).removeprefix('torch.')}|in={K}|out={weight.shape[0]}|bias={bias is not None}|"
             f"T<={token_bucket(T)}")
    with torch.cuda.device(x.device):  # the timing events record on this device's current stream
        name = choose("projection_energies", shape,
                      {v: (lambda f=f: f(x, weight, bias, segments)) for v, f in CUDA_VARIANTS.items()},
                      device_name=torch.cuda.get_device_name(x.device))
    return CUDA_VARIANTS[name](x, weight, bias, segments)
