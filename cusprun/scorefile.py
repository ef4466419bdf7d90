"""The score file, ``cusprun-scores/1``: the interchange format between scoring and pruning.

A safetensors file with, for every decoder layer l and projection P, ``model.layers.{l}.{P}.rows``
(float32 [n_docs, out_features]) and ``model.layers.{l}.{P}.cols`` (float32 [n_docs, in_features]),
and string metadata (``__metadata__``): format, measure, model, config_hash, corpus, corpus_sha256,
n_docs, token_counts (JSON list), skipped (JSON list), architecture (JSON object: the config fields
that fix every tensor's shape), cusprun_version and the scoring options. An intersection of several
corpora's sets (:meth:`cusprun.ScoreSet.intersect`) holds all their documents and lists them in parts
(JSON list of {corpus, corpus_sha256, n_docs}). Baseline scorers (:mod:`cusprun.baselines`) record
their ``method`` (also as ``measure``) and, where a method needs them, ``prunable`` (JSON list of
the groups, e.g. ``mlp.down_proj.cols``, a selection may choose) or ``granularity: layer`` with
``block_influence`` (JSON list, one value per layer) for whole-layer removal.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import CusprunError

FORMAT = "cusprun-scores/1"
JSON_FIELDS = ("token_counts", "skipped", "architecture", "parts", "prunable", "block_influence")


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` as the user's umask leaves it: what open() would have given (mkstemp/mkdtemp give 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A float32 safetensors file with its header in sorted order, so that equal contents give equal
    bytes (the safetensors library writes metadata in hash-map order, which varies run to run)."""
    header, offset, names = {"__metadata__": dict(sorted(metadata.items()))}, 0, sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype != torch.float32:
            raise ValueError(f"{name}: score tensors are float32")
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * 4]}
        offset += t.numel() * 4
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for name in names:
            fh.write(tensors[name].detach().cpu().contiguous().numpy().tobytes())


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
            meta[key] = json.loads(meta[key])
    return tensors, meta
