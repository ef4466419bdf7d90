import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.tiny import random_ids, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face directory (safetensors, no tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=3).save_pretrained(path)
    return path


def write_ids_corpus(path, lengths, seed=0):
    with open(path, "w") as fh:
        for i, n in enumerate(lengths):
            fh.write(json.dumps({"input_ids": random_ids(n, seed=seed + i)}) + "\n")
    return path


ROOT = Path(__file__).resolve().parents[1]


def run_module(module, *args, cwd=None):
    """``python -m cusprun.MODULE ARGS`` in a child process that imports this checkout's package, as a user runs
    a command: the completed process, output captured."""
    return subprocess.run([sys.executable, "-m", f"cusprun.{module}", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})
