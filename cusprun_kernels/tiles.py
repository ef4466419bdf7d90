"""Tile schedules for packed documents: no tile spans two documents, so per-document sums need no atomics.

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


def row_tiles(offsets: torch.Tensor, block: int, device) -> Tiles:
    bounds = offsets.tolist()
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
