"""python -m cusprun: the environment report names versions, optional integrations and every backend."""

import subprocess
import sys

import torch


def test_environment_report():
    res = subprocess.run([sys.executable, "-m", "cusprun"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.strip()]
    versions = {line.split()[0]: line for line in rows if not line.startswith(" ")}
    backends = {line.split()[0]: line for line in rows if line.startswith("  ")}
    assert torch.__version__ in versions["torch"]
    assert all(name in versions for name in ("transformers", "matplotlib", "torch-pruning", "lm-eval", "gpu"))
    assert set(backends) == {"torch", "triton", "cuda"} and "unavailable" not in backends["torch"]
    if not torch.cuda.is_available():
        assert "unavailable:" in backends["cuda"] and versions["gpu"].split()[1] == "none"
