"""Statistics files, ``cusprun-stats/1``: the Gram matrices closed-form compensation needs.

``python -m cusprun.score --stats`` (``cusprun.score(..., stats=True)``) writes, beside each score file
``NAME.safetensors``, a file ``NAME.stats.safetensors`` readable with plain ``safetensors``:

* ``model.layers.{l}.self_attn.o_proj.gram`` float32 [heads·head_dim, heads·head_dim] and
  ``model.layers.{l}.mlp.down_proj.gram`` float32 [intermediate, intermediate]: G = Σ_t x_t x_tᵀ over
  every token of every scored document, x_t the projection's input in the unpruned forward pass
  (summed in float64, stored in float32);
* metadata: ``format`` = ``cusprun-stats/1``, ``n_docs``, and ``scores``: the fingerprint of the score file
  they belong to (:meth:`cusprun.scores.scoreset.ScoreSet.fingerprint`: sha256 of the config hash and of every
  score), checked when they are loaded, so statistics of other documents are never used.

Disk: intermediate² + (heads·head_dim)² floats per layer (SmolLM2-135M: 320 MB per corpus; Llama-3-8B:
28 GB; Llama-3-70B: 3.6 GB per layer, 285 GB per corpus, twice that while the statistics file is written
beside the checkpoint it comes from). Host memory stays at one layer's matrices wherever a run can spill
(rank 0 of a torchrun job also receives every rank's sums of that layer): ``python -m cusprun.score``
writes each layer's into its per-layer checkpoint and streams the statistics file from there; a loaded
file (:class:`GramFiles`) and the sum of several corpora's (:class:`GramSum`, an intersection's
statistics) read one matrix per access; compensation asks for one layer's at a time (and refits a copy of
the model, so it needs twice the model's memory). The in-memory API, ``cusprun.score(model, docs,
stats=True)``, keeps them in memory: it holds the model too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.errors import CusprunError
from ..core.files import atomic_write
from ..core.neurons import Geometry, tensor_name
from .scorefile import write_safetensors

FORMAT = "cusprun-stats/1"
SUFFIX = ".gram"
# The output projections whose inputs' Gram matrices compensation needs (cusprun.experts.compensate).
STAT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


def gram_name(layer: int, proj: str) -> str:
    """``model.layers.{layer}.{proj}.gram``: the name of a Gram matrix in checkpoints and statistics files."""
    return tensor_name(layer, proj, SUFFIX.removeprefix("."))


def stats_path(score_path: str | Path) -> Path:
    """``NAME.stats.safetensors`` beside ``NAME.safetensors``."""
    path = Path(score_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".stats.safetensors")


def is_gram_name(name: str) -> bool:
    return name.endswith(SUFFIX)


def split_stats(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(scores, Gram matrices) of an engine result that may hold both."""
    scores = {n: t for n, t in tensors.items() if not is_gram_name(n)}
    grams = {n: t for n, t in tensors.items() if is_gram_name(n)}
    return scores, grams


class GramFiles(Mapping):
    """name -> Gram matrix (float32 [n, n]), read from safetensors files on access, one matrix at a time:
    what a statistics file or a run's per-layer checkpoints hold, without holding it in memory.

    ``paths``: the files; ``wanted`` picks the names taken from them. Names and shapes come from the files'
    headers (``shapes``), so a writer can lay out a whole file before reading any matrix. Each file's
    identity (inode, size, modification time) is recorded here: a file replaced or removed since, or a
    matrix that is not float32 or not finite, is a one-line :class:`CusprunError` when it is read.
    ``check_finite`` False: the run that just summed them reads them back (its own checkpoints)."""

    def __init__(self, paths: list[Path], wanted=lambda name: True, check_finite: bool = True):
        self.files, self.shapes, self._stamps, self.check_finite = {}, {}, {}, check_finite
        for path in paths:
            path = Path(path).resolve()
            with safe_open(str(path), "pt") as fh:
                for name in filter(wanted, fh.keys()):
                    info = fh.get_slice(name)
                    if info.get_dtype() != "F32":
                        raise CusprunError(f"{path}: {name} is {info.get_dtype()}, not F32")
                    self.files[name], self.shapes[name] = path, tuple(info.get_shape())
            self._stamps[path] = _stamp(path)

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self.files[name]
        try:
            if _stamp(path) != self._stamps[path]:
                raise OSError
            with safe_open(str(path), "pt") as fh:
                gram = fh.get_tensor(name)
        except Exception:  # noqa: BLE001 - replaced, removed or unreadable: the same one line
            raise CusprunError(f"{path} changed or vanished since it was opened: load the statistics again") from None
        if self.check_finite and not torch.isfinite(gram).all():
            raise CusprunError(f"{path}: {name} is not finite")
        return gram

    def __contains__(self, name) -> bool:  # Mapping's default would read the matrix
        return name in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


# How several corpora's Gram matrices are weighted in their sum (corpus_weights).
CORPUS_WEIGHTS = ("tokens", "equal")
DEFAULT_CORPUS_WEIGHT = "tokens"


def corpus_weights(tokens: list[int], corpora: list[int] | None = None,
                   rule: str = DEFAULT_CORPUS_WEIGHT) -> list[float]:
    """Each part's weight in the sum of several corpora's Gram matrices (:class:`GramSum`).

    tokens: each part's calibration token count; corpora: how many corpora each part holds (default 1 each).
    ``tokens``: 1 each, the plain sum, so every calibration token weighs the same and a corpus by its token count
    (100 German documents outweigh 40 medical ones 2.5 : 1). ``equal``: every corpus the same share,
    w = n · T / (C · t) for a part of n corpora and t tokens among C corpora and T tokens, so the sum keeps
    the token count's total weight (the auto ridge rule, which counts tokens, stays meaningful). Parts whose
    token counts are unknown (0) are summed plainly."""
    if rule not in CORPUS_WEIGHTS:
        raise ValueError(f"corpus weight {rule!r}: expected one of {', '.join(CORPUS_WEIGHTS)}")
    corpora = corpora or [1] * len(tokens)
    if rule == "tokens" or not all(tokens):
        return [1.0] * len(tokens)
    total, count = sum(tokens), sum(corpora)
    return [n * total / (count * t) for n, t in zip(corpora, tokens)]


class GramSum(Mapping):
    """The element-wise sum of several corpora's statistics (the statistics of their documents together),
    each part times its weight (default 1; :func:`corpus_weights`), added when a matrix is asked for: the parts
    stay where they are (in memory or in files)."""

    def __init__(self, parts: list[Mapping], weights: list[float] | None = None):
        self.parts, self.weights = parts, weights or [1.0] * len(parts)
        self.shapes = {n: _shape(parts[0], n) for n in parts[0]}

    def __getitem__(self, name: str) -> torch.Tensor:
        return sum(part[name] if w == 1 else w * part[name] for part, w in zip(self.parts, self.weights))

    def __contains__(self, name) -> bool:  # Mapping's default would read and add the matrices
        return name in self.parts[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts[0])

    def __len__(self) -> int:
        return len(self.parts[0])


def _shape(grams: Mapping, name: str) -> tuple[int, ...]:
    """A matrix's shape without reading it where the mapping knows it (GramFiles, GramSum)."""
    shapes = getattr(grams, "shapes", None)
    return shapes[name] if shapes is not None else tuple(grams[name].shape)


def save_stats(path: str | Path, grams: Mapping[str, torch.Tensor], metadata: dict) -> None:
    """Write a statistics file atomically (float32 matrices, header in sorted order: equal sums give equal
    bytes), reading the matrices one at a time where ``grams`` is lazy (:class:`GramFiles`, :class:`GramSum`)."""
    meta = {**{k: str(v) for k, v in metadata.items()}, "format": FORMAT}
    shapes = {n: _shape(grams, n) for n in grams}
    atomic_write(path, lambda tmp: write_safetensors(tmp, grams, meta, shapes))


def load_stats(path: str | Path, fingerprint: str, geo: Geometry) -> GramFiles:
    """The Gram matrices of a statistics file that belongs to the score file of ``fingerprint`` and model
    geometry ``geo``, read lazily (:class:`GramFiles`); a broken, foreign or stale file is a one-line
    :class:`CusprunError` here, before any matrix is read (a matrix that is not finite: when it is read)."""
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        grams = GramFiles([Path(path)])
    except CusprunError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one line
        raise CusprunError(f"{path}: not a readable statistics file ({type(exc).__name__})") from None
    if meta.get("format") != FORMAT:
        raise CusprunError(f"{path}: not a {FORMAT} file")
    if meta.get("scores") != fingerprint:
        raise CusprunError(f"{path} does not belong to its score file (another model, corpus or documents): "
                           "score again with --stats")
    for layer in range(geo.layers):
        for proj in STAT_PROJECTIONS:
            n, name = geo.shape[proj][1], gram_name(layer, proj)
            if grams.shapes.get(name) != (n, n):
                raise CusprunError(f"{path}: {name} missing or not [{n}, {n}]")
    return grams
