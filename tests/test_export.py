"""Models others can load: the stock format, and sliced models with their own code (trust_remote_code)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import cusprun
from cusprun.core.neurons import Geometry
from cusprun.formats.stock import uniform_counts
from cusprun.selection.plan import propagate
from tests.conftest import write_ids_corpus
from tests.isolated import fresh_venv, run_isolated
from tests.tiny import random_ids, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_stock_model_computes_what_the_masked_uniform_plan_computes(arch, ratio):
    model = tiny_model(arch, seed=3, layers=3)
    scores = cusprun.score(model, [random_ids(n, seed=n) for n in (7, 12)], progress=False)
    geo = Geometry(model.config)
    if ratio > 0.3 and geo.kv == 1:  # one k/v group (qwen2 here) stays: the channels alone cannot reach 40%
        with pytest.raises(ValueError, match=r"the largest reachable ratio is 0\.2\d+"):
            scores.select(ratio, uniform=True)
        return
    plan = scores.select(ratio, uniform=True)
    assert all(torch.equal(plan.plan[n], propagate(plan.plan, geo)[n]) for n in plan.plan)
    channels, groups = uniform_counts(plan.plan, geo)
    stock, masked = cusprun.apply(model, plan, "stock"), cusprun.apply(model, plan, "masked")
    assert type(stock) is type(model)
    assert stock.config.intermediate_size == int(channels[0].sum()) < model.config.intermediate_size
    assert stock.config.num_key_value_heads == int(groups[0].sum())
    assert stock.config.num_attention_heads == stock.config.num_key_value_heads * geo.rep
    assert sum(p.numel() for p in stock.parameters()) == (
        sum(p.numel() for p in model.parameters()) - plan.total_projection_params + plan.kept_projection_params)
    ids = random_ids(16, seed=4)
    assert (logits(stock, ids) - logits(masked, ids)).abs().max() <= 1e-4
    # whole units only: the uniform plan removes at least the asked ratio, and at most one MLP channel per layer
    # more unless a k/v group step is coarser (tiny models: 2 groups or fewer)
    per_channel = 3 * geo.hidden * geo.layers / geo.projection_params()
    assert plan.removed_fraction >= ratio
    assert plan.removed_fraction - ratio < per_channel or model.config.num_key_value_heads <= 2


def test_stock_refuses_a_non_uniform_plan():
    model = tiny_model("llama", seed=1)
    plan = cusprun.score(model, [random_ids(9)], progress=False).select(0.3, granularity="neuron", neurons="all")
    with pytest.raises(ValueError, match="select with uniform=True"):
        cusprun.apply(model, plan, "stock")


# the tiny Qwen2 keeps its one k/v group: its channels alone reach 23.5% of the projection parameters
STOCK_RATIO = "0.2"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Qwen2 (biases, 4 query heads per k/v group) pruned to the sliced, stock and dense formats by the CLI."""
    root = tmp_path_factory.mktemp("exported")
    model = tiny_model("qwen2", seed=6, layers=2)
    model.save_pretrained(root / "model")
    write_ids_corpus(root / "a.jsonl", [6, 9, 4], seed=1)
    run = [sys.executable, "-m", "cusprun.score", "--model", root / "model", "--corpus", f"a={root / 'a.jsonl'}",
           "--out", root / "scores", "--quiet"]
    assert subprocess.run(run, capture_output=True).returncode == 0
    for fmt in ("sliced", "stock", "dense"):
        paper = [] if fmt == "stock" else ["--granularity", "neuron", "--neurons", "all"]  # scattered rows too
        res = subprocess.run([sys.executable, "-m", "cusprun.prune", "--model", root / "model", "--scores",
                              root / "scores/a.safetensors", "--ratio", STOCK_RATIO if fmt == "stock" else "0.3",
                              "--format", fmt, "--out", root / fmt,
                              "--quiet", *paper], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    # MLP channels and RoPE pairs: narrower q and k with per-k/v-head rotary dimensions
    res = subprocess.run([sys.executable, "-m", "cusprun.prune", "--model", root / "model", "--scores",
                          root / "scores/a.safetensors", "--ratio", "0.3", "--format", "dense", "--out",
                          root / "dense-pairs", "--quiet", "--neurons", "mlp+pairs"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return root


def test_stock_cli_reports_the_uniform_plan(exported):
    config = json.loads((exported / "stock" / "config.json").read_text())
    report = json.loads((exported / "stock" / "pruning.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["intermediate_size"] == report["stock"]["intermediate_size"] < 14
    assert report["stock"]["share_of_asked"] == pytest.approx(report["ratio_achieved_projection"] / float(STOCK_RATIO))
    assert report["ratio_achieved_projection"] >= float(STOCK_RATIO)


SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor([json.loads(sys.argv[3])])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "remote").eval()
with torch.no_grad():
    tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    print(json.dumps({"class": type(model).__name__, "logits": model(ids).logits.tolist(), "tokens": tokens.tolist()}))
"""


def test_exports_load_where_cusprun_is_not_installed(exported, tmp_path):
    python = fresh_venv(tmp_path)
    ids = random_ids(11, seed=2)
    layers = json.loads((exported / "dense-pairs" / "config.json").read_text())["per_layer_config"].values()
    assert any(layer.get("cusprun_rope_pairs") for layer in layers)
    for fmt, mode in (("sliced", "remote"), ("stock", "plain"), ("dense", "remote"), ("dense-pairs", "remote")):
        res = run_isolated(python, SCRIPT, tmp_path, str(exported / fmt), mode, json.dumps(ids))
        assert res.returncode == 0, res.stderr[-2000:]
        got = json.loads(res.stdout.strip().splitlines()[-1])
        expected = AutoModelForCausalLM.from_pretrained(exported / fmt).eval()
        assert got["class"] == type(expected).__name__
        assert (torch.tensor(got["logits"]) - logits(expected, ids)).abs().max() <= 1e-5
        with torch.no_grad():
            assert got["tokens"] == expected.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                                                      pad_token_id=0).tolist()
    assert json.loads((exported / "sliced" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_cusprun.CusprunQwen2ForCausalLM")
    assert json.loads((exported / "dense" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_cusprun.CusprunDenseQwen2ForCausalLM")


def test_model_folders_get_the_umask_permissions(exported):
    from cusprun.core.files import umask_mode

    for fmt in ("sliced", "stock", "dense"):
        assert (exported / fmt).stat().st_mode & 0o777 == umask_mode(0o777)
        assert (exported / fmt / "pruning.json").stat().st_mode & 0o777 == umask_mode()
