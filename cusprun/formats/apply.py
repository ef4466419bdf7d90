"""Turn a plan into a model: dense (per-layer shapes), sliced, masked (original architecture, zeros) or stock."""

from __future__ import annotations

import copy
import re

import torch

from ..core.neurons import tensor_name
from ..selection.plan import Plan
from .modeling_cusprun import PROJECTIONS, SLICED

FORMATS = ("dense", "sliced", "masked", "stock")
# A decoder layer's projection parameter, in every format's models (the dense format renumbers kept layers).
_PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.(weight|bias)")


def held_params(model) -> tuple[int, int]:
    """(parameters, projection parameters) that ``model`` holds, which are the floating-point tensors its
    ``save_pretrained`` writes: every parameter's elements, a tied (shared) one once; projection parameters are
    the decoder layers' q, k, v, o, gate, up and down weights and biases. A format keeps what it cannot drop:
    zeros in the masked format, partly removed units whole in the dense one. The sliced format's index
    buffers (integers) are not parameters."""
    total = projection = 0
    for name, param in model.named_parameters():  # a shared tensor is named once
        total += param.numel()
        if _PROJECTION.fullmatch(name):
            projection += param.numel()
    return total, projection


def _masks(plan: Plan, layer: int, proj: str):
    return plan[tensor_name(layer, proj, "rows")], plan[tensor_name(layer, proj, "cols")]


def masked(model, plan: Plan):
    """A copy of ``model`` with removed rows (and their bias entries) and columns set to zero."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer_index, layer in enumerate(out.model.layers):
            for proj in PROJECTIONS:
                linear = layer.get_submodule(proj)
                rows, cols = _masks(plan, layer_index, proj)
                linear.weight[~rows] = 0
                linear.weight[:, ~cols] = 0
                if linear.bias is not None:
                    linear.bias[~rows] = 0
    return out


def sliced(model, plan: Plan):
    """A sliced model computing exactly what ``masked(model, plan)`` computes, holding only live weights."""
    from transformers.initialization import no_init_weights

    config_cls, model_cls = SLICED[model.config.model_type]
    state = dict(model.state_dict())
    slices = {}
    for layer_index, layer in enumerate(model.model.layers):
        slices[str(layer_index)] = {}
        for proj in PROJECTIONS:
            linear = layer.get_submodule(proj)
            rows, cols = _masks(plan, layer_index, proj)
            # gate/up outputs and down inputs are the compacted MLP channels: no scatter, no gather
            gather = not bool(cols.all()) and proj != "mlp.down_proj"
            scatter = not bool(rows.all()) and proj not in ("mlp.gate_proj", "mlp.up_proj")
            prefix = f"model.layers.{layer_index}.{proj}."
            state[prefix + "weight"] = linear.weight.detach()[rows][:, cols].clone()
            if linear.bias is not None:
                state[prefix + "bias"] = linear.bias.detach()[rows].clone()
            if gather:
                state[prefix + "in_index"] = cols.nonzero().flatten()
            if scatter:
                state[prefix + "out_index"] = rows.nonzero().flatten()
            slices[str(layer_index)][proj] = [int(rows.sum()), int(cols.sum()), gather, scatter]
    config_dict = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        config_dict.pop(key, None)
    config = config_cls(cusprun_slices=slices, **config_dict)
    config.architectures = [model_cls.__name__]
    with no_init_weights():
        out = model_cls(config)
    out.tie_weights()  # construction under no_init_weights leaves tied embeddings untied
    out.load_state_dict(state, strict=True)
    return out.to(dtype=next(model.parameters()).dtype).eval()


def apply(model, plan, format: str = "dense"):
    """The pruned model, in memory (``model`` is left as it was); every format computes exactly what
    ``masked`` computes.

    plan: a :class:`~cusprun.selection.algorithm.Selection` (from ``ScoreSet.select``) or a dict of keep masks.
    format: ``dense`` (default: dense matrices, per-layer head and channel counts, removed blocks skipped
    and layers dropped; any plan, fastest for plans of whole units, see :mod:`cusprun.formats.dense`), ``sliced``
    (only live rows and columns, gathered and scattered at full width), ``masked`` (original
    architecture, removed rows/columns zero) or ``stock`` (the original architecture class with fewer MLP
    channels and k/v groups; needs a plan uniform across layers, from ``ScoreSet.select(ratio,
    uniform=True)``, see :mod:`cusprun.formats.stock`)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    keep = getattr(plan, "plan", plan)
    if format == "stock":
        from .stock import stock

        return stock(model, keep)
    if format == "dense":
        from .dense import dense

        return dense(model, keep)
    return sliced(model, keep) if format == "sliced" else masked(model, keep)
