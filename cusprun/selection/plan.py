"""Pruning plans: which rows and columns of every projection stay, with all dead neurons propagated.

A plan is a mapping ``"model.layers.{l}.{P}.rows|cols" -> bool keep mask``, keyed like the score
file (:func:`cusprun.core.neurons.tensor_name`). :func:`propagate` removes every neuron a removal makes
dead, so that the sliced model computes exactly what the masked model (removed rows, their biases
and columns zeroed) computes while holding no parameter that cannot influence the output:

* MLP channel k lives only while gate row k, up row k and down column k all do (act(0)·up = 0);
* v row (g, d) and the o columns (h, d) of every query head h sharing k/v head g live or die
  together (attention is linear in V; O_h[:, d] is read only by those o columns);
* a query head whose o columns are all removed is dead: its q rows go;
* RoPE mixes head dimensions d and its partner p(d): if q rows d and p(d) are removed in every
  query head of a group, the group's k rows d and p(d) are dead, and the other way round.
"""

from __future__ import annotations

import torch

from ..core.neurons import PROJECTIONS, Geometry, tensor_name

Plan = dict[str, torch.Tensor]


def propagate(plan: Plan, geo: Geometry) -> Plan:
    """A new plan in which every neuron made dead by the plan's removals is removed too."""
    out = {k: v.clone() for k, v in plan.items()}
    half = geo.hd // 2
    for layer in range(geo.layers):
        def m(proj, side, layer=layer):
            return out[tensor_name(layer, proj, side)]
        # MLP channels: gate row, up row and down column go together.
        channel = m("mlp.gate_proj", "rows") & m("mlp.up_proj", "rows") & m("mlp.down_proj", "cols")
        for proj, side in (("mlp.gate_proj", "rows"), ("mlp.up_proj", "rows"), ("mlp.down_proj", "cols")):
            m(proj, side).copy_(channel)
        # v rows <-> o columns of every query head sharing the k/v head.
        o_cols = m("self_attn.o_proj", "cols").view(geo.kv, geo.rep, geo.hd)
        v_rows = m("self_attn.v_proj", "rows").view(geo.kv, geo.hd)
        v_rows &= o_cols.any(dim=1)
        o_cols &= v_rows[:, None, :]
        # Query heads whose output is never read lose their q rows.
        q_rows = m("self_attn.q_proj", "rows").view(geo.kv, geo.rep, geo.hd)
        q_rows &= o_cols.any(dim=2, keepdim=True)
        # RoPE pairs (d, d + half): dead in q for all heads of a group <=> dead in k, and back.
        k_rows = m("self_attn.k_proj", "rows").view(geo.kv, geo.hd)
        q_pair = (q_rows[..., :half] | q_rows[..., half:]).any(dim=1)  # [kv, half]
        k_pair = k_rows[:, :half] | k_rows[:, half:]
        k_rows &= torch.cat([q_pair, q_pair], dim=-1)
        q_rows &= torch.cat([k_pair, k_pair], dim=-1)[:, None, :]
    return out


def kept_params(plan: Plan, geo: Geometry) -> int:
    """Projection parameters (weights and biases) a propagated plan keeps."""
    total = 0
    for layer in range(geo.layers):
        for proj in PROJECTIONS:
            rows = int(plan[tensor_name(layer, proj, "rows")].sum())
            cols = int(plan[tensor_name(layer, proj, "cols")].sum())
            total += rows * cols + (rows if geo.bias[proj] else 0)
    return total


def kept_counts(plan: Plan, geo: Geometry) -> dict[str, dict[str, list[int]]]:
    """{layer: {projection: [rows kept, cols kept]}} for reports."""
    return {str(layer): {proj: [int(plan[tensor_name(layer, proj, s)].sum()) for s in ("rows", "cols")]
                         for proj in PROJECTIONS} for layer in range(geo.layers)}
