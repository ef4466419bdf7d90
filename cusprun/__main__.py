"""``python -m cusprun``: environment report (versions, backends and why any is unavailable)."""

from __future__ import annotations

import importlib.metadata
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> int:
    import torch

    import cusprun
    from cusprun_kernels.backend import BACKENDS, backend_status, requested_backend

    print(f"cusprun        {cusprun.__version__}")
    print(f"python         {sys.version.split()[0]}")
    for dist in ("torch", "triton", "transformers", "safetensors"):
        print(f"{dist:<15}{_version(dist)}")
    # optional: plots (python -m cusprun.plot), the Torch-Pruning adapter, lm-eval task definitions
    for dist in ("matplotlib", "torch-pruning", "lm-eval"):
        print(f"{dist:<15}{_version(dist)} (optional)")
    from cusprun_kernels.cuda_ext import describe

    print(f"cuda extension {describe()}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"gpu            {gpu}")
    print(f"CUSPRUN_BACKEND={requested_backend()}")
    for name in BACKENDS:
        reason = backend_status(name)
        print(f"  {name:<8} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
