"""The optional CUDA C++ extension (``cusprun_kernels._cuda``, built from csrc/): loading it, and why not.

The extension links only the CUDA runtime; launchers hand it device pointers, shapes, strides and
torch's current stream. :func:`extension` returns the module or the reason it cannot be used, which
``CUSPRUN_BACKEND=cuda`` and ``python -m cusprun`` report.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

BUILD_INFO = Path(__file__).with_name("_cuda_build.json")  # written by setup.py: built, skipped or failed, and why
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def build_info() -> dict:
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


@cache
def extension():
    """(module, None) when the extension imports, else (None, why it was not built or does not load)."""
    try:
        from . import _cuda
    except ImportError as exc:
        info = build_info()
        if info.get("status") in ("skipped", "failed"):
            return None, f"the CUDA extension was not built ({info.get('reason')})"
        return None, f"the CUDA extension is not built or does not load ({exc}); reinstall with nvcc on PATH"
    return _cuda, None


def status(device_type: str) -> str | None:
    """None when the CUDA kernels can run on ``device_type`` tensors here, else the reason."""
    module, reason = extension()
    if module is None:
        return reason
    if module.device_count() == 0 or not torch.cuda.is_available():
        return "the CUDA extension is built, but no CUDA device is available"
    if device_type != "cuda":
        return "the CUDA extension runs on CUDA tensors only"
    return None


def describe() -> str:
    """One line for the environment report: built (with its CUDA runtime) or why not."""
    module, reason = extension()
    if module is None:
        return f"not built: {reason.removeprefix('the CUDA extension ')}"
    version = module.cuda_runtime_version
    return f"built (CUDA runtime {version // 1000}.{version % 1000 // 10}, sm_80 and sm_90a)"


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def pointer(t: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> int:
    """The device pointer of ``t`` after the checks the kernels rely on (CUDA, contiguous, dtype)."""
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t.data_ptr()
