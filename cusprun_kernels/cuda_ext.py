"""The optional CUDA C++ extension (``cusprun_kernels._cuda``, built from csrc/): loading it, and why not.

The extension links only the CUDA runtime; launchers hand it device pointers, shapes, strides, the
tensors' device and that device's current stream (:func:`cusprun_kernels.devices.launch_on`).
:func:`extension` returns the module or the reason it cannot be used, which ``CUSPRUN_BACKEND=cuda``
and ``python -m cusprun`` report.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

BUILD_INFO = Path(__file__).with_name("_cuda_build.json")  # written by setup.py: built, skipped or failed, and why
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
INTERFACE_VERSION = 2  # csrc/kernels.h kInterfaceVersion: the entry-point signatures these launchers call


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
    built = getattr(_cuda, "interface_version", 1)
    if built != INTERFACE_VERSION:
        return None, (f"the CUDA extension at {_cuda.__file__} was built from other sources (interface {built}, "
                      f"these launchers need {INTERFACE_VERSION}); rebuild it (pip install -e .)")
    return _cuda, None


def cuda_version_text(version: int) -> str:
    """12040 -> "12.4" (CUDA's version encoding: 1000 major + 10 minor)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def device_problem(device_count: int, driver_version: int, runtime_version: int) -> str | None:
    """Why the extension sees no GPU, from what its CUDA runtime reports: none when it sees one.

    The runtime is linked statically (the module imports without a CUDA toolkit), so the driver must
    support at least the CUDA version the module was built with; an older driver makes every runtime
    call fail as if there were no GPU, which would be the wrong thing to tell the user."""
    if device_count > 0:
        return None
    if 0 < driver_version < runtime_version:
        return (f"the NVIDIA driver supports CUDA {cuda_version_text(driver_version)}, older than the CUDA "
                f"{cuda_version_text(runtime_version)} runtime the extension was built with (update the driver, "
                f"or rebuild with an older CUDA toolkit)")
    if driver_version == 0:
        return "no CUDA device is available (no NVIDIA driver found)"
    return "no CUDA device is available"


def status(device: str | torch.device = "cuda") -> str | None:
    """None when the CUDA kernels can run on tensors on ``device`` here, else the reason."""
    module, reason = extension()
    if module is None:
        return reason
    problem = device_problem(module.device_count(), module.driver_version(), module.cuda_runtime_version)
    if problem is not None or not torch.cuda.is_available():
        return f"the CUDA extension is built, but {problem or 'torch sees no CUDA device'}"
    device = torch.device(device)
    if device.type != "cuda":
        return "the CUDA extension runs on CUDA tensors only"
    from .devices import TENSOR_CORE_CAPABILITY

    capability = torch.cuda.get_device_capability(device)
    if capability < TENSOR_CORE_CAPABILITY:
        return (f"the CUDA kernels need compute capability {'.'.join(map(str, TENSOR_CORE_CAPABILITY))} or newer "
                f"(tensor cores: mma.sync TF32; the module holds sm_80 and sm_90a images); "
                f"{torch.cuda.get_device_name(device)} ({device}) is {capability[0]}.{capability[1]}")
    return None


def describe() -> str:
    """One line for the environment report: built (with its CUDA runtime) or why not."""
    module, reason = extension()
    if module is None:
        return f"not built: {reason.removeprefix('the CUDA extension ')}"
    version = module.cuda_runtime_version
    return f"built (CUDA runtime {cuda_version_text(version)}, sm_80 and sm_90a)"


def pointer(t: torch.Tensor, name: str, dtype: torch.dtype | None = None, device: torch.device | None = None) -> int:
    """The device pointer of ``t`` after the checks the kernels rely on (CUDA, on ``device`` when given,
    contiguous, dtype)."""
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the launch runs on {device}: all tensors must share one device")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t.data_ptr()
