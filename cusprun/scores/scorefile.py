"""The score file, ``cusprun-scores/1``: the interchange format between scoring and pruning.

A safetensors file with, for every decoder layer l and projection P, ``model.layers.{l}.{P}.rows``
(float32 [n_docs, out_features]) and ``model.layers.{l}.{P}.cols`` (float32 [n_docs, in_features]),
for every layer ``model.layers.{l}.block_influence`` (float32 [n_docs, 1], see
:func:`cusprun.core.neurons.influence_name`; files written before it lack it, and only dropping layers needs it),
and string metadata (``__metadata__``): format, measure, model, config_hash, corpus, corpus_sha256,
n_docs, token_counts (JSON list), skipped (JSON list), architecture (JSON object: the config fields
that fix every tensor's shape), cusprun_version and the scoring options. An intersection of several
corpora's sets (:meth:`cusprun.ScoreSet.intersect`) holds all their documents and lists them in parts
(JSON list of {corpus, corpus_sha256, n_docs}). Baseline scorers (:mod:`cusprun.scores.baselines`) record
their ``method`` (also as ``measure``) and, where a method needs them, ``prunable`` (JSON list of
the groups, e.g. ``mlp.down_proj.cols``, a selection may choose) or ``granularity: layer`` with
``block_influence`` (JSON list, one value per layer) for whole-layer removal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..core.errors import CusprunError
from ..core.files import atomic_write
from ..core.neurons import architecture, config_hash
from ..core.version import __version__

FORMAT = "cusprun-scores/1"
JSON_FIELDS = ("token_counts", "skipped", "architecture", "parts", "prunable", "block_influence")


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str],
                      shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """A float32 safetensors file (tensors converted) with its header in sorted order, so that equal contents give equal
    bytes (the safetensors library writes metadata in hash-map order, which varies run to run).

    With ``shapes`` (name -> shape) the header is laid out from them and each tensor is read from
    ``tensors`` only when its bytes are written, so a lazy mapping is never held in memory whole."""
    names = sorted(tensors)
    shapes = {n: tuple(tensors[n].shape) for n in names} if shapes is None else shapes
    header, offset = {"__metadata__": dict(sorted(metadata.items()))}, 0
    for name in names:
        size = math.prod(shapes[name]) * 4
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for name in names:
            t = tensors[name].detach().to("cpu", torch.float32).contiguous()
            if tuple(t.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: expected shape {list(shapes[name])}, got {list(t.shape)}")
            fh.write(t.numpy().data)  # the buffer itself, not a copy of it
            del t  # freed before the next tensor is read, so two are never held at once


def score_metadata(config, *, measure: str, model: str, corpus: str, n_docs: int, token_counts, skipped=(),
                   method: str | None = None, **fields) -> dict:
    """The metadata of a score file, built in this one place for every scorer (the engine's and the
    baselines'): what was scored (model, its config hash and architecture, corpus, documents and their
    token counts) and how (measure or method, and the options given as ``fields``, e.g. max_tokens,
    dtype, backend, corpus_sha256, prunable)."""
    meta = {"measure": measure, "model": model, "config_hash": config_hash(config),
            "architecture": architecture(config), "corpus": corpus, "n_docs": n_docs,
            "token_counts": list(token_counts), "skipped": list(skipped), "cusprun_version": __version__}
    if method is not None:
        meta["method"] = method
    meta.update(fields)
    return meta


def save_scores(path: str | Path, scores: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write a score file atomically. JSON-valued metadata fields are serialized here."""
    meta = {}
    for key, value in {**metadata, "format": FORMAT}.items():
        meta[key] = json.dumps(value) if key in JSON_FIELDS else str(value)
    tensors = {k: v.float() for k, v in scores.items()}
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, meta))


def load_scores(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a score file: (tensors, metadata with JSON fields decoded)."""
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = dict(fh.metadata() or {})
    except (OSError, SafetensorError) as exc:
        raise CusprunError(f"cannot read score file {path}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CusprunError(f"{path} is not a {FORMAT} score file (format={meta.get('format')!r})")
    for key in JSON_FIELDS:
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                raise CusprunError(f"{path}: damaged score file (metadata {key} is not JSON)") from None
    _check_scores(path, tensors, meta)
    return tensors, meta


def _check_scores(path, tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    """What every reader relies on: a document count, one row per document (or per pooled corpus) in every
    tensor, and no NaN (it would rank arbitrarily and silently pick the neurons to remove; an infinite score
    still ranks, as the most relevant)."""
    if not str(meta.get("n_docs", "")).isdigit():
        raise CusprunError(f"{path}: damaged score file (n_docs {meta.get('n_docs')!r} is not a count)")
    rows = {t.shape[0] if t.dim() == 2 else None for t in tensors.values()}
    if not tensors or len(rows) != 1 or None in rows:
        raise CusprunError(f"{path}: damaged score file (tensors are not all [rows, features] with one row count)")
    bad = next((name for name, t in tensors.items() if t.isnan().any()), None)
    if bad is not None:
        raise CusprunError(f"{path}: {bad} holds NaN scores (score again, in float32)")
