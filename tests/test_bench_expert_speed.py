"""benchmarks/bench_expert_speed.py: the expert shapes it times remove what they say, and --quick runs every
path and prints a consistent table."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from cusprun.core.neurons import Geometry
from cusprun.formats.dense import layer_units
from cusprun.selection.plan import kept_params, propagate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_expert_speed import ALIGN, SHAPES, expert_plan, spread  # noqa: E402

# Llama-3-8B's geometry (no weights are made: plans only)
LLAMA3_8B = Geometry(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=128, num_hidden_layers=32))


@pytest.mark.parametrize("total, weights, caps", [
    (64 * 10, [1, 1, 1], [640] * 3),
    (64 * 7 + 30, [0.5, 1.5, 1.0, 0.7], [640] * 4),  # a remainder under one unit is dropped
    (64 * 9, [10, 1, 1], [192, 640, 640]),  # the first layer's share is capped; the rest go elsewhere
    (64 * 30, [1, 1], [640, 640]),  # more than the caps allow: every layer at its cap
])
def test_spread_in_whole_units_within_caps(total, weights, caps):
    out = spread(total, weights, caps, ALIGN)
    assert all(n % ALIGN == 0 and 0 <= n <= c for n, c in zip(out, caps))
    assert sum(out) == min(total // ALIGN * ALIGN, sum(c // ALIGN * ALIGN for c in caps))


@pytest.mark.parametrize("ratio", [0.25, 0.35, 0.45])
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_remove_the_ratio_as_named(shape, ratio):
    geo = LLAMA3_8B
    plan = expert_plan(geo, shape, ratio)
    assert {k: v.tolist() for k, v in propagate(plan, geo).items()} == {k: v.tolist() for k, v in plan.items()}
    removed = 1 - kept_params(plan, geo) / geo.projection_params()
    assert removed == pytest.approx(ratio, abs=3 * geo.hidden * ALIGN / geo.projection_params())
    units = [layer_units(plan, geo, layer) for layer in range(geo.layers)]
    channels = [len(u["channels"]) for u in units]
    heads = [len(u["heads"]) for u in units]
    kept = [c for c, h in zip(channels, heads) if c or h]
    assert all(c % ALIGN == 0 for c in channels)
    if shape == "layers+channels":  # a third of the ratio as whole layers, the others keep every head
        assert geo.layers - len(kept) == round(ratio / 3 * geo.layers)
        assert all(h in (0, geo.heads) for h in heads)
    else:
        assert len(kept) == geo.layers
    if shape == "heads+channels":
        assert len(set(heads)) == 1 and heads[0] < geo.heads
        assert len(set(channels)) <= 2  # equal shares, up to one 64-channel unit
    elif shape == "channels-uniform":
        assert set(heads) == {geo.heads} and max(channels) - min(channels) <= ALIGN
    elif shape == "channels":
        assert set(heads) == {geo.heads} and max(channels) - min(channels) > 10 * ALIGN  # non-uniform


@pytest.mark.parametrize("logits", ["all", "last"])
def test_quick_run_prints_every_shape(logits):
    results = ROOT / "benchmarks" / "results" / "bench_expert_speed.csv"
    before = results.read_bytes() if results.exists() else None
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_expert_speed.py"), "--quick",
                           "--ratios", "0.45", "--batch", "2", "--logits", logits], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    header = re.split(r"\s{2,}", lines[-6].strip())
    rows = [dict(zip(header, re.split(r"\s{2,}", line.strip()))) for line in lines[-5:]]
    assert [r["model"] for r in rows] == ["dense (bfloat16)", *SHAPES]
    for r in rows[1:]:
        assert float(r["ideal"]) > 1 and float(r["speed-up"]) > 0
        speedup, ideal = float(r["speed-up"]), float(r["ideal"])
        rounding = 0.005 + 0.005 / ideal + 0.005 * speedup / ideal**2  # each column is printed to 2 decimals
        assert float(r["measured/ideal"]) == pytest.approx(speedup / ideal, abs=rounding)
        assert float(r["decode tok/s"]) > 0
    assert (results.read_bytes() if results.exists() else None) == before  # --quick appends nothing
