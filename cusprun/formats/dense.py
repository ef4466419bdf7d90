"""The ``dense`` format: a plan turned into a model of dense matrices with its own shapes per layer.

The units of a layer are its query heads (q rows and o columns of one head), its k/v heads (k and v rows)
and its MLP channels (gate row, up row, down column). A unit stays when any of its neurons is live in the
propagated plan (:func:`cusprun.selection.plan.propagate`); neurons removed inside a kept unit (single q/k rows,
hidden-size columns or rows) are zero in its dense matrices, so the dense model computes exactly what
``masked(model, plan)`` computes for any plan, and is only as much faster as the plan removes whole units:

* a query head stays while any of its o columns is live (a head whose q rows are all removed still
  averages its values uniformly, so it is not dead);
* a k/v head stays while a kept query head reads it;
* an MLP channel stays while its gate row, up row and down column are all live (act(0) · up = 0 and
  gate · 0 = 0);
* a RoPE pair (d, d + head_dim/2) of a k/v head stays while either of its k rows is live (RoPE rotates the
  pair as one; removing both k rows makes the pair add nothing to any logit, and propagation then removes its
  q rows too). Every kept k/v head of a layer keeps the same number of pairs, the largest any of them keeps
  (the others pad with pairs they removed, all zero), so q and k stay dense with a narrower head dimension,
  and each group applies RoPE at its own pairs' frequencies. v and o keep the full head dimension, and the
  logits keep the original scale head_dim^-1/2;
* a block with no unit left is skipped, unless its output projection keeps a bias (then it is kept with
  zero units and adds that constant); a layer with both blocks skipped is dropped.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..core.neurons import Geometry, tensor_name
from ..selection.plan import Plan, propagate
from .modeling_cusprun import DENSE, rope_pair_dims


def layer_units(plan: Plan, geo: Geometry, layer: int) -> dict:
    """Kept units of one layer of a propagated plan.

    heads: [(k/v head, query head)] kept, grouped by k/v head; groups: kept k/v heads; channels: kept MLP
    channel indices; kv_map: per kept query head, the position of its k/v head among the kept ones, or None
    when every kept group keeps the same number of query heads; pairs: per kept group, the RoPE pairs
    (indices d < head_dim/2) it keeps, padded with removed ones to the layer's common count, or None when
    every kept group keeps all of them."""
    o_cols = plan[tensor_name(layer, "self_attn.o_proj", "cols")].view(geo.kv, geo.rep, geo.hd)
    live = o_cols.any(dim=-1)  # [kv, rep]
    heads = [(g, r) for g in range(geo.kv) for r in range(geo.rep) if live[g, r]]
    groups = [g for g in range(geo.kv) if live[g].any()]
    counts = {int(live[g].sum()) for g in groups}
    kv_map = None if len(counts) <= 1 else [groups.index(g) for g, _ in heads]
    channel = (plan[tensor_name(layer, "mlp.gate_proj", "rows")] & plan[tensor_name(layer, "mlp.up_proj", "rows")]
               & plan[tensor_name(layer, "mlp.down_proj", "cols")])
    return {"heads": heads, "groups": groups, "kv_map": kv_map, "channels": channel.nonzero().flatten(),
            "pairs": _kept_pairs(plan, geo, layer, groups)}


def _kept_pairs(plan: Plan, geo: Geometry, layer: int, groups: list[int]) -> list[list[int]] | None:
    """Per kept group, its live RoPE pairs, then removed ones up to the layer's largest live count (at least
    one, so a group whose pairs are all gone still has a head dimension: zero logits, uniform attention)."""
    half = geo.hd // 2
    k_rows = plan[tensor_name(layer, "self_attn.k_proj", "rows")].view(geo.kv, geo.hd)
    live = k_rows[:, :half] | k_rows[:, half:]  # [kv, half]
    if not groups or all(bool(live[g].all()) for g in groups):
        return None
    width = max(1, max(int(live[g].sum()) for g in groups))
    return [(live[g].nonzero().flatten().tolist() + (~live[g]).nonzero().flatten().tolist())[:width] for g in groups]


def _head_index(units: list[int], width: int, dims: list[list[int]] | None = None) -> torch.Tensor:
    """Row (or column) indices of units of ``width`` neurons, in the given order: every dimension of each, or
    ``dims[i]`` of the i-th."""
    return torch.tensor([u * width + d for i, u in enumerate(units) for d in (range(width) if dims is None
                                                                              else dims[i])], dtype=torch.long)


def masked_state(model, plan: Plan) -> dict[str, torch.Tensor]:
    """``masked(model, plan).state_dict()`` without copying the model: removed rows (and their biases) and
    columns of every projection zero, every other tensor shared with ``model``."""
    return masked_tensors(dict(model.state_dict()), plan)


def masked_tensors(state: dict[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """``state`` (name -> tensor; updated and returned) with the rows (and their biases) and columns ``plan``
    removes zeroed in copies; masks of projections ``state`` does not hold (other layers') are skipped."""
    for name, keep in plan.items():
        prefix, side = name.rsplit(".", 1)
        if keep.all() or prefix + ".weight" not in state:
            continue
        weight = state[prefix + ".weight"] = state[prefix + ".weight"].clone()
        if side == "rows":
            weight[~keep] = 0
            if prefix + ".bias" in state:
                state[prefix + ".bias"] = state[prefix + ".bias"].clone()
                state[prefix + ".bias"][~keep] = 0
        else:
            weight[:, ~keep] = 0
    return state


def _block_state(zeroed: dict, src: str, dst: str, norm: str, rows: dict, out_proj: str, cols) -> dict:
    """One kept block's tensors, renamed from layer prefix ``src`` to ``dst``: its norm, the kept rows (and
    biases) of its input projections, and the kept columns of its output projection (whose bias stays whole)."""
    state = {f"{dst}{norm}.weight": zeroed[f"{src}{norm}.weight"]}
    for proj, index in rows.items():
        state[f"{dst}{proj}.weight"] = zeroed[f"{src}{proj}.weight"][index]
        if f"{src}{proj}.bias" in zeroed:
            state[f"{dst}{proj}.bias"] = zeroed[f"{src}{proj}.bias"][index]
    state[f"{dst}{out_proj}.weight"] = zeroed[f"{src}{out_proj}.weight"][:, cols]
    if f"{src}{out_proj}.bias" in zeroed:
        state[f"{dst}{out_proj}.bias"] = zeroed[f"{src}{out_proj}.bias"]
    return state


def dense_layer(zeroed: dict, plan: Plan, geo: Geometry, layer: int, dst_index: int) -> tuple[dict, dict] | None:
    """Decoder layer ``layer`` in the dense format as layer ``dst_index`` of the expert: (its tensors, its
    per-layer config), or None when both its blocks are skipped (the layer is dropped). ``zeroed``: the
    masked tensors (:func:`masked_tensors`) under the source model's names, at least this layer's; ``plan``
    propagated (:func:`cusprun.selection.plan.propagate`)."""
    units = layer_units(plan, geo, layer)
    src, dst = f"model.layers.{layer}.", f"model.layers.{dst_index}."
    o_bias, down_bias = zeroed.get(src + "self_attn.o_proj.bias"), zeroed.get(src + "mlp.down_proj.bias")
    attention = bool(units["heads"]) or (o_bias is not None and bool(o_bias.any()))
    mlp = len(units["channels"]) > 0 or (down_bias is not None and bool(down_bias.any()))
    if not attention and not mlp:
        return None
    overrides = {"num_attention_heads": len(units["heads"]), "num_key_value_heads": len(units["groups"]),
                 "intermediate_size": len(units["channels"])}
    if units["kv_map"] is not None:
        overrides["cusprun_kv_map"] = units["kv_map"]
    if units["pairs"] is not None:
        overrides["cusprun_rope_pairs"] = units["pairs"]
    overrides["skip"] = [b for b, on in (("self_attn", attention), ("mlp", mlp)) if not on]
    state = {}
    if attention:
        heads = [g * geo.rep + r for g, r in units["heads"]]
        o_index, v_index = _head_index(heads, geo.hd), _head_index(units["groups"], geo.hd)
        q_index, k_index = o_index, v_index
        if units["pairs"] is not None:
            dims = {g: rope_pair_dims(p, geo.hd) for g, p in zip(units["groups"], units["pairs"])}
            q_index = _head_index(heads, geo.hd, [dims[g] for g, _ in units["heads"]])
            k_index = _head_index(units["groups"], geo.hd, [dims[g] for g in units["groups"]])
        state.update(_block_state(zeroed, src, dst, "input_layernorm", {
            "self_attn.q_proj": q_index, "self_attn.k_proj": k_index, "self_attn.v_proj": v_index},
            "self_attn.o_proj", o_index))
    if mlp:
        channels = units["channels"]
        state.update(_block_state(zeroed, src, dst, "post_attention_layernorm", {
            "mlp.gate_proj": channels, "mlp.up_proj": channels}, "mlp.down_proj", channels))
    return state, overrides


def dense_config(source_config, per_layer: dict, kept_layers: list[int]):
    """The dense expert's config: ``source_config``'s with the per-layer shapes (:func:`dense_layer`'s) of the
    kept layers (their source indices, ``kept_layers``)."""
    config_cls, model_cls = DENSE[source_config.model_type]
    config_dict = source_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "per_layer_config"):
        config_dict.pop(key, None)
    if config_dict.get("layer_types"):
        config_dict["layer_types"] = [config_dict["layer_types"][i] for i in kept_layers]
    config_dict.update(num_hidden_layers=len(kept_layers), head_dim=Geometry(source_config).hd)
    config = config_cls(per_layer_config=per_layer, cusprun_source_layers=kept_layers, **config_dict)
    config.architectures = [model_cls.__name__]
    return config


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def dense(model, plan: Plan):
    """A dense-format model computing exactly what ``masked(model, plan)`` computes (see module doc), on
    ``model``'s device and in its dtype (a model on a GPU needs room there for its expert too)."""
    from transformers.initialization import no_init_weights

    arch = model.config.model_type
    if arch not in DENSE:
        raise ValueError(f"the dense format supports {tuple(DENSE)}, not {arch!r}")
    geo = Geometry(model.config)
    plan = propagate(plan, geo)
    zeroed = masked_state(model, plan)  # removed neurons inside kept units stay as zeros
    state = {k: v for k, v in zeroed.items() if not k.startswith("model.layers.")}
    per_layer, kept_layers = {}, []
    for layer in range(geo.layers):
        kept = dense_layer(zeroed, plan, geo, layer, len(kept_layers))
        if kept is not None:
            state.update(kept[0])
            per_layer[len(kept_layers)] = kept[1]
            kept_layers.append(layer)
    config = dense_config(model.config, per_layer, kept_layers)
    model_cls = DENSE[arch][1]
    source = next(model.parameters())
    # built on the source's device in its dtype: an 8B model's expert on a GPU never passes through host
    # memory or float32 (the cast after it still casts floating buffers, as the source's own cast did)
    with no_init_weights(), torch.device(source.device), _default_dtype(source.dtype):
        out = model_cls(config)
    out = out.to(dtype=source.dtype)
    out.tie_weights()
    out.load_state_dict(state, strict=True)  # copies into the new parameters: model stays untouched
    return out.eval()
