"""Brute-force reference scores: remove each neuron, rerun the model's own module in float64, measure.

Independent of the engine: no linearity, no RoPE algebra, no hand-written attention — only the
Hugging Face modules run with one row or column of one weight zeroed.
"""

from __future__ import annotations

import copy

import torch

from cusprun.core.neurons import PROJECTIONS

LOCAL_COLUMNS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


def _capture_block_inputs(model, ids):
    """Per layer: (attention args, kwargs), mlp input; from one float64 eager forward pass."""
    captured = [dict() for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: captured[i].__setitem__("attn", (a, dict(kw))), with_kwargs=True))
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: captured[i].__setitem__("mlp", a[0])))
        for proj in PROJECTIONS:
            handles.append(layer.get_submodule(proj).register_forward_pre_hook(
                lambda m, a, i=i, p=proj: captured[i].__setitem__(p, a[0])))
    with torch.no_grad():
        model.model(input_ids=torch.tensor([ids]), use_cache=False)
    for h in handles:
        h.remove()
    return captured


def _ablate(linear, side, index):
    """Zero row ``index`` (and its bias) or column ``index`` of ``linear``; return an undo function."""
    w, b = linear.weight.data.clone(), None if linear.bias is None else linear.bias.data.clone()
    if side == "rows":
        linear.weight.data[index] = 0
        if linear.bias is not None:
            linear.bias.data[index] = 0
    else:
        linear.weight.data[:, index] = 0

    def undo():
        linear.weight.data.copy_(w)
        if b is not None:
            linear.bias.data.copy_(b)
    return undo


def _output(layer, cap, proj, what):
    """The output h that a score measures: the projection's own, or its enclosing block's."""
    if what == "local":
        return layer.get_submodule(proj)(cap[proj])
    if what == "attention":
        args, kwargs = cap["attn"]
        return layer.self_attn(*args, **kwargs)[0]
    return layer.mlp(cap["mlp"])


def brute_force_scores(model, ids, measure):
    """tensor name -> float64 [features] scores of one document."""
    model = copy.deepcopy(model).double()
    model.config._attn_implementation = "eager"
    captured = _capture_block_inputs(model, ids)
    out = {}
    with torch.no_grad():
        for li, layer in enumerate(model.model.layers):
            for proj in PROJECTIONS:
                linear = layer.get_submodule(proj)
                for side in ("rows", "cols"):
                    if measure == "local" or (side == "cols" and proj in LOCAL_COLUMNS):
                        what = "local"
                    else:
                        what = "attention" if proj.startswith("self_attn") else "mlp"
                    base = _output(layer, captured[li], proj, what)
                    n = linear.weight.shape[0 if side == "rows" else 1]
                    scores = torch.empty(n, dtype=torch.float64)
                    for i in range(n):
                        undo = _ablate(linear, side, i)
                        scores[i] = (_output(layer, captured[li], proj, what) - base).norm()
                        undo()
                    out[f"model.layers.{li}.{proj}.{side}"] = scores
    return out


def assert_gpu_engine_matches_brute_force(arch: str, backend: str, monkeypatch) -> None:
    """The engine on a GPU with ``backend`` forced scores two packed documents of a tiny ``arch`` model as
    brute force does on the CPU (the same weights), to 1e-4 of each tensor's largest score."""
    import cusprun
    from tests.tiny import random_ids, tiny_model

    monkeypatch.setenv("CUSPRUN_BACKEND", backend)
    docs = [random_ids(9, seed=4), random_ids(3, seed=5)]
    result = cusprun.score(tiny_model(arch, seed=1).cuda(), docs, progress=False)
    assert result.metadata["backend"] == backend
    reference = tiny_model(arch, seed=1)  # the same weights, on the CPU
    for i, ids in enumerate(docs):
        for name, expected in brute_force_scores(reference, ids, "block").items():
            got = result.scores[name][i].double()
            assert (got - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-6, name
