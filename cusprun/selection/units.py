"""Selection by units: whole query heads, MLP channels and RoPE pair slots, with budgets compared across layers.

The paper's selection (:mod:`.selection`, ``granularity="neuron"``) ranks single rows and columns inside each
(layer, projection, side) group and takes the same share σ from every group. This module chooses whole units,
the structure a dense model can drop (:mod:`.dense`), and lets some layers lose more than others.

Unit scores, per document, derived from the per-neuron scores in the score files (both measures):

* an MLP channel k: ``down_proj.cols[k]`` = ‖W_down[:, k]‖₂ · ‖A[:, k]‖₂, A = act(gate) ⊙ up. That is the norm
  of the channel's whole contribution to the MLP output, under the local and the block measure alike (under
  the block measure the gate and up rows carry the same number; under the local measure they are
  pre-activation norms the activation may silence, so they are not used);
* a RoPE pair (d, d + head_dim/2) of k/v head g: sqrt(``k_proj.rows[g, d]``² + ``k_proj.rows[g, d + hd/2]``²).
  Under the local measure that is the norm of the pair's keys over the document, which RoPE only rotates
  (the same before and after it); under the block measure the root of the two single rows' exact ablation
  energies (removing both at once is not scored, so this is a proxy for the pair's). A selection removes
  *slots*: slot j of a layer is every kept k/v head's j-th weakest pair (by its value over the corpora), so
  every group keeps the same number of pairs and the dense model stays dense (:mod:`.dense`); its value is
  the largest of those pairs' values and its cost their q rows (every query head of the group) and k rows;
* a query head h: sqrt(Σ_{j ∈ h} ``o_proj.cols[j]``²), the head's contribution to the attention output
  ‖O_h W_o,hᵀ‖ when its columns' contributions are orthogonal (in general Σ_j cols[j] bounds it from above);
  a k/v head goes with the last query head that reads it;
* the block's output: ‖attention output‖ = sqrt(Σ_i ``o_proj.rows[i]``²) and ‖MLP output‖ =
  sqrt(Σ_i ``down_proj.rows[i]``²) (rows are local: ‖Y[:, i]‖₂, so the sum of squares is ‖Y‖_F²).

Budgets (``budget``):

* ``relative`` (cross-layer): a unit's value in a document is its score divided by its block's output norm in
  the same document — the relative change of the block's output its removal causes at most — and units
  are removed in ascending order of value per projection parameter they hold, over all layers at once;
* ``rank`` (default): a unit's value in a document is its rank fraction within its block, as the neuron
  selection does; the rule combines documents and one threshold runs over all layers at once. That is a
  cross-layer comparison by consistency: a block loses many units where its weak units are weak in every
  document and few where the ranking moves from document to document (measured on SmolLM2 at 25%: 9–49% of
  a layer's channels). Where several kinds compete (heads and channels, channels and pair slots), each
  kind's values are replaced by their rank fraction among that kind's units, so every kind loses the same
  share overall. With several corpora, each corpus's own selection at the ratio sets how much each layer
  loses (the shares averaged over the corpora, :func:`corpus_shares`), and the intersection's values which
  units go;
* ``equal``: every block loses the same number of units of each kind (±1), its lowest-valued ones: the
  strictly uniform budget, against which the others are measured.

Documents are combined by the rule (``all-docs``: the maximum over documents, so a unit goes only when it
is small in every document; ``mean-rank``: the mean; ``pooled``: the corpus as one document, squares summed
over documents before dividing); several corpora: the maximum over corpora. As in :func:`.selection.select`,
the shortest prefix of that order whose removal (with everything it makes dead) removes at least the asked
ratio of projection parameters is taken.
"""

from __future__ import annotations

from functools import cache

import torch

from ..core.neurons import Geometry, tensor_name
from .algorithm import Selection, aggregate, check_dropped_share, without_layers
from .plan import Plan, kept_params, propagate

BUDGETS = ("rank", "equal", "relative")
KINDS = ("heads", "channels", "pairs")  # the unit kinds, in the order used for tie-breaking


def unit_scores(scores: dict[str, torch.Tensor], geo: Geometry, layer: int) -> dict[str, tuple]:
    """{kind: (unit scores [n_docs, units], block output norm [n_docs])} of one layer, float64."""
    o_cols = scores[tensor_name(layer, "self_attn.o_proj", "cols")].double()
    heads = o_cols.view(o_cols.shape[0], geo.heads, geo.hd).square().sum(-1).sqrt()
    attention = scores[tensor_name(layer, "self_attn.o_proj", "rows")].double().square().sum(-1).sqrt()
    channels = scores[tensor_name(layer, "mlp.down_proj", "cols")].double()
    mlp = scores[tensor_name(layer, "mlp.down_proj", "rows")].double().square().sum(-1).sqrt()
    k_rows = scores[tensor_name(layer, "self_attn.k_proj", "rows")].double()
    k_rows = k_rows.view(o_cols.shape[0], geo.kv, 2, geo.hd // 2)
    pairs = k_rows.square().sum(2).sqrt().flatten(1)  # [n_docs, kv * half], (g, d) of pair (d, d + half)
    return {"heads": (heads, attention), "channels": (channels, mlp), "pairs": (pairs, attention)}


def _aggregate(units: torch.Tensor, norm: torch.Tensor, rule: str, budget: str) -> torch.Tensor:
    """[n_docs, units] scores and [n_docs] block norms of one corpus -> [units] value under rule and budget."""
    if budget != "relative":
        return aggregate(units, rule)
    tiny = torch.finfo(torch.float64).tiny
    if rule == "pooled":
        return units.square().sum(0).sqrt() / norm.square().sum().sqrt().clamp_min(tiny)
    relative = units / norm[:, None].clamp_min(tiny)
    if rule == "all-docs":
        return relative.max(dim=0).values
    if rule == "mean-rank":
        return relative.mean(dim=0)
    raise ValueError(f"unknown rule {rule!r}")


def unit_values(score_sets: list[dict[str, torch.Tensor]], geo: Geometry, rule: str = "all-docs",
                budget: str = "rank") -> dict[str, torch.Tensor]:
    """{kind: [layers, units]} float64 values (lower: removed first), the maximum over corpora; for
    ``pairs`` the values of single pairs, [layers, kv_heads · hd/2] (:func:`pair_slots` makes them slots)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    return intersection_values([_corpus_values(scores, geo, rule, budget) for scores in score_sets])


def _corpus_values(scores: dict[str, torch.Tensor], geo: Geometry, rule: str, budget: str) -> dict[str, torch.Tensor]:
    """One corpus's {kind: [layers, units]} values, one layer's unit scores in memory at a time."""
    per_kind = {kind: [] for kind in KINDS}
    for layer in range(geo.layers):
        layer_scores = unit_scores(scores, geo, layer)
        for kind in KINDS:
            per_kind[kind].append(_aggregate(*layer_scores[kind], rule, budget))
    return {kind: torch.stack(values) for kind, values in per_kind.items()}


def intersection_values(per_corpus: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several corpora's :func:`unit_values` -> the intersection's: each unit's largest value over the corpora
    (so it goes only where it is weak in every one)."""
    return {kind: torch.stack([values[kind] for values in per_corpus]).max(dim=0).values for kind in per_corpus[0]}


def pair_slots(pair_values: torch.Tensor, geo: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair values [layers, kv · half] -> (slot values [layers, half], order [layers, kv, half]): ``order[l, g, j]``
    is k/v head g's j-th weakest pair in layer l, and slot j's value the largest of the kv heads' j-th values
    (non-decreasing in j, so a layer's slots go in order and each group loses its weakest pairs)."""
    values, order = pair_values.view(geo.layers, geo.kv, geo.hd // 2).sort(dim=-1, stable=True)
    return values.max(dim=1).values, order


def unit_cost(geo: Geometry) -> dict[str, int]:
    """Projection parameters one unit holds: a query head's q rows (with bias) and o columns; a channel's gate
    and up rows (with biases) and down column; a pair slot's two q rows in every query head and two k rows in
    every k/v head (with biases). (A k/v head's rows go with its last query head.)"""
    head = 2 * geo.hd * geo.hidden + (geo.hd if geo.bias["self_attn.q_proj"] else 0)
    channel = 3 * geo.hidden + (2 if geo.bias["mlp.gate_proj"] else 0)
    pair = 2 * (geo.heads + geo.kv) * (geo.hidden + (1 if geo.bias["self_attn.q_proj"] else 0))
    return {"heads": head, "channels": channel, "pairs": pair}


def unit_counts(geo: Geometry) -> dict[str, int]:
    """Units of each kind per layer (pairs: slots)."""
    return {"heads": geo.heads, "channels": geo.inter, "pairs": geo.hd // 2}


def remove_units(geo: Geometry, removed: dict[str, torch.Tensor], pair_order: torch.Tensor | None = None) -> Plan:
    """The propagated plan removing ``removed[kind]`` (bool [layers, units]) heads, channels and pair slots
    (slot j of layer l: pair ``pair_order[l, g, j]`` of every k/v head g; identity order when None)."""
    plan = geo.full_plan()
    half = geo.hd // 2
    if pair_order is None:
        pair_order = torch.arange(half).expand(geo.layers, geo.kv, half)
    for layer in range(geo.layers):
        heads = removed["heads"][layer]
        plan[tensor_name(layer, "self_attn.o_proj", "cols")] = ~heads.repeat_interleave(geo.hd)
        plan[tensor_name(layer, "mlp.down_proj", "cols")] = ~removed["channels"][layer]
        gone = torch.zeros(geo.kv, half, dtype=torch.bool)
        gone.scatter_(1, pair_order[layer], removed["pairs"][layer].expand(geo.kv, half))
        plan[tensor_name(layer, "self_attn.k_proj", "rows")] = ~gone.repeat(1, 2).flatten()  # q rows follow (propagate)
    return propagate(plan, geo)


def reachable(geo: Geometry, kinds: tuple[str, ...]) -> float:
    """The largest fraction of projection parameters removing every unit of ``kinds`` reaches."""
    removed = {k: torch.full((geo.layers, n), k in kinds) for k, n in unit_counts(geo).items()}
    return 1 - kept_params(remove_units(geo, removed), geo) / geo.projection_params()


def _share(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank fraction among ``values`` (one kind's units; ties in index order): under the rank
    budget the kinds are interleaved by these, so each loses the same share of its units. Their own values are
    not comparable across kinds: a max over documents of rank fractions runs higher for units whose ranking
    moves from document to document (MLP channels) than for units ranked alike in every document (RoPE pairs),
    and more so the more documents an intersection has (measured: docs/experts.md, "Selection units")."""
    rank = torch.empty(len(values), dtype=torch.float64)
    rank[torch.sort(values, stable=True).indices] = torch.arange(len(values), dtype=torch.float64)
    return (rank + 1) / len(values)


def layer_keys(values: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """values [layers, units], shares [layers] -> keys [layers, units]: a unit's rank in its layer (0.5 = weakest,
    1.5 the next, ...) over the number of units its layer's share asks for. Removing the units with keys up
    to t takes round(t · share · units) from each layer, so at t = 1 every layer its share to the nearest unit,
    and around it the layers lose units in proportion to their shares. A layer with share 0 loses nothing
    before the others are spent, and then its weakest first (finite keys, in rank order)."""
    units = values.shape[1]
    rank = torch.empty(values.shape, dtype=torch.float64)
    rank.scatter_(1, torch.sort(values, dim=1, stable=True).indices,
                  torch.arange(0.5, units, dtype=torch.float64).expand(values.shape).contiguous())
    return rank / (shares.double()[:, None] * units).clamp_min(1e-9)


def corpus_shares(per_corpus: list[dict[str, torch.Tensor]], geo: Geometry, ratio: float,
                  kinds: tuple[str, ...], dropped_layers: list[int] = ()) -> dict[str, torch.Tensor]:
    """{kind: [layers]} the share of each layer's units of ``kind`` that each corpus's own rank-budget selection
    at ``ratio`` removes (``per_corpus``: :func:`unit_values` of one corpus each), averaged over the corpora.

    Why: the rank budget's maximum over documents runs toward 1 for every unit whose rank moves, the more
    documents it spans; so an intersection of several corpora, ranked as one, piles its removals onto the
    few layers whose rankings hold still (measured on SmolLM2 at 45%, three corpora: up to 94% of a layer's
    channels). Each corpus decides how much a layer can lose from its own documents; the intersection's
    values decide which units go."""
    counts = {kind: torch.zeros(geo.layers, dtype=torch.float64) for kind in kinds}
    for values in per_corpus:
        removed = _choose(values, geo, ratio, "rank", kinds, dropped_layers)[1]
        for kind in kinds:
            counts[kind] += removed[kind].sum(1)
    return {kind: counts[kind] / (len(per_corpus) * unit_counts(geo)[kind]) for kind in kinds}


def select_units(values: dict[str, torch.Tensor], geo: Geometry, ratio: float, budget: str = "rank",
                 kinds: tuple[str, ...] = ("heads", "channels"), dropped_layers: list[int] = (),
                 shares: dict[str, torch.Tensor] | None = None, align: int = 1) -> Selection:
    """Remove the lowest-valued units of ``kinds`` until ``ratio`` of the projection parameters is gone.

    Order: ascending key, then kind, layer and index. The key is the value per parameter under the relative
    budget; under the rank budget the value (with several kinds, its rank fraction within its kind,
    :func:`_share`); with ``shares`` ({kind: [layers]}, the rank budget of several corpora,
    :func:`corpus_shares`) and under the equal budget (every share the same) its rank in its layer over the
    units its layer's share asks for (:func:`layer_keys`). The Selection's ``sigma`` is the last removed unit's
    key under the rank budget without shares or alignment (a rank-fraction threshold, as the neuron
    selection's), None otherwise (no single threshold). ``dropped_layers``: whole layers removed first (every
    head and channel); the units of the other layers reach the rest of the ratio. ``align``: every layer keeps a
    multiple of ``align`` MLP channels (or all of them), the nearest to what the order alone would keep, its
    lowest-ordered channels going first (:func:`align_channels`)."""
    return _choose(values, geo, ratio, budget, kinds, dropped_layers, shares, align)[0]


# The default alignment of a layer's kept MLP channels (ScoreSet.select's align=None): 64, the narrowest GEMM
# tile of GPU kernels and a multiple of the CPU's vector widths, where the MLP is at least 16 such steps wide
# (so rounding moves a layer by at most 1/32 of its width, or 1/16 where a layer kept fewer than 32 channels
# and keeps 64); narrower MLPs (the tests' tiny models) stay as selected. Measured on SmolLM2 (1536
# channels) in docs/expert-quality.md, "Where a prefill's time goes, and aligned widths", and its main table.
DEFAULT_ALIGN = 64
MIN_ALIGNED_WIDTH = 16 * DEFAULT_ALIGN


def align_channels(removed: torch.Tensor, rank: torch.Tensor, align: int) -> torch.Tensor:
    """removed bool [layers, channels], rank [layers, channels] (each channel's rank in its layer's removal
    order, 0 = first to go) -> removed with every layer keeping the multiple of ``align`` nearest to what it
    kept, or every channel where that is nearer (a width that is no multiple of ``align``); ties keep more;
    and a layer that kept any channel keeps at least ``align`` of them (or all): rounding never removes an MLP
    the selection kept (measured: with the relative budget, which leaves some layers a few channels, rounding
    them to none multiplied perplexity by up to 90). The layer's earliest channels in the order go, as more
    of the order would take them.

    Why: GEMMs run fastest on widths their kernels tile evenly (multiples of 16 for CPU vector units and
    half-precision tensor cores, 64 or more for GPU tiles); measured on SmolLM2 in docs/expert-quality.md, "Where a
    prefill's time goes, and aligned widths". A layer's aligned count never rises as the order goes on, so
    the removed fraction still grows with it and the search finds the smallest reachable fraction at or above
    the ratio (reachable in steps of up to ``align`` channels of one layer)."""
    channels = removed.shape[1]
    kept = channels - removed.sum(1)
    down = torch.div(kept, align, rounding_mode="floor") * align
    up = torch.clamp(down + align, max=channels)
    target = torch.where(up - kept <= kept - down, up, down)
    target = torch.where((target == 0) & (kept > 0), min(align, channels), target)
    return rank < (channels - target)[:, None]


def _choose(values: dict[str, torch.Tensor], geo: Geometry, ratio: float, budget: str, kinds: tuple[str, ...],
            dropped_layers: list[int], shares: dict[str, torch.Tensor] | None = None, align: int = 1):
    """:func:`select_units`' Selection and the units it removes ({kind: bool [layers, units]}, pairs as slots)."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be a positive whole number of channels, got {align!r}")
    if align > 1 and "channels" not in kinds:
        raise ValueError("align rounds each layer's MLP channels: it needs a selection of channels")
    check_dropped_share(geo, dropped_layers, ratio)
    if budget == "equal":
        shares = {kind: torch.ones(geo.layers) for kind in kinds}
    kept_layers = torch.tensor([layer not in dropped_layers for layer in range(geo.layers)])
    total = geo.projection_params()
    cost = unit_cost(geo)
    values = dict(values)
    values["pairs"], pair_order = pair_slots(values["pairs"], geo)
    flat, tags = [], []
    for kind_index, kind in enumerate(KINDS):
        if kind not in kinds:
            continue
        v = values[kind]
        layers, units = v.shape
        live = kept_layers.repeat_interleave(units)  # a dropped layer's units are gone already
        if shares is not None:
            key = layer_keys(v, shares[kind]).flatten()[live]
        elif budget == "relative":
            key = (v / cost[kind]).flatten()[live]
        else:
            key = v.flatten()[live]
            if len(kinds) > 1:
                key = _share(key)
        flat.append(key)
        tags.append(torch.stack([torch.full((layers * units,), kind_index),
                                 torch.arange(layers).repeat_interleave(units),
                                 torch.arange(units).repeat(layers)], dim=1)[live])
    keys, tags = torch.cat(flat), torch.cat(tags)
    minor = (tags[:, 0] * (geo.layers + 1) + tags[:, 1]) * (max(unit_counts(geo).values()) + 1) + tags[:, 2]
    order = torch.argsort(minor, stable=True)
    order = order[torch.sort(keys[order], stable=True).indices]
    if align > 1:  # each channel's rank in its layer's part of the order (a dropped layer's, gone already, last)
        position = torch.full(values["channels"].shape, len(order), dtype=torch.long)
        ordered = tags[order]
        ours = ordered[:, 0] == KINDS.index("channels")
        position[ordered[ours, 1], ordered[ours, 2]] = torch.arange(len(order))[ours]
        channel_rank = torch.empty_like(position)
        channel_rank.scatter_(1, torch.argsort(position, dim=1, stable=True),
                              torch.arange(position.shape[1]).expand(position.shape).contiguous())

    def removed_by(k: int) -> dict[str, torch.Tensor]:
        removed = {kind: torch.zeros(values[kind].shape, dtype=torch.bool) for kind in KINDS}
        chosen = tags[order[:k]]
        for kind_index, kind in enumerate(KINDS):
            mine = chosen[chosen[:, 0] == kind_index]
            removed[kind][mine[:, 1], mine[:, 2]] = True
        if align > 1:
            aligned = align_channels(removed["channels"], channel_rank, align)
            removed["channels"] = torch.where(kept_layers[:, None], aligned, removed["channels"])
        return removed

    def plan_for(k: int) -> Plan:
        return without_layers(remove_units(geo, removed_by(k), pair_order), dropped_layers)

    @cache
    def fraction(k: int) -> float:
        return 1 - kept_params(plan_for(k), geo) / total

    lo, hi = 0, len(order)
    if fraction(hi) < ratio:
        names = {"heads": "query heads", "channels": "MLP channels", "pairs": "RoPE pairs"}
        hint = "" if "heads" in kinds or "pairs" in kinds else "; with neurons='all' (--neurons all) query heads go too"
        raise ValueError(f"ratio {ratio} cannot be reached by removing {' and '.join(names[k] for k in kinds)}: "
                         f"the largest reachable ratio is {fraction(hi):.4f}{hint}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fraction(mid) >= ratio else (mid, hi)
    k = hi  # the shortest prefix removing at least the ratio
    plan = plan_for(k)
    kept = kept_params(plan, geo)
    # aligned widths keep some units below the last removed key and remove some above it: no single threshold
    sigma = (float(keys[order[k - 1]]) if k else 0.0) if budget == "rank" and shares is None and align == 1 else None
    return Selection(plan, sigma, 1 - kept / total, kept, total, tuple(dropped_layers)), removed_by(k)
