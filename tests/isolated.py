"""A fresh virtual environment without cusprun, for what must work where cusprun is not installed.

Installing torch and transformers into a new venv would download gigabytes, so the new venv sees the
test environment's third-party packages through a folder of symbolic links that leaves out cusprun
(and its editable-install hooks). Scripts run there with the working directory outside the checkout.
"""

from __future__ import annotations

import os
import site
import subprocess
import venv
from pathlib import Path

EXCLUDED = ("cusprun", "__editable__", "_cusprun", "__pycache__")


def fresh_venv(root: Path) -> Path:
    """Create ``root/venv`` and return its python."""
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    deps = root / "deps"
    deps.mkdir()
    for packages in site.getsitepackages():
        for entry in Path(packages).iterdir():
            if entry.name.startswith(EXCLUDED) or entry.suffix == ".pth" or (deps / entry.name).exists():
                continue
            (deps / entry.name).symlink_to(entry)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "deps.pth").write_text(f"{deps}\n")
    return python


def run_isolated(python: Path, script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` with the fresh venv's python; it must not be able to import cusprun."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"))
    guard = "import importlib.util, sys\nassert importlib.util.find_spec('cusprun') is None, 'cusprun is importable'\n"
    return subprocess.run([str(python), "-c", guard + script, *args], cwd=cwd, env=env, capture_output=True,
                          text=True)



