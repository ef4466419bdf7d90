"""benchmarks/bench_gguf.py --quick: builds, quantizes and times every model and type, prints a consistent table."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_ids_corpus
from tests.test_gguf import VOCAB, bpe_tokenizer
from tests.tiny import WORDS, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (bash scripts/setup_env.sh)")
def test_quick_run_prints_every_model_and_type(tmp_path):
    from cusprun.score import main as score_main

    model = tiny_model("llama", seed=1, layers=3, vocab=VOCAB)
    model.save_pretrained(tmp_path / "model")
    bpe_tokenizer().save_pretrained(tmp_path / "model")
    write_ids_corpus(tmp_path / "a.jsonl", [9, 12, 7], seed=2)
    assert score_main(["--model", str(tmp_path / "model"), "--corpus", f"a={tmp_path / 'a.jsonl'}",
                       "--out", str(tmp_path / "scores"), "--quiet"]) == 0
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i])}) + "\n" for i in range(3)))
    csv = ROOT / "benchmarks/results/bench_gguf.csv"
    before = csv.read_text() if csv.exists() else None
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_gguf.py"), "--quick", "--model",
                          str(tmp_path / "model"), "--scores", str(tmp_path / "scores/a.safetensors"),
                          "--ratios", "0.1,0.2", "--types", "f32,q8_0", "--pad-mlp", "1,32", "--text", str(text)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines() if line.strip().startswith(("dense ", "expert-"))]
    assert len(rows) == 12  # dense and two experts, in f32 and q8_0, each as selected and padded to 32
    ppl = {(r[0], r[1]): float(r[4]) for r in rows}
    for name in ("dense", "expert-10%", "expert-20%"):  # zero channels change nothing but the file
        assert ppl[name, "f32+pad32"] == pytest.approx(ppl[name, "f32"], rel=1e-5)
    dense_f32 = next(r for r in rows if r[0] == "dense" and r[1] == "f32")
    assert dense_f32[7] == "1" and dense_f32[9] == "1"  # the dense model against itself: speed-up 1, ideal 1
    assert (csv.read_text() if csv.exists() else None) == before  # --quick appends nothing
