"""The Python API snippet of docs/api.md runs as written (on the embedded SmolLM2 and the shipped corpora)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_snippet_runs(tmp_path):
    match = re.search(r"<!-- snippet:api -->\n```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    assert match, "docs/api.md lost its API snippet"
    (tmp_path / "data").symlink_to(ROOT / "data")
    res = subprocess.run([sys.executable, "-c", match.group(1)], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    sigma_line, classes = res.stdout.strip().splitlines()[-2:]
    removed = float(re.search(r"removed ([0-9.]+)", sigma_line).group(1))
    assert abs(removed - 0.25) < 0.01
    assert classes.split()[:2] == ["CusprunDenseLlamaForCausalLM", "LlamaForCausalLM"]
    assert int(classes.split()[2]) < 1536
    assert (tmp_path / "de.safetensors").is_file()
