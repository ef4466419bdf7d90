"""Hidden states of every document between layers: on the device while they fit, then in host
memory, then on disk — so a corpus larger than device memory can still be carried layer by layer."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class HiddenStore:
    def __init__(self, device: torch.device, device_budget: float, host_budget: float):
        self.device, self.device_budget, self.host_budget = device, device_budget, host_budget
        self._spill: Path | None = None
        self._items: dict[int, torch.Tensor | Path] = {}
        self._bytes = {"device": 0, "host": 0}

    def _where(self, t: torch.Tensor) -> str:
        return "host" if t.device.type == "cpu" and self.device.type != "cpu" else "device"

    def put(self, index: int, t: torch.Tensor) -> None:
        self.drop(index)
        size = t.numel() * t.element_size()
        if self._bytes["device"] + size <= self.device_budget:
            self._items[index] = t
            self._bytes["device"] += size
        elif self.device.type != "cpu" and self._bytes["host"] + size <= self.host_budget:
            self._items[index] = t.to("cpu")
            self._bytes["host"] += size
        else:
            if self._spill is None:
                self._spill = Path(tempfile.mkdtemp(prefix="cusprun-hidden-"))
            path = self._spill / f"{index}.safetensors"
            save_file({"h": t.contiguous().cpu()}, str(path))
            self._items[index] = path

    def get(self, index: int) -> torch.Tensor:
        item = self._items[index]
        if isinstance(item, Path):
            return load_file(str(item))["h"].to(self.device)
        return item.to(self.device)

    def drop(self, index: int) -> None:
        item = self._items.pop(index, None)
        if isinstance(item, torch.Tensor):
            self._bytes[self._where(item)] -= item.numel() * item.element_size()
        elif isinstance(item, Path):
            item.unlink(missing_ok=True)

    def close(self) -> None:
        self._items.clear()
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
