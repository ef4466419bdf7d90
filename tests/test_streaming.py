"""Layer streaming, resume after kill -9, and several processes (torchrun, gloo) — all bit-identical."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cusprun.core.errors import CusprunError
from cusprun.core.models import load_weights, open_model
from cusprun.engine.layer_major import Scorer
from cusprun.engine.sources import SafetensorsFiles, StreamedLayers, open_tensors
from cusprun.formats.gguf_tensors import GGUFTensors
from cusprun.scores.scorefile import load_scores
from cusprun.scores.scoreset import ScoreSet
from tests.conftest import write_ids_corpus
from tests.tiny import gguf_source_model, random_ids, tiny_model, write_source_gguf


def score_cli(*args, env=None, launcher=(sys.executable, "-m")):
    return subprocess.run([*launcher, "cusprun.score", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    model = tiny_model("qwen2", seed=11, layers=4)
    model.save_pretrained(root / "model", max_shard_size="20KB")  # several shards + index
    write_ids_corpus(root / "c.jsonl", [9, 1, 14, 6, 11], seed=5)
    return root


@pytest.mark.parametrize("measure", ["block", "local"])
def test_streamed_equals_in_memory_bit_for_bit(saved, measure):
    model = AutoModelForCausalLM.from_pretrained(saved / "model").eval()
    docs = [random_ids(n, seed=n) for n in (7, 1, 12)]
    in_memory = Scorer(model, measure).score_documents(docs)
    layers = StreamedLayers(SafetensorsFiles(saved / "model"), AutoConfig.from_pretrained(saved / "model"),
                            torch.float32, "cpu")
    streamed = Scorer(measure=measure, layers=layers).score_documents(docs)
    assert in_memory.keys() == streamed.keys()
    assert all(torch.equal(in_memory[k], streamed[k]) for k in in_memory)


def test_stream_flag_writes_identical_score_file(saved, tmp_path):
    a = score_cli("--model", saved / "model", "--corpus", f"c={saved / 'c.jsonl'}", "--out", tmp_path / "a", "--quiet")
    b = score_cli("--model", saved / "model", "--corpus", f"c={saved / 'c.jsonl'}", "--out", tmp_path / "b", "--quiet",
                  "--stream")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "streamed" in b.stdout
    assert (tmp_path / "a/c.safetensors").read_bytes() == (tmp_path / "b/c.safetensors").read_bytes()
    assert not (tmp_path / "b/.cusprun-checkpoint/c").exists()  # removed once the file is written


@pytest.fixture(scope="module")
def gguf_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    for arch in ("llama", "qwen2"):
        write_source_gguf(gguf_source_model(arch, seed=5, layers=3), root / f"{arch}.gguf", half=True)
    write_ids_corpus(root / "c.jsonl", [9, 1, 14, 6], seed=3)
    return root


@pytest.mark.parametrize("spec,dtype", [("llama", "float32"), ("llama", "bfloat16"), ("qwen2", "float32"),
                                        ("smollm2-135m", "float32")])
def test_gguf_tensors_are_the_ones_transformers_loads(gguf_sources, spec, dtype):
    """Read one at a time from the file, every tensor is bit for bit what transformers' whole-file loader gives:
    F16 matrices widened, llama's permuted query and key rows put back, SmolLM2's Q4_1 and Q8_0 blocks."""
    config, _, source = open_model(spec if spec == "smollm2-135m" else str(gguf_sources / f"{spec}.gguf"), quiet=True,
                                   need_tokenizer=False)
    want = load_weights(source, dtype, quiet=True).state_dict()
    tensors = open_tensors(source, config)
    assert isinstance(tensors, GGUFTensors)
    assert tensors.names == set(want) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    got = tensors.read(sorted(tensors.names), getattr(torch, dtype))
    assert all(torch.equal(got[name], want[name]) for name in tensors.names)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_gguf_equals_in_memory_bit_for_bit(gguf_sources, arch):
    config, _, source = open_model(str(gguf_sources / f"{arch}.gguf"), quiet=True, need_tokenizer=False)
    docs = [random_ids(n, seed=n) for n in (7, 1, 12)]
    in_memory = Scorer(load_weights(source, quiet=True), "block").score_documents(docs)
    layers = StreamedLayers(open_tensors(source, config), config, torch.float32, "cpu")
    streamed = Scorer(measure="block", layers=layers).score_documents(docs)
    assert in_memory.keys() == streamed.keys()
    assert all(torch.equal(in_memory[k], streamed[k]) for k in in_memory)


def test_stream_flag_on_the_default_gguf_model_writes_the_identical_score_file(gguf_sources, tmp_path):
    common = ("--model", "smollm2-135m", "--corpus", f"c={gguf_sources / 'c.jsonl'}", "--measure", "local", "--quiet")
    a = score_cli(*common, "--out", tmp_path / "a")
    b = score_cli(*common, "--out", tmp_path / "b", "--stream")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "streamed" in b.stdout and "streamed" not in a.stdout
    assert (tmp_path / "a/c.safetensors").read_bytes() == (tmp_path / "b/c.safetensors").read_bytes()


def test_a_gguf_file_of_another_architecture_is_refused_in_one_line(tmp_path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CusprunError, match=r"^--stream reads GGUF files of the llama and qwen2 architectures; "
                                           r"m\.gguf is gemma$"):
        GGUFTensors(tmp_path / "m.gguf", config=None)


def test_resume_after_kill_9_is_bit_identical(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama", seed=12, layers=8).save_pretrained(model_dir)
    write_ids_corpus(tmp_path / "c.jsonl", [60] * 12, seed=2)
    # with --stats: the Gram matrices of the finished layers come back from the checkpoint
    args = ["--model", model_dir, "--corpus", f"c={tmp_path / 'c.jsonl'}", "--quiet", "--stats"]
    reference = score_cli(*args, "--out", tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "out"
    checkpoint = out / ".cusprun-checkpoint" / "c"
    proc = subprocess.Popen([sys.executable, "-m", "cusprun.score", *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (checkpoint / "layer-1.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "c.safetensors").exists(), "the run finished before it could be killed"
    finished = sorted(p.name for p in checkpoint.glob("layer-*.safetensors"))
    assert finished and len(finished) < 8
    resumed = score_cli(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "c.safetensors").read_bytes() == (tmp_path / "ref/c.safetensors").read_bytes()
    assert (out / "c.stats.safetensors").read_bytes() == (tmp_path / "ref/c.stats.safetensors").read_bytes()


def test_checkpoint_from_other_inputs_is_refused(saved, tmp_path):
    stale = tmp_path / "out/.cusprun-checkpoint/c"
    stale.mkdir(parents=True)
    (stale / "fingerprint.json").write_text('{"fingerprint": "from another run"}')
    res = score_cli("--model", saved / "model", "--corpus", f"c={saved / 'c.jsonl'}", "--out", tmp_path / "out",
                    "--quiet")
    assert res.returncode == 2 and "made from different inputs" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m")


def test_two_ranks_equal_one_process(saved, tmp_path):
    args = ["--model", saved / "model", "--corpus", f"c={saved / 'c.jsonl'}", "--quiet", "--stats"]
    # CPU reductions round differently with different thread counts; torchrun gives each rank one thread
    one = score_cli(*args, "--out", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    two = score_cli(*args, "--out", tmp_path / "two", launcher=TORCHRUN, env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert (tmp_path / "one/c.safetensors").read_bytes() == (tmp_path / "two/c.safetensors").read_bytes()
    tensors, meta = load_scores(tmp_path / "two/c.safetensors")
    assert meta["n_docs"] == "5" and all(t.shape[0] == 5 for t in tensors.values())
    # the ranks' Gram sums add up to the single process's (float64 partial sums, so equal to rounding)
    one_stats = ScoreSet.load(tmp_path / "one/c.safetensors", stats=True).stats
    two_stats = ScoreSet.load(tmp_path / "two/c.safetensors", stats=True).stats
    assert one_stats.keys() == two_stats.keys() and len(one_stats) == 2 * 4
    assert all(torch.allclose(one_stats[n], two_stats[n], rtol=1e-6, atol=1e-6) for n in one_stats)


def test_a_failing_rank_fails_the_run_and_writes_nothing(saved, tmp_path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import cusprun.engine.layer_major as e\n"
        "    def fail(self, index, *a, **k):\n"
        "        raise RuntimeError(f'injected failure at layer {index}')\n"
        "    e.Scorer._run_layer = fail\n")
    env = {"PYTHONPATH": os.pathsep.join([str(inject), str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    res = score_cli("--model", saved / "model", "--corpus", f"c={saved / 'c.jsonl'}", "--out", tmp_path / "out",
                    "--quiet", launcher=TORCHRUN, env=env)
    assert res.returncode != 0
    assert "rank 1: RuntimeError: injected failure at layer 0" in res.stderr
    assert not (tmp_path / "out/c.safetensors").exists()
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_hidden_states_spill_to_disk_without_changing_scores(saved):
    model = AutoModelForCausalLM.from_pretrained(saved / "model").eval()
    docs = [random_ids(n, seed=n) for n in (5, 9)]
    plain = Scorer(model, "block").score_documents(docs)
    spilled = Scorer(model, "block").score_documents(docs, device_budget=0, host_budget=0)
    assert all(torch.equal(plain[k], spilled[k]) for k in plain)
