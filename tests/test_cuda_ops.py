"""The CUDA C++ extension: built and importable where nvcc is (CI), a clear error without a GPU, and on a GPU
the kernels against their plain-torch references (same odd shapes and tolerances as the Triton tests) and
the brute-force suite end to end with CUSPRUN_BACKEND=cuda."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from cusprun_kernels import BackendUnavailable, resolve_backend
from cusprun_kernels.cuda_ext import build_info, extension
from cusprun_kernels.projection_energy import projection_energies_cuda, projection_energies_torch
from cusprun_kernels.qk_ablation import qk_row_ablation_cuda, qk_row_ablation_torch
from tests.brute_force import brute_force_scores
from tests.test_triton_ops import TOL, offsets_of, qk_inputs, rel_err
from tests.tiny import random_ids, tiny_model

GPU = torch.cuda.is_available()
EXPECT_BUILT = shutil.which("nvcc") is not None and os.environ.get("CUSPRUN_BUILD_CUDA") != "0"
needs_gpu = pytest.mark.skipif(not GPU or extension()[0] is None, reason="needs a CUDA GPU and the extension")


@pytest.mark.skipif(not EXPECT_BUILT, reason="nvcc absent or CUSPRUN_BUILD_CUDA=0: the extension is not built")
def test_extension_is_built_and_reported():
    module, reason = extension()
    assert module is not None, reason
    assert build_info().get("status") == "built"
    report = subprocess.run([sys.executable, "-m", "cusprun"], capture_output=True, text=True).stdout
    assert "cuda extension built (CUDA runtime" in report


@pytest.mark.skipif(GPU or extension()[0] is None, reason="checks the error path on a machine without a GPU")
def test_without_a_gpu_calls_fail_with_the_reason(monkeypatch):
    module = extension()[0]
    assert module.device_count() == 0
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        module.require_device()
    with pytest.raises(RuntimeError, match="no CUDA device is available"):  # before any pointer is touched
        module.segment_sum_sq(16, 0, 4, 4, 4, 1, 32, 1, 64, 0)
    with pytest.raises(ValueError, match="head_dim"):  # bad arguments are ValueErrors, checked first
        module.ablated_attention(*[0] * 12, 1, 4, 2, 1, 300, 2, 1, 1.0, 0, False, 0)
    monkeypatch.setenv("CUSPRUN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="CUSPRUN_BACKEND=cuda: .*no CUDA device is available"):
        resolve_backend("cuda")
    monkeypatch.setenv("CUSPRUN_BACKEND", "auto")
    assert resolve_backend("cpu", announce=False) == "torch"  # auto never picks it here


@needs_gpu
@pytest.mark.parametrize("lengths", [[1], [17, 1, 5], [40]])
@pytest.mark.parametrize("in_f, out_f", [(24, 37), (80, 19)])
@pytest.mark.parametrize("bias", [False, True])
def test_projection_energies(lengths, in_f, out_f, bias):
    torch.manual_seed(in_f + len(lengths))
    x = torch.randn(sum(lengths), in_f, device="cuda")
    w = torch.randn(out_f, in_f, device="cuda")
    b = torch.randn(out_f, device="cuda") if bias else None
    off = offsets_of(lengths)
    for g, r in zip(projection_energies_cuda(x, w, b, off), projection_energies_torch(x, w, b, off)):
        assert not g.isnan().any()  # NaN-poisoned before launch: every element was written
        assert rel_err(g, r) <= TOL[torch.float32]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_segment_energies_read_strided_inputs(dtype):
    from cusprun_kernels.projection_energy import segment_sum_sq, segment_sum_sq_cuda

    x = torch.randn(45, 70, device="cuda", dtype=dtype)[:, 3:66]  # a view: row stride 70
    off = offsets_of([1, 30, 14])
    assert rel_err(segment_sum_sq_cuda(x, off), segment_sum_sq(x, off)) <= TOL[torch.float32]
    assert torch.equal(segment_sum_sq_cuda(x, off), segment_sum_sq_cuda(x, off))  # deterministic


@needs_gpu
@pytest.mark.parametrize("lengths, heads, kv, hd, window", [
    ([1, 20], 1, 1, 64, None),
    ([7, 11], 3, 1, 80, None),
    ([9], 4, 1, 128, None),
    ([13, 5], 4, 2, 10, 4),
    ([70], 2, 1, 256, None),  # head_dim 256: shared memory above the default 48 KiB; two row tiles of 64
    ([150, 3], 2, 1, 24, 40),  # 3 row tiles: warps skip key tiles past their rows and before their window
])
def test_qk_row_ablation(lengths, heads, kv, hd, window):
    args = qk_inputs(lengths, heads, kv, hd)
    kw = dict(n_rep=heads // kv, sliding_window=window)
    got = qk_row_ablation_cuda(*args, chunk_bytes=2**16, **kw)
    ref = qk_row_ablation_torch(*args, **kw)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and not g.isnan().any()
        assert rel_err(g, r) <= 1e-4


@needs_gpu
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_engine_matches_brute_force(arch, monkeypatch):
    import cusprun

    monkeypatch.setenv("CUSPRUN_BACKEND", "cuda")
    docs = [random_ids(9, seed=4), random_ids(3, seed=5)]
    result = cusprun.score(tiny_model(arch, seed=1).cuda(), docs, progress=False)
    assert result.metadata["backend"] == "cuda"
    reference = tiny_model(arch, seed=1)  # the same weights, on the CPU
    for i, ids in enumerate(docs):
        for name, expected in brute_force_scores(reference, ids, "block").items():
            got = result.scores[name][i].double()
            assert (got - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-6, name
