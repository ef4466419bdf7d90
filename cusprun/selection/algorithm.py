"""Selection (the paper's Algorithm 1): irrelevant neurons per corpus, intersected, at a target ratio.

Within each document, the neurons of each group — one group per (layer, projection, rows|cols) —
are ranked by score, ascending, ties by index: rank fraction r / n. A neuron is irrelevant to a
corpus when its rank fraction is below σ in *every* document; the expert removes the intersection
over the given corpora. Equivalently, with R(n) = the maximum rank fraction of n over all
documents of all corpora, it removes {n : R(n) < σ}.

Aggregation over documents (``rule``): ``all-docs`` (the paper's rule, default) takes the maximum
rank fraction as above; ``mean-rank`` the mean rank fraction over the corpus's documents; ``pooled``
ranks the corpus as one document (score² summed over documents). With several corpora, each
corpus is aggregated alone and the intersection takes the maximum over corpora.

σ is found from the asked ratio: neurons are ordered by (R, group in file order, index) and the
shortest prefix whose removal, with every neuron it makes dead (:func:`plan.propagate`), removes at
least the asked fraction of projection parameters is taken — a deterministic tie-break among neurons
of equal R. σ is reported as the R of the last neuron removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ..core.neurons import influence_name, parse_name
from .plan import Geometry, Plan, kept_params, propagate


def rank_fractions(scores: torch.Tensor) -> torch.Tensor:
    """[n_docs, n] scores -> [n_docs, n] within-document rank fractions in [0, 1): rank / n."""
    n = scores.shape[1]
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n).expand_as(order).contiguous())
    return ranks.double() / n


RULES = ("all-docs", "mean-rank", "pooled")


def aggregate(scores: torch.Tensor, rule: str = "all-docs") -> torch.Tensor:
    """[n_docs, n] scores of one corpus -> [n] float64 relevance in [0, 1) under ``rule``."""
    if rule == "all-docs":
        return rank_fractions(scores).max(dim=0).values
    if rule == "mean-rank":
        return rank_fractions(scores).mean(dim=0)
    if rule == "pooled":
        return rank_fractions(scores.double().square().sum(dim=0, keepdim=True).sqrt())[0]
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def relevance(score_sets: list[dict[str, torch.Tensor]], rule: str = "all-docs") -> dict[str, torch.Tensor]:
    """R(n) per tensor name: each corpus aggregated under ``rule``, then the maximum over corpora
    (for ``all-docs``: the maximum within-group rank fraction over all documents of all corpora)."""
    names = score_sets[0].keys()
    return {name: torch.stack([aggregate(s[name], rule) for s in score_sets]).max(dim=0).values for name in names}


@dataclass
class Selection:
    """A pruning plan: ``plan[name]`` is the bool keep mask of tensor ``name`` (dead neurons propagated)."""

    plan: Plan
    sigma: float | None  # the rank-fraction threshold σ; None where layers' shares decide (cusprun.selection.units)
    removed_fraction: float  # of projection parameters
    kept_projection_params: int
    total_projection_params: int
    dropped_layers: tuple[int, ...] = ()  # whole layers removed before the selection (``drop_layers``)

    def removed(self) -> dict[str, torch.Tensor]:
        """Indices of the neurons to remove, per tensor name (``model.layers.{l}.{P}.rows|cols``)."""
        return {name: (~keep).nonzero().flatten() for name, keep in self.plan.items()}


def layer_influence(score_sets: list[dict[str, torch.Tensor]], geo: Geometry) -> torch.Tensor:
    """[layers] float64: each layer's block influence (score files' ``model.layers.{l}.block_influence``), the
    mean over each corpus's documents (each document weighs the same; the ``shortgpt`` baseline pools tokens
    instead), then the maximum over corpora — a layer is as influential as it is for the dimension that needs
    it most."""
    missing = [influence_name(layer) for layer in range(geo.layers) if influence_name(layer) not in score_sets[0]]
    if missing:
        raise ValueError(f"the score files hold no block influence ({missing[0]}): score them again with this "
                         "version of cusprun to drop layers")
    return torch.stack([torch.stack([s[influence_name(layer)].double().mean() for layer in range(geo.layers)])
                        for s in score_sets]).max(dim=0).values


def least_influential(influence: torch.Tensor, count: int) -> list[int]:
    """The ``count`` layers of lowest influence (ties: the earlier layer), in layer order."""
    if not 0 <= count < len(influence):
        raise ValueError(f"cannot drop {count} of {len(influence)} layers: at least one must stay")
    return sorted(sorted(range(len(influence)), key=lambda layer: (float(influence[layer]), layer))[:count])


def without_layers(plan: Plan, layers: list[int]) -> Plan:
    """``plan`` with every row and column of ``layers`` removed (the layers become the identity; the dense
    format drops them)."""
    return {name: torch.zeros_like(keep) if parse_name(name)[0] in layers else keep for name, keep in plan.items()}


def check_dropped_share(geo: Geometry, layers: list[int], ratio: float) -> None:
    """Dropping ``layers`` must leave something for the selection to remove on the way to ``ratio``."""
    share = 1 - kept_params(without_layers(geo.full_plan(), layers), geo) / geo.projection_params()
    if layers and share >= ratio:
        raise ValueError(f"dropping {len(layers)} of {geo.layers} layers already removes {share:.4f} of the "
                         f"projection parameters, not less than the ratio {ratio}: drop fewer layers")


def select(relevance_by_name: dict[str, torch.Tensor], geo: Geometry, ratio: float,
           candidates: set[str] | None = None, dropped_layers: list[int] = ()) -> Selection:
    """Remove the least relevant neurons until ``ratio`` of the projection parameters is gone.

    ``candidates``: the tensor names whose neurons may be chosen (default: all); the others go only
    where a chosen removal makes them dead. ``dropped_layers``: whole layers removed first (the paper's
    §4.5 combination of layer and neuron pruning); the neurons reach the rest of the ratio."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    check_dropped_share(geo, dropped_layers, ratio)
    names = geo.names()
    values = torch.cat([relevance_by_name[n] if (candidates is None or n in candidates)
                        and parse_name(n)[0] not in dropped_layers
                        else torch.full_like(relevance_by_name[n], float("inf")) for n in names])
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
        return propagate(without_layers(keep, dropped_layers), geo)

    @cache  # the search and the final pick revisit the same prefix lengths
    def kept(k: int) -> int:
        return kept_params(plan_for(k), geo)

    def fraction(k: int) -> float:
        return 1 - kept(k) / total

    lo, hi = 0, int(values.isfinite().sum())  # fraction(lo) < ratio <= fraction(hi)
    if fraction(hi) < ratio:
        raise ValueError(f"ratio {ratio} cannot be reached by removing the candidate neurons: the largest reachable "
                         f"ratio is {fraction(hi):.4f}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fraction(mid) >= ratio:
            hi = mid
        else:
            lo = mid
    k = hi  # the shortest prefix removing at least the ratio
    return Selection(plan_for(k), float(values[order[k - 1]]) if k else 0.0, fraction(k), kept(k), total,
                     tuple(dropped_layers))


def select_layers(influence: list[float], geo: Geometry, ratio: float) -> Selection:
    """Whole-layer removal (ShortGPT): the layers with the lowest influence go, the fewest that remove at least
    ``ratio`` of the projection parameters (every layer holds the same share); ValueError naming the largest
    reachable share where even all but one layer are too few. Removing every row and column of a layer's
    projections makes the layer the identity (its blocks add zero)."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if len(influence) != geo.layers:
        raise ValueError(f"{len(influence)} layer influences for {geo.layers} layers")
    count = next((n for n in range(1, geo.layers) if n / geo.layers >= ratio), None)
    if count is None:
        raise ValueError(f"ratio {ratio} cannot be reached by removing whole layers: at least one stays, so the "
                         f"largest reachable ratio is {(geo.layers - 1) / geo.layers:.4f}")
    dropped = least_influential(torch.tensor(influence, dtype=torch.float64), count)
    plan = without_layers(geo.full_plan(), dropped)
    total = geo.projection_params()
    kept = kept_params(plan, geo)
    return Selection(plan, max(float(influence[layer]) for layer in dropped), 1 - kept / total, kept, total,
                     tuple(dropped))
