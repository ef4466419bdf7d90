"""``ScoreSet``: the scores of one corpus (or of several intersected), in memory.

A ScoreSet holds, for every decoder layer l and projection P, ``model.layers.{l}.{P}.rows`` and
``.cols`` as float32 [n_docs, features] tensors and each layer's ``block_influence`` [n_docs, 1] (files
written before it was recorded lack it), plus the metadata of a ``cusprun-scores/1`` file.
It is what :func:`cusprun.score` returns and what ``save``/``load`` write and read; ``relevance``,
``intersect`` and ``select`` are the paper's thresholding and intersection (see :mod:`.selection`).
Scored with ``stats``, a set also holds the Gram matrices compensation needs (``stats``, saved beside the
score file, see :mod:`.stats`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..core.neurons import Geometry, group_of, is_influence_name
from ..selection.algorithm import Selection, layer_influence, least_influential, relevance, select, select_layers
from .methods import method_of
from .scorefile import FORMAT, JSON_FIELDS, load_scores, save_scores
from .stats import DEFAULT_CORPUS_WEIGHT, GramSum, corpus_weights, load_stats, save_stats, split_stats, stats_path

GRANULARITIES = ("unit", "neuron")
# The group whose scores score each unit kind (cusprun.selection.units.unit_scores): a method whose scores cover
# only some groups (``prunable``) can select the kinds those groups score.
UNIT_GROUPS = {"heads": "self_attn.o_proj.cols", "channels": "mlp.down_proj.cols", "pairs": "self_attn.k_proj.rows"}


@dataclass(frozen=True)
class Neurons:
    """What a ``neurons`` choice lets a selection remove: ``groups`` (projection.side) for the per-neuron
    selection (None: every group), ``units`` (kinds of :mod:`.units`) for the unit selection."""

    groups: tuple[str, ...] | None
    units: tuple[str, ...]


_MLP_GROUPS = ("mlp.gate_proj.rows", "mlp.up_proj.rows", "mlp.down_proj.cols")
NEURONS = {"all": Neurons(None, ("heads", "channels")),
           "mlp": Neurons(_MLP_GROUPS, ("channels",)),
           "mlp+pairs": Neurons(_MLP_GROUPS + ("self_attn.q_proj.rows", "self_attn.k_proj.rows"),
                                ("channels", "pairs"))}


@dataclass
class ScoreSet:
    """Per-document relevance scores of every neuron: ``scores[name]`` is float32 [n_docs, features]."""

    scores: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    # ``model.layers.{l}.{proj}.gram`` [n, n], see .stats: a dict, or read on access (GramFiles, GramSum)
    stats: Mapping[str, torch.Tensor] | None = None

    def __post_init__(self):
        scores, grams = split_stats(self.scores)  # an engine result scored with stats holds both
        if grams:
            self.scores, self.stats = scores, {**(self.stats or {}), **grams}
        # as a file stores them: JSON fields decoded, every other value a string (so sets compare equal
        # whether they were just computed or loaded)
        self.metadata = {k: v if k in JSON_FIELDS else str(v) for k, v in self.metadata.items()}
        self.metadata.setdefault("format", FORMAT)

    @property
    def n_docs(self) -> int:
        return next(iter(self.scores.values())).shape[0]

    @property
    def corpora(self) -> list[str]:
        """Names of the corpora behind this set (several after :meth:`intersect`)."""
        return [p["corpus"] for p in self._parts()]

    def save(self, path: str | Path) -> Path:
        """Write a ``cusprun-scores/1`` file atomically (a temporary file renamed into place), and its
        statistics beside it (``NAME.stats.safetensors``) when the set holds them; an older statistics file
        there is removed otherwise, so it can never pass for these scores' statistics."""
        if self.stats:
            save_stats(stats_path(path), self.stats, {"n_docs": self.n_docs, "scores": self.fingerprint()})
        else:
            stats_path(path).unlink(missing_ok=True)
        save_scores(path, self.scores, self.metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, stats: bool = False) -> ScoreSet:
        """A score file; with ``stats``, also its statistics (``NAME.stats.safetensors``) when they lie beside it
        and belong to these scores (same model, corpus and documents), else a one-line :class:`CusprunError`."""
        tensors, meta = load_scores(path)
        grams = None
        if stats and stats_path(path).is_file():
            loaded = cls(tensors, meta)
            grams = load_stats(stats_path(path), loaded.fingerprint(), loaded.geometry())
        return cls(tensors, meta, grams)

    def fingerprint(self) -> str:
        """sha256 of the model's config hash and of every score (float32 bytes, tensors in name order): what
        a statistics file must have been collected with."""
        h = hashlib.sha256(str(self.metadata.get("config_hash", "")).encode())
        for name in sorted(self.scores):
            h.update(name.encode() + self.scores[name].float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def relevance(self, rule: str = "all-docs") -> dict[str, torch.Tensor]:
        """R(n) per tensor name, float64 [features]. Under the paper's rule ``all-docs`` (default): the
        maximum within-group rank fraction of each neuron over all documents; a neuron is irrelevant at
        threshold σ when R(n) < σ. Other rules (``mean-rank``, ``pooled``) aggregate each corpus of the
        set alone, then take the maximum over corpora (see :mod:`cusprun.selection.algorithm`)."""
        neurons = [{n: t for n, t in part.items() if not is_influence_name(n)} for part in self._per_corpus()]
        return relevance(neurons, rule)

    def _per_corpus(self) -> list[dict[str, torch.Tensor]]:
        sizes = [int(p.get("n_docs", 0)) for p in self._parts()]
        if sum(sizes) != self.n_docs or 0 in sizes:  # parts not recorded per corpus: one corpus
            sizes = [self.n_docs]
        chunks = {name: t.split(sizes) for name, t in self.scores.items()}
        return [{name: c[i] for name, c in chunks.items()} for i in range(len(sizes))]

    def intersect(self, *others: ScoreSet, corpus_weight: str = DEFAULT_CORPUS_WEIGHT) -> ScoreSet:
        """The set whose irrelevant neurons, at any σ, are those irrelevant to every given set.

        Irrelevant to all ⟺ below σ in every document of every set, so this is the sets' documents
        together; its relevance is the element-wise maximum of the members' relevance. Its statistics are the
        sets' summed, each weighted by ``corpus_weight`` (:func:`~.stats.corpus_weights`: ``tokens``, every
        calibration token alike, or ``equal``, every corpus alike)."""
        sets = (self, *others)
        for other in others:
            if other.metadata.get("config_hash") != self.metadata.get("config_hash"):
                raise ValueError("score sets come from different models (config hashes differ)")
            if other.metadata.get("measure") != self.metadata.get("measure"):
                raise ValueError("score sets use different measures; score all corpora with the same measure")
            if _neuron_names(other.scores) != _neuron_names(self.scores):
                raise ValueError("score sets hold different tensors")
        parts = [p for s in sets for p in s._parts()]
        common = {k: v for k, v in self.metadata.items()
                  if all(s.metadata.get(k) == v for s in others) and k not in _PER_CORPUS}
        meta = {**common, "corpus": "+".join(p["corpus"] for p in parts), "n_docs": sum(s.n_docs for s in sets),
                "token_counts": [n for s in sets for n in s.metadata.get("token_counts", [])],
                "parts": parts}
        # statistics add up over corpora; a set without them leaves the intersection without them
        weights = corpus_weights([sum(s.metadata.get("token_counts", [])) for s in sets],
                                 [len(s._parts()) for s in sets], corpus_weight)
        stats = None if any(s.stats is None for s in sets) else GramSum([s.stats for s in sets], weights)
        # block influence only where every set has it (files written before it was recorded lack it)
        names = [n for n in self.scores if all(n in s.scores for s in sets)]
        return ScoreSet({name: torch.cat([s.scores[name] for s in sets]) for name in names}, meta, stats)

    __and__ = intersect

    def _parts(self) -> list[dict]:
        """{corpus, corpus_sha256, n_docs} of each corpus behind this set."""
        if "parts" in self.metadata:
            return list(self.metadata["parts"])
        return [{"corpus": self.metadata.get("corpus", ""), "corpus_sha256": self.metadata.get("corpus_sha256", ""),
                 "n_docs": self.n_docs}]

    def geometry(self, config=None) -> Geometry:
        """Projection shapes, from ``config`` or from the file's recorded architecture."""
        if config is None:
            arch = self.metadata.get("architecture")
            if arch is None:
                raise ValueError("this score file records no architecture; pass the model's config")
            config = SimpleNamespace(**arch)
        return Geometry(config)

    def layers_to_drop(self, count: int, geo: Geometry, uniform: bool = False) -> list[int]:
        """The ``count`` layers of lowest block influence on this set's corpora (:meth:`select`'s
        ``drop_layers``), in layer order; ValueError where dropping layers does not apply."""
        if count < 0:
            raise ValueError(f"drop_layers must be 0 or more, got {count}")
        if not count:
            return []
        method = method_of(self.metadata)
        if uniform or method.granularity == "layer":
            raise ValueError("dropping layers combines them with units or neurons: not with a uniform (stock) "
                             "plan nor with whole-layer scores")
        if method.name != "cusprun":
            raise ValueError(f"dropping layers needs the block influence of Cus-Prun's score files; {method.name} "
                             "score files do not record it")
        return least_influential(layer_influence(self._per_corpus(), geo), count)

    def selection_settings(self, neurons: str | None = None, granularity: str | None = None,
                           uniform: bool = False) -> tuple[str, str]:
        """(neurons, granularity) that :meth:`select` uses: the given ones, else the scoring method's defaults."""
        # a uniform (stock) plan has its own units (channels and k/v groups, see .stock), and the per-neuron
        # selection asked for by name is the paper's (every projection): no method default then
        paper = uniform or granularity == "neuron"
        chosen = {"neurons": "all", "granularity": "neuron",
                  **({} if paper else dict(method_of(self.metadata).selection))}
        return (chosen["neurons"] if neurons is None else neurons,
                chosen["granularity"] if granularity is None else granularity)

    def resolved_align(self, align: int | None, config=None, uniform: bool = False, granularity: str | None = None,
                       neurons: str | None = None) -> int:
        """The alignment :meth:`select` uses: ``align`` when given, else the default: ``units.DEFAULT_ALIGN``
        (64) where Cus-Prun's scores select whole MLP channels of an MLP at least ``units.MIN_ALIGNED_WIDTH``
        (1024) wide, 1 (as selected) otherwise: other methods' selections, the stock format, the per-neuron
        selection, whole layers and narrow MLPs."""
        if align is not None:
            return align
        from ..selection.units import DEFAULT_ALIGN, MIN_ALIGNED_WIDTH

        neurons, granularity = self.selection_settings(neurons, granularity, uniform)
        channels = neurons in NEURONS and "channels" in NEURONS[neurons].units
        if not (channels and self._rounds_channels(uniform, granularity)
                and method_of(self.metadata).name == "cusprun"):
            return 1
        return DEFAULT_ALIGN if self.geometry(config).inter >= MIN_ALIGNED_WIDTH else 1

    def _rounds_channels(self, uniform: bool, granularity: str) -> bool:
        """Whether a selection with these settings chooses whole MLP channels from scores of every neuron, the
        plans an alignment can round (not the stock format, the per-neuron selection, whole layers or a
        prunable list)."""
        method = method_of(self.metadata)
        return not (uniform or granularity != "unit" or method.granularity == "layer" or method.prunable is not None)

    def check_align(self, align: int, config=None, uniform: bool = False, granularity: str | None = None) -> None:
        """ValueError unless :meth:`select` can round each layer's whole MLP channels to multiples of ``align``
        (1: nothing to round) on the model of ``config`` (None: the one in the metadata)."""
        if align == 1:
            return
        if not isinstance(align, int) or align < 1:
            raise ValueError(f"align must be a whole number of channels, 1 or more, got {align!r}")
        _, granularity = self.selection_settings(None, granularity, uniform)
        if not self._rounds_channels(uniform, granularity):
            raise ValueError(f"align {align} rounds each layer's whole MLP channels: it needs the unit granularity "
                             "and scores of every neuron (not the stock format, whole layers or a prunable list)")
        width = self.geometry(config).inter
        if align > width:  # every layer would round to no channel at all, or keep all
            raise ValueError(f"align {align} is wider than the model's MLP ({width} channels)")

    def select(self, ratio: float, config=None, uniform: bool = False, rule: str = "all-docs",
               neurons: str | None = None, granularity: str | None = None, budget: str = "rank",
               drop_layers: int = 0, align: int | None = None) -> Selection:
        """The plan removing the least relevant units or neurons (and all they make dead) until ``ratio`` of
        the projection parameters is gone; ``cusprun.formats.apply`` it to the model.

        uniform: the plan the ``stock`` format needs: whole MLP channels and k/v groups, the same count
            in every layer.
        rule: aggregation over documents, ``all-docs`` (the paper's, default), ``mean-rank`` or ``pooled``.
        neurons: ``mlp`` (only MLP channels are chosen; attention stays whole), ``mlp+pairs`` (MLP channels and
            RoPE pairs of q and k: attention keeps its heads, v and o) or ``all``.
        granularity: ``unit`` (whole query heads, MLP channels, RoPE pair slots, see
            :mod:`cusprun.selection.units`) or ``neuron`` (the paper's per-row/column selection); with units,
            ``budget`` ``rank`` (default: within-block rank fractions under one threshold over all layers, so
            layers lose different shares), ``equal`` (the same number of units from every block) or ``relative``
            (score over block output norm; measured far worse, see docs/experts.md).
        neurons and granularity default to the scoring method's choice (:mod:`cusprun.scores.methods`): for Cus-
        Prun's scores whole MLP channels (``unit``, ``mlp``), the best expert in docs/expert-quality.md; the paper's
        selection is ``granularity="neuron", neurons="all"``; for Magnitude's, Wanda-sp's and FLAP's whole query
        heads and MLP channels (``unit``, ``all``), as their papers remove them. What may be removed is the method's
        too: layer-granularity methods (ShortGPT) remove whole layers; methods that declare ``prunable`` groups
        (FLAP) choose only among those (units scored by those groups, or, with ``granularity="neuron"``, single rows
        and columns of those groups).
        drop_layers: first remove this many whole decoder layers, those of lowest block influence on the
            set's corpora (:func:`~cusprun.selection.algorithm.layer_influence`), then units or neurons of the other
            layers up to ``ratio`` (the paper's §4.5 combination for aggressive ratios).
        align: with whole MLP channels, every layer keeps a multiple of ``align`` of them (or all), the
            widths GEMM kernels tile evenly (:func:`~cusprun.selection.units.align_channels`); None (default): 64 where
            Cus-Prun's scores select whole channels of an MLP at least 1024 wide, else 1
            (:meth:`resolved_align`)."""
        geo = self.geometry(config)
        method = method_of(self.metadata)
        neurons, granularity = self.selection_settings(neurons, granularity, uniform)
        if neurons not in NEURONS:
            raise ValueError(f"neurons must be one of {tuple(NEURONS)}, got {neurons!r}")
        align = self.resolved_align(align, config, uniform, granularity, neurons)
        self.check_align(align, config, uniform, granularity)
        dropped = self.layers_to_drop(drop_layers, geo, uniform)
        if method.granularity == "layer":
            if uniform:
                raise ValueError(f"whole-layer scores ({method.name}) cannot make a uniform (stock) plan")
            return select_layers(self.metadata["block_influence"], geo, ratio)
        groups = NEURONS[neurons].groups
        if method.prunable is not None:
            groups = [g for g in method.prunable if groups is None or g in groups]
        if uniform:
            if groups is not None:
                raise ValueError("a uniform (stock) plan chooses among all neurons; use neurons='all' and "
                                 "scores without a prunable list")
            from ..formats.stock import select_uniform

            return select_uniform(self.relevance(rule), geo, ratio)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if neurons == "mlp+pairs" and (granularity != "unit" or method.prunable is not None):
            raise ValueError("neurons='mlp+pairs' (--neurons mlp+pairs) chooses whole RoPE pair slots: it needs "
                             "granularity='unit' and scores without a prunable list")
        if granularity == "unit":
            from ..selection.units import corpus_shares, intersection_values, select_units, unit_values

            kinds = NEURONS[neurons].units
            unscored = [k for k in kinds if method.prunable is not None and UNIT_GROUPS[k] not in method.prunable]
            if unscored:
                raise ValueError(f"{method.name} scores do not score {unscored[0]} (they score "
                                 f"{', '.join(method.prunable)})")
            if budget == "relative" and method.prunable is not None:
                raise ValueError(f"budget 'relative' divides by block output norms, which {method.name} scores do "
                                 "not record: use the rank or equal budget")
            per_corpus = [unit_values([scores], geo, rule, budget) for scores in self._per_corpus()]
            shares = None
            if budget == "rank" and len(per_corpus) > 1:  # each corpus's own layer shares, averaged
                shares = corpus_shares(per_corpus, geo, ratio, kinds, dropped)
            return select_units(intersection_values(per_corpus), geo, ratio, budget, kinds, dropped, shares, align)
        candidates = None if groups is None else {n for n in geo.names() if group_of(n) in groups}
        return select(self.relevance(rule), geo, ratio, candidates, dropped)


def _neuron_names(scores: dict) -> set[str]:
    return {n for n in scores if not is_influence_name(n)}


def intersect(*sets: ScoreSet, corpus_weight: str = DEFAULT_CORPUS_WEIGHT) -> ScoreSet:
    """The intersection of several dimensions' irrelevant sets, as one ScoreSet (see ScoreSet.intersect)."""
    if not sets:
        raise ValueError("intersect needs at least one ScoreSet")
    return sets[0].intersect(*sets[1:], corpus_weight=corpus_weight)


# Metadata that describes one corpus and has no single value for an intersection.
_PER_CORPUS = ("corpus", "corpus_sha256", "n_docs", "token_counts", "skipped", "parts")
