"""The recipe of docs/scores.md for reading score files without cusprun, run where cusprun is not installed."""

import re
from pathlib import Path

import numpy as np

import cusprun
from tests.isolated import fresh_venv, run_isolated
from tests.tiny import random_ids, tiny_model

PAGE = Path(__file__).resolve().parents[1] / "docs" / "scores.md"


def recipe() -> str:
    match = re.search(r"<!-- recipe:read-scores -->\n```python\n(.*?)```", PAGE.read_text(), re.S)
    assert match, "docs/scores.md lost its score-file recipe"
    return match.group(1)


def test_recipe_reads_score_files_without_cusprun(tmp_path):
    model = tiny_model("qwen2", seed=4)
    a = cusprun.score(model, [random_ids(7, seed=1), random_ids(12, seed=2)], corpus="a", progress=False)
    b = cusprun.score(model, [random_ids(9, seed=3)], corpus="b", progress=False)
    a.save(tmp_path / "a.safetensors")
    (a & b).save(tmp_path / "ab.safetensors")
    b.save(tmp_path / "b.safetensors")
    use = """
import sys
rel = relevance(sys.argv[1], sys.argv[2])
rel_combined = relevance(sys.argv[3])
_, meta = read_scores(sys.argv[3])
assert meta["parts"][1]["corpus"] == "b" and meta["architecture"]["num_key_value_heads"] == 1
np.savez(sys.argv[4], **{k: v for k, v in rel.items()}, **{"combined." + k: v for k, v in rel_combined.items()})
bad = irrelevant(rel, 0.5)
print(sum(len(v) for v in bad.values()))
"""
    res = run_isolated(fresh_venv(tmp_path), recipe() + use, tmp_path, str(tmp_path / "a.safetensors"),
                       str(tmp_path / "b.safetensors"), str(tmp_path / "ab.safetensors"), str(tmp_path / "rel.npz"))
    assert res.returncode == 0, res.stderr[-2000:]
    got = np.load(tmp_path / "rel.npz")
    expected = (a & b).relevance()
    for name, r in expected.items():
        assert np.array_equal(got[name], r.numpy()) and np.array_equal(got["combined." + name], r.numpy())
    assert int(res.stdout.split()[-1]) == sum(int((r < 0.5).sum()) for r in expected.values())
