"""The one backend table of the scoring ops, resolved once per op and case, each backend verified before use.

``CUSPRUN_BACKEND=auto|torch|triton|cuda``. :data:`IMPLEMENTATIONS` maps every op to its
implementations by backend and :data:`AVAILABILITY` says where each backend can run; adding a backend
is one entry in each (this file) plus its tests.

The first call of an op for a *case* (device, dtype and, for the attention op, head_dim) resolves the
backend once for the process:

* ``auto`` walks :func:`auto_order` for the op and device type (on a GPU: cuda, triton, torch, except where
  :data:`AUTO_ORDER_BY_OP` records a measured better order; on the CPU torch only: the Triton interpreter
  is for tests) and takes the first backend that can run there and passes its check;
* an explicitly named backend must be able to run and pass its check, or the call raises
  :class:`BackendUnavailable` with the reason.

The check runs the backend once against the plain-PyTorch reference on small, odd, packed documents,
in the case's dtype, with and without a sliding window, and compares every output against
:data:`TOLERANCE`. A backend that disagrees, raises (e.g. a head_dim it does not support) or writes
NaN fails it: ``auto`` prints one stderr line naming the backend, the op and the error measured, and
tries the next. On CUDA devices verdicts are cached on disk (``verdicts.json`` in the cache directory,
see :mod:`cusprun_kernels.cache`) per GPU, driver, CUDA, torch and triton versions, the kernels' own
sources and the extension build, so each is measured once; any change of these verifies again (a kernel
edited in a checkout whose version number stayed the same included).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .cache import cache_dir, load, store
from .gram import gram_torch, gram_triton
from .projection_energy import projection_energies_cuda, projection_energies_torch, projection_energies_triton
from .qk_ablation import (
    qk_row_ablation_cuda,
    qk_row_ablation_torch,
    qk_row_ablation_triton,
    sdpa_where_faster,
    triton_config_tag,
)
from .segments import Segments
from .v_row_energy import v_row_energies_torch

BACKENDS = ("torch", "triton", "cuda")
REFERENCE = "torch"

# v-row energies are two small einsums over data already on the device (O(T·hd·rep²)); every
# backend runs them through torch, which dispatches them to cuBLAS on a GPU.
IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    "projection_energies": {"torch": projection_energies_torch, "triton": projection_energies_triton,
                            "cuda": projection_energies_cuda},
    # the flash kernels hand each document to PyTorch's fused attention where that measured faster
    "qk_row_ablation": {"torch": qk_row_ablation_torch,
                        "triton": sdpa_where_faster(qk_row_ablation_triton, "triton", tag=triton_config_tag),
                        "cuda": sdpa_where_faster(qk_row_ablation_cuda, "cuda")},
    "v_row_energies": {"torch": v_row_energies_torch, "triton": v_row_energies_torch, "cuda": v_row_energies_torch},
    # XᵀX is one GEMM: cuBLAS (through torch) is the CUDA implementation
    "gram": {"torch": gram_torch, "triton": gram_triton, "cuda": gram_torch},
}
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch")}  # any other device type: torch
# Where measurement overrules that order (benchmarks/bench_kernels.py on an NVIDIA H200, 2026-11-27, Llama-3-8B
# and -70B shapes, L = 512-2048): Triton's projection kernel ran 0.25-0.56x torch's cuBLAS GEMM plus reductions
# at every shape, so a GPU without the CUDA extension uses torch; Triton's q/k kernel ran 1.13-1.19x faster
# than the CUDA one at every shape.
AUTO_ORDER_BY_OP = {"cuda": {"projection_energies": ("cuda", "torch"), "qk_row_ablation": ("triton", "cuda", "torch")}}

# Largest |got - reference| relative to the reference's largest magnitude, per output, by op and input dtype.
# The attention op computes in float32 whatever its inputs' dtype, so one bound serves every dtype.
TOLERANCE = {
    "projection_energies": {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2},
    "qk_row_ablation": {torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4},
    "gram": {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5},  # float32 products either way
}

_quiet = False
_announced: dict[str, str] = {}  # device type -> the backend its first announcement named
_announced_ops: set[tuple[str, str]] = set()  # (device type, op) announced with another backend
_resolved: dict[tuple, str] = {}  # (op, case key) -> backend, for this process
_verdicts: dict[tuple, str | None] = {}  # (op, backend, case key) -> problem, None when it passed


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot run here or fails its check (one line: the reason)."""


def set_quiet(quiet: bool = True) -> None:
    """Silence the one-line announcement of the backend ``auto`` chose (``--quiet``)."""
    global _quiet
    _quiet = quiet


def triton_interpreter() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is imported) runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install triton"
    return None


def _triton_status(device: torch.device) -> str | None:
    if _triton_import_error():
        return _triton_import_error()
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if device.type == "cpu" and not triton_interpreter():
        return "Triton kernels run on CUDA GPUs; on the CPU only under TRITON_INTERPRET=1 (its interpreter)"
    return None


def _cuda_status(device: torch.device) -> str | None:
    from .cuda_ext import status

    return status(device)


AVAILABILITY: dict[str, Callable[[torch.device], str | None]] = {
    "torch": lambda device: None, "triton": _triton_status, "cuda": _cuda_status}


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def backend_status(name: str, device=None) -> str | None:
    """None when backend ``name`` can run on ``device`` (a device or device type; default: this machine's
    best device), else the reason it cannot. Says nothing of its check (see :func:`implementation`)."""
    if name not in AVAILABILITY:
        return f"unknown backend {name!r} (choose one of auto, {', '.join(AVAILABILITY)})"
    return AVAILABILITY[name](_device(device))


def requested_backend() -> str:
    return os.environ.get("CUSPRUN_BACKEND", "auto").strip().lower() or "auto"


def resolve_backend(device_type: str = "cpu", announce: bool = True) -> str:
    """The backend the ops prefer for tensors on ``device_type``, before any check: the named one (raising
    :class:`BackendUnavailable` with the reason when it cannot run there) or, for ``auto``, the first of
    :data:`AUTO_ORDER` that can. Each op's backend is then fixed on first use by :func:`implementation`,
    which also verifies it."""
    name = requested_backend()
    device = _device(device_type)
    if name != "auto":
        reason = backend_status(name, device)
        if reason is not None:
            raise BackendUnavailable(f"CUSPRUN_BACKEND={name}: {reason}")
        return name
    chosen = next(b for b in (*AUTO_ORDER.get(device.type, ()), REFERENCE) if backend_status(b, device) is None)
    if announce:
        _announce(chosen, device)
    return chosen


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    """The backends ``auto`` tries for ``op`` on ``device_type``, best first (the reference comes last anyway)."""
    return AUTO_ORDER_BY_OP.get(device_type, {}).get(op, AUTO_ORDER.get(device_type, ()))


def _announce(chosen: str, device: torch.device, op: str | None = None) -> None:
    """One stderr line per device type, and one more for each op that auto gives another backend than the
    one that line named."""
    if _quiet:
        return
    where = f"(CUSPRUN_BACKEND=auto, device {device.type})"
    if device.type not in _announced:
        _announced[device.type] = chosen
        print(f"cusprun: scoring backend {chosen} {where}", file=sys.stderr)
    elif chosen != _announced[device.type] and op is not None and (device.type, op) not in _announced_ops:
        _announced_ops.add((device.type, op))
        print(f"cusprun: scoring backend {chosen} for {op} {where}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Cases and checks
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """What an implementation's correctness may depend on: device, input dtype, head_dim and n_rep."""
    device: torch.device
    dtype: torch.dtype
    head_dim: int | None = None
    n_rep: int | None = None

    @property
    def key(self) -> str:
        parts = [str(self.dtype).removeprefix("torch.")]
        if self.head_dim is not None:
            parts += [f"head_dim={self.head_dim}", f"n_rep={self.n_rep}"]
        return " ".join(parts)


def case_of(op: str, args: tuple, kw: dict) -> Case:
    """The case of one call of ``op`` (its first argument carries device and dtype)."""
    first = args[0]
    if op == "qk_row_ablation":
        return Case(first.device, first.dtype, first.shape[-1], kw.get("n_rep", 1))
    return Case(first.device, first.dtype)


def _lengths(device: torch.device) -> tuple[int, ...]:
    # packed documents of odd lengths, one of a single token; on a GPU one crosses a 64-row tile
    return (1, 19, 70) if device.type == "cuda" else (1, 5, 12)


def _randn(gen: torch.Generator, *shape, case: Case, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(case.device, case.dtype)


def _projection_runs(case: Case):
    gen = torch.Generator().manual_seed(17)
    lengths = _lengths(case.device)
    x, w, b = _randn(gen, sum(lengths), 37, case=case), _randn(gen, 45, 37, case=case, scale=37**-0.5), \
        _randn(gen, 45, case=case)
    yield "", (x, w, b, Segments.of_lengths(lengths, case.device)), {}


def _qk_runs(case: Case):
    gen = torch.Generator().manual_seed(23)
    lengths, kv, hd = _lengths(case.device), 2, case.head_dim
    heads = kv * case.n_rep
    T = sum(lengths)
    q, k, v = (_randn(gen, T, n, hd, case=case) for n in (heads, kv, kv))
    ang = torch.rand(T, hd // 2, generator=gen) * 6
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(case.device, case.dtype) for f in (torch.cos, torch.sin))
    w_o = _randn(gen, 24, heads * hd, case=case, scale=(heads * hd) ** -0.5)
    args = (q, k, v, cos, sin, w_o, Segments.of_lengths(lengths, case.device))
    for window in (None, 4):
        yield f"window {window}", args, dict(n_rep=case.n_rep, sliding_window=window)


def _gram_runs(case: Case):
    gen = torch.Generator().manual_seed(29)
    yield "", (_randn(gen, sum(_lengths(case.device)), 41, case=case),), {}


CHECK_RUNS = {"projection_energies": _projection_runs, "qk_row_ablation": _qk_runs, "gram": _gram_runs}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| in float64; inf when shapes differ or got holds NaN / inf."""
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return math.inf
    ref64 = ref.double()
    return ((got.double() - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30)).item()


def check(op: str, backend: str, case: Case) -> str | None:
    """Run ``backend``'s ``op`` against the reference on the check's documents; None when it agrees within
    :data:`TOLERANCE`, else one line naming the backend, the op, the case and the error measured."""
    # a routed implementation (qk_ablation.sdpa_where_faster) is checked on its kernel: the check's short
    # documents might all go to sdpa, which is exact by construction, and leave the kernel unverified
    impl = getattr(IMPLEMENTATIONS[op][backend], "kernel", IMPLEMENTATIONS[op][backend])
    ref = IMPLEMENTATIONS[op][REFERENCE]
    where = f"{op} ({case.key} on {case.device})"
    tol = TOLERANCE[op].get(case.dtype, TOLERANCE[op][torch.float32])
    for label, args, kw in CHECK_RUNS[op](case):
        try:
            got, want = impl(*args, **kw), ref(*args, **kw)
            if isinstance(want, torch.Tensor):  # ops with one output
                got, want = (got,), (want,)
            err = max(relative_error(g, w) for g, w in zip(got, want))
        except Exception as exc:  # noqa: BLE001 - any failure disqualifies the backend; its message is reported
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return f"backend {backend} failed its check of {where}{', ' + label if label else ''}: raised " \
                   f"{type(exc).__name__}: {message}"
        if not err <= tol:
            return (f"backend {backend} failed its check of {where}{', ' + label if label else ''}: "
                    f"relative error {err:.2e} > tolerance {tol:.0e}")
    return None


# --------------------------------------------------------------------------------------------------
# Verdicts: measured once per environment, cached on disk for CUDA devices
# --------------------------------------------------------------------------------------------------
def verdicts_path():
    return cache_dir() / "verdicts.json"


def _persists(device: torch.device) -> bool:
    """Verdicts of GPUs go to disk; on the CPU (the Triton interpreter, in tests) they last one process."""
    return device.type == "cuda"


@cache
def kernel_sources_digest() -> str:
    """A digest of this package's Python sources (kernels, launchers, references and this check): a verdict
    stands for the code that earned it, not for a version number a checkout can keep while its kernels
    change."""
    # hidden names (an editor's lock or swap file, possibly a dangling link) are not sources
    sources = sorted(p for p in Path(__file__).parent.glob("*.py") if not p.name.startswith(".") and p.is_file())
    if not sources:  # an install without sources (zipped, bytecode only): the version is all there is to go by
        return "version " + importlib.metadata.version("cusprun")
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def environment_key(device: torch.device) -> str:
    """Everything a verdict depends on besides op, backend and case: the GPU, driver, CUDA runtime, torch,
    triton, the kernels' sources (:func:`kernel_sources_digest`) and the CUDA extension build (its file's
    size and modification time)."""
    from .cuda_ext import extension
    from .devices import driver_version

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "none"

    module = extension()[0]
    build = "none"
    if module is not None and getattr(module, "__file__", None):
        st = os.stat(module.__file__)
        build = f"{st.st_size}@{int(st.st_mtime)}"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (f"{gpu}|driver {driver_version()}|cuda {torch.version.cuda}|torch {torch.__version__}|"
            f"triton {version('triton')}|kernels {kernel_sources_digest()}|extension {build}")


def verdict(op: str, backend: str, case: Case, *, fresh: bool = False) -> str | None:
    """The check's outcome for ``backend`` on ``op`` in ``case``: cached for this process and, on CUDA
    devices, on disk; ``fresh`` measures again. The reference itself always passes."""
    impl = IMPLEMENTATIONS[op][backend]
    if impl is IMPLEMENTATIONS[op][REFERENCE] or op not in CHECK_RUNS:
        return None
    memo = (op, backend, str(case.device), case.key)
    if memo in _verdicts and not fresh:
        return _verdicts[memo]
    persistent = _persists(case.device)
    key = f"{environment_key(case.device)}|{op}|{backend}|{case.key}" if persistent else None
    entry = None if fresh or not persistent else load(verdicts_path()).get(key)
    if entry is not None and "problem" in entry:
        problem = entry["problem"]
    else:
        problem = check(op, backend, case)
        if persistent:
            try:
                store(verdicts_path(), key, {"problem": problem, "checked": datetime.datetime.now(
                    datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
            except OSError:  # a read-only cache still runs; the next process checks again
                pass
    _verdicts[memo] = problem
    return problem


def implementation(op: str, args: tuple, kw: dict) -> Callable:
    """The implementation of ``op`` for the case of this call, resolved (and verified) on first use."""
    case = case_of(op, args, kw)
    memo = (op, str(case.device), case.key, requested_backend())
    if memo not in _resolved:
        _resolved[memo] = _choose(op, case)
    return IMPLEMENTATIONS[op][_resolved[memo]]


def resolved_backends() -> dict[str, str]:
    """{op: backend} as resolved so far in this process (several cases of one op: their backends joined by
    "+"), for score-file metadata: a backend that failed its check for one op is not the one that ran it."""
    out: dict[str, set[str]] = {}
    for (op, *_), name in _resolved.items():
        out.setdefault(op, set()).add(name)
    return {op: "+".join(sorted(names)) for op, names in sorted(out.items())}


def _choose(op: str, case: Case) -> str:
    name = requested_backend()
    if name != "auto":
        reason = backend_status(name, case.device)
        if reason is None:
            reason = verdict(op, name, case)
        if reason is not None:
            raise BackendUnavailable(f"CUSPRUN_BACKEND={name}: {reason}")
        return name
    for name in (*auto_order(op, case.device.type), REFERENCE):
        if backend_status(name, case.device) is not None:
            continue
        problem = verdict(op, name, case)
        if problem is None:
            _announce(name, case.device, op)
            return name
        print(f"cusprun: {problem}; using the next backend", file=sys.stderr)
    raise AssertionError("unreachable: the reference always passes")


Verdict = tuple[str, str, str, "str | None"]  # (op, backend, case key, problem or None)


def verify_now(device=None, dtypes=(torch.float32, torch.bfloat16), head_dims=(64, 128)) -> list[Verdict]:
    """Check every available backend of every op now (``python -m cusprun --verify``), storing the verdicts;
    [(op, backend, case key, problem or None)]."""
    device = _device(device)
    out = []
    for op in CHECK_RUNS:
        cases = [Case(device, dt, hd, 2) for dt in dtypes for hd in head_dims] if op == "qk_row_ablation" else \
            [Case(device, dt) for dt in dtypes]
        for name in BACKENDS:
            if name == REFERENCE or backend_status(name, device) is not None:
                continue
            for case in cases:
                out.append((op, name, case.key, verdict(op, name, case, fresh=True)))
    return out


def cached_verdicts(device=None) -> tuple[list[tuple[str, str | None]], int]:
    """The stored verdicts of this environment ([(op backend case, problem)]) and how many others the file holds."""
    device = _device(device)
    table = load(verdicts_path())
    if not _persists(device):
        return [], len(table)
    prefix = environment_key(device) + "|"
    mine = [(k.removeprefix(prefix).replace("|", " "), v.get("problem")) for k, v in sorted(table.items())
            if k.startswith(prefix)]
    return mine, len(table) - len(mine)
