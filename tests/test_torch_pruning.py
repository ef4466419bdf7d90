"""The Torch-Pruning adapter: Torch-Pruning's own pruner, driven by cusprun relevance, removes the channels
cusprun ranks least relevant, and the result computes what cusprun's masked model computes."""

import pytest
import torch

tp = pytest.importorskip("torch_pruning")

import cusprun  # noqa: E402
from cusprun.integrations.torch_pruning import CusprunImportance  # noqa: E402
from tests.tiny import random_ids, tiny_model  # noqa: E402


def mlp_only_pruner(model, importance, ratio):
    """Torch-Pruning on the MLP channels only: every other projection and the hidden size are left alone."""
    ignored = [model.lm_head] + [m for layer in model.model.layers for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.down_proj)]
    example = torch.tensor([random_ids(8)])
    return tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio, ignored_layers=ignored,
                                output_transform=lambda out: out.logits)


@pytest.mark.parametrize("reduction", ["max", "mean"])
def test_torch_pruning_removes_the_least_relevant_channels(reduction):
    model = tiny_model("llama", seed=2, layers=2)
    scores = cusprun.score(model, [random_ids(n, seed=n) for n in (9, 14, 6)], progress=False)
    rel = scores.relevance()
    plan = {name: torch.ones(r.numel(), dtype=torch.bool) for name, r in rel.items()}
    n_remove = int(model.config.intermediate_size * 0.25)
    for layer in range(model.config.num_hidden_layers):
        members = torch.stack([rel[f"model.layers.{layer}.mlp.{p}"] for p in ("gate_proj.rows", "up_proj.rows",
                                                                              "down_proj.cols")])
        channel = members.max(0).values if reduction == "max" else members.mean(0)
        ordered = channel.sort().values
        assert ordered[n_remove - 1] < ordered[n_remove]  # no tie at the boundary: the expected set is unique
        drop = channel.argsort()[:n_remove]
        for p in ("gate_proj.rows", "up_proj.rows", "down_proj.cols"):
            plan[f"model.layers.{layer}.mlp.{p}"][drop] = False
    masked = cusprun.apply(model, plan, "masked")
    mlp_only_pruner(model, CusprunImportance(model, scores, reduction), 0.25).step()  # prunes model in place
    assert all(layer.mlp.gate_proj.out_features == 20 - n_remove for layer in model.model.layers)
    ids = torch.tensor([random_ids(13, seed=5)])
    with torch.no_grad():
        assert (model(ids).logits - masked(ids).logits).abs().max() <= 1e-5


def test_scores_of_another_model_are_refused():
    scores = cusprun.score(tiny_model("llama"), [random_ids(5)], progress=False)
    with pytest.raises(ValueError, match="does not match the scores"):
        CusprunImportance(tiny_model("qwen2"), scores)
