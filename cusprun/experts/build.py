"""Building an expert: score files -> selection (threshold, intersection) -> pruned model folder.

The library behind ``python -m cusprun.prune`` and the main job: :func:`load_score_sets` reads and checks
score files, :func:`check_against_model` matches them with the model, :func:`build_expert` selects at a
ratio, applies the plan in the asked format and writes the folder with its ``pruning.json``.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import CusprunError
from ..core.models import local_folder
from ..core.neurons import Geometry, config_hash
from ..core.version import __version__
from ..formats.apply import apply, held_params
from ..formats.folder import save_model_dir, source_record
from ..formats.gguf import tokenizer_source, write_gguf
from ..scores.methods import method_of, methods
from ..scores.scoreset import ScoreSet, intersect
from ..scores.stats import stats_path
from ..selection.algorithm import Selection
from ..selection.plan import kept_counts
from .calibration import DEFAULT_REFIT, Calibration, calibrate_in_memory, refit_record
from .compensate import DEFAULT_RIDGE, DEFAULT_RIDGE_SCALE, refit_widths, resolved_ridge_scale, thin_statistics_note
from .compensate import compensate as compensate_model


def check_ratio(ratio: float) -> None:
    """--ratio must be a fraction strictly between 0 and 1."""
    if not 0 < ratio < 1:
        raise CusprunError(f"--ratio {ratio}: must be strictly between 0 and 1")


def load_score_sets(paths: list[str], stats: bool = False) -> list[ScoreSet]:
    """Score files read (one line and exit 2 when missing or damaged), checked to share one measure; with
    ``stats``, their statistics files too where they exist (see :func:`check_stats`)."""
    sets = []
    for path in paths:
        if Path(path).is_dir():
            raise CusprunError(f"--scores {path} is a folder: give its score files (NAME.safetensors)")
        if not Path(path).is_file():
            raise CusprunError(f"score file not found: {path}")
        sets.append(ScoreSet.load(path, stats=stats))
    known = methods()
    for score_set, path in zip(sets, paths):
        if score_set.metadata.get("method", "cusprun") not in known:
            raise CusprunError(f"{path}: score file of unknown method {score_set.metadata['method']!r}")
    names = {str(s.metadata.get("method", "cusprun")) for s in sets}
    if len(names) > 1:
        raise CusprunError(f"score files mix methods ({', '.join(sorted(names))}): give score files of one method")
    measures = {s.metadata.get("measure") for s in sets}
    if len(measures) > 1:
        raise CusprunError(f"score files mix measures ({', '.join(sorted(map(str, measures)))}): score all corpora "
                           "with the same --measure")
    return sets


def check_against_model(sets: list[ScoreSet], paths, config) -> None:
    """Every score file was made on ``config``'s architecture and holds every tensor at its shape."""
    expected_hash, shapes = config_hash(config), Geometry(config).sizes()
    for score_set, path in zip(sets, paths):
        meta, tensors = score_set.metadata, score_set.scores
        if meta.get("config_hash") != expected_hash:
            raise CusprunError(f"{path} was scored on another model ({meta.get('model')}, config hash differs)")
        for name, n in shapes.items():
            if name not in tensors or tensors[name].dim() != 2 or tensors[name].shape[1] != n:
                raise CusprunError(f"{path}: tensor {name} missing or not [n_docs, {n}] (another model?)")


def check_stats(sets: list[ScoreSet], paths) -> None:
    """--compensate needs the statistics beside every score file: one line naming the first missing one."""
    for score_set, path in zip(sets, paths):
        method = score_set.metadata.get("method", "cusprun")
        if method != "cusprun":  # score --stats refuses baseline methods: there is nothing to advise
            raise CusprunError(f"--compensate needs Cus-Prun's calibration statistics; {path} holds {method} scores, "
                               "which have none (prune without --compensate)")
        if score_set.stats is None:
            raise CusprunError(f"--compensate needs {stats_path(path)}: score with python -m cusprun.score ... "
                               "--stats to write it")


def local_qk_note(sets: list[ScoreSet], selected: ExpertSelection) -> None:
    """One line on stderr when the selection ranks q/k rows (or RoPE pairs, query heads) by local scores:
    the norms of their own outputs, not what removing them changes in the attention block (score
    --measure block)."""
    if sets[0].metadata.get("measure") == "local" and selected.neurons != "mlp" and \
            method_of(sets[0].metadata).name == "cusprun":
        print(f"note: --neurons {selected.neurons} ranks attention rows by local scores (their own output norms); "
              "score with --measure block for the paper's ranking by their effect on the attention block",
              file=sys.stderr)


def _layer_norm_params(model) -> int:
    return sum(p.numel() for name, p in model.model.layers.named_parameters() if "layernorm" in name)


@dataclass(frozen=True)
class ExpertSelection:
    """What :func:`select_expert` chose: the selection, the settings it resolved (pruning.json's) and the
    intersection it chose from (whose token counts and statistics the refit uses)."""

    selection: Selection
    scores: ScoreSet
    neurons: str
    granularity: str
    align: int


def select_expert(sets: list[ScoreSet], config, ratio: float, format: str, rule: str = "all-docs",
                  neurons: str | None = None, granularity: str | None = None, budget: str = "rank",
                  drop_layers: int = 0, align: int | None = None) -> ExpertSelection:
    """The selection at ``ratio`` from the score files and the model's config alone, so a ratio the units
    cannot reach fails before any weights load (``ValueError`` naming the largest reachable ratio).
    ``neurons``/``granularity`` None: the scoring method's defaults (:meth:`ScoreSet.select`);
    ``drop_layers``: whole layers of lowest block influence removed first; ``align``: every layer's kept MLP
    channels a multiple of it (None: the default, :meth:`ScoreSet.resolved_align`)."""
    combined = intersect(*sets)
    neurons, granularity = combined.selection_settings(neurons, granularity, uniform=format == "stock")
    align = combined.resolved_align(align, config, format == "stock", granularity, neurons)
    sel = combined.select(ratio, config, uniform=format == "stock", rule=rule, neurons=neurons,
                          granularity=granularity, budget=budget, drop_layers=drop_layers, align=align)
    return ExpertSelection(sel, combined, neurons, granularity, align)


def expert_report(source, config, sets: list[ScoreSet], score_paths, selected: ExpertSelection, ratio: float,
                  format: str, rule: str, budget: str, drop_layers: int, refit: dict | bool) -> dict:
    """pruning.json's record of the settings an expert was built with (``source``: the model's
    :class:`~cusprun.core.models.ModelSource`, with what its config says of where it came from; ``refit``: the
    refit's settings, False without one); the counts of what the saved model holds are the caller's to add
    (:func:`saved_counts`)."""
    sel = selected.selection
    return {
        "cusprun_version": __version__, "model": source.model_id, "config_hash": config_hash(config),
        "source": {"path": source.path, "gguf_file": source.gguf_file, **source_record(config)},
        "format": format, "measure": sets[0].metadata.get("measure"), "rule": rule, "neurons": selected.neurons,
        "granularity": selected.granularity, "budget": budget, "compensate": bool(refit), "drop_layers": drop_layers,
        "align": selected.align, "dropped_layers": list(sel.dropped_layers), **(refit or {}),
        "ratio_asked": ratio, "sigma": sel.sigma,
        "corpora": [{"scores": str(p), "corpus": s.metadata.get("corpus"),
                     "corpus_sha256": s.metadata.get("corpus_sha256"), "n_docs": s.n_docs}
                    for p, s in zip(score_paths, sets)],
        "kept": kept_counts(sel.plan, Geometry(config)),
    }


def saved_counts(sel: Selection, format: str, dense_params: int, params: int, projection_params: int,
                 dropped_norms: int) -> dict:
    """pruning.json's counts: ``params`` and ``projection_params`` the saved model holds (:func:`held_params`) and
    the shares they leave out (``ratio_achieved_*``). Where the plan removes more than ``format`` can drop
    (zeros in the masked format; neurons inside kept units, as per-neuron plans remove, in the dense format),
    ``plan`` also gives the plan's counts: what the model would hold if every removed neuron were dropped."""
    total = sel.total_projection_params
    counts = {"ratio_achieved_projection": 1 - projection_params / total,
              "ratio_achieved_all": 1 - params / dense_params, "params_dense": dense_params, "params": params,
              "projection_params_dense": total, "projection_params": projection_params}
    if projection_params != sel.kept_projection_params:
        plan_params = dense_params - (total - sel.kept_projection_params) - dropped_norms
        counts["plan"] = {"note": f"the plan removes more than the {format} format drops (it keeps zeros)",
                          "ratio_achieved_projection": sel.removed_fraction,
                          "ratio_achieved_all": 1 - plan_params / dense_params, "params": plan_params,
                          "projection_params": sel.kept_projection_params}
    return counts


def build_expert(model, tokenizer, source, sets: list[ScoreSet], score_paths, ratio: float, format: str,
                 out: Path, rule: str = "all-docs", neurons: str | None = None, granularity: str | None = None,
                 budget: str = "rank", compensate: bool = False, ridge: float = DEFAULT_RIDGE,
                 ridge_scale: str = DEFAULT_RIDGE_SCALE, drop_layers: int = 0, align: int | None = None,
                 selected: ExpertSelection | None = None, calibration: Calibration | None = None,
                 refit: str = DEFAULT_REFIT, in_place: bool = False, quiet: bool = True) -> dict:
    """Select at ``ratio`` (:func:`select_expert`, with these settings), apply, and save the expert to ``out``
    with its pruning.json (which records the resolved settings); returns the report. ``compensate``: refit
    o_proj and down_proj over the kept columns first (:mod:`cusprun.experts.compensate`, with ``ridge`` and
    ``ridge_scale``, ``auto`` resolved from the sets' token counts; needs the sets' stats). ``selected``:
    :func:`select_expert`'s result for these same arguments, where the caller made it before loading the
    weights (``prune`` does). ``calibration``: the refit's Gram matrices are made from these documents, layer by
    layer (:mod:`cusprun.experts.calibration`, ``refit`` independent or sequential), instead of read from the
    sets' statistics files. ``in_place``: the refit changes ``model``'s weights (no copy of the model: ``prune``,
    which loaded it for this expert alone); else it refits a copy."""
    geo = Geometry(model.config)
    dense_params = sum(p.numel() for p in model.parameters())
    if selected is None:
        selected = select_expert(sets, model.config, ratio, format, rule, neurons, granularity, budget,
                                 drop_layers, align)
    sel, combined = selected.selection, selected.scores
    if compensate:
        widths = refit_widths(sel, geo.layers)
        if calibration is None:
            check_stats(sets, score_paths)
            tokens = sum(combined.metadata.get("token_counts", []))
        else:
            tokens = calibration.tokens
        ridge_scale = resolved_ridge_scale(ridge_scale, tokens, widths)  # pruning.json records the rule used
        if not in_place:
            model = copy.deepcopy(model)
        if calibration is None:
            compensate_model(model, sel, combined.stats, ridge, ridge_scale, copy=False)
        else:
            calibrate_in_memory(model, sel, calibration, refit, ridge, ridge_scale, quiet)
        note = thin_statistics_note(tokens, widths)
        if note:  # after the refit, so statistics it refuses give their one-line error alone
            print(note, file=sys.stderr)
    pruned = apply(model, sel, "dense" if format == "gguf" else format)  # a GGUF holds the dense expert
    # the dense format also drops the norm in front of a block it skips
    dropped_norms = _layer_norm_params(model) - _layer_norm_params(pruned) if format in ("dense", "gguf") else 0
    params, projection_params = held_params(pruned)  # what the saved model holds
    report = expert_report(source, model.config, sets, score_paths, selected, ratio, format, rule, budget,
                           drop_layers, compensate and {"ridge": ridge, "ridge_scale": ridge_scale,
                                                        **refit_record(calibration, refit)})
    report.update(saved_counts(sel, format, dense_params, params, projection_params, dropped_norms))
    if format == "stock":
        report["stock"] = {"intermediate_size": pruned.config.intermediate_size,
                           "num_key_value_heads": pruned.config.num_key_value_heads,
                           "num_attention_heads": pruned.config.num_attention_heads,
                           "share_of_asked": sel.removed_fraction / ratio}
    if format == "gguf":
        gguf_type = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[model.dtype]
        write_gguf(pruned, out, tokenizer_source(source, local_folder(source)), gguf_type,
                   name=f"{Path(source.model_id).name} expert", report=report)
    else:
        save_model_dir(out, pruned, tokenizer, report)
    return report
