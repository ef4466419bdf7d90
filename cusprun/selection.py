"""Selection (the paper's Algorithm 1): irrelevant neurons per corpus, intersected, at a target ratio.

Within each document, the neurons of each group — one group per (layer, projection, rows|cols) —
are ranked by score, ascending, ties by index: rank fraction r / n. A neuron is irrelevant to a
corpus when its rank fraction is below σ in *every* document; the expert removes the intersection
over the given corpora. Equivalently, with R(n) = the maximum rank fraction of n over all
documents of all corpora, it removes {n : R(n) < σ}.

σ is found from the asked ratio: neurons are ordered by (R, group in file order, index) and the
shortest prefix whose removal, with every neuron it makes dead (:func:`plan.propagate`), reaches
the asked fraction of projection parameters is taken — a deterministic tie-break among neurons
of equal R. σ is reported as the R of the last neuron removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .plan import Geometry, Plan, kept_params, propagate


def rank_fractions(scores: torch.Tensor) -> torch.Tensor:
    """[n_docs, n] scores -> [n_docs, n] within-document rank fractions in [0, 1): rank / n."""
    n = scores.shape[1]
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n).expand_as(order).contiguous())
    return ranks.double() / n


def relevance(score_sets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """R(n): the maximum within-group rank fraction over all documents of all corpora."""
    names = score_sets[0].keys()
    return {name: torch.cat([rank_fractions(s[name]) for s in score_sets]).max(dim=0).values for name in names}


@dataclass
class Selection:
    """A pruning plan: ``plan[name]`` is the bool keep mask of tensor ``name`` (dead neurons propagated)."""

    plan: Plan
    sigma: float
    removed_fraction: float  # of projection parameters
    kept_projection_params: int
    total_projection_params: int

    def removed(self) -> dict[str, torch.Tensor]:
        """Indices of the neurons to remove, per tensor name (``model.layers.{l}.{P}.rows|cols``)."""
        return {name: (~keep).nonzero().flatten() for name, keep in self.plan.items()}


def select(relevance_by_name: dict[str, torch.Tensor], geo: Geometry, ratio: float) -> Selection:
    """Remove the least relevant neurons until ``ratio`` of the projection parameters is gone."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    names = geo.names()
    values = torch.cat([relevance_by_name[n] for n in names])
    group = torch.cat([torch.full((relevance_by_name[n].numel(),), i) for i, n in enumerate(names)])
    index = torch.cat([torch.arange(relevance_by_name[n].numel()) for n in names])
    # lexicographic order (R, group, index): sort by the minor keys first, then stably by R
    order = torch.argsort(group * (index.max() + 1) + index, stable=True)
    order = order[torch.sort(values[order], stable=True).indices]
    sizes = [relevance_by_name[n].numel() for n in names]
    total = geo.projection_params()

    def plan_for(k: int) -> Plan:
        removed = torch.zeros(values.numel(), dtype=torch.bool)
        removed[order[:k]] = True
        keep = dict(zip(names, (~removed).split(sizes)))
        return propagate(keep, geo)

    @cache  # the search and the final pick revisit the same prefix lengths
    def kept(k: int) -> int:
        return kept_params(plan_for(k), geo)

    def fraction(k: int) -> float:
        return 1 - kept(k) / total

    lo, hi = 0, values.numel()  # fraction(lo) < ratio <= fraction(hi)
    if fraction(hi) < ratio:
        raise ValueError(f"ratio {ratio} cannot be reached")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fraction(mid) >= ratio:
            hi = mid
        else:
            lo = mid
    k = hi if lo == 0 or abs(fraction(hi) - ratio) <= abs(fraction(lo) - ratio) else lo
    return Selection(plan_for(k), float(values[order[k - 1]]) if k else 0.0, fraction(k), kept(k), total)
