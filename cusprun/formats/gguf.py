"""The ``gguf`` format: a dense expert (or an unpruned model) as a llama.cpp GGUF of architecture ``deci``.

llama.cpp's ``deci`` architecture (NVIDIA's Nemotron-51B) reads the query-head count, k/v-head count and
feed-forward width of every layer from per-layer arrays, so it holds the dense format's shapes; plain ``llama``
and ``qwen2`` GGUFs take layer 0's shapes for every layer. Its graph (``src/models/deci.cpp``) has pitfalls,
each written around here so that llama.cpp computes exactly what the dense expert computes:

* a layer with heads but feed-forward width 0 ``continue``\\ s before its attention output joins the residual,
  and the last layer must have an MLP (its row selection sits after the MLP): such a layer gets a small
  all-zero MLP (down = 0 adds nothing);
* the head size is read only when layer 0 has heads: an attention-free layer 0 gets one all-zero head
  (o = 0 adds nothing);
* a layer's query-head count must be a multiple of its k/v-head count, the groups contiguous as in
  transformers' ``repeat_kv``: uneven groups are padded to the largest one with zero q rows and zero o
  columns (a padded head attends uniformly but its output is multiplied by zero), k/v heads no query
  reads are dropped;
* llama.cpp applies RoPE to interleaved pairs (d, d+1) where transformers rotates halves (d, d + head_dim/2):
  q and k rows, weights and biases, are permuted per head;
* a layer left with nothing is dropped (it is the identity).

What ``deci`` cannot express is refused with one line: RoPE pairs (narrower q/k per group) and sliding
windows shorter than the context. Tokenizer metadata comes from the source GGUF (every ``tokenizer.*`` key:
vocabulary, merges, special tokens, chat template) or from a Hugging Face byte-level BPE tokenizer.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.architectures import DENSE_PREFIX, PRUNED_PREFIX, architecture_of
from ..core.errors import CusprunError
from ..core.files import atomic_write

DTYPES = ("f32", "f16", "bf16")
# llama.cpp's file types (LLAMA_FTYPE_MOSTLY_<NAME>) that llama_model_quantize writes from a float file
QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
               "q5_k_s", "q5_k_m", "q6_k")
ZERO_MLP = 32  # width of the all-zero MLP a layer without one gets (a Q8_0 block; k-quants store it as zeros too)
SETUP = "bash scripts/setup_env.sh"
PRUNING_KEY = "cusprun.pruning"


@dataclass
class Block:
    """One GGUF layer's tensors (numpy [out, in], float32) before the dtype cast, named as in llama.cpp."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    heads: int = 0
    kv: int = 0
    ff: int = 0


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def rotary_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows [heads * head_dim, ...] from transformers' rotate-half order to llama.cpp's interleaved order
    (convert_hf_to_gguf's ``LlamaModel.permute``): within each head, row d goes to 2d and d + head_dim/2 to 2d+1."""
    if heads == 0:
        return w
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rotary_unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`rotary_permute`: a query or key projection of a llama GGUF back in Hugging Face's
    rotary order (what ``--stream`` reads from a source GGUF, :mod:`cusprun.formats.gguf_tensors`)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layer_shape(config, layer: int) -> dict:
    """heads, kv, kv_of (per query head, its k/v head), channels, attention / mlp kept, rope pairs of one layer."""
    per_layer = getattr(config, "per_layer_config", None)
    lc = per_layer[layer] if per_layer else config
    heads, kv = lc.num_attention_heads, lc.num_key_value_heads
    kv_map = getattr(lc, "cusprun_kv_map", None)
    skip = set(getattr(lc, "skip", None) or ())
    return {"heads": heads, "kv": kv, "channels": lc.intermediate_size,
            "kv_of": list(kv_map) if kv_map is not None else [h // (heads // kv) for h in range(heads)],
            "attention": "self_attn" not in skip, "mlp": "mlp" not in skip,
            "pairs": getattr(lc, "cusprun_rope_pairs", None)}


def check_exportable(config) -> None:
    """One line for a model ``deci`` cannot hold exactly; nothing is loaded yet."""
    if config.model_type.startswith(PRUNED_PREFIX) and not config.model_type.startswith(PRUNED_PREFIX + DENSE_PREFIX):
        raise CusprunError(f"{config.model_type!r} is a sliced expert; GGUF export takes a dense one "
                           "(prune again with --format dense or --format gguf)")
    architecture_of(config)
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise CusprunError(f"unsupported MLP activation {config.hidden_act!r}: llama.cpp's deci applies SiLU")
    window = getattr(config, "sliding_window", None)
    windowed = architecture_of(config).window_for_every_layer or "sliding_attention" in (
        getattr(config, "layer_types", None) or ())
    if windowed and window and window < config.max_position_embeddings:
        raise CusprunError(f"sliding window {window} < context {config.max_position_embeddings}: llama.cpp's deci "
                           "has no sliding window; keep the dense safetensors folder and run it in transformers")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CusprunError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not written to GGUF here; "
                           "keep the dense safetensors folder and run it in transformers")
    for layer in range(config.num_hidden_layers):
        if _layer_shape(config, layer)["pairs"] is not None:
            raise CusprunError(f"layer {layer} keeps only some RoPE pairs (narrower q/k per group), which GGUF "
                               "cannot express; keep the dense safetensors folder and run it in transformers, or "
                               "prune with --neurons that keep whole heads")


def _attention(state: dict, prefix: str, shape: dict, hd: int, hidden: int) -> Block | None:
    """The attention tensors of one layer, groups padded to equal size (see module doc); None when skipped."""
    if not shape["attention"]:
        return None
    o = _np(state[prefix + "self_attn.o_proj.weight"])
    block = Block()
    block.tensors["attn_norm.weight"] = _np(state[prefix + "input_layernorm.weight"])
    if prefix + "self_attn.o_proj.bias" in state:
        block.tensors["attn_output.bias"] = _np(state[prefix + "self_attn.o_proj.bias"])
    groups = [[h for h, g in enumerate(shape["kv_of"]) if g == kv] for kv in range(shape["kv"])]
    kept = [g for g in range(shape["kv"]) if groups[g]]  # a k/v head no query reads is dropped
    if not kept:  # kept with zero heads for its o bias alone: one zero head carries it
        head = _zero_head(hidden, hd)
        head.tensors.update(block.tensors)
        return head
    size = max(len(groups[g]) for g in kept)
    rows = lambda w, units: np.concatenate([w[u * hd:(u + 1) * hd] if u is not None else
                                            np.zeros((hd, *w.shape[1:]), np.float32) for u in units])
    q_heads = [h for g in kept for h in groups[g] + [None] * (size - len(groups[g]))]
    block.heads, block.kv = len(q_heads), len(kept)
    q, k, v = (_np(state[f"{prefix}self_attn.{p}_proj.weight"]) for p in "qkv")
    block.tensors["attn_q.weight"] = rotary_permute(rows(q, q_heads), block.heads)
    block.tensors["attn_k.weight"] = rotary_permute(rows(k, kept), block.kv)
    block.tensors["attn_v.weight"] = rows(v, kept)
    block.tensors["attn_output.weight"] = rows(o.T, q_heads).T.copy()  # padded heads: zero o columns
    if prefix + "self_attn.q_proj.bias" in state:
        q_b, k_b, v_b = (_np(state[f"{prefix}self_attn.{p}_proj.bias"]) for p in "qkv")
        block.tensors["attn_q.bias"] = rotary_permute(rows(q_b, q_heads), block.heads)
        block.tensors["attn_k.bias"] = rotary_permute(rows(k_b, kept), block.kv)
        block.tensors["attn_v.bias"] = rows(v_b, kept)
    return block


def _mlp(state: dict, prefix: str, shape: dict, pad: int) -> dict[str, np.ndarray] | None:
    """The MLP tensors of one layer, its width padded with zero channels to a multiple of ``pad``."""
    if not shape["mlp"]:
        return None
    gate, up = _np(state[prefix + "mlp.gate_proj.weight"]), _np(state[prefix + "mlp.up_proj.weight"])
    down = _np(state[prefix + "mlp.down_proj.weight"])
    extra = -gate.shape[0] % pad if gate.shape[0] else max(pad, ZERO_MLP)  # zero channels: act(0) * 0 = 0
    tensors = {"ffn_norm.weight": _np(state[prefix + "post_attention_layernorm.weight"]),
               "ffn_gate.weight": np.pad(gate, ((0, extra), (0, 0))), "ffn_up.weight": np.pad(up, ((0, extra), (0, 0))),
               "ffn_down.weight": np.pad(down, ((0, 0), (0, extra)))}
    for proj, name in (("gate_proj", "ffn_gate.bias"), ("up_proj", "ffn_up.bias")):
        if f"{prefix}mlp.{proj}.bias" in state:
            tensors[name] = np.pad(_np(state[f"{prefix}mlp.{proj}.bias"]), (0, extra))
    if prefix + "mlp.down_proj.bias" in state:
        tensors["ffn_down.bias"] = _np(state[prefix + "mlp.down_proj.bias"])
    return tensors


def _zero_mlp(hidden: int, width: int) -> dict[str, np.ndarray]:
    return {"ffn_norm.weight": np.ones(hidden, np.float32), "ffn_gate.weight": np.zeros((width, hidden), np.float32),
            "ffn_up.weight": np.zeros((width, hidden), np.float32),
            "ffn_down.weight": np.zeros((hidden, width), np.float32)}


def _zero_head(hidden: int, hd: int) -> Block:
    z = np.zeros((hd, hidden), np.float32)
    return Block({"attn_norm.weight": np.ones(hidden, np.float32), "attn_q.weight": z, "attn_k.weight": z,
                  "attn_v.weight": z, "attn_output.weight": np.zeros((hidden, hd), np.float32)}, 1, 1)


def gguf_layers(model, pad_mlp: int = 1) -> list[Block]:
    """The GGUF layers of a dense expert or an unpruned model, with every pitfall of the module doc written
    around; ``pad_mlp``: MLP widths padded with zero channels to a multiple of it (exact)."""
    config = model.config
    check_exportable(config)
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, state = config.hidden_size, model.state_dict()
    blocks = []
    for layer in range(config.num_hidden_layers):
        prefix, shape = f"model.layers.{layer}.", _layer_shape(config, layer)
        block = _attention(state, prefix, shape, hd, hidden)
        mlp = _mlp(state, prefix, shape, pad_mlp)
        if block is None and mlp is None:
            continue  # the identity
        block = block or Block()
        if mlp is not None:
            block.tensors.update(mlp)
            block.ff = mlp["ffn_gate.weight"].shape[0]
        blocks.append(block)
    if not blocks:
        raise CusprunError("the expert has no layer left; llama.cpp needs at least one")
    zero_width = max(ZERO_MLP, pad_mlp)
    for i, block in enumerate(blocks):
        if block.ff == 0 and (block.heads or i == len(blocks) - 1):
            block.tensors.update(_zero_mlp(hidden, zero_width))
            block.ff = zero_width
    if blocks[0].heads == 0:
        head = _zero_head(hidden, hd)
        blocks[0].tensors.update(head.tensors)
        blocks[0].heads = blocks[0].kv = 1
    return blocks


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _cast(writer, name: str, array: np.ndarray, dtype: str) -> None:
    """1-D tensors (norms, biases) stay F32 as llama.cpp's converter keeps them; matrices take ``dtype``."""
    import gguf

    if array.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
    elif dtype == "f16":
        writer.add_tensor(name, np.ascontiguousarray(array, np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(array, np.float32),
                                                     gguf.GGMLQuantizationType.BF16),
                          raw_dtype=gguf.GGMLQuantizationType.BF16)


def copy_tokenizer_keys(writer, source_gguf: str | Path, vocab: int) -> None:
    """Every ``tokenizer.*`` key of a GGUF file: vocabulary, merges, token types, special tokens, chat template."""
    import gguf

    reader = gguf.GGUFReader(str(source_gguf))
    fields = {name: f for name, f in reader.fields.items() if name.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise CusprunError(f"{source_gguf} holds no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab:
        raise CusprunError(f"{source_gguf}'s tokenizer has {len(tokens.data)} tokens, the model {vocab} embeddings")
    for name, f in fields.items():
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, f.contents(), vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(name, f.contents(), vtype)


def check_hf_tokenizer(folder: str | Path) -> None:
    """One line unless ``folder`` holds a byte-level BPE tokenizer.json (the kind :func:`add_hf_tokenizer` writes)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise CusprunError(f"{folder} has no tokenizer.json; a GGUF needs the model's tokenizer (export the "
                           "model it was pruned from, or copy that model's tokenizer files into the folder)")
    spec = json.loads(path.read_text())
    kind = spec.get("model", {}).get("type")
    if kind != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise CusprunError(f"{folder}'s tokenizer ({kind}, not byte-level BPE) has no GGUF writer here; export "
                           "from the source GGUF or keep the dense safetensors folder")


def tokenizer_source(source, folder: Path | None) -> tuple[str, str]:
    """Where the GGUF's tokenizer comes from: the model's own GGUF file; for an expert folder, the GGUF it was
    pruned from (pruning.json's ``model``, else config.json's ``_name_or_path``) when that is a GGUF here, else
    the folder's tokenizer.json. One line when there is none."""
    from ..core.models import resolve_model

    if source.gguf_file:
        return "gguf", str(Path(source.path) / source.gguf_file)
    origin = None
    for record, key in (("pruning.json", "model"), ("config.json", "_name_or_path")):
        if folder is not None and (folder / record).is_file():
            origin = origin or json.loads((folder / record).read_text()).get(key)
    if origin:
        try:
            parent = resolve_model(origin)
        except CusprunError:
            parent = None  # pruned elsewhere: its source is not on this machine
        if parent is not None and parent.gguf_file:
            return "gguf", str(Path(parent.path) / parent.gguf_file)
    if folder is None:
        raise CusprunError(f"{source.model_id}: no local folder to read a tokenizer from")
    check_hf_tokenizer(folder)
    return "hf", str(folder)


def add_hf_tokenizer(writer, folder: str | Path, vocab: int) -> None:
    """A Hugging Face byte-level BPE tokenizer (Llama 3, Qwen2, SmolLM2, GPT-2 style) as llama.cpp's ``gpt2``
    tokenizer, the way convert_hf_to_gguf writes it. Its pre-tokenizer is written as ``default``: text tokenizes
    in llama.cpp with llama.cpp's default split, which can differ from the model's own in rare cases."""
    import gguf
    from transformers import AutoTokenizer

    folder = Path(folder)
    check_hf_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab:
        raise CusprunError(f"{folder}'s tokenizer has ids up to {max(by_id)}, the model only {vocab} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab):
        if i not in by_id:  # embedding rows no token names (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in added and added[i].special else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab).add_to_gguf(writer, quiet=True)


def write_gguf(model, path: str | Path, tokenizer_from: tuple[str, str], dtype: str = "f32", pad_mlp: int = 1,
               name: str | None = None, report: dict | None = None) -> dict:
    """Write ``model`` (dense expert or unpruned) as a ``deci`` GGUF at ``path``, atomically.
    ``tokenizer_from``: ("gguf", file) copies its tokenizer keys, ("hf", folder) converts its tokenizer.json;
    ``report``: the expert's pruning.json, kept as the JSON string key ``cusprun.pruning`` (llama.cpp ignores it).
    Returns the per-layer arrays written."""
    import gguf

    config = model.config
    blocks = gguf_layers(model, pad_mlp)
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    state = model.state_dict()
    arrays = {"heads": [b.heads for b in blocks], "kv": [b.kv for b in blocks], "ff": [b.ff for b in blocks]}

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch="deci")
        writer.add_name(name or "cusprun expert")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(len(blocks))
        writer.add_feed_forward_length(arrays["ff"])
        writer.add_head_count(arrays["heads"])
        writer.add_head_count_kv(arrays["kv"])
        writer.add_key_length(hd)  # deci otherwise derives the head size from layer 0 as hidden / heads
        writer.add_value_length(hd)
        writer.add_rope_dimension_count(hd)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        if report is not None:
            writer.add_string(PRUNING_KEY, json.dumps(report))
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
        kind, where = tokenizer_from
        if kind == "gguf":
            copy_tokenizer_keys(writer, where, config.vocab_size)
        else:
            add_hf_tokenizer(writer, where, config.vocab_size)
        _cast(writer, "token_embd.weight", _np(state["model.embed_tokens.weight"]), dtype)
        _cast(writer, "output_norm.weight", _np(state["model.norm.weight"]), dtype)
        if not getattr(config, "tie_word_embeddings", False):  # tied: llama.cpp reuses token_embd
            _cast(writer, "output.weight", _np(state["lm_head.weight"]), dtype)
        for i, block in enumerate(blocks):
            for tensor, array in block.tensors.items():
                _cast(writer, f"blk.{i}.{tensor}", array, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return arrays


def quantizer():
    """llama-cpp-python's module, or one line naming the command that installs it."""
    try:
        import llama_cpp
    except ImportError:
        raise CusprunError(f"quantization needs llama-cpp-python (built without AMX, see docs/deploy.md): "
                           f"run `{SETUP}`") from None
    return llama_cpp


def check_quant_type(name: str | None) -> None:
    if name is not None and name not in QUANT_TYPES:
        raise CusprunError(f"--quantize {name}: unknown type; choose one of {', '.join(QUANT_TYPES)}")


def quantize(src: str | Path, dst: str | Path, kind: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) from the float GGUF ``src`` into ``dst``, atomically.
    Tensors whose input width is not a multiple of the type's block fall back to another type (llama.cpp's
    rule: Q8_0 -> F16 below 32, k-quants -> Q5_0/Q5_1/Q8_0 below 256)."""
    llama_cpp = quantizer()
    check_quant_type(kind)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = threads or os.cpu_count() or 1
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's line per tensor; errors still print (the types chosen: tensor_types)

    def write(tmp: str) -> None:
        if llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params)) != 0:
            raise CusprunError(f"llama.cpp could not quantize {src} to {kind}")
    atomic_write(dst, write)


def check_out_file(out: str | Path, overwrite: bool) -> Path:
    """One line for an --out that is a folder, exists (without ``overwrite``) or lies in a missing folder."""
    path = Path(out)
    if path.is_dir():
        raise CusprunError(f"--out {out} is a folder; name the .gguf file to write")
    if path.exists() and not overwrite:
        raise CusprunError(f"--out {out} exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise CusprunError(f"--out {out}: folder {path.parent} does not exist")
    return path


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each type a GGUF file holds (after quantization: which fell back to another type)."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def export_gguf(model, path: str | Path, tokenizer_from: tuple[str, str], dtype: str = "f32",
                quant: str | None = None, pad_mlp: int = 1, name: str | None = None,
                report: dict | None = None) -> dict:
    """The GGUF of ``model`` at ``path`` in ``dtype``, or quantized to ``quant`` from an F32 file written beside it
    (and removed), atomically either way. Returns the per-layer arrays."""
    if quant is None:
        return write_gguf(model, path, tokenizer_from, dtype, pad_mlp, name, report)
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        full = Path(tmp) / "f32.gguf"
        arrays = write_gguf(model, full, tokenizer_from, "f32", pad_mlp, name, report)
        quantize(full, path, quant)
    return arrays
