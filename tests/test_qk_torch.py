"""The q/k ablation's torch implementations (shared logits, the torch backend; fused attention, the sdpa
anchor): exact cancellation, batch independence, float64, and agreement with each other."""

import pytest
import torch

from cusprun_kernels import cuda_tuning
from cusprun_kernels.qk_ablation import (
    qk_row_ablation_sdpa,
    qk_row_ablation_shared,
    sdpa_where_faster,
    triton_config_tag,
)
from cusprun_kernels.segments import Segments

IMPLEMENTATIONS = pytest.mark.parametrize("ablation", [qk_row_ablation_shared, qk_row_ablation_sdpa],
                                          ids=["shared", "sdpa"])


def inputs(lengths, heads, kv, hd, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, n, hd, dtype=dtype) for n in (heads, kv, kv))
    ang = torch.cat([torch.arange(n) for n in lengths])[:, None] * torch.rand(hd // 2) * 2  # positions restart
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    w_o = torch.randn(17, heads * hd, dtype=dtype)
    return q, k, v, cos, sin, w_o


@IMPLEMENTATIONS
@pytest.mark.parametrize("window", [None, 3])
def test_removing_a_zero_row_scores_zero(ablation, window):
    """Base and ablated outputs come from the same call: removing a row that is already zero gives 0 up to
    the last bit of O (PyTorch's CPU flash kernel rounds its row sums by the alignment of per-thread
    buffers, so equal queries in different batch slots may differ in the last bit), i.e. a squared score
    some 1e-13 of the largest; a separately computed base would leave float32 noise of ~1e-7 relative."""
    q, k, v, cos, sin, w_o = inputs([9, 14], heads=6, kv=2, hd=10)
    q[:, 4, 3] = 0  # q row (head 4, dimension 3)
    k[:, 1, 7] = 0  # k row (group 1, dimension 7)
    q_sq, k_sq = ablation(q, k, v, cos, sin, w_o, Segments([0, 9, 23]), n_rep=3, sliding_window=window,
                          chunk_bytes=3000)
    for scores, zero in ((q_sq, 4 * 10 + 3), (k_sq, 10 + 7)):
        others = torch.cat([scores[:, :zero], scores[:, zero + 1:]], dim=1)
        assert (scores[:, zero] <= 1e-10 * others.max(dim=1).values).all()
        assert (others.min(dim=1).values > 1e-6 * others.max(dim=1).values).all()


@IMPLEMENTATIONS
@pytest.mark.parametrize("chunk_bytes", [1, 5000, 2**30])
def test_scores_do_not_depend_on_the_batch(ablation, chunk_bytes):
    """A document's scores are bit-identical alone and packed with others, in any order."""
    lengths = [5, 12, 1, 8]
    q, k, v, cos, sin, w_o = inputs(lengths, heads=4, kv=1, hd=6, seed=1)
    bounds = Segments.of_lengths(lengths).bounds
    together = ablation(q, k, v, cos, sin, w_o, Segments(bounds), n_rep=4, chunk_bytes=chunk_bytes)
    for d, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = ablation(q[s:e], k[s:e], v[s:e], cos[s:e], sin[s:e], w_o, Segments([0, e - s]),
                         n_rep=4, chunk_bytes=chunk_bytes)
        for got, ref in zip(together, alone):
            assert torch.equal(got[d], ref[0])
    order = [2, 0, 3, 1]
    rows = torch.cat([torch.arange(bounds[d], bounds[d + 1]) for d in order])
    shuffled = ablation(q[rows], k[rows], v[rows], cos[rows], sin[rows], w_o,
                        Segments.of_lengths([lengths[d] for d in order]), n_rep=4, chunk_bytes=chunk_bytes)
    for got, ref in zip(shuffled, together):
        assert torch.equal(got, ref[order])


@IMPLEMENTATIONS
def test_float64_inputs_are_scored_in_float64(ablation):
    """Float64 inputs go through float64 attention: agreement with float32 is float32-limited, and two
    float64 runs with different chunking agree to float64 rounding."""
    args = inputs([11, 6], heads=3, kv=3, hd=8, dtype=torch.float64, seed=2)
    seg = Segments([0, 11, 17])
    a = ablation(*args, seg, n_rep=1, chunk_bytes=1)
    b = ablation(*args, seg, n_rep=1)
    single = ablation(*(t.float() for t in args), seg, n_rep=1)
    for x, y, s in zip(a, b, single):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
        assert (x - s).abs().max() <= 1e-4 * x.abs().max()


@pytest.mark.parametrize("lengths, heads, kv, hd, window", [
    ([9, 14], 6, 2, 10, None), ([300, 7], 4, 2, 8, None), ([300], 4, 1, 8, 50), ([200, 150, 33], 3, 3, 16, 40)])
@pytest.mark.parametrize("chunk_bytes", [1, 2**20, 2**30])
def test_shared_logits_agree_with_fused_attention(lengths, heads, kv, hd, window, chunk_bytes):
    """Shared logits (query tiles, their key bands, rank-2 updates, o_proj folded into the values) give
    the fused-attention scores: to float64 rounding in float64, and within float32 rounding in float32,
    on documents longer than one query tile, with and without a sliding window, in any chunking."""
    args = inputs(lengths, heads, kv, hd, dtype=torch.float64, seed=3)
    seg = Segments.of_lengths(lengths)
    kw = dict(n_rep=heads // kv, sliding_window=window)
    exact = qk_row_ablation_sdpa(*args, seg, **kw)
    shared64 = qk_row_ablation_shared(*args, seg, chunk_bytes=chunk_bytes, **kw)
    shared32 = qk_row_ablation_shared(*(t.float() for t in args), seg, chunk_bytes=chunk_bytes, **kw)
    for ref, got64, got32 in zip(exact, shared64, shared32):
        torch.testing.assert_close(got64, ref, rtol=1e-6, atol=0)
        assert (got32 - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("window", [None, 5])
def test_documents_routed_by_length_match_each_implementation_alone(window, tmp_path, monkeypatch):
    """sdpa_where_faster's gathering (the GPU path, run here with a stand-in timer and the shared-logits op as
    the "kernel"): each document's scores equal, bit for bit, its implementation's on that document alone;
    empty documents score zero; each length bucket is timed once and its choice stored."""
    monkeypatch.setenv("CUSPRUN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CUSPRUN_CUDA_QK_ROW_ABLATION", raising=False)
    timed = []

    def timer(call):  # sdpa "faster" from 65 tokens on
        timed.append((call.func.__name__, call.args[0].shape[0]))
        return float((call.func is qk_row_ablation_sdpa) == (call.args[0].shape[0] <= 64))

    lengths, heads, kv, hd = [7, 0, 100, 20, 70, 1], 4, 2, 8
    q, k, v, cos, sin, w_o = inputs(lengths, heads, kv, hd, seed=3)
    segments = Segments.of_lengths(lengths)
    routed = sdpa_where_faster(qk_row_ablation_shared, "test", timer=timer)
    kw = dict(n_rep=heads // kv, sliding_window=window)
    q_sq, k_sq = routed(q, k, v, cos, sin, w_o, segments, **kw)
    for i, (s, e) in enumerate(segments.spans()):
        if e == s:
            continue
        alone = (qk_row_ablation_sdpa if e - s > 64 else qk_row_ablation_shared)(
            *(t[s:e] for t in (q, k, v, cos, sin)), w_o, [0, e - s], **kw)
        assert torch.equal(q_sq[i], alone[0][0]) and torch.equal(k_sq[i], alone[1][0])
    assert not q_sq[1].any() and not k_sq[1].any()
    whole = qk_row_ablation_shared(q, k, v, cos, sin, w_o, segments, **kw)  # empty documents need no routing
    assert not whole[0][1].any() and not whole[1][1].any()
    assert sorted(timed) == sorted([(f.__name__, n) for f in (qk_row_ablation_shared, qk_row_ablation_sdpa)
                                    for n in (7, 100)])  # buckets 64 and 128, each on its first document
    # a second batch of short documents only reads the stored choice and runs the kernel on the whole batch
    timed.clear()
    short = Segments.of_lengths([5, 9])
    got = routed(*(t[:14] for t in (q, k, v, cos, sin)), w_o, short, **kw)
    assert not timed and all(torch.equal(g, w) for g, w in zip(got, qk_row_ablation_shared(
        *(t[:14] for t in (q, k, v, cos, sin)), w_o, short, **kw)))


def test_the_triton_routing_tag_names_the_launch_configuration():
    pytest.importorskip("triton")
    from cusprun_kernels.triton_configs import attention_config

    q = torch.zeros(3, 2, 64)  # the CPU (Triton's interpreter) is taken for an A100
    assert triton_config_tag(q) == attention_config(64, 166_912, (8, 0)).describe()
    assert triton_config_tag(q) != triton_config_tag(torch.zeros(3, 2, 128))


def test_a_routing_choice_is_measured_again_when_the_kernel_configuration_changes(tmp_path, monkeypatch):
    """The stored choice names the kernel's launch configuration (``tag``): a release with other tiles must not
    inherit a choice measured with the old ones, while the same configuration reads it back untimed."""
    monkeypatch.setenv("CUSPRUN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CUSPRUN_CUDA_QK_ROW_ABLATION", raising=False)
    timed = []

    def timer(call):
        timed.append(call.func.__name__)
        return 1.0 if call.func is qk_row_ablation_sdpa else 2.0

    q, k, v, cos, sin, w_o = inputs([30], 2, 1, 8, seed=4)
    args = (q, k, v, cos, sin, w_o, [0, 30])
    for tag, expect_timed in (("tiles A", True), ("tiles A", False), ("tiles B", True)):
        timed.clear()
        sdpa_where_faster(qk_row_ablation_shared, "test", timer=timer, tag=lambda q, tag=tag: tag)(*args, n_rep=2)
        assert bool(timed) == expect_timed, tag
        monkeypatch.setattr(cuda_tuning, "_chosen", {})  # as in a new process: only the stored file remembers
