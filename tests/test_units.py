"""Selection by units (cusprun.selection.units): unit scores from score files, budgets across layers, whole units."""

import copy
from dataclasses import replace

import pytest
import torch

import cusprun
from cusprun.core.models import ModelSource
from cusprun.formats.dense import layer_units
from cusprun.selection.plan import Geometry, propagate
from cusprun.selection.units import align_channels, layer_keys, select_units, unit_scores, unit_values
from tests.tiny import random_ids, tiny_model

DOCS = (7, 12, 9)


def documents(seed=0):
    return [random_ids(n, seed=seed + n) for n in DOCS]


def block_outputs(model, layer: int, ids: list[int]):
    """(attention block output [T, hidden], o_proj input [T, q], MLP output, down_proj input) of one document,
    float64, from hooks on the model's own modules."""
    seen = {}
    attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
    hooks = [attn.o_proj.register_forward_hook(lambda m, i, o: seen.update(o_in=i[0][0], o_out=o[0])),
             mlp.down_proj.register_forward_hook(lambda m, i, o: seen.update(d_in=i[0][0], d_out=o[0]))]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {k: v.double() for k, v in seen.items()}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("measure", ["block", "local"])
def test_unit_scores_are_block_output_changes(arch, measure):
    """The documented derivations, against the model's own forward pass (float64): the block norms are the
    blocks' output norms, a channel's score is the exact norm of its contribution to the MLP output, and a
    head's score lies between its contribution's norm over the largest column and the sum over its columns."""
    model = tiny_model(arch, seed=2, layers=2).double()
    scores = cusprun.score(model.float(), [random_ids(n, seed=n) for n in DOCS], measure, progress=False).scores
    model = model.double()
    geo = Geometry(model.config)
    for layer in range(geo.layers):
        per_kind = unit_scores(scores, geo, layer)
        heads, attn_norm = per_kind["heads"]
        channels, mlp_norm = per_kind["channels"]
        for d, n in enumerate(DOCS):
            seen = block_outputs(model, layer, random_ids(n, seed=n))
            tol = 1e-4 * float(seen["o_out"].norm())
            assert abs(float(attn_norm[d]) - float(seen["o_out"].norm())) <= tol
            assert abs(float(mlp_norm[d]) - float(seen["d_out"].norm())) <= 1e-4 * float(seen["d_out"].norm())
            w_down = model.model.layers[layer].mlp.down_proj.weight.double()
            for k in (0, geo.inter // 2, geo.inter - 1):
                contribution = torch.outer(seen["d_in"][:, k], w_down[:, k]).norm()
                assert abs(float(channels[d, k]) - float(contribution)) <= 1e-4 * float(seen["d_out"].norm())
            w_o = model.model.layers[layer].self_attn.o_proj.weight.double()
            for h in range(geo.heads):
                cols = slice(h * geo.hd, (h + 1) * geo.hd)
                contribution = float((seen["o_in"][:, cols] @ w_o[:, cols].T).norm())
                per_col = scores[f"model.layers.{layer}.self_attn.o_proj.cols"][d, cols].double()
                assert float(per_col.max()) - tol <= float(heads[d, h]) <= float(per_col.sum()) + tol
                assert contribution <= float(per_col.sum()) + tol


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("budget", ["relative", "rank", "equal"])
@pytest.mark.parametrize("ratio", [0.15, 0.4, 0.8])
def test_unit_selection_removes_whole_units_and_reaches_the_ratio(arch, budget, ratio):
    model = tiny_model(arch, seed=4, layers=4)
    geo = Geometry(model.config)
    sel = cusprun.score(model, documents(), progress=False).select(ratio, granularity="unit", neurons="all",
                                                                  budget=budget)
    assert all(torch.equal(sel.plan[n], propagate(sel.plan, geo)[n]) for n in sel.plan)
    for name, keep in sel.plan.items():  # hidden-size rows and columns are never removed
        if name.endswith(("q_proj.cols", "k_proj.cols", "v_proj.cols", "gate_proj.cols", "up_proj.cols",
                          "o_proj.rows", "down_proj.rows")):
            assert keep.all(), name
    for layer in range(geo.layers):  # whole heads: every o column of a kept head is kept
        o_cols = sel.plan[f"model.layers.{layer}.self_attn.o_proj.cols"].view(geo.heads, geo.hd)
        assert torch.equal(o_cols.all(-1), o_cols.any(-1))
    # at least the ratio, and at most the coarsest step more: a query head, with its k/v group where it was the last
    step = (2 * geo.hd * geo.hidden + 2 * geo.hd * (geo.hidden + 1)) / geo.projection_params()
    assert ratio <= sel.removed_fraction < ratio + step
    ids = torch.tensor([random_ids(15, seed=1)])
    with torch.no_grad():
        gap = cusprun.apply(model, sel, "dense")(ids).logits - cusprun.apply(model, sel, "masked")(ids).logits
    assert gap.abs().max() <= 1e-4


def test_relative_budget_differs_across_layers_and_follows_the_values():
    """Under the relative budget the layers lose different numbers of channels, and every removed channel's value
    per parameter is at most every kept one's (the order is global, not per layer)."""
    model = tiny_model("llama", seed=6, layers=4)
    geo = Geometry(model.config)
    score_set = cusprun.score(model, documents(3), progress=False)
    sel = score_set.select(0.15, granularity="unit", neurons="mlp", budget="relative")
    kept = [len(layer_units(sel.plan, geo, layer)["channels"]) for layer in range(geo.layers)]
    assert len(set(kept)) > 1
    values = unit_values([score_set.scores], geo, budget="relative")["channels"]
    removed = torch.stack([~sel.plan[f"model.layers.{layer}.mlp.down_proj.cols"] for layer in range(geo.layers)])
    assert values[removed].max() <= values[~removed].min()


@pytest.mark.parametrize("neurons", ["mlp", "mlp+pairs"])
def test_equal_budget_takes_the_same_count_of_each_kind_from_every_layer_and_the_weakest(neurons):
    """Under the equal budget every layer loses the same number of channels (and of pair slots) ±1, and each
    its lowest-valued ones."""
    model = tiny_model("llama", seed=6, layers=5)
    geo = Geometry(model.config)
    score_set = cusprun.score(model, documents(3), progress=False)
    sel = score_set.select(0.2, granularity="unit", neurons=neurons, budget="equal")
    values = unit_values([score_set.scores], geo)
    removed = torch.stack([~sel.plan[f"model.layers.{layer}.mlp.down_proj.cols"] for layer in range(geo.layers)])
    counts = removed.sum(1)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.min()) > 0
    for layer in range(geo.layers):
        v = values["channels"][layer]
        assert v[removed[layer]].max() <= v[~removed[layer]].min()
    if neurons == "mlp+pairs":
        k_kept = torch.tensor([int(sel.plan[f"model.layers.{layer}.self_attn.k_proj.rows"].sum())
                               for layer in range(geo.layers)])
        assert int(k_kept.max() - k_kept.min()) <= 2 * geo.kv  # one slot: two k rows per k/v head
        assert int(k_kept.max()) < geo.kv * geo.hd


def test_several_corpora_take_each_layers_share_from_the_corpora_and_the_units_from_the_intersection():
    """Rank budget, two corpora: each layer loses the mean of what the two corpora's own selections take from
    it (±1 channel), and in each layer the channels lowest in the intersection's values."""
    model = tiny_model("llama", seed=7, layers=5)
    geo = Geometry(model.config)
    first = cusprun.score(model, documents(seed=1), corpus="a", progress=False)
    second = cusprun.score(model, documents(seed=20), corpus="b", progress=False)

    def removed(sel):
        return torch.stack([~sel.plan[f"model.layers.{layer}.mlp.down_proj.cols"] for layer in range(geo.layers)])

    both = cusprun.intersect(first, second).select(0.2)
    own = (removed(first.select(0.2)).sum(1) + removed(second.select(0.2)).sum(1)).double() / 2
    assert (removed(both).sum(1) - own).abs().max() <= 1 and int(removed(both).sum(1).min()) > 0
    assert both.sigma is None  # no single threshold: the layers' shares decide
    values = unit_values([first.scores, second.scores], geo)["channels"]
    gone = removed(both)
    for layer in range(geo.layers):
        assert values[layer][gone[layer]].max() <= values[layer][~gone[layer]].min()


@pytest.mark.parametrize("arch, align", [("llama", 4), ("mistral", 4), ("qwen2", 3)])
@pytest.mark.parametrize("corpora, drop_layers", [(1, 0), (2, 0), (2, 1)])
def test_aligned_channels_keep_multiples_from_the_same_order_and_stay_exact(arch, align, corpora, drop_layers):
    """align: every kept layer keeps a multiple of ``align`` channels or all of them; in each layer the removed
    channels are the ones the unaligned selection's order takes first (the two nest); at least the ratio is
    removed, at most one step of ``align`` channels more; the dense export computes what the masked model computes."""
    model = tiny_model(arch, seed=9, layers=5)
    geo = Geometry(model.config)
    sets = [cusprun.score(model, documents(seed=7 * c + 1), corpus=f"c{c}", progress=False) for c in range(corpora)]
    score_set = cusprun.intersect(*sets)
    plain = score_set.select(0.2, drop_layers=drop_layers)
    aligned = score_set.select(0.2, drop_layers=drop_layers, align=align)

    def removed(sel):
        return torch.stack([~sel.plan[f"model.layers.{layer}.mlp.down_proj.cols"] for layer in range(geo.layers)])

    kept = geo.inter - removed(aligned).sum(1)
    live = [layer for layer in range(geo.layers) if layer not in aligned.dropped_layers]
    assert all(int(kept[layer]) % align == 0 or int(kept[layer]) == geo.inter for layer in live)
    assert len(live) == geo.layers - drop_layers
    for layer in live:
        a, p = removed(aligned)[layer], removed(plain)[layer]
        assert bool((a & ~p).sum() == 0) or bool((p & ~a).sum() == 0), layer  # prefixes of one order
    step = align * 3 * geo.hidden / geo.projection_params()  # one layer's count moving by align channels
    assert 0.2 <= aligned.removed_fraction <= 0.2 + step + 1e-12
    ids = torch.tensor([random_ids(15, seed=1)])
    with torch.no_grad():
        gap = cusprun.apply(model, aligned, "dense")(ids).logits - cusprun.apply(model, aligned, "masked")(ids).logits
    assert gap.abs().max() <= 1e-4



def test_the_default_alignment_is_64_only_for_cusprun_channels_of_wide_mlps():
    """align=None: 64 where Cus-Prun's scores select whole MLP channels of an MLP at least 1024 wide, else 1
    (narrow MLPs such as the tests' tiny models, the per-neuron selection, the stock format, other methods);
    a given align is kept; select uses what resolved_align says."""
    model = tiny_model("llama", seed=9, layers=3)
    score_set = cusprun.score(model, documents(seed=1), corpus="c", progress=False)
    wide = copy.deepcopy(model.config)
    wide.intermediate_size = 1024
    assert score_set.resolved_align(None) == 1 and score_set.resolved_align(None, model.config) == 1
    assert score_set.resolved_align(None, wide) == 64 and score_set.resolved_align(None, wide, neurons="all") == 64
    assert score_set.resolved_align(None, wide, granularity="neuron") == 1
    assert score_set.resolved_align(None, wide, uniform=True) == 1
    assert score_set.resolved_align(8, wide, granularity="neuron") == 8
    other = replace(score_set, metadata={**score_set.metadata, "method": "wanda-sp"})
    assert other.resolved_align(None, wide) == 1
    narrow = score_set.select(0.2)  # the tiny model's MLP: as selected, the same plan as align=1
    assert all(torch.equal(narrow.plan[k], v) for k, v in score_set.select(0.2, align=1).plan.items())


def test_select_and_build_expert_use_the_default_alignment(monkeypatch, tmp_path):
    """With the default's thresholds scaled to the tiny model (align 4 from 16 channels), select(align=None)
    is select(align=4), not the plan as selected, and pruning.json records 4."""
    import cusprun.selection.units as units
    from cusprun.experts.build import build_expert

    monkeypatch.setattr(units, "DEFAULT_ALIGN", 4)
    monkeypatch.setattr(units, "MIN_ALIGNED_WIDTH", 16)
    model = tiny_model("llama", seed=9, layers=3)
    assert model.config.intermediate_size >= 16
    score_set = cusprun.score(model, documents(seed=1), corpus="c", progress=False)

    def plan(**kw):
        return score_set.select(0.2, **kw).plan
    default, four, plain = plan(), plan(align=4), plan(align=1)
    assert all(torch.equal(default[k], four[k]) for k in four)
    assert any(not torch.equal(default[k], plain[k]) for k in plain)
    report = build_expert(model, None, ModelSource("tiny", "tiny"), [score_set], ["c.safetensors"], 0.2,
                          "masked", tmp_path / "expert")
    assert report["align"] == 4

def test_align_rounds_to_the_nearest_multiple_or_keeps_every_channel():
    """18 channels, align 8: each kept count goes to the nearest of the multiples of 8 and 18 (ties keep more),
    but never from some channels to none; the layer's earliest channels in the order going first, and never
    more as fewer are kept."""
    rank = torch.stack([torch.randperm(18, generator=torch.Generator().manual_seed(s)) for s in range(19)])
    removed = rank < torch.arange(19)[:, None]  # row i: the order took i channels
    aligned = align_channels(removed, rank, 8)
    kept = (~aligned).sum(1)
    nearest = {18: 18, 17: 18, 16: 16, 13: 16, 12: 16, 11: 8, 4: 8, 3: 8, 1: 8, 0: 0}
    assert all(int(kept[18 - k]) == want for k, want in nearest.items())
    assert torch.equal(aligned, rank < (18 - kept)[:, None])  # the earliest in the order go
    assert bool((kept[1:] <= kept[:-1]).all())


def test_align_needs_whole_channels():
    model = tiny_model("llama", seed=1, layers=2)
    score_set = cusprun.score(model, documents(), progress=False)
    for kwargs in (dict(granularity="neuron"), dict(uniform=True)):
        with pytest.raises(ValueError, match="align 4 rounds each layer's whole MLP channels"):
            score_set.select(0.3, align=4, **kwargs)
    with pytest.raises(ValueError, match="align must be a whole number of channels"):
        score_set.select(0.3, align=0)
    with pytest.raises(ValueError, match=r"align 21 is wider than the model's MLP \(20 channels\)"):
        score_set.select(0.3, align=21)
    assert score_set.select(0.2).sigma is not None and score_set.select(0.2, align=4).sigma is None
    with pytest.raises(ValueError, match="align rounds each layer's MLP channels: it needs a selection of channels"):
        select_units(unit_values([score_set.scores], Geometry(model.config)), Geometry(model.config), 0.2,
                     kinds=("heads",), align=4)


def testlayer_keys_take_each_layers_share_and_its_weakest_units_first():
    """Keys up to 1 remove round(share · units) from each layer, weakest first; a layer with share 0 comes after
    every other layer's units and then loses its own weakest first."""
    values = torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.5, 0.1, 0.9, 0.2], [4.0, 3.0, 2.0, 1.0]])
    keys = layer_keys(values, torch.tensor([0.5, 0.25, 0.0]))
    assert torch.equal(keys[:2] <= 1, torch.tensor([[False, True, False, True], [False, True, False, False]]))
    assert bool(keys[2].min() > keys[:2].max())
    assert torch.equal(keys[2].argsort(), values[2].argsort())
    assert torch.equal(keys[0].argsort(), values[0].argsort())


def test_unreachable_ratio_names_the_largest_reachable_one():
    model = tiny_model("llama", seed=1, layers=2)
    score_set = cusprun.score(model, documents(), progress=False)
    with pytest.raises(ValueError, match=r"cannot be reached by removing MLP channels: the largest reachable ratio "
                                         r"is 0\.\d{4}"):
        score_set.select(0.95, granularity="unit", neurons="mlp")
    with pytest.raises(ValueError, match="granularity must be one of"):
        score_set.select(0.3, granularity="layer")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_default_selection_is_whole_mlp_channels_and_the_same_under_both_measures(arch):
    """Cus-Prun's default expert: MLP channels only, under the rank budget; a channel's score is the
    down_proj column's under either measure, so block and local score files give the same expert. The paper's
    selection stays one argument away and differs."""
    model = tiny_model(arch, seed=5, layers=3)
    geo = Geometry(model.config)
    block = cusprun.score(model, documents(2), "block", progress=False)
    local = cusprun.score(model, documents(2), "local", progress=False)
    default = block.select(0.2)
    assert all(torch.equal(default.plan[n], block.select(0.2, granularity="unit", neurons="mlp").plan[n])
               for n in default.plan)
    assert all(torch.equal(default.plan[n], local.select(0.2).plan[n]) for n in default.plan)
    for name, keep in default.plan.items():  # attention and the hidden size stay whole
        assert keep.all() == ("self_attn" in name or name.endswith(("gate_proj.cols", "up_proj.cols",
                                                                     "down_proj.rows"))), name
    # one threshold σ on within-layer rank fractions for every layer: removed exactly the channels below it
    values = unit_values([block.scores], geo)["channels"]
    removed = torch.stack([~default.plan[f"model.layers.{layer}.mlp.down_proj.cols"] for layer in range(geo.layers)])
    assert values[removed].max() <= values[~removed].min()
    paper = block.select(0.2, granularity="neuron", neurons="all")
    assert any(not paper.plan[n].all() for n in paper.plan if "self_attn" in n)


def key_outputs(model, layer: int, ids: list[int]):
    """k_proj's output [T, kv·hd] of one document and the rotated keys [kv, T, hd] RoPE makes of it, float64,
    from hooks on the model's own modules."""
    seen = {}
    attn = model.model.layers[layer].self_attn
    hook = attn.k_proj.register_forward_hook(lambda m, i, o: seen.update(k=o[0].double()))
    with torch.no_grad():
        model(torch.tensor([ids]))
    hook.remove()
    geo = Geometry(model.config)
    k = seen["k"].view(-1, geo.kv, geo.hd).transpose(0, 1)[None]  # [1, kv, T, hd]
    cos, sin = model.model.rotary_emb(k, torch.arange(k.shape[2])[None])
    half = geo.hd // 2
    rotated = k * cos.double() + torch.cat((-k[..., half:], k[..., :half]), -1) * sin.double()
    return seen["k"], rotated[0]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_pair_scores_are_the_pairs_key_norms_before_and_after_rope(arch):
    """Under the local measure a RoPE pair's score is the norm of its keys over the document, which RoPE only
    rotates: the same as the rotated keys' norm over the pair's two dimensions (float64, the model's own RoPE)."""
    model = tiny_model(arch, seed=3, layers=2)
    scores = cusprun.score(model, documents(), "local", progress=False).scores
    geo = Geometry(model.config)
    half = geo.hd // 2
    for layer in range(geo.layers):
        pairs = unit_scores(scores, geo, layer)["pairs"][0].view(len(DOCS), geo.kv, half)
        for d, n in enumerate(DOCS):
            keys, rotated = key_outputs(model, layer, random_ids(n, seed=n))
            keys = keys.view(-1, geo.kv, geo.hd).transpose(0, 1)
            for g in range(geo.kv):
                for p in (0, half - 1):
                    want = keys[g][:, [p, p + half]].norm()
                    assert abs(float(pairs[d, g, p]) - float(want)) <= 1e-5 * float(keys.norm())
                    # cos² + sin² = 1 to the rotary tables' float32 rounding
                    assert abs(float(rotated[g][:, [p, p + half]].norm()) - float(want)) <= 1e-6 * float(keys.norm())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("measure", ["local", "block"])
def test_pair_selection_drops_each_groups_weakest_pairs_and_stays_dense(arch, measure):
    """neurons="mlp+pairs": every k/v head of a layer loses the same number of pairs, its weakest by the values
    over the corpora, with their q rows in every query head of the group; heads, v, o and the hidden size stay;
    the dense model has narrower q and k and computes what the masked model computes."""
    model = tiny_model(arch, seed=8, layers=3)
    geo = Geometry(model.config)
    half = geo.hd // 2
    score_set = cusprun.score(model, documents(4), measure, progress=False)
    values = unit_values([score_set.scores], geo)["pairs"].view(geo.layers, geo.kv, half)
    narrowed = 0
    slot = 2 * (geo.heads + geo.kv) * (geo.hidden + 1) / geo.projection_params()  # the coarsest step
    for ratio in (0.1, 0.3):
        sel = score_set.select(ratio, granularity="unit", neurons="mlp+pairs")
        assert abs(sel.removed_fraction - ratio) <= slot
        for name, keep in sel.plan.items():
            if not name.endswith(("q_proj.rows", "k_proj.rows", "gate_proj.rows", "up_proj.rows", "down_proj.cols")):
                assert keep.all(), name
        for layer in range(geo.layers):
            k_rows = sel.plan[f"model.layers.{layer}.self_attn.k_proj.rows"].view(geo.kv, 2, half)
            q_rows = sel.plan[f"model.layers.{layer}.self_attn.q_proj.rows"].view(geo.kv, geo.rep, 2, half)
            kept = k_rows[:, 0]
            assert torch.equal(k_rows[:, 1], kept) and torch.equal(q_rows, kept[:, None, None].expand_as(q_rows))
            counts = kept.sum(-1)
            assert len(set(counts.tolist())) == 1  # the same number of pairs in every group
            for g in range(geo.kv):  # its weakest ones
                if 0 < counts[g] < half:
                    assert values[layer, g][~kept[g]].max() <= values[layer, g][kept[g]].min()
            narrowed += int(counts[0] < half)
        dense = cusprun.apply(model, sel, "dense")
        ids = torch.tensor([random_ids(15, seed=2)])
        with torch.no_grad():
            gap = dense(ids).logits - cusprun.apply(model, sel, "masked")(ids).logits
        assert gap.abs().max() <= 1e-4
    assert narrowed > 0
    with pytest.raises(ValueError, match=r"cannot be reached by removing MLP channels and RoPE pairs: the largest "
                                         r"reachable ratio is 0\.\d{4}"):
        score_set.select(0.95, granularity="unit", neurons="mlp+pairs")
