"""Per-layer checkpoints of a scoring run, next to ``--out``: an interrupted run (kill -9 included)
resumes at the first unfinished layer and writes a bit-identical score file.

``OUT/.cusprun-checkpoint/NAME/``: ``fingerprint.json`` (what the run depends on, and a digest of the model's
weights), one
``layer-{l}.safetensors`` of scores (and, with statistics, Gram matrices) per finished layer (rank 0), and
each rank's hidden states after its last finished layer. Every file is written atomically; a checkpoint
made from different inputs is refused, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core.errors import CusprunError
from ..core.files import atomic_write
from ..scores.stats import GramFiles, is_gram_name


def fingerprint(**inputs) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class Checkpoint:
    """``fingerprint``: what the run depends on (:func:`fingerprint`); ``weights``: the model's weights digest
    (:func:`cusprun.core.models.weights_digest`), kept apart so that a checkpoint of other weights gets its own
    message."""

    def __init__(self, folder: Path, fingerprint: str, rank: int = 0, world: int = 1, weights: str = ""):
        self.folder, self.fp, self.rank, self.world, self.weights = folder, fingerprint, rank, world, weights

    def open(self) -> None:
        """Create the folder, or check that an existing one belongs to the same inputs and weights."""
        stamp = self.folder / "fingerprint.json"
        if stamp.exists():
            found = json.loads(stamp.read_text())
            if found.get("fingerprint") != self.fp:
                raise CusprunError(f"checkpoint {self.folder} was made from different inputs (model, corpus or "
                                   "options); delete it or choose another --out")
            if found.get("weights") != self.weights:  # same config and options, other weights (or an older run)
                raise CusprunError(f"checkpoint {self.folder} was made from other weights of this model (a changed or "
                                   f"replaced model file); delete {self.folder} to start over")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            stamp_text = json.dumps({"fingerprint": self.fp, "weights": self.weights}) + "\n"
            atomic_write(stamp, lambda tmp: Path(tmp).write_text(stamp_text))

    def _hidden(self, layer: int) -> Path:
        return self.folder / f"hidden-{layer}-rank{self.rank}-of-{self.world}.safetensors"

    def _scores(self, layer: int) -> Path:
        return self.folder / f"layer-{layer}.safetensors"

    def finished_layers(self) -> int:
        """How many leading layers are complete: their scores and this rank's hidden states after the last."""
        n = 0
        while self._scores(n).exists():
            n += 1
        while n > 0 and not self._hidden(n - 1).exists():
            n -= 1
        return n

    def save_hidden(self, layer: int, hidden: dict[int, torch.Tensor]) -> None:
        """This rank's hidden states after ``layer`` (written by every rank before rank 0 writes the scores)."""
        tensors = {str(i): h.contiguous().cpu() for i, h in hidden.items()}
        atomic_write(self._hidden(layer), lambda tmp: save_file(tensors, tmp))

    def save_scores(self, layer: int, scores: dict[str, torch.Tensor]) -> None:
        """The layer's scores (rank 0): from now on the layer counts as finished."""
        atomic_write(self._scores(layer), lambda tmp: save_file(scores, tmp))

    def drop_hidden(self, layer: int) -> None:
        if layer >= 0:
            self._hidden(layer).unlink(missing_ok=True)

    def load_hidden(self, layer: int) -> dict[int, torch.Tensor]:
        return {int(k): v for k, v in load_file(str(self._hidden(layer))).items()}

    def load_scores(self, layers: int) -> dict[str, torch.Tensor]:
        """The scores of the first ``layers`` layers, without their Gram matrices (see :meth:`grams`)."""
        out = {}
        for layer in range(layers):
            with safe_open(str(self._scores(layer)), "pt") as fh:
                out.update({n: fh.get_tensor(n) for n in fh.keys() if not is_gram_name(n)})
        return out

    def grams(self, layers: int) -> GramFiles:
        """The Gram matrices of the first ``layers`` layers (a run with statistics), read one at a time."""
        return GramFiles([self._scores(layer) for layer in range(layers)], is_gram_name, check_finite=False)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
