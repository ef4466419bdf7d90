"""Sliced Llama / Mistral / Qwen2 models: every projection keeps only its live rows and columns.

Self-contained (torch and transformers only). A sliced projection reads its live input columns
(a gather, only where some were removed), multiplies by its compacted weight, and writes its live
output rows into a zero-filled full-width output (a scatter, only where some were removed), so
the rest of the architecture — RoPE, grouped attention, the residual stream — runs unchanged and
computes exactly what the masked model computes. The MLP is compacted to its live channels:
gate and up produce only those, down reads only those.

``config.cusprun_slices[layer][projection] = [rows kept, cols kept, gathers, scatters]``.
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


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM load sliced checkpoints (idempotent)."""
    for config_cls, model_cls in SLICED.values():
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered
            pass
