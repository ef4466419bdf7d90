"""cusprun — Custom Pruning (Cus-Prun): expert models from general LLMs by removing irrelevant neurons.

``import cusprun`` registers the sliced architectures with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(OUT)`` loads an expert model written by ``cusprun.prune``.

API: ``cusprun.score(model, documents) -> ScoreSet``; ``ScoreSet.load/save``, ``.relevance()``,
``a & b`` (intersection), ``.select(ratio) -> Selection``; ``cusprun.apply(model, selection)``.
"""

from .core.version import __version__  # noqa: F401  (cusprun.__version__)
from .formats.modeling_cusprun import register as _register  # noqa: E402

_register()

from .engine.api import score  # noqa: E402
from .formats.apply import apply  # noqa: E402
from .scores import baselines as _baselines  # noqa: E402,F401  (registers the baseline methods)
from .scores.scoreset import ScoreSet, intersect  # noqa: E402
from .selection.algorithm import Selection  # noqa: E402

__all__ = ["ScoreSet", "Selection", "apply", "intersect", "score"]
