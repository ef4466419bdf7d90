"""Sliced == masked (logits within 1e-4, float32); parameter counts equal the reported ones."""

import pytest
import torch

from cusprun.core.neurons import Geometry
from cusprun.engine.layer_major import Scorer
from cusprun.formats.apply import apply
from cusprun.selection.algorithm import relevance, select
from cusprun.selection.plan import kept_params, propagate
from tests.tiny import random_ids, tiny_model


def corpus_scores(model, n_corpora, seed):
    return [Scorer(model, "block").score_documents([random_ids(n, seed=seed + 10 * c + n) for n in (5, 11, 8)])
            for c in range(n_corpora)]


def max_logit_gap(a, b, vocab, seed=0):
    ids = torch.tensor([random_ids(17, vocab=vocab, seed=seed), random_ids(17, vocab=vocab, seed=seed + 1)])
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def non_projection_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if "_proj." not in n)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("n_corpora", [1, 2, 3])
def test_sliced_computes_exactly_what_masked_computes(arch, ratio, n_corpora):
    model = tiny_model(arch, seed=4, layers=3)
    geo = Geometry(model.config)
    sel = select(relevance(corpus_scores(model, n_corpora, seed=n_corpora)), geo, ratio)
    sliced, masked = apply(model, sel.plan, "sliced"), apply(model, sel.plan, "masked")
    assert max_logit_gap(sliced, masked, model.config.vocab_size) <= 1e-4
    assert sum(p.numel() for p in sliced.parameters()) == non_projection_params(model) + sel.kept_projection_params
    assert abs(sel.removed_fraction - ratio) < 0.08  # tiny models: coarse steps; SmolLM2 is checked to 0.01
    assert max_logit_gap(masked, model, model.config.vocab_size) > 0  # the removal really changed something


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_random_plans_with_every_dead_rule(arch):
    """Plans that hit each propagation rule head-on: whole heads, RoPE pairs, v rows, MLP channels."""
    model = tiny_model(arch, seed=5)
    geo = Geometry(model.config)
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        plan = {n: torch.rand(geo.size(n), generator=gen) > (0.15 * trial) for n in geo.names()}
        plan["model.layers.0.self_attn.o_proj.cols"][:geo.hd] = False  # a whole query head's output
        qk = "model.layers.1.self_attn.k_proj.rows"
        plan[qk][[0, geo.hd // 2]] = False  # a RoPE pair of k
        full = propagate(plan, geo)
        assert not full["model.layers.0.self_attn.q_proj.rows"][:geo.hd].any()
        assert not full["model.layers.1.self_attn.q_proj.rows"].view(geo.kv, geo.rep, geo.hd)[0, :, 0].any()
        sliced, masked = apply(model, full, "sliced"), apply(model, full, "masked")
        assert max_logit_gap(sliced, masked, model.config.vocab_size, seed=trial) <= 1e-4
        # propagation only removes what is dead: masking the unpropagated plan gives the same model
        assert max_logit_gap(apply(model, plan, "masked"), masked, model.config.vocab_size, seed=trial) <= 1e-5
        assert sum(p.numel() for p in sliced.parameters()) == non_projection_params(model) + kept_params(full, geo)
