"""The benchmark scripts report bad input as the CLIs do: one line, exit code 2, no traceback, before any
model is loaded or any kernel timed."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")


@pytest.mark.parametrize("args, message", [
    (["bench_score.py", "--docs", "0"], "--docs 0: must be 1 or more"),
    (["bench_score.py", "--docs", "1", "--model", "missing.gguf"], "GGUF file not found: missing.gguf"),
    (["bench_score.py", "--random-width", "100"], "--random-width 100: must be a positive multiple of 512"),
    (["bench_score.py", "--tokens", "64", "--batch-tokens", "32"], "--batch-tokens 32: must hold one document"),
    (["bench_long_document.py", "--tokens", "1"], "--tokens 1: must be 2 or more"),
    (["bench_expert_speed.py", "--shapes", "channels", "blocks"], "--shapes blocks: unknown"),
    (["bench_score.py", "--random-width", "1152"], "--random-width 1152: must be a positive multiple of 512"),
    (["bench_expert_speed.py", "--width", "1152", "--device", "cpu"], "--width 1152: must be a multiple of 512"),
    (["bench_expert_speed.py", "--batch", "0"], "--batch 0: must be 1 or more"),
    (["bench_expert_speed.py", "--ratios", "0.5,2"], "every ratio must lie strictly between 0 and 1"),
    (["expert_quality.py", "--experts", "de,de+fr"], "--experts 'de,de+fr': unknown dimension 'fr'"),
    (["expert_quality.py", "--methods", "wanda-sp,sparsegpt"], "--methods 'wanda-sp,sparsegpt': unknown 'sparsegpt'"),
    (["expert_quality.py", "--ratios", "0.25,1"], "every ratio must lie strictly between 0 and 1"),
    (["expert_quality.py", "--experts", ""], "--experts '': unknown dimension ''"),
    (["expert_quality.py", "--ratios", ""], "--ratios '': expected comma-separated numbers"),
    (["expert_quality.py", "--out", "README.md"], "--out README.md: not writable"),
    (["bench_stream.py", "--ram-multiple", "nan"], "--ram-multiple nan: must be a number above 1"),
    (["bench_stream.py", "--docs", "0"], "--docs 0: must be 1 or more"),
    (["bench_stream.py", "--layers", "0", "--prune"], "--layers 0: must be 1 or more"),
    (["bench_calibration.py", "--repetitions", "0"], "--repetitions 0: must be 1 or more"),
    (["bench_score.py", "--random-width", "512", "--device", "gpu"], "--device 'gpu': expected cpu or cuda[:N]"),
    (["bench_expert_speed.py", "--quick", "--device", "gpu"], "--device 'gpu': expected cpu or cuda[:N]"),
    pytest.param(["bench_kernels.py"], "no CUDA device is available here", marks=NO_GPU),
    pytest.param(["tune_qk_attention.py"], "no CUDA device is available here", marks=NO_GPU),
    pytest.param(["bench_expert_speed.py", "--device", "cuda"], "no CUDA device is available", marks=NO_GPU),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    script, *rest = args
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *rest], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not done.stdout.strip()


def test_results_csv_keeps_earlier_runs(tmp_path):
    """A run's rows join the earlier runs' (the history the README's claims cite), a new column included."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import append_records

    path = tmp_path / "results.csv"
    append_records(path, [{"commit": "aaa", "ppl": "1.5"}, {"commit": "aaa", "ppl": "2.5"}])
    append_records(path, [{"commit": "bbb", "ppl": "3.5", "speed": "9"}])
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["commit"], r["ppl"], r["speed"]) for r in rows] == [("aaa", "1.5", ""), ("aaa", "2.5", ""),
                                                                   ("bbb", "3.5", "9")]
