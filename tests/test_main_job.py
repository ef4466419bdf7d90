"""python -m cusprun.pipeline end to end on a tiny model: scores, experts, evaluation table, summary, reuse."""

import json
import subprocess
import sys

import pytest

from tests.conftest import write_ids_corpus


def run_pipeline(*args):
    return subprocess.run([sys.executable, "-m", "cusprun.pipeline", *map(str, args)], capture_output=True, text=True)


def test_main_job_on_a_tiny_model(tiny_dir, tmp_path):
    data = tmp_path / "data"
    (data / "corpora").mkdir(parents=True)
    (data / "heldout").mkdir()
    for i, name in enumerate(("a", "b")):
        write_ids_corpus(data / "corpora" / f"{name}.jsonl", [9, 14, 5], seed=10 * i)
        write_ids_corpus(data / "heldout" / f"{name}.jsonl", [12, 7], seed=100 + 10 * i)
    out = tmp_path / "run"
    args = ["--model", tiny_dir, "--data", data, "--expert", "a", "--expert", "a+b", "--eval", "a", "--eval", "b",
            "--docs", 2, "--max-tokens", 12, "--eval-max-tokens", 16, "--out", out, "--quiet"]
    res = run_pipeline(*args)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [r["model"] for r in summary["results"]] == ["dense", "a", "a+b"]
    for row in summary["results"][1:]:
        assert abs(row["ratio_achieved_projection"] - 0.25) < 0.05
        assert (out / "experts" / row["model"] / "pruning.json").is_file()
    assert all(r["files"][str(data / "heldout" / "a.jsonl")]["perplexity"] > 1 for r in summary["results"])
    table = (out / "summary.md").read_text()
    assert table.startswith("| model |") and "| a+b |" in table and table in res.stdout
    # each expert's speed-up is against the dense model timed beside it, and the table shows that ratio
    assert "prefill_speedup" not in summary["results"][0]
    for row in summary["results"][1:]:
        line = next(t for t in table.splitlines() if t.startswith(f"| {row['model']} |"))
        assert row["prefill_speedup"] > 0 and line.endswith(f"| {row['prefill_speedup']:.2f}x |")
    # corpora are cut to --docs documents, and a second run reuses the matching score files
    assert len((out / "corpora" / "a.jsonl").read_text().splitlines()) == 2
    again = run_pipeline(*args)
    assert again.returncode == 0 and again.stderr.count("reusing") == 2, again.stderr


def test_main_job_checks_its_inputs_before_loading(tmp_path):
    res = run_pipeline("--model", tmp_path / "no-model", "--data", tmp_path, "--out", tmp_path / "o", "--quiet")
    assert res.returncode == 2 and "no calibration corpus" in res.stderr and "Traceback" not in res.stderr


def test_main_job_refuses_a_ratio_whole_mlp_channels_cannot_reach_before_scoring(tiny_dir, tmp_path):
    data = tmp_path / "data"
    (data / "corpora").mkdir(parents=True)
    (data / "heldout").mkdir()
    write_ids_corpus(data / "corpora" / "a.jsonl", [9, 14], seed=1)
    write_ids_corpus(data / "heldout" / "a.jsonl", [12], seed=2)
    res = run_pipeline("--model", tiny_dir, "--data", data, "--expert", "a", "--eval", "a", "--ratio", "0.9",
                       "--out", tmp_path / "run", "--quiet")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "remove whole MLP channels, which reach at most 0." in lines[0], res.stderr
    assert not list((tmp_path / "run" / "scores").glob("*.safetensors"))  # nothing was scored


@pytest.mark.parametrize("case, expect", [
    ("heldout_malformed", "a.jsonl:2: malformed JSON"),
    ("expert_empty_dimension", "--expert 'a+': expected corpus names joined by '+'"),
    ("corpus_not_utf8", "b.jsonl: not UTF-8 text"),
    ("heldout_nothing_to_predict", "a.jsonl: no document with at least 2 tokens"),
])
def test_main_job_reads_every_input_before_scoring(case, expect, tiny_dir, tmp_path):
    data = tmp_path / "data"
    (data / "corpora").mkdir(parents=True)
    (data / "heldout").mkdir()
    write_ids_corpus(data / "corpora" / "a.jsonl", [9, 14], seed=1)
    write_ids_corpus(data / "heldout" / "a.jsonl", [12], seed=2)
    if case == "heldout_malformed":
        with open(data / "heldout" / "a.jsonl", "a") as fh:
            fh.write('{"input_ids": [1,\n')
    if case == "heldout_nothing_to_predict":
        write_ids_corpus(data / "heldout" / "a.jsonl", [1, 1], seed=2)
    (data / "corpora" / "b.jsonl").write_bytes(b'{"text": "\xff"}\n')
    expert = {"expert_empty_dimension": "a+", "corpus_not_utf8": "a+b"}.get(case, "a")
    res = run_pipeline("--model", tiny_dir, "--data", data, "--expert", expert, "--eval", "a",
                       "--out", tmp_path / "run", "--quiet")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and expect in lines[0], res.stderr
    assert not list((tmp_path / "run").glob("scores/*.safetensors"))  # nothing scored before the error
