"""Pruned Llama / Mistral / Qwen2 models, in two forms. Self-contained (torch and transformers only): this file
ships inside every exported model folder.

**Sliced** (``cusprun_<arch>``): every projection keeps only its live rows and columns. A sliced projection
reads its live input columns (a gather, only where some were removed), multiplies by its compacted weight,
and writes its live output rows into a zero-filled full-width output (a scatter, only where some were
removed), so the rest of the architecture — RoPE, grouped attention, the residual stream — runs unchanged and
computes exactly what the masked model computes. The MLP is compacted to its live channels:
gate and up produce only those, down reads only those.

``config.cusprun_slices[layer][projection] = [rows kept, cols kept, gathers, scatters]``.

**Dense** (``cusprun_dense_<arch>``): every kept matrix is an ordinary dense ``nn.Linear``; no gathers,
scatters or zero-filled outputs. Each layer has its own number of query heads, k/v heads and MLP channels,
given as transformers' ``per_layer_config`` overrides (``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``, and ``skip`` naming a removed ``self_attn`` or ``mlp`` block); removed layers are gone
(``cusprun_source_layers`` lists the original index of each kept layer). Query heads are stored grouped by the
k/v head they read; where the kept groups keep different numbers of query heads, ``cusprun_kv_map`` (per
layer) names each query head's k/v head. Where RoPE pairs were removed, ``cusprun_rope_pairs`` (per layer)
lists, per k/v head, the pairs (d, d + head_dim/2) of the original head its queries and keys keep, d < head_dim/2,
the same number for every k/v head: q and k are narrower (2 per pair) and rotate at those pairs' frequencies,
v and o keep ``head_dim``, and the logits keep the scale head_dim^-1/2. The KV cache holds each layer's own k/v
heads (keys as narrow as the layer's queries); a layer without attention caches zero heads, so the cache still
counts the positions seen.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class SlicedLinear(nn.Module):
    """y_full[..., out_index] = x[..., in_index] Wᵀ + b, zero elsewhere.

    weight [rows kept, cols kept]; ``in_index`` [cols kept] and ``out_index`` [rows kept] are
    persistent buffers, present only when the projection gathers / scatters.
    """

    def __init__(self, rows: int, cols: int, out_features: int, bias: bool, gather: bool, scatter: bool):
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(rows, cols))
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None
        self.register_buffer("in_index", torch.zeros(cols, dtype=torch.long) if gather else None)
        self.register_buffer("out_index", torch.zeros(rows, dtype=torch.long) if scatter else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_index is not None:
            x = x.index_select(-1, self.in_index)
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.out_index is None:
            return y
        return y.new_zeros(*y.shape[:-1], self.out_features).index_copy_(-1, self.out_index, y)


def install_sliced_projections(model: nn.Module, slices: dict) -> None:
    """Replace the projections of ``model`` (built from the base config) by SlicedLinear modules."""
    for layer_index, per_proj in slices.items():
        layer = model.model.layers[int(layer_index)]
        for proj, (rows, cols, gather, scatter) in per_proj.items():
            parent_name, _, attr = proj.rpartition(".")
            parent = layer.get_submodule(parent_name)
            old = getattr(parent, attr)
            out_features = rows if proj in ("mlp.gate_proj", "mlp.up_proj") else old.out_features
            setattr(parent, attr, SlicedLinear(rows, cols, out_features, old.bias is not None, gather, scatter))


def _sliced_family(base_config, base_model, name):
    class Config(base_config):
        model_type = f"cusprun_{name}"

        def __init__(self, cusprun_slices=None, **kwargs):
            super().__init__(**kwargs)
            self.cusprun_slices = cusprun_slices or {}

    class Model(base_model):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            install_sliced_projections(self, config.cusprun_slices)

    title = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[name]
    Config.__name__ = Config.__qualname__ = f"Cusprun{title}Config"
    Model.__name__ = Model.__qualname__ = f"Cusprun{title}ForCausalLM"
    return Config, Model


CusprunLlamaConfig, CusprunLlamaForCausalLM = _sliced_family(LlamaConfig, LlamaForCausalLM, "llama")
CusprunMistralConfig, CusprunMistralForCausalLM = _sliced_family(MistralConfig, MistralForCausalLM, "mistral")
CusprunQwen2Config, CusprunQwen2ForCausalLM = _sliced_family(Qwen2Config, Qwen2ForCausalLM, "qwen2")
SLICED = {"llama": (CusprunLlamaConfig, CusprunLlamaForCausalLM),
          "mistral": (CusprunMistralConfig, CusprunMistralForCausalLM),
          "qwen2": (CusprunQwen2Config, CusprunQwen2ForCausalLM)}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_pair_dims(pairs: list[int], head_dim: int) -> list[int]:
    """Head dimensions of RoPE pairs d < head_dim/2: first the pairs' d, then their partners d + head_dim/2, so a
    narrower head's rotate-half pairs them again."""
    return list(pairs) + [d + head_dim // 2 for d in pairs]


class DenseAttention(nn.Module):
    """Grouped-query attention with this layer's own head counts; q/k/v/o are dense ``nn.Linear``.

    q_proj [heads * qk_dim, hidden], k_proj [kv_heads * qk_dim, hidden], v_proj [kv_heads * head_dim, hidden],
    o_proj [hidden, heads * head_dim]; qk_dim = head_dim, or 2 per kept RoPE pair.
    Query head i reads k/v head ``kv_index[i]`` (or i // (heads / kv_heads) when the groups are even)."""

    def __init__(self, config, layer_config, layer_idx: int, qkv_bias: bool, o_bias: bool, sliding_window):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = layer_config.num_attention_heads, layer_config.num_key_value_heads
        kv_map = getattr(layer_config, "cusprun_kv_map", None)
        # uneven groups: k/v heads are expanded to the query heads before the attention call, so no regrouping
        self.num_key_value_groups = 1 if kv_map is not None else self.num_heads // max(self.num_kv_heads, 1)
        pairs = getattr(layer_config, "cusprun_rope_pairs", None)
        self.qk_dim = self.head_dim if pairs is None else 2 * len(pairs[0])
        # Index lists, made tensors per device on first use (``_index``): buffers would not survive
        # from_pretrained, which builds the model without running this constructor's tensor code on real memory.
        # kv_index: each query head's k/v head; rope_dims [kv_heads, qk_dim] and rope_dims_q [heads, qk_dim]:
        # the rotary dimensions of each k/v head's kept pairs and of each query head's (its k/v head's), where
        # the rotary tables are gathered so every head rotates its pairs at their own frequencies.
        self._lists = {"kv_index": kv_map}
        if pairs is not None:
            dims = [rope_pair_dims(p, self.head_dim) for p in pairs]
            group = kv_map or [i // max(self.num_heads // max(self.num_kv_heads, 1), 1) for i in range(self.num_heads)]
            self._lists.update(rope_dims=dims, rope_dims_q=[dims[g] for g in group])
        self._tensors = {}
        self.scaling = self.head_dim ** -0.5  # the original head's scale, also where q and k are narrower
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = sliding_window
        hidden, heads, kv = config.hidden_size, self.num_heads, self.num_kv_heads
        self.q_proj = nn.Linear(hidden, heads * self.qk_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv * self.qk_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=o_bias)

    def _index(self, name: str, device) -> torch.Tensor | None:
        if self._lists.get(name) is None:
            return None
        if (name, device) not in self._tensors:
            # made outside inference mode even when first used inside it: an inference tensor, kept in this
            # cache, could not be saved for backward by a later training forward (index_select saves it)
            with torch.inference_mode(False):
                self._tensors[name, device] = torch.tensor(self._lists[name], dtype=torch.long, device=device)
        return self._tensors[name, device]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        shape = hidden_states.shape[:-1]
        if self.num_heads == 0:  # every head removed, o_proj's bias kept: a constant output
            if cache is not None:
                track_positions(cache, hidden_states, self.layer_idx)
            return self.o_proj(hidden_states.new_zeros(*shape, 0)), None
        q = self.q_proj(hidden_states).view(*shape, -1, self.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*shape, -1, self.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings  # [batch, tokens, head_dim]
        dims_k, dims_q = self._index("rope_dims", cos.device), self._index("rope_dims_q", cos.device)
        if dims_k is None:
            cos_q = cos_k = cos.unsqueeze(1)
            sin_q = sin_k = sin.unsqueeze(1)
        else:  # [batch, heads, tokens, qk_dim]: each head's kept pairs
            cos_q, sin_q = cos[..., dims_q].transpose(1, 2), sin[..., dims_q].transpose(1, 2)
            cos_k, sin_k = cos[..., dims_k].transpose(1, 2), sin[..., dims_k].transpose(1, 2)
        q, k = q * cos_q + _rotate_half(q) * sin_q, k * cos_k + _rotate_half(k) * sin_k
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        kv_index = self._index("kv_index", k.device)
        if kv_index is not None:
            k, v = k.index_select(1, kv_index), v.index_select(1, kv_index)
        implementation = self.config._attn_implementation
        if self.qk_dim < self.head_dim and implementation != "eager" and (implementation != "sdpa" or q.shape[2] > 1):
            # Fused attention kernels need one head dimension for q, k and v: FlashAttention refuses narrower q
            # and k, PyTorch's sdpa falls back to its unfused path (3.4x slower on a 2-core CPU at 512 tokens,
            # 9 heads, 48 vs 64). Zeros added to q and k change no logit, so they are padded to v's width after
            # the cache (which stays narrow); sdpa only in a prefill, where its fused kernels pay.
            pad = (0, self.head_dim - self.qk_dim)
            q, k = nn.functional.pad(q, pad), nn.functional.pad(k, pad)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, modeling_llama.eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                                 self.attention_dropout, scaling=self.scaling, sliding_window=self.sliding_window,
                                 **kwargs)
        return self.o_proj(out.reshape(*shape, -1).contiguous()), weights


def track_positions(cache, hidden_states: torch.Tensor, layer_idx: int) -> None:
    """A layer without attention caches one zero per token ([batch, 1, tokens, 1] keys and values): transformers
    reads the number of tokens seen from a cache layer's keys, and an empty tensor would count none."""
    marker = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
    cache.update(marker, marker.clone(), layer_idx)


class DenseMLP(nn.Module):
    """down(act(gate(x)) * up(x)) over this layer's own number of channels (zero channels: down's bias)."""

    def __init__(self, config, channels: int):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, channels, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, channels, bias=bias)
        self.down_proj = nn.Linear(channels, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DenseDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer whose attention or MLP block may be absent (removed: the residual passes)."""

    def __init__(self, config, layer_idx: int, norm_cls, arch: str):
        super().__init__()
        layer_config = config.per_layer_config[layer_idx]
        skip = set(getattr(layer_config, "skip", None) or ())
        layer_types = getattr(config, "layer_types", None)
        self.attention_type = layer_types[layer_idx] if layer_types else "full_attention"
        self.layer_idx = layer_idx
        if arch == "qwen2":
            qkv_bias, o_bias = True, False
            window = config.sliding_window if self.attention_type == "sliding_attention" else None
        else:
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
            window = getattr(config, "sliding_window", None) if arch == "mistral" else None
        self.self_attn = None if "self_attn" in skip else DenseAttention(config, layer_config, layer_idx, qkv_bias,
                                                                         o_bias, window)
        self.input_layernorm = None if "self_attn" in skip else norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = None if "mlp" in skip else DenseMLP(config, layer_config.intermediate_size)
        self.post_attention_layernorm = None if "mlp" in skip else norm_cls(config.hidden_size,
                                                                            eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if self.self_attn is not None:
            out, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                                    attention_mask=attention_mask, cache=cache, position_ids=position_ids, **kwargs)
            hidden_states = hidden_states + out
        elif cache is not None:
            track_positions(cache, hidden_states, self.layer_idx)
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


FAMILY = {"llama": modeling_llama, "mistral": modeling_mistral, "qwen2": modeling_qwen2}


def _dense_family(base_config, base_model, base_causal, name):
    module, title = FAMILY[name], {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[name]
    norm_cls, rotary_cls = getattr(module, f"{title}RMSNorm"), getattr(module, f"{title}RotaryEmbedding")

    class Config(base_config):
        model_type = f"cusprun_dense_{name}"

        def __init__(self, per_layer_config=None, cusprun_source_layers=None, **kwargs):
            kwargs.setdefault("cusprun_kv_map", None)  # global defaults of the per-layer overrides
            kwargs.setdefault("cusprun_rope_pairs", None)
            # The base config's validation reads one global head count; the per-layer shapes are set after it
            # and validated per layer by ``validate``.
            super().__init__(**kwargs)
            self.cusprun_source_layers = cusprun_source_layers
            self.per_layer_config = per_layer_config or {}

        def validate(self):
            for i, layer in enumerate(self.per_layer_config):
                heads, kv = layer.num_attention_heads, layer.num_key_value_heads
                kv_map = getattr(layer, "cusprun_kv_map", None)
                even = heads == kv == 0 or (kv > 0 and heads % kv == 0)
                if heads < 0 or kv < 0 or layer.intermediate_size < 0 or (kv_map is None and not even) or (
                        kv_map is not None and (len(kv_map) != heads or not all(0 <= g < kv for g in kv_map))):
                    raise ValueError(f"layer {i}: inconsistent head counts ({heads} heads, {kv} k/v heads, "
                                     f"kv map {kv_map})")
                pairs, half = getattr(layer, "cusprun_rope_pairs", None), self.head_dim // 2
                if pairs is not None and (len(pairs) != kv or not pairs or len({len(p) for p in pairs}) != 1 or any(
                        not p or len(set(p)) != len(p) or not all(0 <= d < half for d in p) for p in pairs)):
                    raise ValueError(f"layer {i}: cusprun_rope_pairs must list, for each of its {kv} k/v heads, "
                                     f"the same number of distinct pairs d < {half}, got {pairs}")

    class Model(base_model):
        config_class = Config
        _no_split_modules = ["DenseDecoderLayer"]
        _can_record_outputs = {"hidden_states": DenseDecoderLayer, "attentions": DenseAttention}

        def __init__(self, config):
            super(base_model, self).__init__(config)  # the base class would build uniform layers
            self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
            self.layers = nn.ModuleList([DenseDecoderLayer(config, i, norm_cls, name)
                                         for i in range(config.num_hidden_layers)])
            self.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
            self.rotary_emb = rotary_cls(config=config)
            self.gradient_checkpointing = False
            self.has_sliding_layers = "sliding_attention" in (getattr(config, "layer_types", None) or ())
            self.post_init()

    class CausalLM(base_causal):
        config_class = Config
        _no_split_modules = ["DenseDecoderLayer"]
        _can_record_outputs = Model._can_record_outputs

        def __init__(self, config):
            super(base_causal, self).__init__(config)
            self.model = Model(config)
            self.vocab_size = config.vocab_size
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

    Config.__name__ = Config.__qualname__ = f"CusprunDense{title}Config"
    Model.__name__ = Model.__qualname__ = f"CusprunDense{title}Model"
    CausalLM.__name__ = CausalLM.__qualname__ = f"CusprunDense{title}ForCausalLM"
    return Config, CausalLM


CusprunDenseLlamaConfig, CusprunDenseLlamaForCausalLM = _dense_family(
    LlamaConfig, modeling_llama.LlamaModel, LlamaForCausalLM, "llama")
CusprunDenseMistralConfig, CusprunDenseMistralForCausalLM = _dense_family(
    MistralConfig, modeling_mistral.MistralModel, MistralForCausalLM, "mistral")
CusprunDenseQwen2Config, CusprunDenseQwen2ForCausalLM = _dense_family(
    Qwen2Config, modeling_qwen2.Qwen2Model, Qwen2ForCausalLM, "qwen2")
DENSE = {"llama": (CusprunDenseLlamaConfig, CusprunDenseLlamaForCausalLM),
         "mistral": (CusprunDenseMistralConfig, CusprunDenseMistralForCausalLM),
         "qwen2": (CusprunDenseQwen2Config, CusprunDenseQwen2ForCausalLM)}


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM load sliced and dense checkpoints (idempotent)."""
    for config_cls, model_cls in (*SLICED.values(), *DENSE.values()):
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered
            pass
