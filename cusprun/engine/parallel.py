"""Several processes (``torchrun``): documents are split across ranks, results gathered on rank 0.

Every document is scored by exactly one rank with the same operations as in a single process,
so the gathered score file is bit-identical to a single-process run. A failure on any rank is
shared with all ranks at the next synchronization point, so the whole run fails with that rank's
error and nothing is written.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from ..core.errors import CusprunError


class Parallel:
    """Single process by default; under torchrun (WORLD_SIZE > 1) a torch.distributed group."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._dist = None
        if self.world > 1:
            import torch.distributed as dist

            if torch.cuda.is_available():
                # Kernels launch on the current device; without this every rank's would be cuda:0 (and NCCL
                # would map every rank to GPU 0 too).
                torch.cuda.set_device(self.local_rank)
            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                dist.init_process_group(backend, timeout=timedelta(minutes=30))
            self._dist = dist

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """Each rank takes its own GPU."""
        return f"cuda:{self.local_rank}" if requested.startswith("cuda") and self.world > 1 else requested

    def shard(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    def gather(self, local: dict[int, object]) -> dict[int, object] | None:
        """Merge every rank's {document index: result} on rank 0 (None elsewhere)."""
        if self._dist is None:
            return local
        parts = [None] * self.world if self.is_main else None
        self._dist.gather_object(local, parts, dst=0)
        return {k: v for p in parts for k, v in p.items()} if self.is_main else None

    def check(self, error: str | None) -> None:
        """Raise on every rank if any rank failed (the first failing rank's message)."""
        if self._dist is None:
            if error:
                raise CusprunError(error)
            return
        errors = [None] * self.world
        self._dist.all_gather_object(errors, error)
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            rank, message = failed[0]
            raise CusprunError(f"rank {rank}: {message}")

    def minimum(self, value: int) -> int:
        """The smallest ``value`` over all ranks (the layer every rank can resume from)."""
        if self._dist is None:
            return value
        values = [None] * self.world
        self._dist.all_gather_object(values, value)
        return min(values)

    def barrier(self) -> None:
        if self._dist is not None:
            self._dist.barrier()

    def close(self) -> None:
        if self._dist is not None and self._dist.is_initialized():
            self._dist.destroy_process_group()
