"""Baseline scorers (random, magnitude, wanda-sp, flap, plnd, shortgpt) against independent references,
and the selection options they and the benchmark use (rules, MLP-only, prunable groups, whole layers)."""

import copy
import json
import subprocess
import sys

import pytest
import torch

import cusprun
from cusprun.core.neurons import PROJECTIONS, Geometry
from cusprun.scores.baselines import baseline_scores
from cusprun.scores.methods import methods
from cusprun.selection.algorithm import rank_fractions
from tests.conftest import write_ids_corpus
from tests.tiny import random_ids, tiny_model

DOCS = [random_ids(11, seed=1), random_ids(7, seed=2), random_ids(13, seed=3)]


def captured_inputs(model, docs):
    """(layer, proj) -> list over documents of float64 inputs [T, in], captured by a plain hook."""
    seen = {}
    handles = [model.model.layers[layer].get_submodule(proj).register_forward_hook(
        lambda m, a, o, key=(layer, proj): seen.setdefault(key, []).append(a[0][0].double()))
        for layer in range(len(model.model.layers)) for proj in PROJECTIONS]
    with torch.no_grad():
        for ids in docs:
            model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    return seen


def close(got, expected, rtol=1e-5):
    return (got.double() - expected).abs().max() <= rtol * expected.abs().max() + 1e-7


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_structured_baselines_follow_their_definitions(arch):
    """Wanda-sp, FLAP and magnitude score attention heads (o_proj columns, summed per head) and MLP channels
    (down_proj columns) only, on the pooled general corpus."""
    model = tiny_model(arch, seed=3)
    x = captured_inputs(model, DOCS)
    sets = {m: baseline_scores(model, m, DOCS) for m in ("wanda-sp", "flap", "magnitude")}
    hd = model.config.head_dim
    for (layer, proj), xs in x.items():
        w = model.model.layers[layer].get_submodule(proj).weight.double()
        X = torch.cat(xs)  # the general corpus pooled
        name = f"model.layers.{layer}.{proj}"
        expected = {"wanda-sp": w.abs().sum(0) * X.norm(dim=0),
                    "flap": X.var(dim=0, unbiased=False) * w.square().sum(0),
                    "magnitude": w.norm(dim=0)}
        for method, score_set in sets.items():
            assert not score_set.scores[f"{name}.rows"].any()
            got = score_set.scores[f"{name}.cols"][0]
            if proj == "self_attn.o_proj":
                assert close(got, expected[method].view(-1, hd).sum(1).repeat_interleave(hd)), method
            elif proj == "mlp.down_proj":
                assert close(got, expected[method]), method
            else:
                assert not got.any()
    for score_set in sets.values():
        assert score_set.n_docs == 1
        assert score_set.metadata["prunable"] == ["self_attn.o_proj.cols", "mlp.down_proj.cols"]


def test_plnd_channel_score_is_brute_force_l1_of_the_mlp_change():
    """Deactivating MLP channel k (zeroing up row k) changes the MLP output per token by a vector whose
    L2 norm, summed over tokens, is PLND's channel importance."""
    model = tiny_model("llama", seed=4)
    plnd = baseline_scores(model, "plnd", DOCS)
    assert plnd.n_docs == len(DOCS)
    for layer_index in range(2):
        mlp = model.model.layers[layer_index].mlp
        x = captured_inputs(model, DOCS)
        for d in range(len(DOCS)):
            h = x[layer_index, "mlp.gate_proj"][d].float()
            with torch.no_grad():
                base = mlp(h).double()
                for k in (0, 5, 19):
                    ablated = copy.deepcopy(mlp)
                    ablated.up_proj.weight[k] = 0
                    expected = (ablated(h).double() - base).norm(dim=-1).sum()
                    for name in ("mlp.gate_proj.rows", "mlp.up_proj.rows", "mlp.down_proj.cols"):
                        got = plnd.scores[f"model.layers.{layer_index}.{name}"][d, k].double()
                        assert abs(got - expected) <= 1e-4 * expected + 1e-6, (name, d, k)
            q = x[layer_index, "self_attn.q_proj"][d]
            w_q = model.model.layers[layer_index].self_attn.q_proj.weight.double()
            assert close(plnd.scores[f"model.layers.{layer_index}.self_attn.q_proj.rows"][d], (q @ w_q.T).abs().sum(0))
            assert close(plnd.scores[f"model.layers.{layer_index}.self_attn.q_proj.cols"][d],
                         q.abs().sum(0) * w_q.norm(dim=0))


def test_random_is_seeded():
    model = tiny_model("llama", seed=5)
    a, b, c = (baseline_scores(model, "random", seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a.scores[n], b.scores[n]) for n in a.scores)
    assert not torch.equal(a.scores["model.layers.0.mlp.up_proj.rows"], c.scores["model.layers.0.mlp.up_proj.rows"])


def test_shortgpt_removes_the_least_influential_layers_exactly():
    model = tiny_model("llama", seed=6, layers=5)
    sg = baseline_scores(model, "shortgpt", DOCS)
    with torch.no_grad():  # independent BI from the hidden states of every layer but the last (normed)
        hs = [model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states for ids in DOCS]
    for layer in range(4):
        cos = torch.cat([torch.nn.functional.cosine_similarity(h[layer][0].double(), h[layer + 1][0].double(), dim=-1)
                         for h in hs])
        assert abs(sg.metadata["block_influence"][layer] - (1 - cos.mean().item())) < 1e-6
    bi = sg.metadata["block_influence"]
    sel = sg.select(0.4)  # 2 of 5 layers
    dropped = sorted(sorted(range(5), key=lambda i: bi[i])[:2])
    assert abs(sel.removed_fraction - 0.4) < 1e-12
    for name, keep in sel.plan.items():
        assert bool(keep.any()) == (int(name.split(".")[2]) not in dropped)
    shallow = copy.deepcopy(model)  # the brute-force reference: the layers deleted from the stack
    shallow.model.layers = torch.nn.ModuleList(m for i, m in enumerate(shallow.model.layers) if i not in dropped)
    for i, layer in enumerate(shallow.model.layers):
        layer.self_attn.layer_idx = i
    shallow.config.num_hidden_layers = 3
    ids = torch.tensor([DOCS[0]])
    with torch.no_grad():
        expected = shallow(input_ids=ids).logits
        for fmt in ("masked", "sliced"):
            got = cusprun.apply(model, sel, fmt)(input_ids=ids).logits
            assert torch.allclose(got, expected, atol=1e-5), fmt
    with pytest.raises(ValueError, match="uniform"):
        sg.select(0.4, uniform=True)


def test_flap_and_mlp_only_choose_only_their_groups():
    model = tiny_model("llama", seed=7, layers=3)
    flap = baseline_scores(model, "flap", DOCS)
    sel = flap.select(0.3)
    assert abs(sel.removed_fraction - 0.3) < 0.02
    for name, keep in sel.plan.items():
        if any(p in name for p in ("q_proj.cols", "k_proj", "v_proj.cols", "o_proj.rows", "gate_proj.cols",
                                   "up_proj.cols", "down_proj.rows")):
            assert keep.all(), name
    scores = cusprun.score(model, DOCS, measure="local", progress=False)
    mlp_only = scores.select(0.2, neurons="mlp")  # the MLP holds 27% of this model's projection parameters
    assert abs(mlp_only.removed_fraction - 0.2) < 0.02
    for name, keep in mlp_only.plan.items():
        assert keep.all() == ("self_attn" in name or "gate_proj.cols" in name or "up_proj.cols" in name
                              or "down_proj.rows" in name), name
    with pytest.raises(ValueError, match="cannot be reached"):
        scores.select(0.3, neurons="mlp")


def test_rules_match_independent_aggregation():
    model = tiny_model("qwen2", seed=8)
    a = cusprun.score(model, DOCS, measure="local", progress=False, corpus="a")
    b = cusprun.score(model, DOCS[:2], measure="local", progress=False, corpus="b")
    both = a & b
    name = "model.layers.1.mlp.up_proj.rows"
    per_corpus = [a.scores[name], b.scores[name]]
    mean = torch.stack([rank_fractions(s).mean(0) for s in per_corpus]).max(0).values
    pooled = torch.stack([rank_fractions(s.double().square().sum(0, keepdim=True).sqrt())[0]
                          for s in per_corpus]).max(0).values
    assert torch.equal(both.relevance("mean-rank")[name], mean)
    assert torch.equal(both.relevance("pooled")[name], pooled)
    assert torch.equal(both.relevance()[name], rank_fractions(torch.cat(per_corpus)).max(0).values)
    with pytest.raises(ValueError, match="rule"):
        a.relevance("median")


def test_baseline_score_files_feed_prune(tmp_path, tiny_dir):
    tiny_model_dir = tiny_dir
    corpus = write_ids_corpus(tmp_path / "c.jsonl", [11, 7, 13])
    for method in [m for m in methods() if m != "cusprun"]:
        args = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "s"), "--method", method, "--quiet"]
        if method not in ("random", "magnitude"):
            args += ["--corpus", f"{method}={corpus}"]
        r = subprocess.run([sys.executable, "-m", "cusprun.score", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out = tmp_path / method
        r = subprocess.run([sys.executable, "-m", "cusprun.prune", "--model", str(tiny_model_dir), "--scores",
                            str(tmp_path / "s" / f"{method}.safetensors"), "--ratio", "0.25", "--out", str(out),
                            "--quiet"], capture_output=True, text=True)
        assert r.returncode == 0, (method, r.stderr)
        report = json.loads((out / "pruning.json").read_text())
        # shortgpt removes whole layers: 1 of 2 here
        assert report["measure"] == method and abs(report["ratio_achieved_projection"] - 0.25) <= 0.25
    r = subprocess.run([sys.executable, "-m", "cusprun.score", "--model", str(tiny_model_dir), "--out",
                        str(tmp_path / "s"), "--method", "plnd"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--corpus is required" in r.stderr


def test_geometry_counts_whole_layers():
    model = tiny_model("mistral", seed=9, layers=4)
    geo = Geometry(model.config)
    scores = baseline_scores(model, "shortgpt", DOCS)
    assert scores.select(0.25).kept_projection_params == geo.projection_params() * 3 // 4
    # the fewest layers that remove at least the ratio: 0.3 of 4 layers takes 2
    assert scores.select(0.3).kept_projection_params == geo.projection_params() // 2
