"""The Python API: cusprun.score -> ScoreSet (save/load, relevance, intersection, select) -> cusprun.formats.apply."""

import json
import subprocess
import sys

import pytest
import torch

import cusprun
from cusprun.core.neurons import Geometry
from cusprun.selection.plan import propagate
from tests.brute_force import brute_force_scores
from tests.conftest import write_ids_corpus
from tests.tiny import random_ids, tiny_model, tiny_tokenizer

TOL = 1e-4  # of each tensor's largest score, as in the brute-force suite


def independent_relevance(*score_dicts):
    """max over documents of rank / n, ranks by a stable argsort (ties: lower index first)."""
    out = {}
    for name in score_dicts[0]:
        if name.endswith(".block_influence"):  # a layer's, not a neuron's
            continue
        rows = torch.cat([s[name] for s in score_dicts])
        n = rows.shape[1]
        fractions = torch.stack([torch.argsort(torch.argsort(r, stable=True), stable=True).double() / n for r in rows])
        out[name] = fractions.max(dim=0).values
    return out


def test_score_matches_brute_force_ablation_on_any_iterable():
    model = tiny_model("mistral", seed=2)
    docs = [random_ids(9, seed=1), random_ids(4, seed=2)]
    result = cusprun.score(model, (torch.tensor(d) if i else d for i, d in enumerate(docs)), progress=False)
    assert result.n_docs == 2 and result.metadata["measure"] == "block"
    for i, ids in enumerate(docs):
        for name, expected in brute_force_scores(model, ids, "block").items():
            got = result.scores[name][i].double()
            assert (got - expected).abs().max() <= TOL * expected.abs().max() + 1e-6, name


def test_text_documents_use_the_tokenizer_and_equal_token_ids():
    model, tok = tiny_model("llama", seed=5), tiny_tokenizer()
    texts = ["the expert model of german legal text", "a neuron in a layer is pruned"]
    from_text = cusprun.score(model, texts, "local", tokenizer=tok, progress=False)
    from_ids = cusprun.score(model, [tok(t)["input_ids"] for t in texts], "local", progress=False)
    assert all(torch.equal(from_text.scores[n], from_ids.scores[n]) for n in from_ids.scores)
    assert from_text.metadata["token_counts"] == [len(tok(t)["input_ids"]) for t in texts]


@pytest.mark.parametrize("documents, error, match", [
    ("one string", TypeError, "iterable of documents"),
    (["text without tokenizer"], ValueError, "pass tokenizer="),
    ([[1, 2], []], ValueError, "document 1 has no tokens"),
    ([[1, 99]], ValueError, "token ids must be integers"),
    ([], ValueError, "no documents"),
])
def test_bad_documents_are_named(documents, error, match):
    with pytest.raises(error, match=match):
        cusprun.score(tiny_model("llama"), documents, progress=False)


def test_save_load_round_trip_and_the_cli_writes_the_same_scores(tmp_path, tiny_dir):
    write_ids_corpus(tmp_path / "c.jsonl", [7, 3, 10], seed=4)
    res = subprocess.run([sys.executable, "-m", "cusprun.score", "--model", tiny_dir, "--corpus",
                          f"c={tmp_path / 'c.jsonl'}", "--out", tmp_path / "cli", "--measure", "block", "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    docs = [json.loads(line)["input_ids"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    api = cusprun.score(model, docs, max_tokens=512, corpus="c", progress=False)
    cli = cusprun.ScoreSet.load(tmp_path / "cli" / "c.safetensors")
    assert all(torch.equal(api.scores[n], cli.scores[n]) for n in cli.scores)
    assert api.metadata["architecture"] == cli.metadata["architecture"]
    assert api.metadata["config_hash"] == cli.metadata["config_hash"]
    again = cusprun.ScoreSet.load(api.save(tmp_path / "api.safetensors"))
    assert again.metadata == api.metadata and all(torch.equal(again.scores[n], api.scores[n]) for n in api.scores)


def test_relevance_and_intersection_follow_their_definitions():
    model = tiny_model("qwen2", seed=1)
    a = cusprun.score(model, [random_ids(6, seed=1), random_ids(9, seed=2)], "local", corpus="a", progress=False)
    b = cusprun.score(model, [random_ids(8, seed=3)], "local", corpus="b", progress=False)
    both = cusprun.intersect(a, b)
    assert both.corpora == ["a", "b"] and both.n_docs == 3
    expected = independent_relevance(a.scores, b.scores)
    rel_a, rel_b, rel = a.relevance(), b.relevance(), both.relevance()
    for name in expected:
        assert torch.equal(rel[name], expected[name])
        assert torch.equal(rel[name], torch.maximum(rel_a[name], rel_b[name]))  # irrelevant to both
    assert (a & b).metadata == both.metadata


def test_intersection_refuses_other_measures():
    model = tiny_model("llama")
    a = cusprun.score(model, [random_ids(5)], "local", progress=False)
    b = cusprun.score(model, [random_ids(5)], "block", progress=False)
    with pytest.raises(ValueError, match="different measures"):
        a & b


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_select_and_apply(arch):
    model = tiny_model(arch, seed=8, layers=3)
    scores = cusprun.score(model, [random_ids(n, seed=n) for n in (6, 13)], progress=False)
    plan = scores.select(0.3, granularity="neuron", neurons="all")  # the paper's selection
    assert abs(plan.removed_fraction - 0.3) < 0.08
    assert all(torch.equal(plan.plan[n], propagate(plan.plan, Geometry(model.config))[n]) for n in plan.plan)
    removed = plan.removed()
    assert sum(len(v) for v in removed.values()) == sum(int((~m).sum()) for m in plan.plan.values())
    sliced, masked = cusprun.apply(model, plan, format="sliced"), cusprun.apply(model, plan, format="masked")
    ids = torch.tensor([random_ids(15, seed=2)])
    with torch.no_grad():
        assert (sliced(ids).logits - masked(ids).logits).abs().max() <= 1e-4
        for name, index in removed.items():  # the masked model really zeroed what the plan removes
            linear = masked.get_submodule(name.rsplit(".", 1)[0])
            weight = linear.weight if name.endswith("rows") else linear.weight.T
            assert not weight[index].any()


def test_saved_files_get_the_umask_permissions_not_mkstemps(tmp_path):
    from cusprun.core.files import umask_mode

    path = cusprun.score(tiny_model("llama"), [random_ids(4)], "local", progress=False).save(tmp_path / "s.safetensors")
    assert path.stat().st_mode & 0o777 == umask_mode()


def test_cusprun_score_stays_the_function_after_the_command_module_is_imported():
    import importlib

    model = tiny_model("llama", seed=2)
    docs = [random_ids(6, seed=1)]
    before = cusprun.score(model, docs, progress=False)
    importlib.import_module("cusprun.score")  # rebinds the package attribute to the command's module
    after = cusprun.score(model, docs, progress=False)
    assert callable(cusprun.score.build_parser)
    assert all(torch.equal(before.scores[n], after.scores[n]) for n in before.scores)
