"""Every Triton kernel compiled ahead of time for sm_80, sm_86 and sm_90 at the configuration its launcher
chooses there (head_dim 64, 128, 256), without a GPU: shared memory within the target's limit and the
launcher's budget, no register spills (ptxas -v) beyond those a measured entry allows, exp through libdevice."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from cusprun_kernels.triton_aot import HEAD_DIMS, TARGETS, CompileReport, shared_limit  # noqa: E402
from cusprun_kernels.triton_configs import (  # noqa: E402
    ATTENTION_CONFIGS,
    AttentionConfig,
    attention_config,
    head_dim_padded,
    known_fault,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_every_target_within_limits():
    # a subprocess without TRITON_INTERPRET: the interpreter's kernels cannot be compiled
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "cusprun_kernels.triton_aot", "--json"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=900)
    assert res.returncode in (0, 1), res.stderr[-3000:]
    reports = json.loads(res.stdout)
    compiled = {(r["target"], r["kernel"]) for r in reports}
    for target in TARGETS:
        for hd in HEAD_DIMS:
            assert (target, f"qk_ablation attention head_dim={hd}") in compiled
        assert (target, "projection_energies fp32") in compiled and (target, "projection_energies bf16") in compiled
    failures = [f"sm_{r['target']} {r['kernel']} [{r['config']}]: {'; '.join(r['problems'])}" for r in reports
                if r["problems"]]
    assert failures == []
    assert all(r["shared"] > 0 and 0 < r["registers"] <= 255 for r in reports)


def test_report_flags_oversize_shared_memory_and_spills():
    ok = CompileReport("k", 86, "cfg", 90_000, shared_limit(86), 200, 0, 100_000)
    assert ok.problems == []
    bad = CompileReport("k", 86, "cfg", 181_504, shared_limit(86), 32, 28_000, 100_000, 2)
    assert bad.problems == ["shared memory 181504 B > sm_86 limit 101376 B",
                            "shared memory 181504 B > the launcher's estimate 100000 B",
                            "28000 B of register spills (32 registers)",
                            "2 exp through bare ex2.approx (tl.exp, not libdevice's expf)"]


def test_attention_config_follows_head_dim_and_shared_memory():
    assert [head_dim_padded(d) for d in (1, 10, 16, 64, 80, 128, 200, 256)] == [16, 16, 16, 64, 128, 128, 256, 256]
    ampere, consumer = (8, 0), (8, 6)
    assert attention_config(80, 101_376, consumer).head_dim_padded == 128
    assert attention_config(128, 166_912, ampere).precision == "tf32x3"
    assert attention_config(256, 101_376, consumer).precision == "ieee"
    with pytest.raises(ValueError, match="head_dim 320 is above the largest supported, 256"):
        attention_config(320, 232_448, (9, 0))
    with pytest.raises(ValueError, match="needs more than the 16384 B of shared memory"):
        attention_config(128, 16_384, ampere)


def test_measured_entries_are_chosen_only_on_their_gpu_and_allow_only_their_spills():
    hopper, ampere = attention_config(128, 232_448, (9, 0)), attention_config(128, 166_912, (8, 0))
    assert hopper.capabilities == ((9, 0),) and hopper.spill_budget > 0
    assert ampere.capabilities == () and ampere.spill_budget == 0
    # a GPU of another capability with as much shared memory gets the entry for every GPU
    assert attention_config(128, 232_448, (10, 0)) == ampere
    assert attention_config(64, 232_448, (9, 0)).head_dim_padded == 64
    within = CompileReport("k", 90, "cfg", 70_000, shared_limit(90), 255, 732, 73_984, spill_budget=732)
    assert within.problems == []
    over = CompileReport("k", 90, "cfg", 70_000, shared_limit(90), 255, 740, 73_984, spill_budget=732)
    assert over.problems == ["740 B of register spills (255 registers) (its table allows 732 B)"]


def test_no_table_entry_is_a_configuration_known_to_fault():
    for table in ATTENTION_CONFIGS.values():
        for cfg in table:
            for capability in cfg.capabilities or [(8, 0), (8, 6), (9, 0), (10, 0)]:
                assert known_fault(cfg, capability) is None, (cfg.describe(), capability)
    faulty = AttentionConfig(128, 64, 16, 8, 1, "tf32x3", 81_920)
    assert "P.V" in known_fault(faulty, (9, 0)) and known_fault(faulty, (8, 0)) is None
