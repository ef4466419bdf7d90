"""The CUDA C++ extension: built and importable where nvcc is (CI), a clear error without a GPU, and on a GPU
the kernels against their plain-torch references (same odd shapes and tolerances as the Triton tests) and
the brute-force suite end to end with CUSPRUN_BACKEND=cuda."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cusprun_kernels import BackendUnavailable, cuda_tuning, resolve_backend
from cusprun_kernels.cuda_ext import build_info, extension
from cusprun_kernels.cuda_tuning import choose
from cusprun_kernels.projection_energy import (
    CUDA_VARIANTS,
    projection_energies_cublas,
    projection_energies_cuda,
    projection_energies_fused,
    projection_energies_torch,
)
from cusprun_kernels.qk_ablation import qk_row_ablation_cuda, qk_row_ablation_torch, sdpa_where_faster
from tests.brute_force import assert_gpu_engine_matches_brute_force
from tests.test_triton_ops import TOL, offsets_of, qk_inputs, rel_err

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
        module.segment_sum_sq(16, 0, 4, 4, 4, 1, 32, 1, 64, 0, 0)
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        module.projection_energy(16, 32, 0, 48, 0, 8, 8, 8, 1, 8, 1, 8, 1, 64, 80, 96, 112, 1, 0, 0)
    with pytest.raises(ValueError, match="head_dim"):  # bad arguments are ValueErrors, checked first
        module.ablated_attention(*[0] * 12, 1, 4, 2, 1, 300, 2, 1, 1.0, 0, False, 0, 0)
    with pytest.raises(ValueError, match="need k >= 1"):
        module.projection_energy(16, 32, 0, 48, 0, 0, 8, 8, 1, 8, 1, 8, 1, 64, 80, 96, 112, 1, 0, 0)
    monkeypatch.setenv("CUSPRUN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="CUSPRUN_BACKEND=cuda: .*no CUDA device is available"):
        resolve_backend("cuda")
    monkeypatch.setenv("CUSPRUN_BACKEND", "auto")
    assert resolve_backend("cpu", announce=False) == "torch"  # auto never picks it here


class _Clock:
    """A stand-in for CUDA-event timing: fixed times per candidate, and a count of measurements."""

    def __init__(self, ms):
        self.ms, self.calls = ms, 0

    def __call__(self, fn):
        self.calls += 1
        return self.ms[fn()]


def test_variant_choice_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CUSPRUN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CUSPRUN_CUDA_PROJECTION_ENERGIES", raising=False)
    candidates = {"cublas": lambda: "cublas", "fused": lambda: "fused"}
    clock = _Clock({"cublas": 2.0, "fused": 1.5})
    assert choose("projection_energies", "bf16|in=8", candidates, device_name="GPU A", timer=clock) == "fused"
    assert clock.calls == 2
    clock.ms = {"cublas": 1.0, "fused": 9.0}  # a later process keeps the stored choice: identical score files
    monkeypatch.setattr(cuda_tuning, "_chosen", {})
    assert choose("projection_energies", "bf16|in=8", candidates, device_name="GPU A", timer=clock) == "fused"
    assert clock.calls == 2
    # another GPU or shape is measured on its own
    assert choose("projection_energies", "bf16|in=8", candidates, device_name="GPU B", timer=clock) == "cublas"
    assert clock.calls == 4
    stored = json.loads((tmp_path / "cuda_tuning.json").read_text())
    assert stored["GPU A|projection_energies|bf16|in=8"] == {"variant": "fused", "ms": {"cublas": 2.0, "fused": 1.5}}
    monkeypatch.setenv("CUSPRUN_CUDA_PROJECTION_ENERGIES", "cublas")  # forced: neither measured nor cached
    assert choose("projection_energies", "f32", candidates, device_name="GPU A", timer=clock) == "cublas"
    assert clock.calls == 4
    monkeypatch.setenv("CUSPRUN_CUDA_PROJECTION_ENERGIES", "cutlass")
    with pytest.raises(ValueError, match="CUSPRUN_CUDA_PROJECTION_ENERGIES=cutlass: choose auto or one of cublas"):
        choose("projection_energies", "f32", candidates, device_name="GPU A", timer=clock)


def test_a_damaged_variant_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("CUSPRUN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CUSPRUN_CUDA_PROJECTION_ENERGIES", raising=False)
    (tmp_path / "cuda_tuning.json").write_text("{not json")
    clock = _Clock({"cublas": 1.0, "fused": 2.0})
    assert choose("projection_energies", "k", {"cublas": lambda: "cublas", "fused": lambda: "fused"},
                  device_name="G", timer=clock) == "cublas"
    assert json.loads((tmp_path / "cuda_tuning.json").read_text())["G|projection_energies|k"]["variant"] == "cublas"


@needs_gpu
@pytest.mark.parametrize("variant", list(CUDA_VARIANTS))
@pytest.mark.parametrize("lengths", [[1], [17, 1, 5], [40], [70, 3]])  # [70, 3]: two row tiles in one document
@pytest.mark.parametrize("in_f, out_f", [(24, 37), (80, 19), (33, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_projection_energies(variant, lengths, in_f, out_f, bias):
    torch.manual_seed(in_f + len(lengths))
    x = torch.randn(sum(lengths), in_f, device="cuda")
    w = torch.randn(out_f, in_f, device="cuda")
    b = torch.randn(out_f, device="cuda") if bias else None
    off = offsets_of(lengths)
    # the variants' public launchers (CUDA_VARIANTS holds their unchecked cores, which take Segments)
    launcher = {"cublas": projection_energies_cublas, "fused": projection_energies_fused}[variant]
    got = launcher(x, w, b, off)
    for g, r in zip(got, projection_energies_torch(x, w, b, off)):
        assert not g.isnan().any()  # NaN-poisoned before launch: every element was written
        assert rel_err(g, r) <= TOL[torch.float32]
    assert all(torch.equal(g, again) for g, again in zip(got, launcher(x, w, b, off)))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_projection_in_16_bit_with_strided_inputs(dtype):
    torch.manual_seed(3)
    x = torch.randn(71, 90, device="cuda", dtype=dtype)[:, 5:77]  # a view: row stride 90
    w = torch.randn(45, 72, device="cuda", dtype=dtype).T.contiguous().T  # column-major weight
    b = torch.randn(45, device="cuda", dtype=dtype)
    off = offsets_of([64, 7])
    y, rows, cols = projection_energies_fused(x, w, b, off)
    ref_y, ref_rows, ref_cols = projection_energies_torch(x, w, b, off)
    assert rel_err(y.float(), ref_y.float()) <= TOL[dtype]
    assert rel_err(rows, ref_rows) <= TOL[dtype] and rel_err(cols, ref_cols) <= TOL[torch.float32]


@needs_gpu
def test_cuda_launcher_uses_the_stored_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("CUSPRUN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CUSPRUN_CUDA_PROJECTION_ENERGIES", raising=False)
    x, w = torch.randn(50, 24, device="cuda"), torch.randn(37, 24, device="cuda")
    off = offsets_of([20, 30])
    got = projection_energies_cuda(x, w, None, off)
    (entry,) = json.loads((tmp_path / "cuda_tuning.json").read_text()).values()
    assert set(entry["ms"]) == set(CUDA_VARIANTS)
    chosen = CUDA_VARIANTS[entry["variant"]](x, w, None, off)
    assert all(torch.equal(g, c) for g, c in zip(got, chosen))


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
    ([9], 2, 1, 128, None),
    ([13, 5], 4, 2, 10, 4),
    # head_dim 256: shared memory above the default 48 KiB; one head and one row tile (512 blocks: racecheck
    # took 150 s on an H200), then two heads and two row tiles of 64 (racecheck leaves it out: over 100 s)
    ([40], 1, 1, 256, None),
    pytest.param([70], 2, 1, 256, None, id="hd256-two-row-tiles"),
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
@pytest.mark.parametrize("window", [None, 40])
def test_documents_routed_between_the_kernel_and_sdpa(window, tmp_path, monkeypatch):
    """Mixed lengths on the GPU: short documents on the CUDA kernel, long ones on fused attention (a stand-in
    timer decides), an empty one in between; gathered sub-batches agree with the reference per document."""
    monkeypatch.setenv("CUSPRUN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CUSPRUN_CUDA_QK_ROW_ABLATION", raising=False)
    lengths, heads, kv, hd = [3, 0, 150, 40, 90], 4, 2, 64
    args = qk_inputs(lengths, heads, kv, hd, seed=5)

    def timer(call):  # sdpa "faster" from 65 tokens on
        return float((call.func.__name__ == "qk_row_ablation_sdpa") == (call.args[0].shape[0] <= 64))
    routed = sdpa_where_faster(qk_row_ablation_cuda, "cuda", timer=timer)
    got = routed(*args, n_rep=heads // kv, sliding_window=window)
    ref = qk_row_ablation_torch(*args, n_rep=heads // kv, sliding_window=window)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and not g.isnan().any()
        assert rel_err(g, r) <= 1e-4 and not g[1].any()  # the empty document scores zero
    stored = json.loads((tmp_path / "cuda_tuning.json").read_text())
    assert sorted(v["variant"] for v in stored.values()) == ["kernel", "sdpa", "sdpa"]  # buckets 64, 128, 256


@needs_gpu
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_engine_matches_brute_force(arch, monkeypatch):
    assert_gpu_engine_matches_brute_force(arch, "cuda", monkeypatch)
