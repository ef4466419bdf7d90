"""Damaged model files and missing evaluation texts: one line, exit 2, before anything expensive."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import write_ids_corpus


def run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True)


def one_line_exit_2(res, expect):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in res.stderr, res.stderr


@pytest.mark.parametrize("damage", ["garbage", "truncated_header", "truncated_data"])
def test_damaged_gguf_is_one_line(damage, tmp_path):
    gguf = tmp_path / "model.gguf"
    if damage == "garbage":
        gguf.write_bytes(b"not a gguf file at all" * 10)
    elif damage == "truncated_header":  # the magic and version, then the header stops mid-field
        gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\x05\x00")
    else:
        from gguf import GGUFWriter

        writer = GGUFWriter(str(gguf), "llama")
        writer.add_block_count(2)
        writer.add_context_length(64)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        gguf.write_bytes(gguf.read_bytes()[:-7])
    corpus = write_ids_corpus(tmp_path / "c.jsonl", [4])
    one_line_exit_2(run("cusprun.score", "--model", gguf, "--corpus", f"c={corpus}", "--out", tmp_path / "o",
                        "--quiet"), "model.gguf")


@pytest.mark.parametrize("damage, message", [
    ("weights", "cannot load model"),
    ("config", "cannot read the model config"),
    ("shapes", "the weights' shapes do not match its config.json"),
    ("heads", "is not a multiple of the number of attention heads"),
])
def test_damaged_model_folder_is_one_line(damage, message, tiny_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    if damage == "weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "config":
        (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    else:  # an MLP twice as wide as the weights, or a hidden size the heads do not divide
        config = json.loads((folder / "config.json").read_text())
        if damage == "shapes":
            config["intermediate_size"] *= 2
        else:
            config["hidden_size"] += 1
        (folder / "config.json").write_text(json.dumps(config))
    corpus = write_ids_corpus(tmp_path / "c.jsonl", [4])
    res = run("cusprun.score", "--model", folder, "--corpus", f"c={corpus}", "--out", tmp_path / "o", "--quiet")
    one_line_exit_2(res, message)


def test_eval_checks_texts_before_loading_the_model(tmp_path):
    # the model does not exist either: the missing text must be reported first, so no model was touched
    res = run("cusprun.eval", "--model", tmp_path / "no-such-model", "--text", tmp_path / "missing.jsonl", "--quiet")
    one_line_exit_2(res, "missing.jsonl")


def test_eval_rejects_a_bad_device_before_loading(tmp_path):
    text = write_ids_corpus(tmp_path / "t.jsonl", [4])
    res = run("cusprun.eval", "--model", tmp_path / "no-such-model", "--text", text, "--device", "tpu", "--quiet")
    one_line_exit_2(res, "--device")
