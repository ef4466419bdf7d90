"""benchmarks/prefill_breakdown.py --quick: the split of a prefill's time, dense model against a channel expert."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "prefill_breakdown.py"


def run(*args, cache):
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--cache", str(cache), *args],
                          capture_output=True, text=True, timeout=600)


def test_quick_breakdown_prints_a_consistent_table(tmp_path):
    results = ROOT / "benchmarks" / "results" / "prefill_breakdown.csv"
    before = results.read_bytes() if results.exists() else None
    res = run("--ratios", "0.45", "--align", "1,16", cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    header = re.split(r"\s{2,}", lines[-4].strip())
    rows = [dict(zip(header, re.split(r"\s{2,}", line.strip()))) for line in lines[-3:]]
    assert [(r["method"], r["align"]) for r in rows] == [("dense", "-"), ("cusprun-channels", "1"),
                                                         ("cusprun-channels", "16")]
    shares = ("gemm share", "attention share", "other share", "outside share")
    for r in rows:
        assert sum(float(r[s]) for s in shares) == pytest.approx(1.0, abs=0.01)
        assert all(float(r[s]) >= 0 for s in shares)
    for expert in rows[1:]:
        assert expert["ratio"] == "45%" and float(expert["ideal"]) > 1.2
        assert float(expert["measured/ideal"]) == pytest.approx(float(expert["speed-up"]) / float(expert["ideal"]),
                                                                rel=0.01)
        assert 0.3 < float(expert["GEMM speed-up/linear FLOP drop"]) < 3
    assert (results.read_bytes() if results.exists() else None) == before  # --quick appends nothing


@pytest.mark.parametrize("args, expect", [
    (("--ratios", "0.5,1"), "--ratios '0.5,1': every ratio must lie strictly between 0 and 1"),
    (("--ratios", "a"), "--ratios 'a': expected comma-separated numbers"),
    (("--experts", "de+fr"), "--experts 'de+fr': unknown dimension 'fr'"),
    (("--align", "1,0"), "--align '1,0': every alignment must be 1 or more"),
    (("--repetitions", "0"), "--repetitions 0: must be 1 or more"),
])
def test_bad_input_is_one_line_exit_2(args, expect, tmp_path):
    res = run(*args, cache=tmp_path / "cache")
    assert res.returncode == 2 and expect in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
