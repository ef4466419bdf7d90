"""Selection on hand-made score sets: the every-document rule, intersection, ties, the σ search."""

import torch

from cusprun.core.neurons import Geometry
from cusprun.selection.algorithm import rank_fractions, relevance, select
from cusprun.selection.plan import kept_params
from tests.tiny import tiny_model

GEO = Geometry(tiny_model("llama", layers=2).config)
DOWN_ROWS = "model.layers.1.mlp.down_proj.rows"  # no propagation rule touches down rows


def score_set(n_docs, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(n_docs, GEO.size(n), generator=g) + 1 for n in GEO.names()}


def test_rank_fractions_ascending_with_index_tie_break():
    r = rank_fractions(torch.tensor([[3.0, 1.0, 2.0, 1.0]]))
    assert r.tolist() == [[0.75, 0.0, 0.5, 0.25]]


def test_a_neuron_relevant_in_one_document_stays():
    s = score_set(4, seed=0)
    s[DOWN_ROWS][:, 0] = 0.0  # least relevant everywhere -> R = 0
    s[DOWN_ROWS][:, 1] = 0.0
    s[DOWN_ROWS][2, 1] = 99.0  # ... except in one document: most relevant there
    rel = relevance([s])
    assert rel[DOWN_ROWS][0] == 0.0 and rel[DOWN_ROWS][1] == (GEO.size(DOWN_ROWS) - 1) / GEO.size(DOWN_ROWS)
    plan = select(rel, GEO, 0.5).plan
    assert not plan[DOWN_ROWS][0] and plan[DOWN_ROWS][1]


def test_intersection_over_corpora():
    a, b = score_set(3, seed=1), score_set(2, seed=2)
    for s in (a, b):
        s[DOWN_ROWS][:, 0] = 0.0
        s[DOWN_ROWS][:, 1] = 0.0
    b[DOWN_ROWS][1, 1] = 99.0  # irrelevant to corpus a, relevant to one document of corpus b
    plan_a = select(relevance([a]), GEO, 0.3).plan
    plan_ab = select(relevance([a, b]), GEO, 0.3).plan
    assert not plan_a[DOWN_ROWS][1] and plan_ab[DOWN_ROWS][1] and not plan_ab[DOWN_ROWS][0]


def test_ties_are_broken_deterministically_and_sigma_search_reaches_target():
    flat = {n: torch.ones(2, GEO.size(n)) for n in GEO.names()}  # every score tied
    first, second = select(relevance([flat]), GEO, 0.3), select(relevance([flat]), GEO, 0.3)
    assert all(torch.equal(first.plan[n], second.plan[n]) for n in GEO.names())
    for ratio in (0.1, 0.25, 0.5):
        sel = select(relevance([score_set(3, seed=4)]), GEO, ratio)
        assert abs(sel.removed_fraction - ratio) < 0.03
        assert sel.removed_fraction == 1 - kept_params(sel.plan, GEO) / GEO.projection_params()
        assert 0 < sel.sigma < 1


def test_larger_ratio_removes_a_superset():
    rel = relevance([score_set(3, seed=5)])
    small, large = select(rel, GEO, 0.2).plan, select(rel, GEO, 0.4).plan
    assert all(bool((large[n] <= small[n]).all()) for n in GEO.names())
