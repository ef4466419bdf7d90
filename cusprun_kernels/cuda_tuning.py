"""Choosing between implementations of one op by measuring them on the GPU at hand, once per shape.

The CUDA backend has two implementations of ``projection_energies`` (cuBLAS through torch plus
segmented reductions, and the fused tensor-core kernel); which is faster depends on the GPU and the
shape. The first call for a (GPU, op, shape class) times every candidate on the real inputs with CUDA
events and keeps the fastest; the choice is stored in a JSON cache so that later runs, and their
score files, use the same implementation (the two differ in the last bits). Like Triton's autotuner,
but persistent: delete the file (``CUSPRUN_CACHE_DIR``, default ``~/.cache/cusprun``) to measure
again. ``CUSPRUN_CUDA_<OP>=<variant>`` (e.g. ``CUSPRUN_CUDA_PROJECTION_ENERGIES=fused``) forces one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .cache import cache_dir, load, store

REPS = 3
_chosen: dict[tuple[str, str], str] = {}  # (cache file, key) -> variant: the file is read once per key and process


def token_bucket(n_tokens: int) -> int:
    """The power of two (at least 64) a token count rounds up to: counts within a factor of 2 share a choice."""
    return 1 << max(6, (n_tokens - 1).bit_length())


def cache_path() -> Path:
    return cache_dir() / "cuda_tuning.json"


def cuda_event_ms(fn: Callable[[], object]) -> float:
    """Best of REPS timed calls after one warm-up, in milliseconds (CUDA events on the current stream)."""
    import torch

    fn()
    best = float("inf")
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def choose(op: str, shape_key: str, candidates: dict[str, Callable[[], object]], *, device_name: str,
           timer: Callable[[Callable[[], object]], float] = cuda_event_ms) -> str:
    """The name of the candidate to use for ``op`` at ``shape_key`` on ``device_name``: forced by
    ``CUSPRUN_CUDA_<OP>``, else cached, else measured now (each candidate called on the real inputs)."""
    env = f"CUSPRUN_CUDA_{op.upper()}"
    forced = os.environ.get(env, "auto").strip().lower() or "auto"
    if forced != "auto":
        if forced not in candidates:
            raise ValueError(f"{env}={forced}: choose auto or one of {', '.join(candidates)}")
        return forced
    path, key = cache_path(), f"{device_name}|{op}|{shape_key}"
    memo = (str(path), key)
    if memo not in _chosen:
        entry = load(path).get(key)
        if entry is not None and entry.get("variant") in candidates:
            _chosen[memo] = entry["variant"]
        else:
            ms = {name: timer(fn) for name, fn in candidates.items()}
            _chosen[memo] = min(ms, key=ms.get)
            try:
                store(path, key, {"variant": _chosen[memo], "ms": ms})
            except OSError:  # a read-only home still runs; the next process measures again
                pass
    return _chosen[memo]
