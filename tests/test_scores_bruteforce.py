"""The engine's scores equal brute-force ablation (float64, the model's own modules) within 1e-4."""

import pytest
import torch

from cusprun.core.neurons import Geometry, influence_name
from cusprun.engine.layer_major import Scorer
from tests.brute_force import brute_force_scores
from tests.tiny import random_ids, tiny_model

TOL = 1e-4  # relative to each tensor's largest score


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("measure", ["block", "local"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_engine_matches_brute_force(arch, measure, backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("CUSPRUN_BACKEND", backend)
    model = tiny_model(arch, seed=1)
    docs = [random_ids(n, seed=n) for n in (1, 7, 13)]
    engine = Scorer(model, measure).score_documents(docs)
    layers = model.config.num_hidden_layers  # every neuron's tensor and every layer's block influence
    assert sorted(engine) == sorted(Geometry(model.config).names() + [influence_name(i) for i in range(layers)])
    for d, ids in enumerate(docs):
        reference = brute_force_scores(model, ids, measure)
        for name, ref in reference.items():
            got = engine[name][d].double()
            assert got.shape == ref.shape, name
            err = (got - ref).abs().max().item()
            bound = TOL * ref.abs().max().item() + 1e-30
            assert err <= bound, f"{name} doc {d}: max err {err:.3g} vs largest score {ref.max():.3g}"


def test_block_differs_from_local_where_it_should():
    """Guards against a block measure that silently falls back to local values."""
    model = tiny_model("llama", seed=2)
    doc = [random_ids(9, seed=3)]
    block = Scorer(model, "block").score_documents(doc)
    local = Scorer(model, "local").score_documents(doc)
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert not torch.allclose(block[f"model.layers.0.{proj}.rows"], local[f"model.layers.0.{proj}.rows"])
    assert torch.equal(block["model.layers.0.self_attn.o_proj.rows"], local["model.layers.0.self_attn.o_proj.rows"])
