"""python -m cusprun.plot: three PNGs from score files (and an expert), numbers behind them, bad input."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("matplotlib")

import cusprun  # noqa: E402
from cusprun.core.neurons import Geometry  # noqa: E402
from cusprun.evaluation.figures import irrelevant_sets, kept_fractions  # noqa: E402
from cusprun.selection.plan import kept_counts  # noqa: E402
from tests.tiny import random_ids, tiny_model  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cusprun.plot", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def two_sets():
    model = tiny_model("llama", seed=9, layers=3)
    a = cusprun.score(model, [random_ids(8, seed=1), random_ids(5, seed=2)], corpus="a", progress=False)
    b = cusprun.score(model, [random_ids(11, seed=3)], corpus="b", progress=False)
    return model, a, b


def test_plot_cli_writes_three_pngs(two_sets, tmp_path):
    _, a, b = two_sets
    res = cli("--scores", a.save(tmp_path / "a.safetensors"), "--scores", b.save(tmp_path / "b.safetensors"),
              "--ratio", "0.2", "--out", tmp_path / "plots")
    assert res.returncode == 0, res.stderr
    for name in ("kept.png", "overlap.png", "distributions.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert not list((tmp_path / "plots").glob(".*tmp"))


def test_plotted_numbers(two_sets):
    model, a, b = two_sets
    selection = (a & b).select(0.3, granularity="neuron", neurons="all")  # the paper's: every projection
    sliced = cusprun.apply(model, selection, "sliced")
    geo = Geometry(model.config)
    fractions = kept_fractions(kept_counts(selection.plan, geo), geo)
    for layer, block in enumerate(sliced.model.layers):  # independent: the sliced model's own weight shapes
        for j, proj in enumerate(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")):
            assert fractions[layer, j] == pytest.approx(block.get_submodule(proj).weight.numel() / geo.shape[proj][0]
                                                        / geo.shape[proj][1])
    ia, ib = irrelevant_sets([a, b], selection.sigma)
    rel = (a & b).relevance()
    assert all(torch.equal(ia[n] & ib[n], rel[n] < selection.sigma) for n in rel)


def test_plot_bad_input_is_one_line(two_sets, tmp_path):
    res = cli("--scores", tmp_path / "missing.safetensors", "--out", tmp_path / "p")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "not found" in res.stderr
    _, a, _ = two_sets
    res = cli("--scores", a.save(tmp_path / "a.safetensors"), "--expert", tmp_path, "--out", tmp_path / "p")
    assert res.returncode == 2 and "pruning.json" in res.stderr


@pytest.mark.parametrize("case, expect", [
    ("truncated", "pruning.json: not valid JSON"),
    ("empty", "pruning.json: lacks kept, sigma, ratio_achieved_projection, config_hash"),
    ("other_model", "was pruned from another model than the score files were made on"),
    ("out_is_file", "is a file, not a folder"),
])
def test_plot_refuses_a_damaged_or_foreign_expert(case, expect, two_sets, tmp_path):
    _, a, _ = two_sets
    expert = tmp_path / "expert"
    expert.mkdir()
    report = {"truncated": '{"kept":', "empty": "{}"}.get(
        case, '{"kept": {}, "sigma": null, "ratio_achieved_projection": 0.2, "config_hash": "%s"}'
        % ("another" if case == "other_model" else a.metadata["config_hash"]))
    (expert / "pruning.json").write_text(report)
    out = tmp_path / "p"
    if case == "out_is_file":
        out.write_text("x")
    res = cli("--scores", a.save(tmp_path / "a.safetensors"), "--expert", expert, "--out", out)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and expect in lines[0], res.stderr
