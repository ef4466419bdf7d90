"""Tiny random models the tests build (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

# Each covers grouped-query attention; head_dim differs from hidden/heads and is not a power of two.
TINY = {
    # 3 query heads per k/v head, head_dim 10
    "llama": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=24, intermediate_size=20, num_attention_heads=6,
                                                 num_key_value_heads=2, head_dim=10)),
    # sliding window shorter than the longer documents
    "mistral": (MistralConfig, MistralForCausalLM, dict(hidden_size=16, intermediate_size=18, num_attention_heads=4,
                                                       num_key_value_heads=2, head_dim=6, sliding_window=5)),
    # q/k/v biases, 4 query heads per k/v head
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=20, intermediate_size=14, num_attention_heads=4,
                                                 num_key_value_heads=1, head_dim=12)),
}


def tiny_model(arch: str, seed: int = 0, layers: int = 2, vocab: int = 61, attn: str = "sdpa"):
    """A random model large enough that attention is far from uniform (initializer_range 0.3)."""
    config_cls, model_cls, kw = TINY[arch]
    config = config_cls(num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=128,
                        initializer_range=0.3, rope_theta=50.0, tie_word_embeddings=False,
                        attn_implementation=attn, **kw)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if arch == "qwen2":  # HF initializes biases at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def random_ids(length: int, vocab: int = 61, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


WORDS = ("the a of and in to is was for on with as by at from that this it be are or an not but "
         "model expert neuron layer prune score text language domain task german english legal medical "
         "data token head group channel").split()


def tiny_tokenizer(vocab: int = 61):
    """A word-level fast tokenizer (whitespace split, unknown words -> [UNK]) over ``vocab`` ids, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "</s>", *WORDS][:vocab]
    words += [f"w{i}" for i in range(vocab - len(words))]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def write_source_gguf(model, path, half: bool = False) -> None:
    """``model`` (a tiny llama or qwen2) as llama.cpp's converter writes a source model: the ``llama`` or
    ``qwen2`` architecture, query and key rows permuted for llama, no output tensor when the embedding is tied,
    a placeholder vocabulary; matrices in F16 with ``half`` (the shapes are too small for block types)."""
    import gguf

    from cusprun.formats.gguf import rotary_permute

    c = model.config
    arch = c.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    if arch == "llama":  # transformers reads head_dim from it (qwen2's is hidden / heads)
        writer.add_rope_dimension_count(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    writer.add_token_scores([0.0] * c.vocab_size)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     c.num_hidden_layers)
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue
        stem, suffix = hf.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        values = tensor.detach().float().numpy()
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            values = rotary_permute(values, c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads)
        writer.add_tensor(name, values.astype("float16") if half and values.ndim == 2 else values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_source_model(arch: str, seed: int = 0, layers: int = 2):
    """A tiny llama (untied, head_dim 10) or qwen2 (tied, biases; head_dim hidden / heads, as GGUF's qwen2
    requires) to write with :func:`write_source_gguf`."""
    if arch == "llama":
        return tiny_model("llama", seed=seed, layers=layers)
    config = Qwen2Config(num_hidden_layers=layers, vocab_size=61, max_position_embeddings=128, initializer_range=0.3,
                         rope_theta=50.0, tie_word_embeddings=True, hidden_size=24, intermediate_size=14,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=6)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model
