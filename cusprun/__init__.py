"""cusprun — Custom Pruning (Cus-Prun): expert models from general LLMs by removing irrelevant neurons.

``import cusprun`` registers the sliced architectures with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(OUT)`` loads an expert model written by ``cusprun.prune``.
"""

__version__ = "0.1.0"

from .modeling_cusprun import register as _register  # noqa: E402

_register()
