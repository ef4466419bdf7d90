"""The ``stock`` format: an expert in the original architecture (Llama, Mistral, Qwen2), fewer units per layer.

Plain transformers and serving engines read one ``intermediate_size``, ``num_attention_heads`` and
``num_key_value_heads`` for all layers, so a stock expert needs a plan that is uniform across layers
and removes whole units only:

* MLP channels: the same number k kept in every layer. A channel's relevance is the maximum R of its
  gate row, up row and down column (it is irrelevant only when all three are);
* attention: the same number g of k/v groups kept in every layer, each with all its query heads
  (q rows, k rows, v rows and the o columns of those heads). A group's relevance is the mean R of
  those neurons: their maximum is close to 1 for every group and would not tell groups apart.

Within a layer the most relevant units are kept (ties: lower index). g follows the attention share of
the non-uniform selection at the same ratio (fewer where even one channel per layer would not reach the
ratio); k is then the largest count whose plan removes at least the ratio of projection parameters.
Hidden-size rows and columns are never removed.
"""

from __future__ import annotations

import copy
from functools import cache

import torch

from ..core.neurons import Geometry, tensor_name
from ..selection.algorithm import Selection, select
from ..selection.plan import Plan, kept_params


def channel_relevance(rel: dict[str, torch.Tensor], geo: Geometry) -> torch.Tensor:
    """[layers, intermediate]: max R over a channel's gate row, up row and down column."""
    members = (("mlp.gate_proj", "rows"), ("mlp.up_proj", "rows"), ("mlp.down_proj", "cols"))
    return torch.stack([torch.stack([rel[tensor_name(layer, p, s)] for p, s in members]).max(dim=0).values
                        for layer in range(geo.layers)])


def group_relevance(rel: dict[str, torch.Tensor], geo: Geometry) -> torch.Tensor:
    """[layers, kv groups]: mean R over a group's q rows, k rows, v rows and o columns."""
    out = []
    for layer in range(geo.layers):
        parts = [rel[tensor_name(layer, "self_attn.q_proj", "rows")].view(geo.kv, -1),
                 rel[tensor_name(layer, "self_attn.k_proj", "rows")].view(geo.kv, -1),
                 rel[tensor_name(layer, "self_attn.v_proj", "rows")].view(geo.kv, -1),
                 rel[tensor_name(layer, "self_attn.o_proj", "cols")].view(geo.kv, -1)]
        out.append(torch.cat(parts, dim=1).mean(dim=1))
    return torch.stack(out)


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest values of a 1-D tensor (ties: lower index first)."""
    order = torch.sort(-values, stable=True).indices
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def uniform_plan(channels: torch.Tensor, groups: torch.Tensor, k: int, g: int, geo: Geometry) -> Plan:
    """Keep the k most relevant MLP channels and g most relevant k/v groups in every layer."""
    plan = geo.full_plan()
    for layer in range(geo.layers):
        channel = _top(channels[layer], k)
        for proj, side in (("mlp.gate_proj", "rows"), ("mlp.up_proj", "rows"), ("mlp.down_proj", "cols")):
            plan[tensor_name(layer, proj, side)] = channel.clone()
        group = _top(groups[layer], g)
        plan[tensor_name(layer, "self_attn.q_proj", "rows")] = group.repeat_interleave(geo.rep * geo.hd)
        plan[tensor_name(layer, "self_attn.o_proj", "cols")] = group.repeat_interleave(geo.rep * geo.hd)
        plan[tensor_name(layer, "self_attn.k_proj", "rows")] = group.repeat_interleave(geo.hd)
        plan[tensor_name(layer, "self_attn.v_proj", "rows")] = group.repeat_interleave(geo.hd)
    return plan


def select_uniform(rel: dict[str, torch.Tensor], geo: Geometry, ratio: float) -> Selection:
    """A plan uniform across layers removing at least ``ratio`` of the projection parameters (see module doc)."""
    total = geo.projection_params()
    reference = select(rel, geo, ratio)
    attn = [p for p in geo.shape if p.startswith("self_attn")]
    attn_dense = sum(o * i for p, (o, i) in geo.shape.items() if p in attn) * geo.layers
    keep = reference.plan
    attn_kept = sum(int(keep[tensor_name(layer, p, "rows")].sum()) * int(keep[tensor_name(layer, p, "cols")].sum())
                    for layer in range(geo.layers) for p in attn)
    g = min(geo.kv, max(1, round(geo.kv * attn_kept / attn_dense)))
    channels, groups = channel_relevance(rel, geo), group_relevance(rel, geo)

    @cache  # the search and the final pick revisit the same counts
    def removed(k: int, g: int) -> float:
        return 1 - kept_params(uniform_plan(channels, groups, k, g, geo), geo) / total

    # where one channel per layer with g groups is still too little, fewer groups (at least one stays)
    while g > 1 and removed(1, g) < ratio:
        g -= 1
    if removed(1, g) < ratio:
        raise ValueError(f"ratio {ratio} cannot be reached by a uniform plan (one k/v group and one MLP channel per "
                         f"layer at least): the largest reachable ratio is {removed(1, g):.4f}")
    # removed() falls as k grows: the largest k that still removes at least the ratio
    lo, hi = 1, geo.inter + 1  # removed(lo) >= ratio; removed(hi) < ratio (hi = inter + 1: none tried)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if removed(mid, g) >= ratio else (lo, mid)
    k = lo
    plan = uniform_plan(channels, groups, k, g, geo)
    kept = kept_params(plan, geo)
    # σ is that of the non-uniform selection the group count follows: a uniform plan has no single threshold
    return Selection(plan, reference.sigma, 1 - kept / total, kept, total)


def uniform_counts(plan: Plan, geo: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer kept channel masks [layers, inter] and kept group masks [layers, kv] of a uniform plan;
    ValueError when the plan is not uniform across layers or removes partial units."""
    channels, groups = [], []
    for layer in range(geo.layers):
        def m(proj, side, layer=layer):
            return plan[tensor_name(layer, proj, side)]
        channel = m("mlp.gate_proj", "rows")
        group = m("self_attn.k_proj", "rows").view(geo.kv, geo.hd)[:, 0]
        whole = (torch.equal(channel, m("mlp.up_proj", "rows")) and torch.equal(channel, m("mlp.down_proj", "cols"))
                 and all(torch.equal(m(p, s), group.repeat_interleave(n)) for p, s, n in (
                     ("self_attn.q_proj", "rows", geo.rep * geo.hd), ("self_attn.o_proj", "cols", geo.rep * geo.hd),
                     ("self_attn.k_proj", "rows", geo.hd), ("self_attn.v_proj", "rows", geo.hd)))
                 and all(bool(m(p, s).all()) for p, s in (
                     ("self_attn.q_proj", "cols"), ("self_attn.k_proj", "cols"), ("self_attn.v_proj", "cols"),
                     ("self_attn.o_proj", "rows"), ("mlp.gate_proj", "cols"), ("mlp.up_proj", "cols"),
                     ("mlp.down_proj", "rows"))))
        if not whole:
            raise ValueError(f"layer {layer}: the plan removes partial units; the stock format needs whole MLP "
                             "channels and whole k/v groups (select with uniform=True)")
        channels.append(channel)
        groups.append(group)
    channels, groups = torch.stack(channels), torch.stack(groups)
    if len(set(channels.sum(1).tolist())) > 1 or len(set(groups.sum(1).tolist())) > 1:
        raise ValueError("the plan keeps different numbers of channels or k/v groups per layer; the stock format "
                         "needs a uniform plan (select with uniform=True)")
    if int(groups[0].sum()) == 0 or int(channels[0].sum()) == 0:
        raise ValueError("the plan removes every k/v group or every MLP channel of a layer")
    return channels, groups


def stock(model, plan: Plan):
    """``model``'s own architecture class with the plan's units removed; computes what the masked model does."""
    from transformers.initialization import no_init_weights

    geo = Geometry(model.config)
    channels, groups = uniform_counts(plan, geo)
    config = copy.deepcopy(model.config)
    config.intermediate_size = int(channels[0].sum())
    config.num_key_value_heads = int(groups[0].sum())
    config.num_attention_heads = config.num_key_value_heads * geo.rep
    config.head_dim = geo.hd  # explicit: hidden_size / heads no longer gives it
    state = dict(model.state_dict())
    for layer in range(geo.layers):
        for proj in geo.shape:
            rows, cols = plan[tensor_name(layer, proj, "rows")], plan[tensor_name(layer, proj, "cols")]
            prefix = f"model.layers.{layer}.{proj}."
            state[prefix + "weight"] = state[prefix + "weight"][rows][:, cols].clone()
            if prefix + "bias" in state:
                state[prefix + "bias"] = state[prefix + "bias"][rows].clone()
    with no_init_weights():
        out = type(model)(config)
    out.tie_weights()
    out.load_state_dict(state, strict=True)
    return out.to(dtype=next(model.parameters()).dtype).eval()
