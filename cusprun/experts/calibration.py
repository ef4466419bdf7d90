"""Build-time calibration: the refit's Gram matrices computed in ``prune``, one decoder layer at a time.

``prune`` refits o_proj and down_proj over the kept columns (:mod:`cusprun.experts.compensate`) from the
Gram matrices G = XᵀX of their inputs over calibration documents. Instead of reading them from statistics
files (``score --stats``: intermediate² floats per layer, 285 GB per corpus for Llama-3-70B), :func:`refit_layers`
makes them here, in one layer-major pass over the documents the score files were made from
(:func:`calibration_documents`): every document passes decoder layer l, the layer is refit, and only then is
layer l + 1 touched. Of each refit projection keeping K of its n inputs, the pass sums X_Kᵀ X_K [K, K] (the
``gram`` op) and X_Kᵀ Y [K, out] with its dense output Y = X Wᵀ (= G[K, :] Wᵀ): all the refit needs
(:func:`cusprun.experts.compensate.refit_from_moments`), K² + K·out floats instead of n². The hidden states
between layers live in the engine's :class:`~cusprun.engine.hidden_store.HiddenStore`; with a streamed source
only one layer's weights and one layer's moments are ever in memory, and nothing of intermediate² size is
written to disk.

Two refits (``--refit``):

* ``independent``: every layer's inputs come from the dense model (the layer-major pass carries the dense
  model's hidden states), as ``score --stats`` statistics hold them: each layer is refit as if every other
  layer were unpruned.
* ``sequential``: every block (attention, MLP) takes its inputs from the pruned and refit blocks below it,
  and its target is what the block's dense weights compute on those inputs (as SparseGPT fits each layer on
  the inputs the already pruned layers give it). The Gram matrix is then that of the pruned model's own
  inputs, G̃ = X̃ᵀX̃, and the refit formula is unchanged: W'_K = (W G̃[:, K] + W_K Λ)(G̃[K, K] + Λ)⁻¹. A layer
  costs two forward passes (three where o_proj is refit too): one for the moments, one through the pruned
  and refit layer for the hidden states the next layer takes. (An earlier attempt, docs/expert-quality.md
  "Why the stretch goal is missed", fit down_proj from the pruned model's inputs to the *dense model's* MLP
  outputs instead.)

The default is ``sequential``: on SmolLM2 it gave the lower target perplexity in all 9 cells of the benchmark
(25/35/45%, one to three dimensions; docs/experts.md "Sequential refit"), for a calibration pass of about 1.6x
the independent one's time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import cusprun_kernels as ops

from ..core.corpus import corpus_sha256, read_corpus, tokenize
from ..core.errors import CusprunError
from ..core.neurons import PROJECTIONS, tensor_name
from ..core.progress import advance, progress_bar
from ..engine.hidden_store import HiddenStore
from ..engine.sources import LayerSource, layer_mask
from ..scores.scoreset import ScoreSet
from ..scores.stats import STAT_PROJECTIONS
from .compensate import DEFAULT_RIDGE, refit_from_moments

REFITS = ("independent", "sequential")
DEFAULT_REFIT = "sequential"
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def dimension_name(score_path: str | Path) -> str:
    """A score file's dimension: its corpus name, ``de`` for ``scores/de.safetensors``."""
    return Path(score_path).name.removesuffix(".safetensors")


def check_refit_scores(sets: list[ScoreSet], paths) -> None:
    """--compensate needs Cus-Prun's score files: the baselines' name no calibration of their own to refit on."""
    for score_set, path in zip(sets, paths):
        method = score_set.metadata.get("method", "cusprun")
        if method != "cusprun":
            raise CusprunError(f"--compensate refits Cus-Prun's experts; {path} holds {method} scores (prune without "
                               "--compensate)")


def parse_calibration(values: list[str], score_paths) -> dict[str, str]:
    """``--calibration NAME=PATH`` values -> {dimension: corpus path}; NAME must be a score file's dimension."""
    known = [dimension_name(p) for p in score_paths]
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise CusprunError(f"--calibration {value!r}: expected NAME=PATH")
        if name not in known:
            raise CusprunError(f"--calibration {value!r}: no score file of dimension {name!r} (the score files' "
                               f"dimensions: {', '.join(known)})")
        if name in out:
            raise CusprunError(f"--calibration: dimension {name!r} is given twice")
        out[name] = path
    return out


@dataclass(frozen=True)
class Calibration:
    """The calibration documents (token ids, every dimension's in order) and where they came from."""

    documents: list[list[int]]
    corpora: dict[str, str]  # dimension -> corpus path

    @property
    def tokens(self) -> int:
        return sum(map(len, self.documents))


def calibration_documents(sets: list[ScoreSet], score_paths, tokenizer, vocab_size: int,
                          overrides: Mapping[str, str] | None = None) -> Calibration:
    """Every dimension's calibration documents, tokenized as its score file's run did (its ``max_tokens``):
    the corpus the score file names, which must still hash to the sha256 it records, or ``overrides[dimension]``
    (``--calibration``), taken as given. One line and exit 2 for a missing or changed corpus."""
    overrides = overrides or {}
    documents, corpora = [], {}
    for score_set, path in zip(sets, score_paths):
        meta, name = score_set.metadata, dimension_name(path)
        max_tokens = int(meta.get("max_tokens") or 0) or None
        corpus = overrides.get(name)
        if corpus is None:
            corpus, recorded = meta.get("corpus"), meta.get("corpus_sha256")
            hint = f"give it with --calibration {name}=PATH, or prune with --no-compensate"
            if not corpus or not recorded:
                raise CusprunError(f"{path} records no calibration corpus file (scored through the Python API?): "
                                   f"{hint}")
            if not Path(corpus).exists():
                raise CusprunError(f"calibration corpus {corpus} (recorded in {path}) not found: {hint}")
            if corpus_sha256(corpus) != recorded:
                raise CusprunError(f"calibration corpus {corpus} differs from the one {path} was scored on "
                                   f"(sha256 changed): {hint}")
        elif not Path(corpus).exists():
            raise CusprunError(f"--calibration {name}={corpus}: corpus not found")
        ids = [t for t in tokenize(read_corpus(corpus), tokenizer, max_tokens or 1 << 62, vocab_size) if t]
        if not ids:
            raise CusprunError(f"calibration corpus {corpus} has no document with tokens")
        documents += ids
        corpora[name] = str(corpus)
    return Calibration(documents, corpora)


def _layer_keeps(plan, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {proj: (plan[tensor_name(index, proj, "rows")], plan[tensor_name(index, proj, "cols")])
            for proj in PROJECTIONS}


def refit_projections(plan, index: int) -> list[str]:
    """The output projections of layer ``index`` the refit changes: some, not all, of their columns kept."""
    out = []
    for proj in STAT_PROJECTIONS:
        keep = plan[tensor_name(index, proj, "cols")]
        if keep.any() and not keep.all():
            out.append(proj)
    return out


@torch.no_grad()
def mask_block(layer: torch.nn.Module, plan, index: int, projections) -> None:
    """Zero, in place, the rows (and their biases) and columns ``plan`` removes from ``projections`` of decoder
    layer ``index``: the block as the masked model computes it."""
    for proj, (rows, cols) in _layer_keeps(plan, index).items():
        if proj not in projections or (rows.all() and cols.all()):
            continue
        linear = layer.get_submodule(proj)
        linear.weight[~rows.to(linear.weight.device)] = 0
        linear.weight[:, ~cols.to(linear.weight.device)] = 0
        if linear.bias is not None:
            linear.bias[~rows.to(linear.bias.device)] = 0


class _Moments:
    """While installed (``with``): for each output projection in ``keeps`` (name -> keep mask of its input
    columns), X_Kᵀ X_K of its kept inputs (the ``gram`` op, float32 per document, float64 sums) and X_Kᵀ Y with
    its output Y (without bias), what :func:`cusprun.experts.compensate.refit_from_moments` takes."""

    def __init__(self, layer: torch.nn.Module, keeps: Mapping[str, torch.Tensor]):
        self.layer, self.keeps, self.moments, self._handles = layer, dict(keeps), {}, []

    def _hook(self, proj: str):
        kept = None

        def hook(module, args, output):
            nonlocal kept
            if kept is None:
                kept = self.keeps[proj].to(output.device).nonzero().flatten()
            x = args[0].reshape(-1, args[0].shape[-1])[:, kept]
            y = output.reshape(-1, output.shape[-1])
            if module.bias is not None:
                y = y - module.bias
            g, xy = ops.gram(x), x.T.float() @ y.float()  # float32 per document
            if proj in self.moments:
                _accumulate(self.moments[proj][0], g)
                _accumulate(self.moments[proj][1], xy)
            else:
                self.moments[proj] = (g.double(), xy.double())
        return hook

    def __enter__(self):
        self._handles = [self.layer.get_submodule(p).register_forward_hook(self._hook(p)) for p in self.keeps]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def _accumulate(total: torch.Tensor, part: torch.Tensor, rows: int = 1024) -> None:
    """total (float64) += part (float32), ``rows`` rows at a time: a mixed-dtype ``add_`` widens the whole of
    ``part`` first, 3.7 GB for Llama-3-70B's down_proj Gram at 25%, where a block of 1024 rows widens 0.18 GB."""
    for start in range(0, total.shape[0], rows):
        total[start:start + rows].add_(part[start:start + rows])


def _forward(source: LayerSource, layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One document [1, L, hidden] through one decoder layer, as the model's own forward (and the engine) run it."""
    position_ids = torch.arange(h.shape[1], device=h.device)[None]
    return layer(h, attention_mask=layer_mask(source.config, layer.self_attn, h, position_ids),
                 position_embeddings=source.rotary(h, position_ids), position_ids=position_ids, use_cache=False)


def _pass(source, layer, hidden: HiddenStore, docs: range, keeps=None, keep_outputs: bool = False,
          on_document: Callable[[int], None] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every document through ``layer``: the moments of the projections in ``keeps`` (:class:`_Moments`); with
    ``keep_outputs`` the hidden states replaced by the layer's outputs."""
    with _Moments(layer, keeps or {}) as hooks:
        for i in docs:
            out = _forward(source, layer, hidden.get(i))
            if keep_outputs:
                hidden.put(i, out)
            if on_document is not None:
                on_document(i)
    return hooks.moments


@torch.no_grad()
def _refit_in_place(layer, proj: str, moments: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor, ridge: float,
                    scale: str) -> None:
    refit_from_moments(layer.get_submodule(proj).weight, *moments, keep, ridge, scale)  # written in place


@torch.no_grad()
def refit_layers(source: LayerSource, plan, documents: list[list[int]], mode: str = DEFAULT_REFIT,
                 ridge: float = DEFAULT_RIDGE, scale: str = "per-input",
                 on_layer: Callable[[int, torch.nn.Module], None] | None = None,
                 on_document: Callable[[int, int], None] | None = None,
                 device_budget: float = float("inf"), host_budget: float = float("inf")) -> None:
    """Refit, layer by layer, the output projections ``plan`` (keep masks) prunes, from Gram matrices of
    ``documents`` (token ids) made here (module docstring; ``mode``: one of :data:`REFITS`; ``scale``: a
    resolved ridge scale, ``per-input`` or ``mean``). Each decoder layer of ``source`` is refit in place and
    handed to ``on_layer(index, layer)`` before :meth:`LayerSource.release` and before the next layer is read
    (with ``sequential`` it is masked too; ``independent`` leaves the removed weights as they were).
    ``on_document(layer, document)`` follows progress."""
    if mode not in REFITS:
        raise ValueError(f"refit must be one of {REFITS}, got {mode!r}")
    plan = getattr(plan, "plan", plan)
    hidden = HiddenStore(source.device, device_budget, host_budget)
    docs = range(len(documents))
    try:
        for i in docs:
            hidden.put(i, source.embed(documents[i]))
        source.release_embedding()
        for index in range(source.config.num_hidden_layers):
            layer = source.layer(index)
            step = None if on_document is None else (lambda i, index=index: on_document(index, i))
            targets = refit_projections(plan, index)
            keep = {proj: plan[tensor_name(index, proj, "cols")] for proj in targets}
            if mode == "independent":  # one pass: the dense layer's moments and its outputs
                moments = _pass(source, layer, hidden, docs, keep, keep_outputs=True, on_document=step)
                for proj in targets:
                    _refit_in_place(layer, proj, moments.pop(proj), keep[proj], ridge, scale)
            else:
                for block, out_proj in ((ATTENTION, "self_attn.o_proj"), (MLP, "mlp.down_proj")):
                    if out_proj in targets:  # this block's dense weights on the inputs the pruned blocks give it
                        moments = _pass(source, layer, hidden, docs, {out_proj: keep[out_proj]})
                        _refit_in_place(layer, out_proj, moments.pop(out_proj), keep[out_proj], ridge, scale)
                    mask_block(layer, plan, index, block)
                _pass(source, layer, hidden, docs, keep_outputs=True, on_document=step)
            if on_layer is not None:
                on_layer(index, layer)
            source.release(index)
    finally:
        hidden.close()


def calibrate_in_memory(model, plan, calibration: Calibration, mode: str, ridge: float, scale: str,
                        quiet: bool = True) -> None:
    """:func:`refit_layers` on a loaded model (its layers refit in place), with a progress bar."""
    from ..engine.sources import InMemoryLayers

    with calibration_bar(calibration, model.config.num_hidden_layers, quiet) as step:
        refit_layers(InMemoryLayers(model), plan, calibration.documents, mode, ridge, scale, on_document=step)


@contextmanager
def calibration_bar(calibration: Calibration, layers: int, quiet: bool):
    """A token-counting progress bar of the calibration pass; yields the ``on_document`` callback."""
    docs = calibration.documents
    with progress_bar(calibration.tokens, "calibration", disable=quiet) as bar:
        yield lambda layer, doc: advance(bar, len(docs), layers, layer, doc, len(docs[doc]))


def refit_record(calibration: Calibration | None, mode: str) -> dict:
    """pruning.json's record of where the refit's statistics came from."""
    if calibration is None:
        return {"refit": "independent", "calibration": "statistics files (score --stats)"}
    return {"refit": mode, "calibration": {"corpora": calibration.corpora, "documents": len(calibration.documents),
                                           "tokens": calibration.tokens}}
