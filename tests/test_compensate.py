"""Closed-form compensation: the Gram statistics of the scoring pass, the ridge refit, the CLI path."""

import gc
import json
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

import cusprun
from cusprun.core.neurons import tensor_name
from cusprun.experts.compensate import (
    MIN_TOKENS_PER_INPUT,
    compensate,
    refit,
    refit_widths,
    resolved_ridge_scale,
    thin_statistics_note,
)
from cusprun.scores import stats as stats_module
from cusprun.scores.stats import gram_name, save_stats, stats_path
from tests.conftest import write_ids_corpus
from tests.tiny import random_ids, tiny_model

DOCS = (7, 12, 9)


def documents(seed=0):
    return [random_ids(n, seed=seed + n) for n in DOCS]


def projection_inputs(model, docs, layer: int, proj: str) -> torch.Tensor:
    """[Σ tokens, n] float64: the projection's input over every document, from a hook on the model's own module."""
    seen = []
    handle = model.model.layers[layer].get_submodule(proj).register_forward_hook(
        lambda m, i, o: seen.append(i[0][0].double()))
    with torch.no_grad():
        for ids in docs:
            model(torch.tensor([ids]))
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_scoring_pass_collects_the_input_gram_matrices(arch):
    model = tiny_model(arch, seed=3, layers=2)
    with_stats = cusprun.score(model, documents(), progress=False, stats=True)
    plain = cusprun.score(model, documents(), progress=False)
    assert with_stats.scores.keys() == plain.scores.keys()
    assert all(torch.equal(with_stats.scores[n], plain.scores[n]) for n in plain.scores)  # scores untouched
    assert plain.stats is None
    for layer in range(2):
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            x = projection_inputs(model, documents(), layer, proj)
            want = x.T @ x
            got = with_stats.stats[gram_name(layer, proj)]
            assert ((got.double() - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_stats_files_round_trip_and_add_up_over_corpora(tmp_path):
    model = tiny_model("llama", seed=3, layers=2)
    a = cusprun.score(model, documents(0), progress=False, stats=True, corpus="a")
    b = cusprun.score(model, documents(5), progress=False, stats=True, corpus="b")
    a.save(tmp_path / "a.safetensors")
    assert stats_path(tmp_path / "a.safetensors").name == "a.stats.safetensors"
    loaded = cusprun.ScoreSet.load(tmp_path / "a.safetensors", stats=True)
    assert loaded.stats.keys() == a.stats.keys()
    assert all(torch.equal(loaded.stats[n], a.stats[n].float()) for n in a.stats)
    both = a & b
    assert all(torch.allclose(both.stats[n].double(), a.stats[n].double() + b.stats[n].double()) for n in a.stats)
    assert (a & cusprun.score(model, documents(5), progress=False)).stats is None  # one set without: none


def test_statistics_are_read_and_written_one_matrix_at_a_time(tmp_path, monkeypatch):
    """Loaded statistics, and the sum of two corpora's, are read on access: loading and intersecting read
    nothing; saving the sum and compensating hold at most one matrix per corpus; the file written holds
    the in-memory matrices' sum."""
    model = tiny_model("llama", seed=3, layers=3)
    sets = [cusprun.score(model, documents(seed), progress=False, stats=True, corpus=corpus)
            for seed, corpus in ((0, "a"), (5, "b"))]
    for s in sets:
        s.save(tmp_path / f"{s.corpora[0]}.safetensors")
    alive, reads, peak = weakref.WeakSet(), [], [0]
    read = stats_module.GramFiles.__getitem__

    def tracked(self, name):
        gc.collect()
        gram = read(self, name)
        alive.add(gram)
        reads.append(name)
        peak[0] = max(peak[0], len(alive))
        return gram

    monkeypatch.setattr(stats_module.GramFiles, "__getitem__", tracked)
    loaded = [cusprun.ScoreSet.load(tmp_path / f"{c}.safetensors", stats=True) for c in "ab"]
    both = loaded[0] & loaded[1]
    assert reads == []
    both.save(tmp_path / "both.safetensors")
    assert len(reads) == 2 * 6 and peak[0] <= 2  # 6 matrices per corpus, at most one of each corpus at a time
    reads.clear()
    peak[0] = 0
    compensate(model, both.select(0.15).plan, both.stats)  # one layer's matrices at a time here too
    assert 0 < len(reads) <= 2 * 6 and peak[0] <= 2
    monkeypatch.undo()
    written = cusprun.ScoreSet.load(tmp_path / "both.safetensors", stats=True).stats
    assert sorted(written) == sorted(sets[0].stats)
    assert all(torch.equal(written[n], sets[0].stats[n] + sets[1].stats[n]) for n in sets[0].stats)


@pytest.mark.parametrize("scale", ["per-input", "mean"])
def test_refit_is_the_ridge_least_squares_solution(scale):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 9, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 9, dtype=torch.float64)
    w = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, False, True, True, True, False])
    ridge = 0.05
    got = refit(w, x.T @ x, keep, ridge, scale)
    # independently: lstsq on the augmented system [X_K; sqrt(Λ)] W'ᵀ = [X Wᵀ; sqrt(Λ) W_Kᵀ]
    xk = x[:, keep]
    energy = (xk * xk).sum(0)
    lam = ridge * (energy if scale == "per-input" else energy.mean().expand(len(energy)))
    a = torch.cat([xk, torch.diag(lam.sqrt())])
    b = torch.cat([x @ w.T, lam.sqrt()[:, None] * w[:, keep].T])
    want = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(got[:, keep], want, atol=1e-10)
    assert torch.equal(got[:, ~keep], w[:, ~keep])


def test_per_input_ridge_is_blind_to_how_an_input_is_scaled():
    """Scaling input i by c and its weight column by 1/c is the same block: the per-input refit gives the same
    block output on any input, the mean rule does not (its one λ weighs the rescaled input differently)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    keep = torch.tensor([True, True, False, True, True, False, True])
    c = torch.tensor([1, 50, 1, 0.02, 1, 1, 7], dtype=torch.float64)
    probe = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    for scale, same in (("per-input", True), ("mean", False)):
        plain = probe[:, keep] @ refit(w, x.T @ x, keep, 0.1, scale)[:, keep].T
        xs, ws = x * c, w / c
        scaled = (probe * c)[:, keep] @ refit(ws, xs.T @ xs, keep, 0.1, scale)[:, keep].T
        assert torch.allclose(plain, scaled, atol=1e-9) == same


def test_an_input_silent_on_the_calibration_tokens_keeps_its_weights():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    x[:, 2] = 0
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, True, True])
    got = refit(w, x.T @ x, keep, 0.1)
    assert got.isfinite().all() and torch.allclose(got[:, 2], w[:, 2], atol=1e-12)


def test_refit_refuses_an_unknown_scale():
    with pytest.raises(ValueError, match="ridge scale 'max'"):
        refit(torch.ones(2, 3), torch.eye(3), torch.tensor([True, False, True]), 0.1, "max")


def test_refit_moves_from_least_squares_to_the_original_weights_as_the_ridge_grows():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    keep = torch.tensor([True, True, False, True, False, True, True])
    plain = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T  # no ridge
    assert torch.allclose(refit(w, x.T @ x, keep, 1e-12)[:, keep], plain, atol=1e-8)
    assert torch.allclose(refit(w, x.T @ x, keep, 1e12)[:, keep], w[:, keep], atol=1e-8)
    # the block error grows monotonically with the ridge between the two ends
    errors = [((x[:, keep] @ refit(w, x.T @ x, keep, r)[:, keep].T - x @ w.T) ** 2).sum() for r in (1e-3, 1e-1, 1e1)]
    assert errors[0] < errors[1] < errors[2]


def test_compensation_reduces_the_block_error_and_keeps_every_format_exact():
    model = tiny_model("qwen2", seed=4, layers=3)
    docs = documents(1)
    scores = cusprun.score(model, docs, progress=False, stats=True)
    sel = scores.select(0.2)  # the default: whole MLP channels
    fixed = compensate(model, sel.plan, scores.stats, ridge=1e-6)
    masked, masked_fixed = cusprun.apply(model, sel, "masked"), cusprun.apply(fixed, sel, "masked")
    for layer in range(3):  # the MLP output on the calibration tokens moves towards the unpruned one
        x = projection_inputs(model, docs, layer, "mlp.down_proj").float()
        target = x @ model.model.layers[layer].mlp.down_proj.weight.T
        errors = [((x @ m.model.layers[layer].mlp.down_proj.weight.T) - target).norm() for m in (masked, masked_fixed)]
        assert errors[1] < errors[0]
    ids = torch.tensor([random_ids(15, seed=9)])
    with torch.no_grad():
        gap = (cusprun.apply(fixed, sel)(ids).logits - masked_fixed(ids).logits).abs().max()
    assert gap <= 1e-4
    fresh = tiny_model("qwen2", seed=4, layers=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))  # model untouched


def cli(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True)


def score_with_and_without_stats(tmp_path):
    """A saved tiny model scored by the CLI on one corpus: ``plain/a.safetensors`` without statistics,
    ``stats/a.safetensors`` with them."""
    tiny_model("llama", seed=6, layers=2).save_pretrained(tmp_path / "model")
    write_ids_corpus(tmp_path / "a.jsonl", [6, 9, 4], seed=1)
    for flags, out in (([], "plain"), (["--stats"], "stats")):
        res = cli("cusprun.score", "--model", tmp_path / "model", "--corpus", f"a={tmp_path / 'a.jsonl'}",
                  "--out", tmp_path / out, "--measure", "local", "--quiet", *flags)
        assert res.returncode == 0, res.stderr


def test_prune_compensate_cli(tmp_path):
    score_with_and_without_stats(tmp_path)
    assert (tmp_path / "stats" / "a.stats.safetensors").is_file()
    assert not (tmp_path / "plain" / "a.stats.safetensors").exists()
    common = ["cusprun.prune", "--model", tmp_path / "model", "--ratio", "0.2", "--quiet", "--compensate",
              "--refit", "independent"]  # the refit that statistics files hold
    # without statistics files: the Gram matrices are made at build time from the corpus the score file names
    res = cli(*common, "--scores", tmp_path / "plain" / "a.safetensors", "--out", tmp_path / "e1")
    assert res.returncode == 0, res.stderr
    assert "refit on 19 calibration tokens, independent" in res.stdout
    assert json.loads((tmp_path / "e1" / "pruning.json").read_text())["calibration"]["tokens"] == 19
    res = cli(*common, "--scores", tmp_path / "stats" / "a.safetensors", "--out", tmp_path / "e2")
    assert res.returncode == 0, res.stderr
    inter = AutoConfig.from_pretrained(tmp_path / "model").intermediate_size  # only down_proj is refit (channels)
    assert f"warning: the compensation statistics hold 19 calibration tokens for down_proj's {inter} inputs" \
        in res.stderr
    report = json.loads((tmp_path / "e2" / "pruning.json").read_text())
    assert report["compensate"] is True and report["ridge"] == pytest.approx(0.1)
    assert report["ridge_scale"] == "mean"  # auto on 19 tokens for inter inputs: too few for per-input ridges
    assert "(ridge 0.1, mean)" in res.stdout
    res = cli(*common, "--scores", tmp_path / "stats" / "a.safetensors", "--out", tmp_path / "e3",
              "--ridge-scale", "per-input")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "e3" / "pruning.json").read_text())["ridge_scale"] == "per-input"
    assert "refit on the statistics files" in res.stdout
    built, auto, per_input = (load_file(tmp_path / name / "model.safetensors") for name in ("e1", "e2", "e3"))
    assert any(not torch.equal(auto[k], per_input[k]) for k in auto)  # the scale reaches the refit
    # the same refit from the same documents, statistics made at build time or read from the files
    assert all(torch.allclose(built[k], auto[k], rtol=1e-4, atol=1e-5) for k in auto)


def test_prune_compensates_by_default_with_or_without_statistics_files(tmp_path):
    """No flag: the refit runs (the same expert as --compensate), sequential, from the recorded corpus whether
    or not statistics files lie beside the score file (they hold the independent refit's matrices only): the
    same weights either way; --no-compensate keeps the weights."""
    score_with_and_without_stats(tmp_path)
    common = ["cusprun.prune", "--model", tmp_path / "model", "--ratio", "0.2", "--quiet"]
    runs = {"auto": ("stats", []), "explicit": ("stats", ["--compensate"]), "off": ("stats", ["--no-compensate"]),
            "missing": ("plain", [])}
    for name, (scores, flags) in runs.items():
        res = cli(*common, "--scores", tmp_path / scores / "a.safetensors", "--out", tmp_path / name, *flags)
        assert res.returncode == 0, res.stderr
        runs[name] = res.stdout
    assert "compensated    yes" in runs["auto"] and "compensated    yes" in runs["explicit"]
    for name in ("auto", "missing"):
        assert "compensated    yes: pruned output projections refit on 19 calibration tokens, sequential" \
            in runs[name]
    assert "compensated" not in runs["off"]  # asked for: nothing to explain
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in runs}
    reports = {name: json.loads((tmp_path / name / "pruning.json").read_text()) for name in runs}
    assert reports["auto"]["compensate"] and not reports["off"]["compensate"] and reports["missing"]["compensate"]
    for name in ("explicit", "off", "missing"):
        assert weights[name].keys() == weights["auto"].keys()
    assert all(torch.equal(weights["auto"][k], weights["explicit"][k]) for k in weights["auto"])
    assert all(torch.allclose(weights["auto"][k], weights["missing"][k], rtol=1e-4, atol=1e-5) for k in weights["off"])
    assert any(not torch.equal(weights["auto"][k], weights["off"][k]) for k in weights["auto"])


def test_statistics_of_other_documents_are_refused_and_stale_ones_removed(tmp_path):
    from cusprun.core.errors import CusprunError

    model = tiny_model("llama", seed=3, layers=2)
    a = cusprun.score(model, documents(0), progress=False, stats=True, corpus="a")
    b = cusprun.score(model, documents(5), progress=False, stats=True, corpus="b")
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    assert cusprun.ScoreSet.load(tmp_path / "a.safetensors").stats is None  # read only when asked for
    stats_path(tmp_path / "b.safetensors").replace(stats_path(tmp_path / "a.safetensors"))
    with pytest.raises(CusprunError, match="does not belong to"):
        cusprun.ScoreSet.load(tmp_path / "a.safetensors", stats=True)
    cusprun.score(model, documents(0), progress=False, corpus="a").save(tmp_path / "a.safetensors")
    assert not stats_path(tmp_path / "a.safetensors").exists()  # re-scored without stats: the old file is gone
    b.save(tmp_path / "b.safetensors")
    loaded = cusprun.ScoreSet.load(tmp_path / "b.safetensors", stats=True)
    b.save(tmp_path / "b.safetensors")  # the same statistics written again: another file in its place
    with pytest.raises(CusprunError, match="changed or vanished since it was opened"):
        loaded.stats[gram_name(0, "mlp.down_proj")]  # read lazily: never from a file other than the one checked


@pytest.mark.parametrize("ridge", ["nan", "0", "-1"])
def test_prune_refuses_a_bad_ridge(ridge, tmp_path):
    res = cli("cusprun.prune", "--scores", tmp_path / "a.safetensors", "--ratio", "0.2", "--out", tmp_path / "o",
              "--compensate", "--ridge", ridge)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: --ridge {float(ridge)}: must be a positive number"]


@pytest.mark.parametrize("damage", ["shape", "nan"])
def test_prune_refuses_damaged_statistics_in_one_line(damage, tmp_path):
    """A wrong shape is found from the header when the file is opened; a matrix that is not finite when
    compensation reads it. Either way one line, exit 2."""
    tiny_model("llama", seed=6, layers=2).save_pretrained(tmp_path / "model")
    scores = cusprun.score(tiny_model("llama", seed=6, layers=2), documents(0), progress=False, stats=True,
                           measure="local", corpus="a")
    scores.save(tmp_path / "a.safetensors")
    grams = {n: g.clone() for n, g in scores.stats.items()}
    name = gram_name(1, "mlp.down_proj")
    grams[name] = grams[name][:-1, :-1].contiguous() if damage == "shape" else grams[name].fill_(float("nan"))
    save_stats(stats_path(tmp_path / "a.safetensors"), grams, {"n_docs": scores.n_docs, "scores": scores.fingerprint()})
    res = cli("cusprun.prune", "--model", tmp_path / "model", "--ratio", "0.2", "--quiet", "--compensate",
              "--refit", "independent", "--scores", tmp_path / "a.safetensors", "--out", tmp_path / "e")
    assert res.returncode == 2
    problem = "missing or not [" if damage == "shape" else "is not finite"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and problem in lines[0], res.stderr
    assert not (tmp_path / "e" / "pruning.json").exists()


def test_auto_takes_per_input_ridges_from_the_tokens_per_input_floor_on():
    inputs = {"down_proj": 1536, "o_proj": 576}
    assert resolved_ridge_scale("auto", MIN_TOKENS_PER_INPUT * 1536, inputs) == "per-input"
    assert resolved_ridge_scale("auto", MIN_TOKENS_PER_INPUT * 1536 - 1, inputs) == "mean"
    assert resolved_ridge_scale("auto", 0, inputs) == "mean"  # unknown count
    assert resolved_ridge_scale("mean", 10**9, inputs) == "mean"
    assert resolved_ridge_scale("per-input", 1, inputs) == "per-input"
    with pytest.raises(ValueError, match="ridge scale 'max'"):
        resolved_ridge_scale("max", 1, inputs)


def test_thin_statistics_are_noted_below_the_tokens_per_input_floor():
    inputs = {"down_proj": 1536, "o_proj": 576}
    assert thin_statistics_note(MIN_TOKENS_PER_INPUT * 1536, inputs) is None
    note = thin_statistics_note(MIN_TOKENS_PER_INPUT * 1536 - 1, inputs)
    assert note.startswith(f"warning: the compensation statistics hold {MIN_TOKENS_PER_INPUT * 1536 - 1} calibration "
                           "tokens for down_proj's 1536 inputs") and "\n" not in note
    assert "o_proj's 4096 inputs" in thin_statistics_note(10_000, {"down_proj": 1536, "o_proj": 4096})
    assert thin_statistics_note(10, {}) is None and thin_statistics_note(0, inputs) is None  # nothing refit; unknown


def test_refit_widths_name_only_the_projections_the_refit_changes():
    geo_layers, plan = 2, {}
    for layer in range(geo_layers):
        plan[tensor_name(layer, "self_attn.o_proj", "cols")] = torch.ones(12, dtype=torch.bool)
        plan[tensor_name(layer, "mlp.down_proj", "cols")] = torch.ones(20, dtype=torch.bool)
    assert refit_widths(plan, geo_layers) == {}
    plan[tensor_name(1, "mlp.down_proj", "cols")][3] = False
    assert refit_widths(plan, geo_layers) == {"down_proj": 20}
    plan[tensor_name(0, "self_attn.o_proj", "cols")][:] = False  # a block removed whole is not refit
    assert refit_widths(plan, geo_layers) == {"down_proj": 20}
