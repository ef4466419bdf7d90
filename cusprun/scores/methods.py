"""The scoring methods: Cus-Prun's own and the baselines, each declared once with what it may prune.

A :class:`Method` says what a method calibrates on, which groups of neurons a selection may choose
from its scores, and at what granularity. Score files record the method (``method``; Cus-Prun's own
files predate the field and mean ``cusprun``); selection asks :func:`method_of` for the policy instead of
interpreting metadata. The baselines register themselves in :mod:`cusprun.scores.baselines` (imported by
``import cusprun``): a new baseline is one entry there (its scorer and its record) plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The structures FLAP and Wanda-sp remove (attention heads through o_proj's input, MLP channels through
# down_proj's input); everything else follows where a removal makes it dead.
HEADS_AND_CHANNELS = ("self_attn.o_proj.cols", "mlp.down_proj.cols")
# Their default selection: whole query heads (q rows and o columns; a k/v group goes with its last head) and
# whole MLP channels, as their papers remove them (the unit selection, cusprun.selection.units).
WHOLE_HEADS_AND_CHANNELS = (("granularity", "unit"), ("neurons", "all"))
DATA = ("none", "general", "target")


@dataclass(frozen=True)
class Method:
    """One scoring method.

    name: ``--method`` value. summary: its one line in ``--help``.
    data: what it calibrates on: ``none``, a ``general`` corpus (pooled) or the ``target`` corpus (per document).
    prunable: the groups (``{proj}.{side}``) that carry the method's scores, the only ones a selection may
        choose from (units scored by them: a query head by its o columns, a channel by its down column); None:
        every group.
    granularity: ``neuron`` (rows and columns) or ``layer`` (whole decoder layers, by ``block_influence``).
    selection: the method's default :meth:`~cusprun.scores.scoreset.ScoreSet.select` settings (``neurons``,
        ``granularity``), which explicit arguments override; unset ones are ``all`` and ``neuron``.
    scorer: baselines only — ``scorer(model, stats, seed) -> (scores, extra metadata)``, see :mod:`.baselines`.
    """

    name: str
    summary: str
    data: str
    prunable: tuple[str, ...] | None = None
    granularity: str = "neuron"
    scorer: Callable | None = None
    selection: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.data not in DATA or self.granularity not in ("neuron", "layer"):
            raise ValueError(f"method {self.name}: data must be one of {DATA}, granularity neuron or layer")


# Cus-Prun's default expert: whole MLP channels under the rank budget (the numbers in
# docs/expert-quality.md chose it; the paper's per-neuron selection is granularity="neuron", neurons="all").
CUSPRUN = Method("cusprun", "Cus-Prun's relevance scores with --measure block|local (default)", data="target",
                 selection=(("granularity", "unit"), ("neurons", "mlp")))
_REGISTRY: dict[str, Method] = {CUSPRUN.name: CUSPRUN}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """Every registered method, Cus-Prun's first."""
    return dict(_REGISTRY)


def method_of(metadata: dict) -> Method:
    """The method a score file's metadata names (files without ``method`` are Cus-Prun's)."""
    name = metadata.get("method", CUSPRUN.name)
    known = methods()
    if name not in known:
        raise ValueError(f"score file of unknown method {name!r} (known: {', '.join(known)})")
    return known[name]
