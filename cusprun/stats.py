"""Statistics files, ``cusprun-stats/1``: the Gram matrices closed-form compensation needs.

``python -m cusprun.score --stats`` (``cusprun.score(..., stats=True)``) writes, beside each score file
``NAME.safetensors``, a file ``NAME.stats.safetensors`` readable with plain ``safetensors``:

* ``model.layers.{l}.self_attn.o_proj.gram`` float32 [heads·head_dim, heads·head_dim] and
  ``model.layers.{l}.mlp.down_proj.gram`` float32 [intermediate, intermediate]: G = Σ_t x_t x_tᵀ over
  every token of every scored document, x_t the projection's input in the unpruned forward pass
  (summed in float64, stored in float32);
* metadata: ``format`` = ``cusprun-stats/1``, ``n_docs``, and ``scores``: the fingerprint of the score file
  they belong to (:meth:`cusprun.scoreset.ScoreSet.fingerprint`: sha256 of the config hash and of every
  score), checked when they are loaded, so statistics of other documents are never used.

Memory and disk: intermediate² + (heads·head_dim)² floats per layer (SmolLM2-135M: 320 MB per corpus;
Llama-3-8B: 28 GB; Llama-3-70B: 3.3 GB per layer for down_proj). The scoring run holds them in host memory
until it writes them, so today they are practical up to 8B-class models. Statistics of several corpora add
up (an intersection's are the sum).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CusprunError
from .files import atomic_write
from .neurons import Geometry, tensor_name
from .scorefile import write_safetensors

FORMAT = "cusprun-stats/1"
SUFFIX = ".gram"
# The output projections whose inputs' Gram matrices compensation needs (cusprun.compensate).
STAT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


def gram_name(layer: int, proj: str) -> str:
    """``model.layers.{layer}.{proj}.gram``: the name of a Gram matrix in checkpoints and statistics files."""
    return tensor_name(layer, proj, SUFFIX.removeprefix("."))


def stats_path(score_path: str | Path) -> Path:
    """``NAME.stats.safetensors`` beside ``NAME.safetensors``."""
    path = Path(score_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".stats.safetensors")


def split_stats(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(scores, Gram matrices) of an engine result that may hold both."""
    scores = {n: t for n, t in tensors.items() if not n.endswith(SUFFIX)}
    grams = {n: t for n, t in tensors.items() if n.endswith(SUFFIX)}
    return scores, grams


def save_stats(path: str | Path, grams: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write a statistics file atomically (float32, header in sorted order: equal sums give equal bytes)."""
    meta = {**{k: str(v) for k, v in metadata.items()}, "format": FORMAT}
    tensors = {n: g.to(torch.float32) for n, g in grams.items()}
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, meta))


def load_stats(path: str | Path, fingerprint: str, geo: Geometry) -> dict[str, torch.Tensor]:
    """The Gram matrices of a statistics file that belongs to the score file of ``fingerprint`` and model
    geometry ``geo``; a broken, foreign or stale file is a one-line :class:`CusprunError`."""
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            grams = {n: fh.get_tensor(n) for n in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one line
        raise CusprunError(f"{path}: not a readable statistics file ({type(exc).__name__})") from None
    if meta.get("format") != FORMAT:
        raise CusprunError(f"{path}: not a {FORMAT} file")
    if meta.get("scores") != fingerprint:
        raise CusprunError(f"{path} does not belong to its score file (another model, corpus or documents): "
                           "score again with --stats")
    for layer in range(geo.layers):
        for proj in STAT_PROJECTIONS:
            n = geo.shape[proj][1]
            g = grams.get(gram_name(layer, proj))
            if g is None or g.shape != (n, n) or not torch.isfinite(g).all():
                raise CusprunError(f"{path}: {gram_name(layer, proj)} missing, not [{n}, {n}] or not finite")
    return grams
