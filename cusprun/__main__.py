"""``python -m cusprun [--verify]``: environment report (versions, backends and why any is unavailable, and
the cached verdicts of the backends' checks); ``--verify`` checks every available backend now."""

from __future__ import annotations

import importlib.metadata
import sys

from .core.errors import OneLineArgumentParser, run_cli


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    ap = OneLineArgumentParser(prog="python -m cusprun", description=__doc__)
    ap.add_argument("--verify", action="store_true",
                    help="check every available compiled backend against the torch reference now, caching verdicts")
    args = ap.parse_args(argv)
    import torch

    import cusprun
    from cusprun_kernels.backend import BACKENDS, backend_status, cached_verdicts, requested_backend, verify_now

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
    if args.verify:
        results = verify_now()
        if not results:
            print("verify: no compiled backend can run here (nothing to check)")
        for op, name, case, problem in results:
            print(f"verify: {op} {name} {case}: {'passed' if problem is None else problem}")
    mine, others = cached_verdicts()
    print(f"verdicts       {len(mine)} cached for this GPU and versions"
          f"{f', {others} for other GPUs or versions (unused)' if others else ''}")
    for what, problem in mine:
        print(f"verdict: {what}: {'passed' if problem is None else problem}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
