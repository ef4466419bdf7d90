"""python -m cusprun.gpu_check: the steps it runs with and without a GPU, and a failing or overlong step reported."""

import sys

import pytest

from cusprun import gpu_check
from cusprun.core.errors import CusprunError


def test_without_a_gpu_only_the_steps_that_need_none():
    assert [s[0] for s in gpu_check.steps(gpu=False)] == ["aot", "resources"]
    names = [s[0] for s in gpu_check.steps(gpu=True)]
    assert names[:11] == ["aot", "build", "resources", "tests", "bruteforce", "memcheck", "racecheck",
                          "memcheck-triton", "verify", "bench_kernels", "bench_score"]
    # --random-width 4096: Llama-3-8B geometry
    assert names[11:] == ["bench_score-8b-width", "bench_expert_speed", "tune_qk"]
    tune = dict((s[0], s[1]) for s in gpu_check.steps(gpu=True, gpu_slug="NVIDIA-H200"))["tune_qk"]
    assert tune[tune.index("--out") + 1] == "benchmarks/results/tune_qk_attention-NVIDIA-H200"
    assert sum(limit for _, _, limit, _ in gpu_check.steps(gpu=True)) > 0


def test_steps_pass_fail_and_time_out(tmp_path):
    ok = gpu_check.run_step("ok", [sys.executable, "-c", "print('fine')"], 60, {}, tmp_path)
    bad = gpu_check.run_step("bad", [sys.executable, "-c", "raise SystemExit(3)"], 60, {}, tmp_path)
    slow = gpu_check.run_step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1, {}, tmp_path)
    missing = gpu_check.run_step("missing", ["no-such-tool-here"], 5, {}, tmp_path)
    assert (ok[0], bad[0], slow[0]) == ("PASS", "FAIL (exit 3)", "FAIL (over 1 s)")
    assert missing[0] == "FAIL (no-such-tool-here not found)"
    assert "fine" in (tmp_path / "ok.log").read_text()


def test_main_prints_the_table_and_fails_when_a_step_fails(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_check, "steps", lambda gpu, slug="unknown": [("good", [sys.executable, "-c", "0"], 30, {}),
                                                               ("broken", [sys.executable, "-c", "1/0"], 30, {})])
    assert gpu_check.main([]) == 1
    out = capsys.readouterr().out
    assert ": 1 passed, 1 failed: broken" in out
    assert gpu_check.main(["--skip", "broken"]) == 0


@pytest.mark.parametrize("flag", ["--only", "--skip"])
def test_unknown_steps_are_refused(flag):
    with pytest.raises(CusprunError, match=f"{flag} bogus: unknown step"):
        gpu_check.main([flag, "aot", "bogus"])
