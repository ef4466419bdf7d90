"""python -m cusprun.score: outputs, metadata and one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from cusprun.core.neurons import Geometry, influence_name
from cusprun.engine.layer_major import Scorer
from cusprun.scores.scorefile import load_scores
from tests.conftest import write_ids_corpus


def run_score(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cusprun.score", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def test_scores_two_corpora_in_one_run(tiny_dir, tmp_path):
    a = write_ids_corpus(tmp_path / "a.jsonl", [5, 1, 9])
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"input_ids": []}) + "\n" + json.dumps({"input_ids": [3, 4, 5]}) + "\n")
    res = run_score("--model", tiny_dir, "--corpus", f"a={a}", "--corpus", f"b={b}", "--out", tmp_path / "out",
                    "--quiet")
    assert res.returncode == 0, res.stderr
    assert "no tokens, skipped" in res.stderr
    tensors, meta = load_scores(tmp_path / "out/a.safetensors")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    shapes = Geometry(model.config).sizes() | {influence_name(i): 1 for i in range(model.config.num_hidden_layers)}
    assert sorted(tensors) == sorted(shapes)
    for name, t in tensors.items():
        assert t.dtype == torch.float32 and t.shape == (3, shapes[name])
    assert meta["format"] == "cusprun-scores/1" and meta["measure"] == "local" and meta["n_docs"] == "3"
    assert meta["token_counts"] == [5, 1, 9] and meta["skipped"] == []
    expected = Scorer(model, "local").score_documents([json.loads(line)["input_ids"]
                                                      for line in a.read_text().splitlines()])
    for name in tensors:
        torch.testing.assert_close(tensors[name], expected[name])
    _, meta_b = load_scores(tmp_path / "out/b.safetensors")
    assert meta_b["n_docs"] == "1" and meta_b["skipped"] == [f"{b}:1"]
    assert len(meta_b["corpus_sha256"]) == 64 and meta_b["config_hash"] == meta["config_hash"]


def test_text_folder_and_txt_corpora_are_read(tmp_path):
    from cusprun.core.corpus import read_corpus
    (tmp_path / "d").mkdir()
    (tmp_path / "d/1.txt").write_text("first doc")
    (tmp_path / "d/2.txt").write_text("second doc")
    (tmp_path / "c.txt").write_text("para one\nstill one\n\n\npara two\n")
    assert [d.text for d in read_corpus(tmp_path / "d")] == ["first doc", "second doc"]
    assert [d.text for d in read_corpus(tmp_path / "c.txt")] == ["para one\nstill one", "para two"]


@pytest.mark.parametrize("case, expect", [
    ("missing", "corpus not found"),
    ("malformed", "bad.jsonl:2: malformed JSON"),
    ("noname", "expected NAME=PATH"),
    ("duplicate", "given twice"),
    ("alias", "unknown model"),
    ("empty", "has no document with tokens"),
    ("text_no_tokenizer", "need a tokenizer"),
    ("unwritable", "not writable"),
    ("arch", "unsupported architecture 'gpt2'"),
    ("max_memory_malformed", "--max-memory '1.2.3GB': expected a positive size"),
    ("max_memory_huge", "--max-memory '1e999': expected a positive size"),
    ("max_memory_zero", "--max-memory '0': expected a positive size"),
    ("surrogate", "surrogate.jsonl:1: 'text' is not valid Unicode"),
    ("second_corpus_bad", "outside the model's vocabulary"),
    ("baseline_stream", "--stream: applies to Cus-Prun's scoring only, not --method wanda-sp"),
    ("data_free_corpus", "--corpus: method magnitude needs no data"),
    ("seed_unused", "--seed: only the random baseline draws numbers, not --method cusprun"),
])
def test_bad_input_is_one_line_exit_2(case, expect, tiny_dir, tmp_path):
    good = write_ids_corpus(tmp_path / "good.jsonl", [4])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1]}\n{"input_ids": [1,\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"input_ids": []}\n')
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "hello"}\n')
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    blocker = tmp_path / "file"
    blocker.write_text("")
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "a\\ud800b"}\n')
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"input_ids": [1, 99999]}\n')
    model, out = tiny_dir, tmp_path / "out"
    corpora = {"missing": ["x=nope.jsonl"], "malformed": [f"x={bad}"], "noname": [str(good)],
               "duplicate": [f"x={good}", f"x={good}"], "empty": [f"x={empty}"], "text_no_tokenizer": [f"x={text}"],
               "surrogate": [f"x={surrogate}"], "second_corpus_bad": [f"x={good}", f"y={outside}"],
               }.get(case, [f"x={good}"])
    extra = {"max_memory_malformed": ["--max-memory", "1.2.3GB"], "max_memory_huge": ["--max-memory", "1e999"],
             "max_memory_zero": ["--max-memory", "0"], "baseline_stream": ["--method", "wanda-sp", "--stream"],
             "data_free_corpus": ["--method", "magnitude"], "seed_unused": ["--seed", "3"]}.get(case, [])
    if case == "alias":
        model = "llama9-1b"
    if case == "arch":
        model = gpt2
    if case == "unwritable":
        out = blocker / "sub"
    args = ["--model", model, "--out", out, "--quiet", *extra] + [a for c in corpora for a in ("--corpus", c)]
    res = run_score(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    if case == "second_corpus_bad":  # found before the first corpus was scored
        assert not (out / "x.safetensors").exists()


def test_unknown_backend_named_explicitly_fails_loudly(tiny_dir, tmp_path, monkeypatch):
    good = write_ids_corpus(tmp_path / "good.jsonl", [4])
    monkeypatch.setenv("CUSPRUN_BACKEND", "cuda")
    res = run_score("--model", tiny_dir, "--corpus", f"x={good}", "--out", tmp_path / "o", "--quiet")
    assert res.returncode == 2 and "CUSPRUN_BACKEND=cuda" in res.stderr


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    from cusprun.scores import scorefile

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(scorefile, "write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        scorefile.save_scores(tmp_path / "x.safetensors", {"a": torch.zeros(1, 2)}, {})
    assert list(tmp_path.iterdir()) == []


def test_concurrent_out_checks_do_not_trip_each_other(tmp_path):
    """torchrun's ranks check --out at the same moment; each must probe with a file of its own."""
    from concurrent.futures import ThreadPoolExecutor

    from cusprun.engine.score_corpora import prepare_out

    out = tmp_path / "out"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: prepare_out(str(out)), range(2000)))
    assert list(out.iterdir()) == []
