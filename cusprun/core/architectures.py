"""The supported decoder architectures, and everything that differs between them, in one table.

Llama (Llama 2/3, SmolLM2), Mistral and Qwen2 share one layout — ``model.layers[l].self_attn.{q,k,v,o}_proj``
and ``mlp.{gate,up,down}_proj``, RoPE on q and k, grouped-query attention, SiLU-gated MLP — and differ
only in what this table records. Supporting another architecture of this layout means one entry here
(plus its tiny model in the tests); the self-contained modeling code shipped with pruned models
(:mod:`cusprun.formats.modeling_cusprun`) keeps its own copy of the class names, since it may not import cusprun.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CusprunError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    title: str  # as in transformers' class names (LlamaForCausalLM, ...)
    qkv_bias_always: bool  # Qwen2 has q/k/v biases whatever ``attention_bias`` says
    window_for_every_layer: bool  # Mistral applies ``config.sliding_window`` to every layer

    def qkv_bias(self, config) -> bool:
        return self.qkv_bias_always or bool(getattr(config, "attention_bias", False))

    def sliding_window(self, attn, config) -> int | None:
        """The attention window of one layer: Qwen2 keeps it per layer on the module (None on full-attention
        layers), Mistral applies ``config.sliding_window`` to every layer, Llama has none."""
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return getattr(config, "sliding_window", None) if self.window_for_every_layer else None


ARCHITECTURES = {a.model_type: a for a in (
    Architecture("llama", "Llama", qkv_bias_always=False, window_for_every_layer=False),
    Architecture("mistral", "Mistral", qkv_bias_always=False, window_for_every_layer=True),
    Architecture("qwen2", "Qwen2", qkv_bias_always=True, window_for_every_layer=False),
)}
SUPPORTED_TYPES = tuple(ARCHITECTURES)
# Pruned models cusprun writes carry ``cusprun_`` (sliced) or ``cusprun_dense_`` (dense) before the original
# model_type.
PRUNED_PREFIX = "cusprun_"
DENSE_PREFIX = "dense_"


def architecture_of(config) -> Architecture:
    """The table entry of a config (or of a pruned model's config); CusprunError when unsupported."""
    name = config.model_type.removeprefix(PRUNED_PREFIX).removeprefix(DENSE_PREFIX)
    if name not in ARCHITECTURES:
        raise CusprunError(f"unsupported architecture {config.model_type!r}: "
                           f"cusprun supports {', '.join(SUPPORTED_TYPES)} (Llama 2/3, SmolLM2, Mistral, Qwen2)")
    return ARCHITECTURES[name]


def check_architecture(config, allow_pruned: bool = False) -> None:
    """Only decoder stacks whose scores we can compute exactly are accepted (and, to evaluate or generate,
    the pruned experts cusprun writes)."""
    if config.model_type.startswith(PRUNED_PREFIX) and not allow_pruned:
        raise CusprunError(f"{config.model_type!r} is a pruned model; score and prune the original model")
    architecture_of(config)
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise CusprunError(f"unsupported MLP activation {config.hidden_act!r}: cusprun supports silu")


def sliding_window(attn, config) -> int | None:
    """The attention window of one layer of ``config``'s architecture (None: full causal attention)."""
    return architecture_of(config).sliding_window(attn, config)
