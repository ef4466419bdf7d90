"""One backend selector for every scoring op: ``CUSPRUN_BACKEND=auto|torch|triton|cuda``.

``auto`` picks the fastest backend that works on the tensors' device and says once (on stderr)
which one it chose; a backend named explicitly either works or fails with the reason it cannot.
"""

from __future__ import annotations

import os
import sys
from functools import cache

BACKENDS = ("torch", "triton", "cuda")
_announced: set[str] = set()
_quiet = False


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot run here."""


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


def backend_status(name: str, device_type: str | None = None) -> str | None:
    """None when backend ``name`` can run on ``device_type`` (default: this machine's best device),
    else the reason it cannot."""
    import torch

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "torch":
        return None
    if name == "triton":
        if _triton_import_error():
            return _triton_import_error()
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        if device_type == "cpu" and not triton_interpreter():
            return "Triton kernels run on CUDA GPUs; on the CPU only under TRITON_INTERPRET=1 (its interpreter)"
        return None
    if name == "cuda":
        from .cuda_ext import status

        return status(device_type)
    return f"unknown backend {name!r} (choose one of auto, {', '.join(BACKENDS)})"


def requested_backend() -> str:
    return os.environ.get("CUSPRUN_BACKEND", "auto").strip().lower() or "auto"


def resolve_backend(device_type: str = "cpu", announce: bool = True) -> str:
    """The backend the ops will use for tensors on ``device_type``.

    ``auto`` prefers the compiled backends on CUDA devices and quietly falls back to torch (on the
    CPU it is always torch: the Triton interpreter is for testing, not speed); an explicit name that
    cannot run raises :class:`BackendUnavailable` naming why.
    """
    name = requested_backend()
    if name != "auto":
        reason = backend_status(name, device_type)
        if reason is not None:
            raise BackendUnavailable(f"CUSPRUN_BACKEND={name}: {reason}")
        return name
    candidates = ("cuda", "triton", "torch") if device_type == "cuda" else ("torch",)
    chosen = next(b for b in candidates if backend_status(b, device_type) is None)
    if announce and not _quiet and device_type not in _announced:
        _announced.add(device_type)
        print(f"cusprun: scoring backend {chosen} (CUSPRUN_BACKEND=auto, device {device_type})", file=sys.stderr)
    return chosen
