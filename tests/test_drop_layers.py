"""Layers dropped before units or neurons (the paper's §4.5): block influence in the score files, measured on
every document against hooks on the model's own layers; the least influential layers go whole, the selection
reaches the rest of the ratio in the others, and the dense expert computes what the masked model computes."""

import pytest
import torch

import cusprun
from cusprun.core.neurons import influence_name
from cusprun.selection.algorithm import layer_influence
from cusprun.selection.plan import Geometry
from tests.tiny import random_ids, tiny_model

DOCS = (7, 12, 9)


def documents(seed=0):
    return [random_ids(n, seed=seed + n) for n in DOCS]


def brute_force_influence(model, ids):
    """[layers] float64: 1 - cos(layer input, layer output) averaged over the document's tokens, from hooks."""
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, args, kwargs, out, i=i: seen.update(
        {i: (kwargs.get("hidden_states", args[0] if args else None), out[0] if isinstance(out, tuple) else out)}),
        with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return torch.tensor([(1 - torch.nn.functional.cosine_similarity(seen[i][0][0].double(), seen[i][1][0].double(),
                                                                    dim=-1)).mean().item()
                         for i in range(len(model.model.layers))], dtype=torch.float64)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("measure", ["block", "local"])
def test_block_influence_is_measured_on_every_document(arch, measure):
    model = tiny_model(arch, seed=2, layers=3)
    docs = documents()
    score_set = cusprun.score(model, docs, measure, progress=False)
    scores = score_set.scores
    assert set(score_set.relevance()) == set(Geometry(model.config).names())  # neurons only
    for d, ids in enumerate(docs):
        expected = brute_force_influence(model, ids)
        got = torch.stack([scores[influence_name(layer)][d, 0].double() for layer in range(3)])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert all(scores[influence_name(layer)].shape == (len(docs), 1) for layer in range(3))


@pytest.mark.parametrize("granularity, neurons", [("unit", "mlp"), ("unit", "all"), ("neuron", "all")])
def test_the_least_influential_layers_go_whole_and_the_rest_reaches_the_ratio(granularity, neurons):
    model = tiny_model("llama", seed=7, layers=5)
    geo = Geometry(model.config)
    score_set = cusprun.score(model, documents(1), progress=False)
    influence = layer_influence([score_set.scores], geo)
    dropped = sorted(torch.argsort(influence)[:2].tolist())
    sel = score_set.select(0.5, granularity=granularity, neurons=neurons, drop_layers=2)
    assert list(sel.dropped_layers) == dropped
    for layer in range(geo.layers):
        names = [n for n in sel.plan if n.startswith(f"model.layers.{layer}.")]
        assert all(not sel.plan[n].any() for n in names) == (layer in dropped), layer
    assert abs(sel.removed_fraction - 0.5) < 0.02
    # the rest of the ratio comes from the other layers, as the selection chooses there: by default only
    # MLP channels (this tiny model's MLPs hold too little to reach 0.5 without the drop)
    assert sum(not sel.plan[f"model.layers.{layer}.mlp.down_proj.cols"].all()
               for layer in set(range(geo.layers)) - set(dropped)) >= 2
    if neurons == "mlp":
        assert all(sel.plan[f"model.layers.{layer}.self_attn.q_proj.rows"].all()
                   for layer in set(range(geo.layers)) - set(dropped))
        with pytest.raises(ValueError, match="cannot be reached by removing MLP channels"):
            score_set.select(0.5, granularity=granularity, neurons=neurons)
    ids = torch.tensor([random_ids(13, seed=4)])
    dense = cusprun.apply(model, sel, "dense")
    assert dense.config.num_hidden_layers <= geo.layers - 2
    with torch.no_grad():
        gap = dense(ids).logits - cusprun.apply(model, sel, "masked")(ids).logits
    assert gap.abs().max() <= 1e-4


def test_a_layer_stays_when_any_corpus_needs_it():
    """Several corpora: a layer's influence is the largest of the corpora's mean influences."""
    model = tiny_model("qwen2", seed=3, layers=4)
    geo = Geometry(model.config)
    a = cusprun.score(model, documents(0), progress=False)
    b = cusprun.score(model, documents(5)[:2], progress=False)
    both = a & b
    means = torch.stack([layer_influence([s.scores], geo) for s in (a, b)])
    torch.testing.assert_close(layer_influence(both._per_corpus(), geo), means.max(dim=0).values)
    lowest = int(torch.argmin(means.max(dim=0).values))
    sel = both.select(0.4, drop_layers=1)
    assert not sel.plan[f"model.layers.{lowest}.mlp.down_proj.cols"].any()


def test_bad_drops_are_refused():
    model = tiny_model("llama", seed=1, layers=3)
    score_set = cusprun.score(model, documents(), progress=False)
    with pytest.raises(ValueError, match="cannot drop 3 of 3 layers"):
        score_set.select(0.5, drop_layers=3)
    with pytest.raises(ValueError, match=r"dropping 2 of 3 layers already removes 0\.6667 .* drop fewer layers"):
        score_set.select(0.5, drop_layers=2)
    with pytest.raises(ValueError, match="not with a uniform"):
        score_set.select(0.5, uniform=True, drop_layers=1)
    with pytest.raises(ValueError, match="drop_layers must be 0 or more"):
        score_set.select(0.5, drop_layers=-1)
    old = cusprun.ScoreSet({n: t for n, t in score_set.scores.items() if not n.endswith("block_influence")},
                           score_set.metadata)
    with pytest.raises(ValueError, match="hold no block influence"):
        old.select(0.5, drop_layers=1)
    assert old.select(0.2).removed_fraction > 0  # selection without dropping needs no influence
    # an older file intersected with a newer one: the neurons combine, the influence goes
    mixed = old & score_set
    assert not any(n.endswith("block_influence") for n in mixed.scores)
    assert mixed.select(0.2).removed_fraction > 0
    with pytest.raises(ValueError, match="hold no block influence"):
        mixed.select(0.5, drop_layers=1)
    from cusprun.scores.baselines import baseline_scores

    with pytest.raises(ValueError, match="wanda-sp score files do not record it"):
        baseline_scores(model, "wanda-sp", documents()).select(0.5, drop_layers=1)
