"""python -m cusprun.prune / cusprun.eval: round trip, report, one-line errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import cusprun  # noqa: F401  (registers the sliced architectures)
from cusprun.core.neurons import Geometry
from cusprun.formats.apply import apply
from cusprun.selection.plan import propagate
from tests.conftest import run_module as cli
from tests.conftest import write_ids_corpus
from tests.tiny import random_ids, tiny_model


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    tiny_model("qwen2", seed=6, layers=2).save_pretrained(root / "model")
    write_ids_corpus(root / "a.jsonl", [6, 9, 4], seed=1)
    write_ids_corpus(root / "b.jsonl", [7, 5], seed=9)
    for measure in ("block", "local"):
        res = cli("score", "--model", root / "model", "--corpus", f"a={root / 'a.jsonl'}", "--corpus",
                  f"b={root / 'b.jsonl'}", "--out", root / measure, "--measure", measure, "--quiet")
        assert res.returncode == 0, res.stderr
    return root


def test_prune_round_trip_generate(scored, tmp_path):
    out = tmp_path / "expert"
    res = cli("prune", "--model", scored / "model", "--scores", scored / "block/a.safetensors",
              "--scores", scored / "block/b.safetensors", "--ratio", "0.25", "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "pruning.json").read_text())
    assert report["ratio_asked"] == 0.25 and len(report["corpora"]) == 2
    assert all(len(c["corpus_sha256"]) == 64 for c in report["corpora"])
    expert = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in expert.parameters()) == report["params"]
    # the default expert: whole MLP channels, dense per-layer widths, attention whole
    assert (report["format"], report["granularity"], report["neurons"]) == ("dense", "unit", "mlp")
    dense = AutoModelForCausalLM.from_pretrained(scored / "model").eval()
    widths = [expert.config.per_layer_config[i].intermediate_size for i in (0, 1)]
    assert sum(widths) < 2 * dense.config.intermediate_size
    assert all(layer.self_attn.q_proj.weight.shape == d.self_attn.q_proj.weight.shape
               for layer, d in zip(expert.model.layers, dense.model.layers))
    ids = torch.tensor([random_ids(12, seed=3)])
    out_ids = expert.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out_ids.shape == (1, 17)
    with torch.no_grad():
        assert (expert(ids).logits - dense(ids).logits).abs().max() > 0


def test_prune_drops_the_least_influential_layer(scored, tmp_path):
    """--drop-layers 1 on a 2-layer model: the layer of lower block influence on the corpora goes whole,
    MLP channels of the other reach the ratio; the dense export has one layer."""
    from cusprun.scores.scoreset import ScoreSet
    from cusprun.selection.algorithm import layer_influence

    out = tmp_path / "expert"
    paths = [scored / "block/a.safetensors", scored / "block/b.safetensors"]
    res = cli("prune", "--model", scored / "model", *[a for p in paths for a in ("--scores", p)], "--ratio", "0.6",
              "--drop-layers", "1", "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "pruning.json").read_text())
    sets = [ScoreSet.load(p) for p in paths]
    influence = layer_influence([s.scores for s in sets], sets[0].geometry())
    assert report["dropped_layers"] == [int(influence.argmin())] and report["drop_layers"] == 1
    assert abs(report["ratio_achieved_projection"] - 0.6) < 0.01
    expert = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert expert.config.num_hidden_layers == 1
    assert f"layers dropped {report['dropped_layers'][0]}" in res.stdout


def test_prune_aligns_each_layers_channels(scored, tmp_path):
    """--align 4: every layer keeps a multiple of 4 MLP channels (or all), pruning.json records it, and the
    folder loads."""
    out = tmp_path / "expert"
    res = cli("prune", "--model", scored / "model", "--scores", scored / "block/a.safetensors", "--ratio", "0.2",
              "--align", "4", "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "pruning.json").read_text())
    inter = AutoModelForCausalLM.from_pretrained(scored / "model").config.intermediate_size
    kept = [layer["mlp.down_proj"][1] for layer in report["kept"].values()]
    assert report["align"] == 4 and all(k % 4 == 0 or k == inter for k in kept) and kept != [inter] * len(kept)
    assert "aligned        every layer keeps a multiple of 4 MLP channels" in res.stdout
    assert "no single threshold: aligned widths, see --align" in res.stdout
    expert = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert [layer.mlp.down_proj.in_features if layer.mlp else 0 for layer in expert.model.layers] == kept


def test_prune_budget_reaches_the_selection_and_pruning_json(scored, tmp_path):
    """--budget equal: every layer loses the same number of MLP channels (±1: the ratio is reached at least, so
    some layers may lose one more), and pruning.json says so (the selection is made before the weights load and
    handed to the build)."""
    out = tmp_path / "expert"
    res = cli("prune", "--model", scored / "model", "--scores", scored / "block/a.safetensors", "--ratio", "0.2",
              "--budget", "equal", "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "pruning.json").read_text())
    kept = [layer["mlp.down_proj"][1] for layer in report["kept"].values()]
    inter = AutoModelForCausalLM.from_pretrained(scored / "model").config.intermediate_size
    assert report["budget"] == "equal" and max(kept) - min(kept) <= 1 and max(kept) < inter


def test_masked_format_loads_as_the_original_architecture(scored, tmp_path):
    out = tmp_path / "masked"
    res = cli("prune", "--model", scored / "model", "--scores", scored / "block/a.safetensors", "--ratio", "0.2",
              "--out", out, "--format", "masked", "--quiet")
    assert res.returncode == 0, res.stderr
    masked = AutoModelForCausalLM.from_pretrained(out)
    assert type(masked).__name__ == "Qwen2ForCausalLM"
    zero_rows = sum(int((m.weight == 0).all(dim=1).sum()) for n, m in masked.named_modules() if n.endswith("_proj"))
    assert zero_rows > 0


def test_sliced_equals_masked_from_the_same_plan():
    model = tiny_model("mistral", seed=7, layers=2)
    geo = Geometry(model.config)
    gen = torch.Generator().manual_seed(1)
    plan = propagate({n: torch.rand(geo.size(n), generator=gen) > 0.4 for n in geo.names()}, geo)
    ids = torch.tensor([random_ids(30, seed=2)])  # longer than the sliding window
    with torch.no_grad():
        gap = (apply(model, plan, "sliced")(ids).logits - apply(model, plan, "masked")(ids).logits).abs().max()
    assert gap <= 1e-4


@pytest.mark.parametrize("case, expect", [
    ("other_model", "scored on another model"),
    ("ratio", "must be strictly between 0 and 1"),
    ("mixed", "mix measures"),
    ("not_empty", "exists and is not empty"),
    ("missing", "score file not found"),
    ("unreachable", "cannot be reached by removing MLP channels: the largest reachable ratio is 0."),
    ("granularity", "argument --granularity: invalid choice: 'layer'"),
    ("drop_negative", "--drop-layers -1: must be 0 or more"),
    ("drop_all", "cannot drop 2 of 2 layers: at least one must stay"),
    ("drop_too_many", "dropping 1 of 2 layers already removes 0.5000 of the projection parameters"),
    ("align_zero", "--align 0: must be a whole number of channels, 1 or more"),
    ("align_stock", "--align 4 rounds each layer's whole MLP channels: it needs the unit granularity"),
    ("align_wide", "--align 1000 is wider than the model's MLP ("),
    ("unreachable_before_weights", "cannot be reached by removing MLP channels"),
    ("out_is_file", "is a file, not a folder"),
    ("out_is_here", "--out .: the current folder or one above it"),
    ("scores_folder", "is a folder: give its score files"),
    ("nan_scores", "holds NaN scores"),
    ("metadata_not_json", "damaged score file (metadata token_counts is not JSON)"),
    ("ragged_rows", "damaged score file (tensors are not all [rows, features] with one row count)"),
    ("n_docs_not_count", "damaged score file (n_docs 'x' is not a count)"),
    ("budget_neuron", "--budget equal would have no effect"),
    ("ridge_no_compensate", "--ridge sets the refit, which is off here (--no-compensate turns it off)"),
    ("calibration_no_compensate", "--calibration sets the refit, which is off here (--no-compensate turns it off)"),
])
def test_prune_errors_are_one_line(case, expect, scored, tmp_path):
    other = tmp_path / "other"
    tiny_model("llama", seed=1, layers=2).save_pretrained(other)
    out = tmp_path / "out"
    if case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    if case == "out_is_file":
        out.write_text("x")
    if case == "out_is_here":
        out = "."  # run in tmp_path: were the check to fail, --overwrite would replace that folder only
    model = other if case == "other_model" else scored / "model"
    if case == "unreachable_before_weights":  # the ratio is refused before these weights are read
        model = tmp_path / "bad-weights"
        model.mkdir()
        (model / "config.json").write_text((scored / "model/config.json").read_text())
        (model / "model.safetensors").write_bytes(b"not safetensors")
    scores = [scored / "block/a.safetensors"]
    if case == "mixed":
        scores.append(scored / "local/b.safetensors")
    if case == "missing":
        scores = [tmp_path / "nope.safetensors"]
    if case == "scores_folder":
        scores = [scored / "block"]
    if case in DAMAGES:
        scores = [damaged(scores[0], tmp_path / "damaged.safetensors", *DAMAGES[case])]
    ratio = {"ratio": "1.5", "unreachable": "0.9", "unreachable_before_weights": "0.9"}.get(case, "0.2")
    args = ["--model", model, "--ratio", ratio, "--out", out, "--quiet"] + [a for s in scores for a in ("--scores", s)]
    if case == "granularity":
        args += ["--granularity", "layer"]
    args += {"drop_negative": ["--drop-layers", "-1"], "drop_all": ["--drop-layers", "2"],
             "drop_too_many": ["--drop-layers", "1"], "align_zero": ["--align", "0"],
             "align_stock": ["--align", "4", "--format", "stock"], "align_wide": ["--align", "1000"],
             "out_is_file": ["--overwrite"], "out_is_here": ["--overwrite"],
             "budget_neuron": ["--granularity", "neuron", "--budget", "equal"],
             "ridge_no_compensate": ["--no-compensate", "--ridge", "0.5"],
             "calibration_no_compensate": ["--no-compensate", "--calibration", f"a={scored / 'a.jsonl'}"]}.get(case, [])
    res = cli("prune", *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], res.stderr
    if case == "not_empty":
        assert (out / "keep.txt").read_text() == "x"
    if case == "out_is_file":
        assert out.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]


def _nan(tensors, meta):
    name = sorted(tensors)[3]
    tensors[name] = tensors[name].clone()
    tensors[name][0, 1] = float("nan")


def _cut(tensors, meta):
    name = sorted(tensors)[5]
    tensors[name] = tensors[name][:1].clone()


# damaged copies of a score file: (change to the tensors and the raw metadata)
DAMAGES = {"nan_scores": (_nan,), "ragged_rows": (_cut,),
           "metadata_not_json": (lambda t, m: m.update(token_counts="abc"),),
           "n_docs_not_count": (lambda t, m: m.update(n_docs="x"),)}


def damaged(source, target, change):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    with safe_open(str(source), "pt") as fh:
        meta = dict(fh.metadata())
    change(tensors, meta)
    save_file(tensors, str(target), metadata=meta)
    return target


def test_eval_refuses_text_with_nothing_to_predict(scored, tmp_path):
    single = tmp_path / "single.jsonl"
    single.write_text('{"input_ids": [5]}\n{"input_ids": [7]}\n')
    model = tmp_path / "bad-weights"  # refused before these weights are read
    model.mkdir()
    (model / "config.json").write_text((scored / "model/config.json").read_text())
    (model / "model.safetensors").write_bytes(b"not safetensors")
    res = cli("eval", "--model", model, "--text", single, "--json", "--quiet")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "no document with at least 2 tokens" in lines[0], res.stderr
    assert not res.stdout.strip()


def test_eval_json(scored):
    res = cli("eval", "--model", scored / "model", "--text", scored / "a.jsonl", "--json", "--decode-tokens", "4",
              "--quiet")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert set(result) == {"model", "params", "files", "prefill_tokens_per_s", "decode_tokens_per_s"}
    entry = result["files"][str(scored / "a.jsonl")]
    assert entry["tokens"] == 5 + 8 + 3 and 1 < entry["perplexity"] < 1e4
