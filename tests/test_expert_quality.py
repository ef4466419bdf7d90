"""benchmarks/expert_quality.py --quick: every method, ablation and sweep path on SmolLM2, end to end."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")


def test_quick_benchmark_writes_tables_and_plots(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "expert_quality.py"), "--quick", "--quiet",
                          "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "expert_quality.csv")))
    methods = {r["method"] for r in rows}
    assert methods == {"dense", "cusprun-channels", "cusprun-channels-comp", "cusprun-units", "cusprun-neurons", "plnd",
                       "cusprun-layers-comp",
                       "wanda-sp", "flap", "shortgpt", "magnitude", "random"}
    assert {r["variant"] for r in rows if r["experiment"] == "ablation"} == {
        "local measure", "equal budget", "relative budget", "mean-rank rule", "pooled rule"}
    assert {r["docs"] for r in rows if r["method"] == "cusprun-channels-comp" and r["variant"] == "default"
            and r["expert"] == "de"} == {"1", "2"}  # the sweep: the compensated expert over the first 1 and 2 documents
    assert {r["docs"] for r in rows if r["expert"] == "de+medical" and r["method"].startswith("cusprun")} == {"2+2"}
    # the same plan with and without compensation: only the refit weights differ
    plain, comp = ({r["expert"]: r for r in rows if r["experiment"] == "main" and r["method"] == m}
                   for m in ("cusprun-channels", "cusprun-channels-comp"))
    assert all(plain[e]["params"] == comp[e]["params"] and plain[e]["ppl_de"] != comp[e]["ppl_de"] for e in plain)
    # identical shapes are timed once; the ideal still follows each model's own nonzero weights
    assert all(plain[e]["prefill_tps"] == comp[e]["prefill_tps"] for e in plain)
    # an expert is evaluated on the sets it is judged on, a general baseline (reported for every expert) on all
    assert plain["de"]["ppl_medical"] == "" and plain["de+medical"]["ppl_medical"] != ""
    assert all(r["ppl_medical"] != "" for r in rows if r["method"] == "wanda-sp")
    assert [p.split(":")[0] for p in rows[0]["minutes_by_phase"].split()] == ["scoring", "building", "evaluation",
                                                                               "speed"]
    for r in rows:
        assert float(r["target_ppl"]) > 1 and float(r["general_ppl"]) > 1
        if r["method"] not in ("dense", "shortgpt"):
            assert abs(float(r["achieved"]) - float(r["ratio"])) < 0.01, r
    dense = {r["expert"]: float(r["target_ppl"]) for r in rows if r["method"] == "dense"}
    pruned = [r for r in rows if r["method"].startswith("cusprun")]
    assert all(float(r["target_ppl"]) > dense[r["expert"]] for r in pruned)  # pruning without retraining costs
    # speed of every main model's dense export, measured in this run; the ideal speed-up follows the FLOPs
    for r in rows:
        if r["experiment"] == "main":
            assert float(r["prefill_tps"]) > 0 and float(r["decode_tps"]) > 0, r
            assert float(r["ideal_speedup"]) == pytest.approx(1.0) if r["method"] == "dense" else (
                float(r["ideal_speedup"]) > 1.0), r
            assert float(r["measured_over_ideal"]) == pytest.approx(
                float(r["prefill_speedup"]) / float(r["ideal_speedup"]), abs=2e-3)
    assert "| speed-up | ideal | measured / ideal |" in (tmp_path / "out" / "expert_quality.md").read_text()
    for png in ("expert_quality.png", "expert_quality_sweep.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 25% | cusprun-channels |" in (tmp_path / "out" / "expert_quality.md").read_text()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) >= 9  # resumable: scores were cached
    evaluated = len(list((tmp_path / "cache").glob("ppl-*.json")))

    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "expert_quality.py"), "--quick", "--quiet",
                          "--ablations", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "expert_quality_ablations.csv")))
    assert {r["variant"] for r in rows if r["method"] == "cusprun-channels"} == {
        "default", "local measure", "equal budget", "relative budget", "mean-rank rule", "pooled rule",
        "local measure + mean-rank"}
    # the variants the first run evaluated came from the cache: only the new combination was evaluated
    assert len(list((tmp_path / "cache").glob("ppl-*.json"))) <= evaluated + 2
    assert "local measure + mean-rank" in (tmp_path / "out" / "expert_quality_ablations.md").read_text()

    # by name only: channels and RoPE pairs on block scores, compensated with the local pass's statistics
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "expert_quality.py"), "--quick", "--quiet",
                          "--methods", "cusprun-pairs-comp", "--no-extras", "--out", str(tmp_path / "pairs"),
                          "--cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [r for r in csv.DictReader(open(tmp_path / "pairs" / "expert_quality.csv"))
            if r["method"] == "cusprun-pairs-comp"]
    assert rows and all(abs(float(r["achieved"]) - float(r["ratio"])) < 0.01 for r in rows)
    assert all(float(r["target_ppl"]) > dense[r["expert"]] for r in rows)
