"""The torch backend's q/k ablation on fused attention: exact cancellation, batch independence, float64."""

import pytest
import torch

from cusprun_kernels.qk_ablation import qk_row_ablation_sdpa
from cusprun_kernels.segments import Segments


def inputs(lengths, heads, kv, hd, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, n, hd, dtype=dtype) for n in (heads, kv, kv))
    ang = torch.cat([torch.arange(n) for n in lengths])[:, None] * torch.rand(hd // 2) * 2  # positions restart
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    w_o = torch.randn(17, heads * hd, dtype=dtype)
    return q, k, v, cos, sin, w_o


@pytest.mark.parametrize("window", [None, 3])
def test_removing_a_zero_row_scores_zero(window):
    """Base and ablated outputs come from the same call: removing a row that is already zero gives 0 up to
    the last bit of O (PyTorch's CPU flash kernel rounds its row sums by the alignment of per-thread
    buffers, so equal queries in different batch slots may differ in the last bit), i.e. a squared score
    some 1e-13 of the largest; a separately computed base would leave float32 noise of ~1e-7 relative."""
    q, k, v, cos, sin, w_o = inputs([9, 14], heads=6, kv=2, hd=10)
    q[:, 4, 3] = 0  # q row (head 4, dimension 3)
    k[:, 1, 7] = 0  # k row (group 1, dimension 7)
    q_sq, k_sq = qk_row_ablation_sdpa(q, k, v, cos, sin, w_o, Segments([0, 9, 23]), n_rep=3, sliding_window=window,
                                      chunk_bytes=3000)
    for scores, zero in ((q_sq, 4 * 10 + 3), (k_sq, 10 + 7)):
        others = torch.cat([scores[:, :zero], scores[:, zero + 1:]], dim=1)
        assert (scores[:, zero] <= 1e-10 * others.max(dim=1).values).all()
        assert (others.min(dim=1).values > 1e-6 * others.max(dim=1).values).all()


@pytest.mark.parametrize("chunk_bytes", [1, 5000, 2**30])
def test_scores_do_not_depend_on_the_batch(chunk_bytes):
    """A document's scores are bit-identical alone and packed with others, in any order."""
    lengths = [5, 12, 1, 8]
    q, k, v, cos, sin, w_o = inputs(lengths, heads=4, kv=1, hd=6, seed=1)
    bounds = Segments.of_lengths(lengths).bounds
    together = qk_row_ablation_sdpa(q, k, v, cos, sin, w_o, Segments(bounds), n_rep=4, chunk_bytes=chunk_bytes)
    for d, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = qk_row_ablation_sdpa(q[s:e], k[s:e], v[s:e], cos[s:e], sin[s:e], w_o, Segments([0, e - s]),
                                     n_rep=4, chunk_bytes=chunk_bytes)
        for got, ref in zip(together, alone):
            assert torch.equal(got[d], ref[0])
    order = [2, 0, 3, 1]
    rows = torch.cat([torch.arange(bounds[d], bounds[d + 1]) for d in order])
    shuffled = qk_row_ablation_sdpa(q[rows], k[rows], v[rows], cos[rows], sin[rows], w_o,
                                    Segments.of_lengths([lengths[d] for d in order]), n_rep=4, chunk_bytes=chunk_bytes)
    for got, ref in zip(shuffled, together):
        assert torch.equal(got, ref[order])


def test_float64_inputs_are_scored_in_float64():
    """Float64 inputs go through float64 attention: agreement with float32 is float32-limited, and two
    float64 runs with different chunking agree to float64 rounding."""
    args = inputs([11, 6], heads=3, kv=3, hd=8, dtype=torch.float64, seed=2)
    seg = Segments([0, 11, 17])
    a = qk_row_ablation_sdpa(*args, seg, n_rep=1, chunk_bytes=1)
    b = qk_row_ablation_sdpa(*args, seg, n_rep=1)
    single = qk_row_ablation_sdpa(*(t.float() for t in args), seg, n_rep=1)
    for x, y, s in zip(a, b, single):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
        assert (x - s).abs().max() <= 1e-4 * x.abs().max()
