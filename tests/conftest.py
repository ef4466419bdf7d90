import json
import os

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
