"""Neurons and their names: the one place that knows projection names, tensor names and model geometry.

A neuron is one row (output neuron) or one column (input neuron) of a projection ``y = x Wᵀ (+ b)``,
``self_attn.{q,k,v,o}_proj`` or ``mlp.{gate,up,down}_proj`` of a decoder layer. Score files, plans and
reports name the neurons of one projection side ``model.layers.{l}.{P}.rows|cols`` (:func:`tensor_name`) and a
layer's block influence ``model.layers.{l}.block_influence`` (:func:`influence_name`);
:class:`Geometry` gives every such tensor's size from a config; :func:`architecture` and
:func:`config_hash` are the config fields that fix those shapes, as score files record them.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .architectures import architecture_of

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTENTION = PROJECTIONS[:4]
MLP = PROJECTIONS[4:]
SIDES = ("rows", "cols")
# Config fields that define a model's projection shapes: hashed to match score files with models.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "attention_bias", "mlp_bias")


def tensor_name(layer: int, proj: str, side: str) -> str:
    """``model.layers.{layer}.{proj}.{side}``: the name of one projection side's neurons."""
    return f"model.layers.{layer}.{proj}.{side}"


def influence_name(layer: int) -> str:
    """``model.layers.{layer}.block_influence``: the layer's block influence in each document (score files,
    [n_docs, 1]): the mean over tokens of 1 - cos(h_in, h_out), the layer's input and output residual
    streams (ShortGPT's measure, on the scored corpus)."""
    return f"model.layers.{layer}.block_influence"


def is_influence_name(name: str) -> bool:
    """Whether a score-file tensor is a layer's block influence (not a projection side's neurons)."""
    return name.endswith(".block_influence")


def parse_name(name: str) -> tuple[int, str, str]:
    """(layer, projection, side) of a :func:`tensor_name`."""
    _, _, layer, rest = name.split(".", 3)
    proj, side = rest.rsplit(".", 1)
    return int(layer), proj, side


def group_of(name: str) -> str:
    """``{proj}.{side}`` of a tensor name, e.g. ``mlp.down_proj.cols`` (the same group in every layer)."""
    return name.split(".", 3)[3]


def head_dim(config) -> int:
    """head_dim, explicit in the config or hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def architecture(config) -> dict:
    """Metadata ``architecture``: the geometry-defining fields of a config (head_dim made explicit)."""
    return {**{k: getattr(config, k, None) for k in ARCHITECTURE_KEYS}, "head_dim": head_dim(config)}


def config_hash(config) -> str:
    """sha256 of the architecture-defining config fields: score files and models must agree on it."""
    fields = {k: getattr(config, k, None) for k in ARCHITECTURE_KEYS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class Geometry:
    """Shapes of one model's projections (from its config, or a score file's recorded architecture)."""

    def __init__(self, config):
        self.layers = config.num_hidden_layers
        self.hidden = config.hidden_size
        self.inter = config.intermediate_size
        self.heads = config.num_attention_heads
        self.kv = config.num_key_value_heads
        self.rep = self.heads // self.kv
        self.hd = head_dim(config)
        qkv_bias = architecture_of(config).qkv_bias(config)
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        self.bias = {"self_attn.q_proj": qkv_bias, "self_attn.k_proj": qkv_bias, "self_attn.v_proj": qkv_bias,
                     "self_attn.o_proj": bool(getattr(config, "attention_bias", False)),
                     **{proj: mlp_bias for proj in MLP}}
        q, kv = self.heads * self.hd, self.kv * self.hd
        self.shape = {"self_attn.q_proj": (q, self.hidden), "self_attn.k_proj": (kv, self.hidden),
                      "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, q),
                      "mlp.gate_proj": (self.inter, self.hidden), "mlp.up_proj": (self.inter, self.hidden),
                      "mlp.down_proj": (self.hidden, self.inter)}

    def names(self) -> list[str]:
        """Every tensor name, in score-file order (layer, projection, rows before cols)."""
        return [tensor_name(layer, proj, side) for layer in range(self.layers) for proj in PROJECTIONS
                for side in SIDES]

    def size(self, name: str) -> int:
        """Neurons in tensor ``name``: out_features for rows, in_features for cols."""
        _, proj, side = parse_name(name)
        return self.shape[proj][side == "cols"]

    def sizes(self) -> dict[str, int]:
        """tensor name -> number of neurons, for every tensor of a score file."""
        return {name: self.size(name) for name in self.names()}

    def projection_params(self) -> int:
        per_layer = sum(o * i + (o if self.bias[p] else 0) for p, (o, i) in self.shape.items())
        return per_layer * self.layers

    def full_plan(self) -> dict[str, torch.Tensor]:
        """Every tensor's keep mask, all True (the dense model)."""
        return {n: torch.ones(self.size(n), dtype=torch.bool) for n in self.names()}
