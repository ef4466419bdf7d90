"""The backend table: each backend checked against the torch reference before first use, a wrong or crashing
one skipped by ``auto`` (one stderr line naming backend, op and error) and refused when named, verdicts
cached per environment; and device-correct launches (current device and stream of the tensors' device)."""

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cusprun_kernels
from cusprun_kernels import backend, cuda_ext, devices
from cusprun_kernels.backend import BackendUnavailable, Case
from cusprun_kernels.projection_energy import projection_energies_torch
from cusprun_kernels.segments import Segments

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def table(monkeypatch, tmp_path):
    """Fresh resolution state, a private cache directory, and fake backends ``wrong`` and ``crash``
    registered for projection_energies and tried by ``auto`` on the CPU before torch."""
    monkeypatch.setenv("CUSPRUN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backend, "_resolved", {})
    monkeypatch.setattr(backend, "_verdicts", {})
    monkeypatch.setattr(backend, "_quiet", True)
    calls = {"wrong": 0, "crash": 0}

    def wrong(x, w, b, off):
        calls["wrong"] += 1
        y, rows, cols = projection_energies_torch(x, w, b, off)
        return y, rows * (1 + 1e-3), cols  # 1e-3 off: far beyond float32's 2e-5

    def crash(x, w, b, off):
        calls["crash"] += 1
        raise RuntimeError("illegal memory access\nsecond line is not reported")

    impls = {**backend.IMPLEMENTATIONS["projection_energies"], "wrong": wrong, "crash": crash}
    monkeypatch.setitem(backend.IMPLEMENTATIONS, "projection_energies", impls)
    monkeypatch.setattr(backend, "AVAILABILITY", {**backend.AVAILABILITY, "wrong": lambda d: None,
                                                  "crash": lambda d: None})
    monkeypatch.setattr(backend, "AUTO_ORDER", {"cpu": ("crash", "wrong")})
    monkeypatch.setenv("CUSPRUN_BACKEND", "auto")
    return calls


def _inputs(lengths=(3, 1, 8)):
    torch.manual_seed(0)
    return torch.randn(sum(lengths), 9), torch.randn(11, 9), torch.randn(11), Segments.of_lengths(lengths)


def test_auto_skips_a_crashing_and_a_wrong_backend_with_one_line_each(table, capsys):
    x, w, b, off = _inputs()
    got = cusprun_kernels.projection_energies(x, w, b, off)
    assert all(torch.equal(g, r) for g, r in zip(got, projection_energies_torch(x, w, b, off)))  # torch ran
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("cusprun: backend crash failed its check of projection_energies (float32 on cpu): "
                               "raised RuntimeError: illegal memory access; using the next backend")
    assert lines[1].startswith("cusprun: backend wrong failed its check of projection_energies (float32 on cpu): "
                               "relative error 1.00e-03 > tolerance 2e-05")
    cusprun_kernels.projection_energies(x, w, b, off)  # resolved once: no second check, no second line
    assert table == {"wrong": 1, "crash": 1} and capsys.readouterr().err == ""
    assert backend.resolved_backends() == {"projection_energies": "torch"}  # what ran, for the metadata



def test_an_op_with_a_measured_order_walks_its_own(table, monkeypatch, capsys):
    """AUTO_ORDER_BY_OP overrules the device's order for one op only: here projection_energies tries only
    ``wrong`` (skipped) before torch, never ``crash``; and auto announces each backend it hands an op."""
    monkeypatch.setattr(backend, "AUTO_ORDER_BY_OP", {"cpu": {"projection_energies": ("wrong",)}})
    monkeypatch.setattr(backend, "_quiet", False)
    monkeypatch.setattr(backend, "_announced", {})
    monkeypatch.setattr(backend, "_announced_ops", set())
    cusprun_kernels.projection_energies(*_inputs())
    assert table == {"wrong": 1, "crash": 0}
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("cusprun: backend wrong failed its check") and len(err) == 2
    assert err[1] == "cusprun: scoring backend torch (CUSPRUN_BACKEND=auto, device cpu)"
    assert backend.auto_order("gram", "cpu") == ("crash", "wrong")  # the other ops keep the device's order
    # an op on another backend than the first line's gets its own line, once; the first line's backend none
    cpu = torch.device("cpu")
    for op, chosen in (("qk_row_ablation", "triton"), ("qk_row_ablation", "triton"), ("gram", "triton"),
                       ("v_row_energies", "torch")):
        backend._announce(chosen, cpu, op)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"cusprun: scoring backend triton for {op} (CUSPRUN_BACKEND=auto, device cpu)"
        for op in ("qk_row_ablation", "gram")]

def test_the_dtype_in_use_is_checked_on_its_own(table, capsys):
    x, w, b, off = _inputs()
    cusprun_kernels.projection_energies(x, w, b, off)
    cusprun_kernels.projection_energies(x.double(), w.double(), b.double(), off)
    assert table == {"wrong": 2, "crash": 2}
    assert "(float64 on cpu)" in capsys.readouterr().err


@pytest.mark.parametrize("name, error", [("wrong", "relative error 1.00e-03 > tolerance 2e-05"),
                                         ("crash", "raised RuntimeError: illegal memory access")])
def test_a_named_backend_that_fails_its_check_is_refused(table, monkeypatch, name, error):
    monkeypatch.setenv("CUSPRUN_BACKEND", name)
    with pytest.raises(BackendUnavailable, match=rf"^CUSPRUN_BACKEND={name}: backend {name} failed its check of "
                                                 rf"projection_energies \(float32 on cpu\): {error}"):
        cusprun_kernels.projection_energies(*_inputs())


def test_nan_output_fails_the_check(table, monkeypatch):
    def poisoned(x, w, b, off):
        y, rows, cols = projection_energies_torch(x, w, b, off)
        return y, rows, cols.index_fill(1, torch.tensor([2]), float("nan"))  # one unwritten element

    monkeypatch.setitem(backend.IMPLEMENTATIONS["projection_energies"], "wrong", poisoned)
    assert "relative error inf" in backend.check("projection_energies", "wrong", Case(torch.device("cpu"),
                                                                                         torch.float32))


def test_unsupported_head_dim_is_reported_by_the_check():
    pytest.importorskip("triton")
    if backend.backend_status("triton", "cpu") is not None:
        pytest.skip("triton cannot run here")
    problem = backend.check("qk_row_ablation", "triton", Case(torch.device("cpu"), torch.float32, 320, 1))
    assert problem.startswith("backend triton failed its check of qk_row_ablation (float32 head_dim=320 n_rep=1 on "
                              "cpu), window None: raised ValueError: qk_row_ablation (triton): head_dim 320")


def test_verdicts_are_cached_per_environment_and_checked_again_when_versions_change(table, monkeypatch, tmp_path):
    monkeypatch.setattr(backend, "_persists", lambda device: True)  # the disk cache is for GPUs: pretend
    env = {"key": "GPU X|driver 12040|cuda 12.4|torch 2|triton 3|kernels 0123456789ab|extension 1@2"}
    monkeypatch.setattr(backend, "environment_key", lambda device: env["key"])
    case = Case(torch.device("cpu"), torch.float32)
    first = backend.verdict("projection_energies", "wrong", case)
    assert "relative error" in first and table["wrong"] == 1
    stored = json.loads((tmp_path / "verdicts.json").read_text())
    assert stored[f"{env['key']}|projection_energies|wrong|float32"]["problem"] == first
    monkeypatch.setattr(backend, "_verdicts", {})  # a new process: read from disk, not measured
    assert backend.verdict("projection_energies", "wrong", case) == first and table["wrong"] == 1
    assert backend.cached_verdicts(case.device) == ([("projection_energies wrong float32", first)], 0)
    env["key"] = env["key"].replace("kernels 0123456789ab", "kernels ba9876543210")  # a kernel edit: again
    monkeypatch.setattr(backend, "_verdicts", {})
    assert backend.verdict("projection_energies", "wrong", case) == first and table["wrong"] == 2
    assert len(json.loads((tmp_path / "verdicts.json").read_text())) == 2
    assert backend.cached_verdicts(case.device)[1] == 1  # the old environment's entry is not shown as current
    assert backend.verdict("projection_energies", "torch", case) is None  # the reference is never checked


def test_environment_key_names_gpu_driver_and_versions(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(devices, "driver_version", lambda: 12080)
    key = backend.environment_key(torch.device("cuda", 0))
    assert key.startswith("NVIDIA H100 80GB HBM3|driver 12080|cuda ")
    assert f"|torch {torch.__version__}|" in key and f"|kernels {backend.kernel_sources_digest()}|" in key


def test_kernel_digest_changes_with_any_kernel_source(monkeypatch, tmp_path):
    """A verdict must not outlive the code that earned it: editing one kernel file changes the digest."""
    import shutil

    package = Path(backend.__file__).parent
    copy = tmp_path / "cusprun_kernels"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    digest = backend.kernel_sources_digest.__wrapped__  # uncached
    real = digest()
    monkeypatch.setattr(backend, "__file__", str(copy / "backend.py"))
    assert digest() == real  # a faithful copy digests the same
    (copy / ".#gram.py").symlink_to(tmp_path / "missing")  # an editor's lock file, a dangling link: ignored
    assert digest() == real
    (copy / "gram.py").write_text((copy / "gram.py").read_text() + "\n# edited\n")
    assert digest() != real
    (tmp_path / "bytecode_only").mkdir()  # no sources to digest: the installed version stands in
    monkeypatch.setattr(backend, "__file__", str(tmp_path / "bytecode_only" / "backend.py"))
    assert digest() == "version " + importlib.metadata.version("cusprun")


def test_environment_report_shows_verdicts_and_verify_runs(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["CUSPRUN_CACHE_DIR"] = str(tmp_path)
    report = subprocess.run([sys.executable, "-m", "cusprun"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert report.returncode == 0, report.stderr
    assert "verdicts" in report.stdout
    verify = subprocess.run([sys.executable, "-m", "cusprun", "--verify"], capture_output=True, text=True, env=env,
                            cwd=ROOT)
    assert verify.returncode == 0, verify.stderr
    if not torch.cuda.is_available():
        assert "no compiled backend can run here" in verify.stdout


# ---------------------------------------------------------------------------------------------------
# Device-correct launches
# ---------------------------------------------------------------------------------------------------
class _FakeTensor:
    def __init__(self, device):
        self.device, self.dtype = torch.device(device), torch.float32

    def is_contiguous(self):
        return True

    def data_ptr(self):
        return 4096


def test_pointer_check_compares_the_tensor_device_with_the_launch_device():
    assert cuda_ext.pointer(_FakeTensor("cuda:1"), "kr", torch.float32, torch.device("cuda", 1)) == 4096
    with pytest.raises(ValueError, match="kr is on cuda:0, but the launch runs on cuda:1"):
        cuda_ext.pointer(_FakeTensor("cuda:0"), "kr", torch.float32, torch.device("cuda", 1))
    with pytest.raises(ValueError, match="w_o is on meta, but the launch runs on cpu"):
        devices.require_same_device(torch.device("cpu"), k=torch.ones(1), w_o=torch.empty(1, device="meta"))


def test_launch_on_makes_the_device_current_and_yields_its_stream(monkeypatch):
    entered = []

    class FakeGuard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    class FakeStream:
        def __init__(self, device):
            self.cuda_stream = 1000 + device.index

    monkeypatch.setattr(torch.cuda, "device", FakeGuard)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    with devices.launch_on(torch.device("cuda", 3)) as stream:
        assert stream == 1003 and entered == [torch.device("cuda", 3)]
    assert entered[-1] == "exit"
    with devices.launch_on(torch.device("cpu")) as stream:  # the interpreter: nothing to select
        assert stream == 0 and len(entered) == 2


def _launches_outside_guard(path: Path) -> list[str]:
    """Calls that launch a kernel (a Triton ``kernel[grid](...)`` or an extension entry point) not lexically
    inside a ``with launch_on(...)`` block."""
    entry_points = {"segment_sum_sq", "projection_energy", "ablated_attention"}
    tree = ast.parse(path.read_text())
    bad = []

    def visit(node, guarded):
        if isinstance(node, ast.With) and any(isinstance(i.context_expr, ast.Call)
                                              and getattr(i.context_expr.func, "id", "") == "launch_on"
                                              for i in node.items):
            guarded = True
        if isinstance(node, ast.Call):
            f = node.func
            triton_launch = isinstance(f, ast.Subscript) and getattr(f.value, "id", "").endswith("_kernel")
            ext_launch = isinstance(f, ast.Attribute) and f.attr in entry_points
            if (triton_launch or ext_launch) and not guarded:
                bad.append(f"{path.name}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)
    visit(tree, False)
    return bad


def test_every_kernel_launch_runs_under_its_tensors_device():
    files = sorted((ROOT / "cusprun_kernels").glob("*.py"))
    assert _launches_outside_guard(ROOT / "cusprun_kernels" / "qk_ablation.py") == []
    assert [bad for f in files for bad in _launches_outside_guard(f)] == []
    # the detector itself finds an unguarded launch
    probe = ROOT / "tests" / ".probe_unguarded.py"
    try:
        probe.write_text("def f(ext):\n    ext.ablated_attention(1)\n")
        assert _launches_outside_guard(probe) == [".probe_unguarded.py:2"]
    finally:
        probe.unlink()


# ---------------------------------------------------------------------------------------------------
# Compute capability and driver: the reasons reported
# ---------------------------------------------------------------------------------------------------
class _FakeModule:
    cuda_runtime_version = 13000
    interface_version = cuda_ext.INTERFACE_VERSION

    def __init__(self, count=1, driver=13000):
        self.count, self.driver = count, driver

    def device_count(self):
        return self.count

    def driver_version(self):
        return self.driver


def test_a_driver_older_than_the_runtime_is_named_not_reported_as_no_device(monkeypatch):
    monkeypatch.setattr(cuda_ext, "extension", lambda: (_FakeModule(count=0, driver=12040), None))
    reason = cuda_ext.status("cuda")
    assert reason == ("the CUDA extension is built, but the NVIDIA driver supports CUDA 12.4, older than the CUDA "
                      "13.0 runtime the extension was built with (update the driver, or rebuild with an older CUDA "
                      "toolkit)")
    assert cuda_ext.device_problem(0, 0, 13000) == "no CUDA device is available (no NVIDIA driver found)"
    assert cuda_ext.device_problem(0, 13000, 13000) == "no CUDA device is available"
    assert cuda_ext.device_problem(2, 12040, 13000) is None  # a GPU is seen: nothing to explain


@pytest.mark.parametrize("capability, ok", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((8, 6), True),
                                            ((9, 0), True)])
def test_pre_ampere_gpus_are_refused_by_status_so_auto_falls_back(monkeypatch, capability, ok):
    monkeypatch.setattr(cuda_ext, "extension", lambda: (_FakeModule(), None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    reason = cuda_ext.status(torch.device("cuda", 1))
    if ok:
        assert reason is None
    else:
        assert reason.startswith("the CUDA kernels need compute capability 8.0 or newer") and \
            f"Tesla T4 (cuda:1) is {capability[0]}.{capability[1]}" in reason
        monkeypatch.setattr(backend, "AVAILABILITY", {**backend.AVAILABILITY, "triton": lambda d: "not here"})
        monkeypatch.setenv("CUSPRUN_BACKEND", "auto")
        assert backend.resolve_backend("cuda", announce=False) == "torch"


def test_a_module_built_from_other_sources_is_refused(monkeypatch):
    class Old:
        __file__ = "/old/_cuda.so"
    monkeypatch.setitem(sys.modules, "cusprun_kernels._cuda", Old)
    monkeypatch.setattr(cusprun_kernels, "_cuda", Old, raising=False)
    cuda_ext.extension.cache_clear()
    try:
        module, reason = cuda_ext.extension()
        assert module is None and "built from other sources (interface 1" in reason
    finally:
        cuda_ext.extension.cache_clear()
