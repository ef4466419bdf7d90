"""GGUF export (cusprun.export, cusprun.formats.gguf): llama.cpp computes what the dense expert computes in
transformers, every pitfall of llama.cpp's ``deci`` graph is written around, and bad input is one line."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import cusprun  # noqa: F401  (registers the dense architectures)
from cusprun.export import main as export_main
from cusprun.formats.apply import apply
from cusprun.formats.folder import save_model_dir
from cusprun.selection.plan import Geometry, propagate
from tests.tiny import WORDS, random_ids, tiny_model

LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed (bash scripts/setup_env.sh)")
VOCAB = 300  # byte-level BPE needs its 256 byte tokens


def bpe_tokenizer():
    """A byte-level BPE tokenizer (the kind GGUF's gpt2 tokenizer holds), trained offline on the tiny word list."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([" ".join(WORDS)] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def key(layer, proj, side):
    return f"model.layers.{layer}.{proj}.{side}"


def pitfall_plan(geo: Geometry):
    """Layer 0 loses every head (attention-free layer 0), layer 1 every channel (attention without MLP), layer 2
    everything (dropped), the last layer every channel and all but one query head of its first group (uneven
    groups; the last layer without MLP)."""
    plan = geo.full_plan()
    plan[key(0, "self_attn.o_proj", "cols")][:] = False
    plan[key(1, "mlp.down_proj", "cols")][:] = False
    plan[key(2, "self_attn.o_proj", "cols")][:] = False
    plan[key(2, "mlp.down_proj", "cols")][:] = False
    last = geo.layers - 1
    plan[key(last, "self_attn.o_proj", "cols")].view(geo.kv, geo.rep, geo.hd)[0, 1:] = False
    plan[key(last, "mlp.down_proj", "cols")][:] = False
    return propagate(plan, geo)


def expert_dir(tmp_path, arch, plan_of=pitfall_plan, seed=0, window=None):
    """A dense expert folder (with a byte-level BPE tokenizer) of a tiny random model, and the expert itself."""
    model = tiny_model(arch, seed=seed, layers=4, vocab=VOCAB)
    if arch == "mistral":
        model.config.sliding_window = window
    expert = apply(model, plan_of(Geometry(model.config)), "dense")
    folder = tmp_path / f"{arch}-expert"
    save_model_dir(folder, expert, bpe_tokenizer(), {"model": str(tmp_path / "not-here")})
    return folder, expert


def llama_logits(path, ids, **kw):
    """llama.cpp's logits of every position, F32 KV cache (the default F16 cache alone moves them ~2e-3)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=max(64, len(ids)), n_threads=2,
                          verbose=False, type_k=0, type_v=0, **kw)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_arrays(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = lambda name: reader.fields[name].contents()
    return {"heads": field("deci.attention.head_count"), "kv": field("deci.attention.head_count_kv"),
            "ff": field("deci.feed_forward_length"), "types": {t.name: t.tensor_type.name for t in reader.tensors},
            "keys": set(reader.fields)}


def relative_error(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@needs_llama
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_f32_export_computes_what_the_dense_expert_computes(tmp_path, arch):
    folder, expert = expert_dir(tmp_path, arch, window=None)
    out = tmp_path / "expert.gguf"
    assert export_main([str(folder), "--out", str(out), "--quiet"]) == 0
    ids = random_ids(40, vocab=VOCAB, seed=1)
    assert relative_error(llama_logits(out, ids), hf_logits(expert, ids)) <= 1e-3
    arrays = gguf_arrays(out)
    # layer 2 (nothing left) is gone; layer 0 has one dummy head; layer 1 and the last layer a zero MLP of 32
    heads_per_group = {"llama": 3, "mistral": 2, "qwen2": 4}[arch]
    assert len(arrays["heads"]) == 3
    assert arrays["heads"][0] == arrays["kv"][0] == 1
    assert arrays["ff"][1] == arrays["ff"][2] == 32
    if arch != "qwen2":  # two groups kept, one query head against the other's full group: padded
        assert arrays["heads"][2] == 2 * heads_per_group and arrays["kv"][2] == 2
    else:
        assert arrays["heads"][2] == 1 and arrays["kv"][2] == 1
    if arch == "qwen2":
        assert {"blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= set(arrays["types"])


@needs_llama
def test_unpruned_model_and_mlp_padding_are_exact(tmp_path):
    """The unpruned model exports as well, and --pad-mlp's zero channels change nothing."""
    model = tiny_model("qwen2", seed=2, layers=2, vocab=VOCAB)
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    ids = random_ids(30, vocab=VOCAB, seed=3)
    ref = hf_logits(model, ids)
    for pad in (1, 32):
        out = tmp_path / f"pad{pad}.gguf"
        assert export_main([str(folder), "--out", str(out), "--pad-mlp", str(pad), "--quiet"]) == 0
        assert gguf_arrays(out)["ff"] == [14 if pad == 1 else 32] * 2
        assert relative_error(llama_logits(out, ids), ref) <= 1e-3


@needs_llama
def test_kv_head_without_queries_is_dropped(tmp_path):
    """A dense layer whose k/v head 1 no query head reads (kv map [0, 0, 0]): the GGUF keeps one k/v head."""
    from cusprun.formats.modeling_cusprun import DENSE

    model = tiny_model("llama", seed=4, layers=2, vocab=VOCAB)
    config_cls, model_cls = DENSE["llama"]
    base = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = config_cls(**base, per_layer_config={0: {"num_attention_heads": 3, "num_key_value_heads": 2,
                                              "cusprun_kv_map": [0, 0, 0]}},
                        cusprun_source_layers=[0, 1])
    torch.manual_seed(5)
    expert = model_cls(config).eval()
    with torch.no_grad():
        for p in expert.parameters():
            p.normal_(0, 0.3)
    folder = tmp_path / "expert"
    save_model_dir(folder, expert, bpe_tokenizer(), {})
    out = tmp_path / "e.gguf"
    assert export_main([str(folder), "--out", str(out), "--quiet"]) == 0
    arrays = gguf_arrays(out)
    assert arrays["heads"][0] == 3 and arrays["kv"][0] == 1
    ids = random_ids(20, vocab=VOCAB, seed=6)
    assert relative_error(llama_logits(out, ids), hf_logits(expert, ids)) <= 1e-3


@needs_llama
def test_bf16_and_f16_exports_stay_close(tmp_path):
    folder, expert = expert_dir(tmp_path, "llama")
    ids = random_ids(20, vocab=VOCAB, seed=7)
    ref = hf_logits(expert, ids)
    for dtype, bound in (("f16", 5e-3), ("bf16", 3e-2)):
        out = tmp_path / f"{dtype}.gguf"
        assert export_main([str(folder), "--out", str(out), "--dtype", dtype, "--quiet"]) == 0
        assert gguf_arrays(out)["types"]["blk.1.ffn_gate.weight"] == dtype.upper()
        assert gguf_arrays(out)["types"]["blk.1.attn_norm.weight"] == "F32"
        assert 0 < relative_error(llama_logits(out, ids), ref) <= bound


@needs_llama
def test_quantized_export_uses_llama_cpp_types_and_padding_lets_down_quantize(tmp_path):
    folder, expert = expert_dir(tmp_path, "llama")
    plain, padded = tmp_path / "q8.gguf", tmp_path / "q8pad.gguf"
    assert export_main([str(folder), "--out", str(plain), "--quantize", "q8_0", "--quiet"]) == 0
    assert export_main([str(folder), "--out", str(padded), "--quantize", "q8_0", "--pad-mlp", "32", "--quiet"]) == 0
    # layer 0 keeps 20 channels: its down projection (input width 20) falls back to F16 unless padded to 32
    assert gguf_arrays(plain)["types"]["blk.0.ffn_down.weight"] == "F16"
    assert gguf_arrays(padded)["types"]["blk.0.ffn_down.weight"] == "Q8_0"
    assert gguf_arrays(padded)["types"]["blk.0.ffn_gate.weight"] == "F16"  # hidden size 24 < 32
    ids = random_ids(20, vocab=VOCAB, seed=8)
    got, ref = llama_logits(padded, ids), hf_logits(expert, ids)
    assert 0 < relative_error(got, ref) < 0.1
    assert not list(tmp_path.glob(".*"))  # the intermediate F32 file is gone


@needs_llama
def test_hf_tokenizer_is_written_for_llama_cpp(tmp_path):
    import llama_cpp

    folder, _ = expert_dir(tmp_path, "llama")
    out = tmp_path / "e.gguf"
    assert export_main([str(folder), "--out", str(out), "--quiet"]) == 0
    text = "the expert model prunes a layer of the language"
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, vocab_only=True)
    try:
        assert llm.tokenize(text.encode(), add_bos=False) == bpe_tokenizer().encode(text)
        assert llm.token_eos() == bpe_tokenizer().eos_token_id
    finally:
        llm.close()


def test_sliding_window_shorter_than_the_context_is_refused(tmp_path, capsys):
    folder, _ = expert_dir(tmp_path, "mistral", window=5)
    out = tmp_path / "e.gguf"
    from cusprun.core.errors import run_cli

    assert run_cli(export_main, [str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sliding window 5" in err and "transformers" in err
    assert not out.exists() and not list(tmp_path.glob(".e.gguf*"))


def rope_pairs_plan(geo: Geometry):
    plan = geo.full_plan()
    k_rows = plan[key(1, "self_attn.k_proj", "rows")].view(geo.kv, geo.hd)
    k_rows[0, [0, geo.hd // 2]] = False  # one RoPE pair of k/v head 0
    return propagate(plan, geo)


def test_rope_pairs_are_refused(tmp_path, capsys):
    from cusprun.core.errors import run_cli

    folder, expert = expert_dir(tmp_path, "llama", plan_of=rope_pairs_plan)
    assert expert.config.per_layer_config[1].cusprun_rope_pairs is not None
    out = tmp_path / "e.gguf"
    assert run_cli(export_main, [str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RoPE pairs" in err and "transformers" in err
    assert not out.exists()


@pytest.fixture
def tiny_expert(tmp_path):
    return expert_dir(tmp_path, "llama")[0]


@pytest.mark.parametrize("case", ["not-a-model", "gpt2", "unknown-quant", "out-exists", "no-tokenizer",
                                  "no-quantizer", "sliced"])
def test_bad_input_is_one_line_exit_2_and_no_file(tmp_path, tiny_expert, case, capsys, monkeypatch):
    from cusprun.core.errors import run_cli

    out = tmp_path / "out.gguf"
    args = [str(tiny_expert), "--out", str(out)]
    expected = {"not-a-model": "without config.json", "gpt2": "unsupported architecture",
                "unknown-quant": "unknown type", "out-exists": "exists", "no-tokenizer": "no tokenizer.json",
                "no-quantizer": "bash scripts/setup_env.sh", "sliced": "--format dense"}[case]
    if case == "not-a-model":
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
    elif case == "gpt2":
        from transformers import GPT2Config

        GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
        args[0] = str(tmp_path / "gpt2")
    elif case == "unknown-quant":
        args += ["--quantize", "q9_9"]
    elif case == "out-exists":
        out.write_text("keep me")
    elif case == "no-tokenizer":
        (tiny_expert / "tokenizer.json").unlink()
    elif case == "no-quantizer":
        monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # import fails as if not installed
        args += ["--quantize", "q8_0"]
    elif case == "sliced":
        model = tiny_model("llama", layers=4, vocab=VOCAB)
        save_model_dir(tmp_path / "sliced", apply(model, pitfall_plan(Geometry(model.config)), "sliced"),
                       bpe_tokenizer(), {})
        args[0] = str(tmp_path / "sliced")
    capsys.readouterr()  # the setup's progress bars
    assert run_cli(export_main, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert (out.read_text() == "keep me") if case == "out-exists" else not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.gguf")]


def test_source_gguf_is_found_from_pruning_json(tmp_path):
    """An expert of the default model takes its tokenizer keys from the source GGUF named in pruning.json."""
    from cusprun.core.models import ModelSource
    from cusprun.formats.gguf import tokenizer_source

    folder = tmp_path / "expert"
    folder.mkdir()
    (folder / "pruning.json").write_text(json.dumps({"model": "smollm2-135m"}))
    kind, where = tokenizer_source(ModelSource(str(folder), str(folder)), folder)
    assert kind == "gguf" and Path(where).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@needs_llama
def test_prune_format_gguf_writes_the_dense_expert(tmp_path):
    """prune --format gguf == prune --format dense then export: same logits as the dense expert, report inside."""
    import gguf
    from transformers import AutoModelForCausalLM

    from cusprun.prune import main as prune_main
    from cusprun.score import main as score_main
    from tests.conftest import write_ids_corpus

    model = tiny_model("llama", seed=8, layers=3, vocab=VOCAB)
    model.save_pretrained(tmp_path / "model")
    bpe_tokenizer().save_pretrained(tmp_path / "model")
    write_ids_corpus(tmp_path / "a.jsonl", [9, 12, 7], seed=2)
    assert score_main(["--model", str(tmp_path / "model"), "--corpus", f"a={tmp_path / 'a.jsonl'}",
                       "--out", str(tmp_path / "scores"), "--quiet"]) == 0
    common = ["--model", str(tmp_path / "model"), "--scores", str(tmp_path / "scores/a.safetensors"),
              "--ratio", "0.3", "--neurons", "all", "--quiet"]
    assert prune_main([*common, "--out", str(tmp_path / "dense")]) == 0
    assert prune_main([*common, "--format", "gguf", "--out", str(tmp_path / "direct.gguf")]) == 0
    expert = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    ids = random_ids(25, vocab=VOCAB, seed=9)
    direct = llama_logits(tmp_path / "direct.gguf", ids)
    assert relative_error(direct, hf_logits(expert, ids)) <= 1e-3
    report = json.loads(gguf.GGUFReader(str(tmp_path / "direct.gguf")).fields["cusprun.pruning"].contents())
    assert report == {**json.loads((tmp_path / "dense/pruning.json").read_text()), "format": "gguf"}


@pytest.fixture(scope="module")
def smollm2_expert(tmp_path_factory):
    """The 25% German expert of the default model, built as the main job builds it (local scores with statistics,
    the default selection, the down_proj refit; here from 8 documents of 128 tokens), exported in F32 and Q8_0,
    and 12 held-out German documents' perplexities in transformers (cusprun.eval's computation)."""
    from cusprun.core.models import load_model
    from cusprun.evaluation.evaluate import perplexity, read_texts, tokenize_texts
    from cusprun.prune import main as prune_main
    from cusprun.score import main as score_main

    tmp_path = tmp_path_factory.mktemp("smollm2-gguf")
    root = Path(__file__).resolve().parents[1] / "data"
    corpus = tmp_path / "de.jsonl"
    corpus.write_text("".join((root / "corpora/de.jsonl").read_text().splitlines(keepends=True)[:8]))
    assert score_main(["--corpus", f"de={corpus}", "--out", str(tmp_path / "scores"), "--measure", "local",
                       "--max-tokens", "128", "--stats", "--quiet"]) == 0
    assert prune_main(["--scores", str(tmp_path / "scores/de.safetensors"), "--ratio", "0.25",
                       "--out", str(tmp_path / "expert"), "--quiet"]) == 0
    files = {"f32": tmp_path / "expert.f32.gguf", "q8_0": tmp_path / "expert.q8_0.gguf"}
    assert export_main([str(tmp_path / "expert"), "--out", str(files["f32"]), "--quiet"]) == 0
    assert export_main([str(tmp_path / "expert"), "--out", str(files["q8_0"]), "--quantize", "q8_0", "--quiet"]) == 0
    model, tokenizer, _ = load_model(str(tmp_path / "expert"), quiet=True, allow_pruned=True)
    text = str(root / "heldout/de.jsonl")
    documents = tokenize_texts(read_texts([text]), tokenizer, 256, model.config.vocab_size)[text][:12]
    return files, documents, [perplexity(model, [ids])[0] for ids in documents]


@needs_llama
def test_smollm2_expert_f32_perplexity_in_llama_cpp_equals_cusprun_eval(smollm2_expert):
    """Per document, on the same token ids: within 0.5% (measured: 1e-5); the tokenizer keys (vocabulary,
    merges, special tokens, chat template) are the source GGUF's."""
    import gguf

    from cusprun.core.models import resolve_model
    from cusprun.evaluation import llama_cpp as engine

    files, documents, reference = smollm2_expert
    got = engine.perplexities(files["f32"], documents)
    assert all(abs(g / r - 1) <= 0.005 for g, r in zip(got, reference)), (got, reference)
    source = resolve_model("smollm2-135m")
    original = gguf.GGUFReader(str(Path(source.path) / source.gguf_file))
    written = gguf.GGUFReader(str(files["f32"]))
    keys = [k for k in original.fields if k.startswith("tokenizer.")]
    assert "tokenizer.chat_template" in keys and "tokenizer.ggml.merges" in keys
    assert all(written.fields[k].contents() == original.fields[k].contents() for k in keys)


def pooled(perplexities: list[float], documents: list[list[int]]) -> float:
    """Token-weighted perplexity over documents, from each document's own."""
    weights = [len(d) - 1 for d in documents]
    return math.exp(sum(w * math.log(p) for w, p in zip(weights, perplexities)) / sum(weights))


@needs_llama
def test_smollm2_expert_q8_0_perplexity_in_llama_cpp_within_2_percent_over_the_documents(smollm2_expert):
    """Token-weighted over the 12 documents (measured: +1.6%; the unpruned model's own Q8_0 file: +1.3%)."""
    from cusprun.evaluation import llama_cpp as engine

    files, documents, reference = smollm2_expert
    got = engine.perplexities(files["q8_0"], documents)
    assert abs(pooled(got, documents) / pooled(reference, documents) - 1) <= 0.02, (got, reference)


@needs_llama
@pytest.mark.xfail(strict=True, reason="measured up to +4.3% on single 256-token documents of this expert, and up to "
                   "+4.4% for the unpruned model's own Q8_0 file (llama.cpp's Q8_0 also rounds the activations "
                   "entering each matrix product to 8 bits); the target is 2% per document (docs/deploy.md)")
def test_smollm2_expert_q8_0_perplexity_in_llama_cpp_within_2_percent_per_document(smollm2_expert):
    from cusprun.evaluation import llama_cpp as engine

    files, documents, reference = smollm2_expert
    got = engine.perplexities(files["q8_0"], documents)
    assert all(abs(g / r - 1) <= 0.02 for g, r in zip(got, reference)), (got, reference)


@needs_llama
def test_main_job_writes_each_expert_as_gguf_and_measures_it_in_llama_cpp(tmp_path):
    import subprocess
    import sys

    from tests.conftest import write_ids_corpus

    model_dir, data = tmp_path / "model", tmp_path / "data"
    tiny_model("llama", seed=3, layers=2, vocab=VOCAB).save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    (data / "corpora").mkdir(parents=True)
    (data / "heldout").mkdir()
    write_ids_corpus(data / "corpora" / "a.jsonl", [9, 14, 5], seed=1)
    write_ids_corpus(data / "heldout" / "a.jsonl", [12, 7], seed=2)
    res = subprocess.run([sys.executable, "-m", "cusprun.pipeline", "--model", str(model_dir), "--data", str(data),
                          "--expert", "a", "--eval", "a", "--docs", "3", "--out", str(tmp_path / "run"), "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    gguf_file = tmp_path / "run/experts/a.f16.gguf"
    assert gguf_file.is_file() and f"a: llama-cli -m {gguf_file}" in res.stdout
    expert = json.loads((tmp_path / "run/summary.json").read_text())["results"][1]
    text = str(data / "heldout/a.jsonl")
    # F16 weights: llama.cpp's perplexity is transformers' to ~1e-3
    assert expert["llama_cpp"]["perplexity"][text] == pytest.approx(expert["files"][text]["perplexity"], rel=1e-2)


@needs_llama
def test_blocks_kept_for_their_output_bias_alone_are_exact(tmp_path):
    """Llama with attention and MLP biases: a block that loses every unit stays for its o / down bias (dense
    format), written as one zero head or a zero MLP that carries the bias."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import TINY

    config = LlamaConfig(num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.3,
                         rope_theta=50.0, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                         **TINY["llama"][2])
    torch.manual_seed(11)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    expert = apply(model, pitfall_plan(Geometry(config)), "dense")
    folder = tmp_path / "expert"
    save_model_dir(folder, expert, bpe_tokenizer(), {})
    out = tmp_path / "e.gguf"
    assert export_main([str(folder), "--out", str(out), "--quiet"]) == 0
    arrays = gguf_arrays(out)
    assert len(arrays["heads"]) == 4  # no layer is empty: every block keeps its bias
    assert arrays["heads"][2] == 1 and arrays["ff"][2] == 32 and "blk.2.attn_output.bias" in arrays["types"]
    ids = random_ids(30, vocab=VOCAB, seed=12)
    assert relative_error(llama_logits(out, ids), hf_logits(expert, ids)) <= 1e-3
