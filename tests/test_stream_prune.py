"""prune --stream (cusprun.experts.stream): one decoder layer read, refit and written at a time, saving the
same tensors byte for byte as the in-memory prune; formats and sources it cannot stream, disk space."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import cusprun  # noqa: F401  (registers the pruned architectures)
from cusprun.core.errors import CusprunError, run_cli
from tests.conftest import run_module as cli
from tests.conftest import write_ids_corpus
from tests.tiny import gguf_source_model, random_ids, tiny_model, write_source_gguf


def saved_tensors(folder: Path) -> dict[str, tuple[str, tuple, bytes]]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name)
                out[name] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Tiny models saved as safetensors (llama untied, qwen2 with tied embeddings and biases) and as GGUF files,
    scored on two corpora with the local measure."""
    root = tmp_path_factory.mktemp("stream")
    write_ids_corpus(root / "a.jsonl", [16, 19, 14, 20], seed=1)
    write_ids_corpus(root / "b.jsonl", [17, 15, 22], seed=9)
    for arch in ("llama", "qwen2"):
        model = tiny_model(arch, seed=6, layers=3)
        if arch == "qwen2":
            model.config.tie_word_embeddings = True
            model.lm_head.weight = model.model.embed_tokens.weight
        model.save_pretrained(root / arch)
    for arch in ("llama", "qwen2"):  # GGUF sources as llama.cpp's converter writes them
        write_source_gguf(gguf_source_model(arch, seed=6, layers=3), root / f"{arch}.gguf", half=True)
    for arch in ("llama", "qwen2", "llama.gguf", "qwen2.gguf"):
        res = cli("score", "--model", root / arch, "--corpus", f"a={root / 'a.jsonl'}", "--corpus",
                  f"b={root / 'b.jsonl'}", "--out", root / f"scores-{arch}", "--measure", "local", "--quiet")
        assert res.returncode == 0, res.stderr
    return root


def prune_args(scored, arch, out, *flags):
    return [str(a) for a in ("--model", scored / arch, "--scores", scored / f"scores-{arch}/a.safetensors",
                             "--scores", scored / f"scores-{arch}/b.safetensors", "--ratio", "0.2", "--out", out,
                             "--quiet", *flags)]


@pytest.mark.parametrize("arch,flags", [
    ("llama", []),  # the default expert: MLP channels, sequential refit
    ("llama", ["--refit", "independent"]),
    ("llama", ["--refit", "sequential", "--neurons", "all"]),  # o_proj refit too, block by block
    ("qwen2", ["--dtype", "bfloat16"]),  # tied embeddings, biases, a saved dtype other than the file's
    ("qwen2", ["--no-compensate", "--neurons", "all", "--granularity", "neuron"]),
    ("llama.gguf", []),  # read from the GGUF file tensor by tensor: q/k rows un-permuted, F16 widened
    ("qwen2.gguf", ["--dtype", "bfloat16", "--neurons", "all"]),
])
def test_streamed_prune_saves_the_in_memory_prunes_tensors(scored, tmp_path, arch, flags):
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    res = cli("prune", *prune_args(scored, arch, memory, *flags))
    assert res.returncode == 0, res.stderr
    res = cli("prune", *prune_args(scored, arch, streamed, "--stream", *flags))
    assert res.returncode == 0, res.stderr
    assert "streamed       one decoder layer at a time" in res.stdout
    want, got = saved_tensors(memory), saved_tensors(streamed)
    assert sorted(got) == sorted(want)
    assert all(got[name] == want[name] for name in want)
    configs = [json.loads((f / "config.json").read_text()) for f in (memory, streamed)]
    assert configs[0] == configs[1]
    reports = [json.loads((f / "pruning.json").read_text()) for f in (memory, streamed)]
    assert reports[1].pop("streamed") is True and reports[0] == reports[1]
    # the streamed expert loads (one shard per kept layer) and computes what the in-memory one computes
    ids = torch.tensor([random_ids(11, seed=4)])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(f).eval()(ids).logits for f in (memory, streamed)]
    assert torch.equal(logits[0], logits[1])


def test_streamed_prune_holds_one_layer_at_a_time_and_is_atomic(scored, tmp_path, monkeypatch):
    """At most one decoder layer is materialized at any time; a failure after some layers were written leaves
    neither the output nor a staging folder."""
    from cusprun.engine.sources import StreamedLayers
    from cusprun.experts import stream
    from cusprun.prune import main

    live, peak = set(), []
    layer, release = StreamedLayers.layer, StreamedLayers.release

    def tracked_layer(self, index):
        live.add(index)
        peak.append(len(live))
        return layer(self, index)

    def tracked_release(self, index):
        live.discard(index)
        return release(self, index)

    monkeypatch.setattr(StreamedLayers, "layer", tracked_layer)
    monkeypatch.setattr(StreamedLayers, "release", tracked_release)
    monkeypatch.setattr("cusprun.prune.load_weights", lambda *a, **k: pytest.fail("the model was loaded whole"))
    assert run_cli(main, prune_args(scored, "llama", tmp_path / "ok", "--stream")) == 0
    assert max(peak) == 1 and len(peak) == 3
    written = []
    dense_layer = stream.dense_layer

    def failing(zeroed, plan, geo, layer, dst):
        if layer == 2:
            raise RuntimeError("disk gone")
        written.append(layer)
        return dense_layer(zeroed, plan, geo, layer, dst)

    monkeypatch.setattr(stream, "dense_layer", failing)
    with pytest.raises(RuntimeError):
        main(prune_args(scored, "llama", tmp_path / "failed", "--stream"))
    assert written == [0, 1] and not (tmp_path / "failed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_prune_streams_by_itself_when_the_model_exceeds_the_memory_budget(scored, tmp_path):
    res = cli("prune", *prune_args(scored, "llama", tmp_path / "e", "--max-memory", "1KB"))
    assert res.returncode == 0, res.stderr
    assert "streamed       one decoder layer at a time" in res.stdout
    assert json.loads((tmp_path / "e" / "pruning.json").read_text())["streamed"] is True


def test_a_gguf_source_streams_by_itself_counted_at_its_dequantized_size(scored, tmp_path):
    """The F16 file is smaller than the float32 model it loads as; the budget between the two still streams."""
    from cusprun.core.models import resolve_model
    from cusprun.engine.sources import loaded_bytes

    source = resolve_model(str(scored / "llama.gguf"))
    file_size, loaded = (scored / "llama.gguf").stat().st_size, loaded_bytes(source, torch.float32)
    assert loaded > file_size
    budget = str((file_size + loaded) // 2)
    res = cli("prune", *prune_args(scored, "llama.gguf", tmp_path / "e", "--max-memory", budget))
    assert res.returncode == 0, res.stderr
    assert "streamed       one decoder layer at a time" in res.stdout


def test_what_cannot_be_streamed_and_a_full_disk_are_one_line(scored, tmp_path, monkeypatch):
    cases = {
        "sliced": (prune_args(scored, "llama", tmp_path / "e", "--stream", "--format", "sliced"),
                   "error: --format sliced cannot be streamed (it builds the whole model in memory): stream "
                   "--format dense"),
        "auto": (prune_args(scored, "llama", tmp_path / "e", "--max-memory", "1KB", "--format", "masked"),
                 "error: --format masked cannot be streamed (it builds the whole model in memory): stream "
                 "--format dense"),
    }
    for name, (args, line) in cases.items():
        res = cli("prune", *args)
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [line], (name, res.stderr)
    from cusprun.prune import main

    monkeypatch.setattr("shutil.disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    monkeypatch.setattr("cusprun.prune.load_weights", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(CusprunError, match=r"^not enough disk for the expert: \d+\.\d kB needed, 1\.0 kB free"):
        main(prune_args(scored, "llama", tmp_path / "e"))
    assert not (tmp_path / "e").exists()
