"""Build-time calibration (cusprun.experts.calibration): the refit's statistics made in prune, independent and
sequential refits against brute-force references, and the calibration corpus's one-line errors."""

import copy
import json

import pytest
import torch

import cusprun
from cusprun.engine.sources import InMemoryLayers
from cusprun.experts.calibration import refit_layers
from cusprun.experts.compensate import compensate, refit, refit_from_moments
from cusprun.formats.apply import masked
from tests.conftest import run_module, write_ids_corpus
from tests.tiny import random_ids, tiny_model


def documents(seed=0):
    return [random_ids(n, seed=seed + i) for i, n in enumerate((14, 9, 21, 12))]


@pytest.mark.parametrize("scale", ["per-input", "mean"])
def test_refit_from_moments_is_the_gram_refit(scale):
    """X_Kᵀ X_K and X_Kᵀ Y give the same solution as the full Gram matrix (float64 data)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(200, 12, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, False, True, True, True, False, True, True, False])
    gram = x.T @ x
    xk = x[:, keep]
    got = w.clone()
    assert refit_from_moments(got, xk.T @ xk, xk.T @ (x @ w.T), keep, 0.1, scale) is got  # in place
    assert torch.allclose(got, refit(w, gram, keep, 0.1, scale), rtol=1e-10, atol=1e-12)
    assert torch.equal(got[:, ~keep], w[:, ~keep])


def test_refit_from_moments_rounds_the_float64_solution_once_into_the_weights_dtype():
    """A bfloat16 weight (outputs past one block of rows): its kept columns are the float64 solution rounded
    once, its removed columns the bits they had."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 9, generator=g, dtype=torch.float64)
    w = torch.randn(1100, 9, generator=g).to(torch.bfloat16)  # 1100 outputs: two blocks of refit_from_moments
    keep = torch.tensor([True, True, False, True, True, True, False, True, True])
    xk, wd = x[:, keep], w.double()
    want = refit(wd, x.T @ x, keep, 0.1, "per-input")
    got = refit_from_moments(w.clone(), xk.T @ xk, xk.T @ (x @ wd.T), keep, 0.1, "per-input")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[:, ~keep], w[:, ~keep])
    # float64 solves of one system agree to ~1e-13, so rounding to bfloat16 lands on the same value
    assert torch.equal(got[:, keep], want[:, keep].to(torch.bfloat16))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_independent_refit_matches_the_statistics_files_refit(arch):
    """The independent refit from build-time calibration = the refit from score --stats Gram matrices over the
    same documents (float32 rounding apart)."""
    model, docs = tiny_model(arch, layers=3), documents()
    scores = cusprun.score(model, docs, "local", stats=True, progress=False)
    plan = scores.select(0.2, neurons="all").plan  # o_proj and down_proj both refit
    reference = compensate(model, plan, scores.stats, 0.1, "per-input")
    mine = copy.deepcopy(model)
    refit_layers(InMemoryLayers(mine), plan, docs, "independent", 0.1, "per-input")
    for name, want in reference.state_dict().items():
        assert torch.allclose(mine.state_dict()[name], want, rtol=1e-4, atol=1e-5), name
    assert any(not torch.equal(mine.state_dict()[n], model.state_dict()[n]) for n in model.state_dict())


def _inputs(model, docs, layer: int, proj: str) -> torch.Tensor:
    """The input of ``proj`` in decoder layer ``layer`` over every document, from the model's own forward."""
    seen = []
    handle = model.model.layers[layer].get_submodule(proj).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        for d in docs:
            model(torch.tensor([d]))
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sequential_refit_fits_each_layer_on_the_pruned_model_below_it(arch):
    """Brute force, layer by layer: the masked model with layers below l already refit gives layer l's down_proj
    its input X̃ (a full forward pass); the refit of layer l solves on X̃ᵀX̃ in float64."""
    model, docs = tiny_model(arch, layers=3), documents(3)
    plan = cusprun.score(model, docs, "local", progress=False).select(0.15).plan  # MLP channels only
    got = copy.deepcopy(model)
    refit_layers(InMemoryLayers(got), plan, docs, "sequential", 0.1, "per-input")
    reference = copy.deepcopy(model)
    for layer in range(3):
        keep = plan[f"model.layers.{layer}.mlp.down_proj.cols"]
        pruned_below = masked(reference, {n: (m if f"layers.{layer}." not in n else torch.ones_like(m))
                                          for n, m in plan.items()})  # this layer still dense
        x = _inputs(pruned_below, docs, layer, "mlp.down_proj")
        linear = reference.model.layers[layer].mlp.down_proj
        with torch.no_grad():
            linear.weight.copy_(refit(linear.weight, x.T @ x, keep, 0.1, "per-input").float())
        want = masked(reference, plan).model.layers[layer].mlp.down_proj.weight
        assert torch.allclose(got.model.layers[layer].mlp.down_proj.weight, want, rtol=1e-4, atol=1e-5), layer
    # layer 0 sees the dense model's inputs either way; later layers differ from the independent refit
    independent = copy.deepcopy(model)
    refit_layers(InMemoryLayers(independent), plan, docs, "independent", 0.1, "per-input")
    # (compared at the highest layer above 0 that keeps a channel: a layer that lost all of them is zero either way)
    layer = max(n for n in (1, 2) if plan[f"model.layers.{n}.mlp.down_proj.cols"].any())
    last = f"model.layers.{layer}.mlp.down_proj.weight"
    assert not torch.allclose(masked(independent, plan).state_dict()[last], got.state_dict()[last], atol=1e-5)


def cli(*args, cwd=None):
    return run_module("prune", *args, cwd=cwd)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    tiny_model("llama", seed=2, layers=2).save_pretrained(root / "model")
    write_ids_corpus(root / "de.jsonl", [12, 9, 15], seed=1)
    write_ids_corpus(root / "med.jsonl", [10, 13], seed=7)
    res = run_module("score", "--model", root / "model", "--corpus", f"de={root / 'de.jsonl'}", "--corpus",
                     f"med={root / 'med.jsonl'}", "--out", root / "scores", "--quiet")
    assert res.returncode == 0, res.stderr
    return root


def test_prune_records_the_refit_and_its_calibration(scored, tmp_path):
    common = ["--model", scored / "model", "--scores", scored / "scores/de.safetensors", "--scores",
              scored / "scores/med.safetensors", "--ratio", "0.2", "--quiet"]
    for refit_mode in ("independent", "sequential"):
        res = cli(*common, "--out", tmp_path / refit_mode, "--refit", refit_mode)
        assert res.returncode == 0, res.stderr
        report = json.loads((tmp_path / refit_mode / "pruning.json").read_text())
        assert report["refit"] == refit_mode and report["calibration"]["tokens"] == 12 + 9 + 15 + 10 + 13
        assert report["calibration"]["corpora"] == {"de": str(scored / "de.jsonl"), "med": str(scored / "med.jsonl")}
    # another corpus for one dimension: other statistics, another expert
    write_ids_corpus(tmp_path / "other.jsonl", [20, 20], seed=30)
    res = cli(*common, "--out", tmp_path / "other", "--calibration", f"de={tmp_path / 'other.jsonl'}")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "other" / "pruning.json").read_text())["calibration"]["tokens"] == 40 + 10 + 13


def test_calibration_corpus_errors_are_one_line_before_the_weights_load(scored, tmp_path):
    common = ["--model", scored / "model", "--scores", scored / "scores/de.safetensors", "--ratio", "0.2",
              "--out", tmp_path / "e", "--quiet"]
    changed = tmp_path / "copy"
    (changed / "scores").mkdir(parents=True)
    for name in ("de.safetensors",):
        (changed / "scores" / name).write_bytes((scored / "scores" / name).read_bytes())
    cases = {
        "unknown dimension": (["--calibration", f"legal={scored / 'de.jsonl'}"],
                              "--calibration 'legal="),
        "malformed": (["--calibration", "de"], "expected NAME=PATH"),
        "missing override": (["--calibration", f"de={tmp_path / 'nope.jsonl'}"], "corpus not found"),
        "refit off": (["--no-compensate", "--refit", "sequential"], "--refit sets the refit, which is off here"),
    }
    for name, (flags, expected) in cases.items():
        res = cli(*common, *flags)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and expected in lines[0], (name, res.stderr)
    # the recorded corpus changed since scoring, or gone
    moved = tmp_path / "de.jsonl"
    moved.write_bytes((scored / "de.jsonl").read_bytes())
    import cusprun.scores.scorefile as scorefile
    from cusprun.scores.scoreset import ScoreSet

    loaded = ScoreSet.load(scored / "scores/de.safetensors")
    scorefile.save_scores(changed / "scores/de.safetensors", loaded.scores, {**loaded.metadata, "corpus": str(moved)})
    with open(moved, "a") as fh:
        fh.write(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    res = cli(*[a if a != scored / "scores/de.safetensors" else changed / "scores/de.safetensors" for a in common])
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: calibration corpus {moved} differs from the one {changed / 'scores/de.safetensors'} was scored on "
        "(sha256 changed): give it with --calibration de=PATH, or prune with --no-compensate"]
    moved.unlink()
    res = cli(*[a if a != scored / "scores/de.safetensors" else changed / "scores/de.safetensors" for a in common])
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert f"calibration corpus {moved} (recorded in" in res.stderr and "not found" in res.stderr
    # ... and --no-compensate needs no corpus
    res = cli(*[a if a != scored / "scores/de.safetensors" else changed / "scores/de.safetensors" for a in common],
              "--no-compensate")
    assert res.returncode == 0, res.stderr
