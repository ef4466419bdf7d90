"""torchrun ranks make their own GPU current before any launch (kernels run on the current device)."""

import torch
import torch.distributed as dist

from cusprun.engine.parallel import Parallel


def test_each_rank_sets_its_local_gpu_current(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append(("init", backend)))
    p = Parallel()
    assert calls == [("set_device", 1), ("init", "nccl")]  # before NCCL binds the rank to a GPU
    assert p.device("cuda") == "cuda:1"
