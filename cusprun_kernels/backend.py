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


def set_quiet(quiet: bool = True) -> None:
    """Silence the one-line announcement of the backend ``auto`` chose (``--quiet``)."""
    global _quiet
    _quiet = quiet


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot run here."""


@cache
def backend_status(name: str) -> str | None:
    """None when backend ``name`` can run on this machine, else the reason it cannot."""
    if name == "torch":
        return None
    if name in ("triton", "cuda"):
        return (
            f"the {name} backend is not implemented in this version of cusprun "
            "(only the plain-PyTorch reference backend exists)"
        )
    return f"unknown backend {name!r} (choose one of auto, {', '.join(BACKENDS)})"


def requested_backend() -> str:
    return os.environ.get("CUSPRUN_BACKEND", "auto").strip().lower() or "auto"


def resolve_backend(device_type: str = "cpu", announce: bool = True) -> str:
    """The backend the ops will use for tensors on ``device_type``.

    ``auto`` prefers the compiled backends on CUDA devices and quietly falls back to torch;
    an explicit name that cannot run raises :class:`BackendUnavailable` naming why.
    """
    name = requested_backend()
    if name != "auto":
        reason = backend_status(name)
        if reason is not None:
            raise BackendUnavailable(f"CUSPRUN_BACKEND={name}: {reason}")
        return name
    candidates = ("cuda", "triton", "torch") if device_type == "cuda" else ("torch",)
    chosen = next(b for b in candidates if backend_status(b) is None)
    if announce and not _quiet and device_type not in _announced:
        _announced.add(device_type)
        print(f"cusprun: scoring backend {chosen} (CUSPRUN_BACKEND=auto, device {device_type})",
              file=sys.stderr)
    return chosen
