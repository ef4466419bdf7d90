"""Each op against an independent plain computation, odd shapes, fixed seeds, outputs poisoned first."""

import pytest
import torch

from cusprun_kernels import projection_energies, qk_row_ablation, v_row_energies
from cusprun_kernels.backend import BackendUnavailable, resolve_backend

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("lengths", [[1], [7, 1, 13], [33, 2]])
@pytest.mark.parametrize("in_f, out_f", [(5, 3), (24, 37)])
@pytest.mark.parametrize("bias", [False, True])
def test_projection_energies_matches_per_document_loop(lengths, in_f, out_f, bias):
    torch.manual_seed(len(lengths) + in_f)
    x = torch.randn(sum(lengths), in_f)
    w = torch.randn(out_f, in_f)
    b = torch.randn(out_f) if bias else None
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    y, row_sq, col_sq = projection_energies(x, w, b, offsets)
    ref_y = x.double() @ w.double().T + (0 if b is None else b.double())
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    for d, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        torch.testing.assert_close(row_sq[d].double(), (ref_y[s:e] ** 2).sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(col_sq[d].double(), (x[s:e].double() ** 2).sum(0), rtol=1e-5, atol=1e-5)


def _attention_output(q, k, v, cos, sin, w_o, n_rep, scaling, window=None):
    """Dense float64 attention block (pre-RoPE q, k) -> [L, hidden]."""
    from cusprun_kernels.qk_ablation import attention_mask
    from cusprun_kernels.rope import apply_rope
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kr, vv = kr.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    s = torch.einsum("thd,shd->hts", qr, kr) * scaling + attention_mask(q.shape[0], window, q.device).double()
    o = torch.einsum("hts,shd->thd", torch.softmax(s, -1), vv)
    return o.reshape(q.shape[0], -1) @ w_o.T


@pytest.mark.parametrize("L, heads, kv, hd, window", [(1, 3, 1, 6, None), (9, 4, 2, 10, None), (11, 3, 1, 8, 4)])
@pytest.mark.parametrize("chunk_bytes", [1, 2**30])  # one removed row per attention call, or all of a group
def test_qk_row_ablation_matches_dense_recompute(L, heads, kv, hd, window, chunk_bytes):
    torch.manual_seed(L * heads)
    n_rep = heads // kv
    q, k, v = torch.randn(L, heads, hd), torch.randn(L, kv, hd), torch.randn(L, kv, hd)
    ang = torch.rand(L, hd // 2) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    w_o = torch.randn(7, heads * hd)
    scaling = hd ** -0.5
    q_sq, k_sq = qk_row_ablation(q, k, v, cos, sin, w_o, torch.tensor([0, L]), n_rep=n_rep, scaling=scaling,
                                 sliding_window=window, chunk_bytes=chunk_bytes)
    args = [t.double() for t in (q, k, v, cos, sin, w_o)]
    base = _attention_output(*args, n_rep, scaling, window)
    for which, out in (("q", q_sq[0]), ("k", k_sq[0])):
        ref = torch.empty(out.shape[0], dtype=torch.float64)
        for i in range(out.shape[0]):
            qq, kk = args[0].clone(), args[1].clone()
            (qq if which == "q" else kk).view(L, -1)[:, i] = 0
            ref[i] = ((_attention_output(qq, kk, *args[2:], n_rep, scaling, window) - base) ** 2).sum()
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.max().item())


def test_v_row_energies_matches_dense_recompute():
    torch.manual_seed(0)
    L, kv, n_rep, hd = 6, 2, 3, 5
    o = torch.randn(L, kv * n_rep * hd, dtype=torch.float64)
    w_o = torch.randn(4, kv * n_rep * hd, dtype=torch.float64)
    got = v_row_energies(o, w_o, torch.tensor([0, 2, L]), n_kv=kv, n_rep=n_rep)
    for d, (s, e) in enumerate([(0, 2), (2, L)]):
        for g in range(kv):
            for i in range(hd):
                oo = o[s:e].clone().view(e - s, kv, n_rep, hd)
                oo[:, g, :, i] = 0  # zeroing v row (g, i) zeroes that column in every head of group g
                ref = ((oo.reshape(e - s, -1) - o[s:e]) @ w_o.T).pow(2).sum()
                torch.testing.assert_close(got[d, g * hd + i].double(), ref, rtol=1e-5, atol=1e-8)


def test_explicit_missing_backend_fails_with_reason(monkeypatch):
    monkeypatch.setenv("CUSPRUN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="CUSPRUN_BACKEND=cuda: .*extension"):
        resolve_backend("cpu")
    monkeypatch.setenv("CUSPRUN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="CUSPRUN_BACKEND=triton: .*TRITON_INTERPRET"):
        resolve_backend("cpu")
    monkeypatch.setenv("CUSPRUN_BACKEND", "bogus")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        resolve_backend("cpu")
