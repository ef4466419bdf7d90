"""Device facts and device-correct launches, shared by the Triton and CUDA launchers.

Both Triton and the CUDA extension launch on torch's *current* device and stream. Nothing else sets
the current device: with ``--device cuda:1``, or on torchrun ranks ≥ 1, the tensors live on another
GPU than the current one, which gives an illegal-address fault or silent remote reads. Every launcher
therefore runs under :func:`launch_on` its tensors' device (and takes that device's current stream),
and checks that every tensor it hands to a kernel lives on that one device (:func:`require_same_device`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# Compute capability the tensor-core kernels (mma.sync TF32) need: Ampere or newer.
TENSOR_CORE_CAPABILITY = (8, 0)

# Shared memory one block may opt in to, per compute capability (CUDA programming guide, "Technical
# Specifications"): the AOT checks compile the Triton kernels against these without a GPU.
SHARED_MEMORY_PER_BLOCK = {(7, 5): 65_536, (8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376,
                           (9, 0): 232_448}


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    capability: tuple[int, int]
    shared_memory: int  # bytes one block may opt in to


def device_info(device: torch.device) -> DeviceInfo:
    """Name, compute capability and per-block shared-memory limit of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or SHARED_MEMORY_PER_BLOCK.get(
        (props.major, props.minor), 49_152)
    return DeviceInfo(props.name, (props.major, props.minor), int(shared))


def require_same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the first tensor that is not on ``device`` (a kernel reads one GPU's memory)."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, but the launch runs on {device}: all tensors must share "
                             f"one device")


@contextlib.contextmanager
def launch_on(device: torch.device):
    """Make ``device`` current for the launches inside; yields its current CUDA stream handle (0 off CUDA).

    The stream is the device's own current stream, so the kernels order with torch's work on it."""
    if device.type != "cuda":  # Triton's interpreter runs on the CPU: nothing to select
        yield 0
        return
    with torch.cuda.device(device):
        yield torch.cuda.current_stream(device).cuda_stream


def driver_version() -> int:
    """The CUDA version the installed NVIDIA driver supports (e.g. 12040), 0 where there is no driver."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    version = ctypes.c_int(0)
    return version.value if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else 0
