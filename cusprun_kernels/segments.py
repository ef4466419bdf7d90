"""Packed documents: segment bounds built once per batch, and the tile tables kernels need.

A batch of documents is packed along the token axis: document d owns rows ``bounds[d]:bounds[d+1]``.
:class:`Segments` keeps the bounds on the host *and* on the device, and builds each tile table once
(cached per block size), so launching an op never reads offsets back from the device (a sync on a
GPU) nor uploads tables per call. The engine builds one per batch and hands it to every op.

Like variable-length flash attention, each document's rows are cut into tiles of at most ``block``
rows; a kernel program owns one tile and writes its partial sums to its own slot, and the partial
sums of a document's tiles are added in a fixed order — results are deterministic run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tiles:
    start: torch.Tensor  # [n_tiles] int32 first row of the tile
    end: torch.Tensor  # [n_tiles] int32 one past its last row
    doc_start: torch.Tensor  # [n_tiles] int32 first row of the tile's document
    doc_tiles: torch.Tensor  # [n_docs, max_tiles] int64 tile ids of each document, -1 padded

    @property
    def count(self) -> int:
        return self.start.numel()

    def per_document(self, partial: torch.Tensor) -> torch.Tensor:
        """[n_tiles, ...] partial sums -> [n_docs, ...] sums over each document's tiles, in tile order."""
        pad = torch.cat([partial, torch.zeros_like(partial[:1])])  # slot -1 reads zeros
        return pad[self.doc_tiles].sum(dim=1)


class Segments:
    """Document bounds of a packed batch: ``bounds`` (host ints, [n_docs + 1], from 0 to T) and
    ``offsets`` (int64 tensor on ``device``), with tile tables built once per block size."""

    def __init__(self, bounds, device=None):
        self.bounds = tuple(int(b) for b in bounds)
        if len(self.bounds) < 2 or self.bounds[0] != 0 or any(b > a for a, b in zip(self.bounds[1:], self.bounds)):
            raise ValueError(f"segment bounds must start at 0 and not decrease, got {list(self.bounds)}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.offsets = torch.tensor(self.bounds, dtype=torch.int64, device=self.device)
        self._tiles: dict[int, Tiles] = {}

    @classmethod
    def of_lengths(cls, lengths, device=None) -> Segments:
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + int(n))
        return cls(bounds, device)

    @property
    def n_docs(self) -> int:
        return len(self.bounds) - 1

    @property
    def total(self) -> int:
        return self.bounds[-1]

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) of each document."""
        return list(zip(self.bounds[:-1], self.bounds[1:]))

    def tiles(self, block: int) -> Tiles:
        """Row tiles of at most ``block`` rows, none spanning two documents (built once, then cached)."""
        if block not in self._tiles:
            self._tiles[block] = _row_tiles(self.bounds, block, self.device)
        return self._tiles[block]


def as_segments(offsets, device=None) -> Segments:
    """A :class:`Segments` from itself, or from an offsets tensor / sequence (read to the host once)."""
    if isinstance(offsets, Segments):
        return offsets
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 1:
            raise ValueError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
        return Segments(offsets.tolist(), device if device is not None else offsets.device)
    return Segments(offsets, device)


def _row_tiles(bounds: tuple[int, ...], block: int, device) -> Tiles:
    start, end, doc_start, doc_tiles = [], [], [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        ids = []
        for t0 in range(s, e, block):
            ids.append(len(start))
            start.append(t0)
            end.append(min(e, t0 + block))
            doc_start.append(s)
        doc_tiles.append(ids)
    width = max(1, max(map(len, doc_tiles)))
    table = [ids + [-1] * (width - len(ids)) for ids in doc_tiles]

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)
    return Tiles(i32(start), i32(end), i32(doc_start), torch.tensor(table, dtype=torch.long, device=device))
