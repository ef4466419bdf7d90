"""Streamed prune (``prune --stream``): an expert built one decoder layer at a time from the model's files.

The model is never loaded whole. :class:`~cusprun.engine.sources.StreamedLayers` reads decoder layer l from the
safetensors shards or the GGUF file (dequantized tensor by tensor); the calibration pass
(:func:`cusprun.experts.calibration.refit_layers`) refits it; its dense-format tensors
(:func:`cusprun.formats.dense.dense_layer`) are written as one safetensors shard of the expert; only then is the
next layer read. Peak memory: one layer's weights, the calibration documents' hidden states (spilled to disk past the
budget, as the scoring engine does) and one layer's refit (K² + K·out floats for an output projection keeping K of
its inputs). The embedding, final norm and head are copied tensor by tensor. Everything goes into the staging folder
of :func:`cusprun.core.files.atomic_folder`, renamed into place at the end, as every model folder is written. The
saved tensors are byte for byte those of the in-memory prune of the same model and flags (tested): both refit
through the same layer-major pass and cut with the same per-layer code.

Only the dense format (the default) is written this way; the others build the whole model in memory. A GGUF
source gives a safetensors expert, as the in-memory prune of it does (``--format gguf`` writes a GGUF file,
in memory).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.errors import CusprunError
from ..core.files import atomic_folder
from ..core.models import DTYPES
from ..core.neurons import Geometry
from ..engine.sources import StreamedLayers, TensorFiles, loaded_bytes, open_tensors
from ..formats.apply import held_params
from ..formats.dense import dense_config, dense_layer, masked_tensors
from ..formats.modeling_cusprun import DENSE
from ..selection.plan import propagate
from .build import expert_report, saved_counts
from .calibration import Calibration, calibration_bar, refit_layers, refit_record

STREAMABLE_FORMATS = ("dense",)


def streamed_tensors(source, config, fmt: str) -> TensorFiles:
    """The tensors a streamed prune reads (safetensors shards or a GGUF file), after the checks that it can: one
    line otherwise."""
    if fmt not in STREAMABLE_FORMATS:
        raise CusprunError(f"--format {fmt} cannot be streamed (it builds the whole model in memory): stream "
                           f"--format {' or '.join(STREAMABLE_FORMATS)}")
    return open_tensors(source, config)


def should_stream(source, stream: bool, budget: int, dtype: str) -> bool:
    """Stream when asked, or when loading the model at ``dtype`` takes more than ``budget`` bytes (as ``score``
    decides: :func:`cusprun.engine.sources.loaded_bytes`)."""
    return stream or loaded_bytes(source, DTYPES[dtype]) > budget


def dense_parameters(config) -> int:
    """The parameter count of ``config``'s model (tied tensors once), from a skeleton on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in skeleton.parameters())


def expert_bytes(config, selection, dtype: str) -> int:
    """What the expert's weights take on disk, about: the dense model's parameters less the removed projection
    parameters, at ``dtype``'s element size."""
    kept = dense_parameters(config) - (selection.total_projection_params - selection.kept_projection_params)
    return kept * DTYPES[dtype].itemsize


def check_free_space(out: Path, need: int) -> None:
    """One line when the file system of ``out`` has less than ``need`` bytes free (the expert is written beside
    ``out`` before it is renamed into place)."""
    free = shutil.disk_usage(out.parent if not out.exists() else out).free
    if free < need:
        raise CusprunError(f"not enough disk for the expert: {_size(need)} needed, {_size(free)} free on the file "
                           f"system of {out}")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def stream_expert(config, tensors: TensorFiles, selection, out: Path, dtype: str, tokenizer, report: dict,
                  calibration: Calibration | None = None, refit: str = "independent", ridge: float = 0.1,
                  ridge_scale: str = "per-input", quiet: bool = False) -> dict:
    """Write the dense-format expert of ``selection`` (a :class:`~cusprun.selection.algorithm.Selection`)
    to ``out``, reading ``config``'s model from ``tensors`` (:func:`streamed_tensors`) one decoder layer at a time
    (module docstring); with ``calibration``, refit as :func:`cusprun.experts.calibration.refit_layers` does
    (``refit``, ``ridge``, ``ridge_scale`` resolved). ``report``: pruning.json, completed here with the
    parameter counts. Returns the report."""
    torch_dtype = DTYPES[dtype]
    geo = Geometry(config)
    plan = propagate(selection.plan, geo)
    source = StreamedLayers(tensors, config, torch_dtype, "cpu")
    skeleton_cls = DENSE[config.model_type][1]

    def fill(staging: Path) -> None:
        weight_map, per_layer, kept_layers, total = {}, {}, [], 0

        def write(name: str, state: dict[str, torch.Tensor]) -> None:
            nonlocal total
            save_file(state, str(staging / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(state, name))
            total += sum(t.numel() * t.element_size() for t in state.values())

        def on_layer(index: int, layer: torch.nn.Module) -> None:
            prefix = f"model.layers.{index}."
            zeroed = masked_tensors({prefix + n: t for n, t in layer.state_dict().items()}, plan)
            kept = dense_layer(zeroed, plan, geo, index, len(kept_layers))
            if kept is None:
                return
            write(f"model-layer-{index:05d}.safetensors", {n: t.contiguous().clone() for n, t in kept[0].items()})
            per_layer[len(kept_layers)] = kept[1]
            kept_layers.append(index)

        if calibration is not None:
            with calibration_bar(calibration, geo.layers, quiet) as step:
                refit_layers(source, selection.plan, calibration.documents, refit, ridge, ridge_scale,
                             on_layer=on_layer, on_document=step)
        else:
            for index in range(geo.layers):
                on_layer(index, source.layer(index))
                source.release(index)
        rest = ["model.embed_tokens.weight", "model.norm.weight"]
        if not config.tie_word_embeddings:
            rest.append("lm_head.weight")
        write("model-rest.safetensors", tensors.read(rest, torch_dtype))
        expert_config = dense_config(config, per_layer, kept_layers)
        with torch.device("meta"):
            skeleton = skeleton_cls(expert_config)
        from ..formats.folder import ship_modeling_code

        ship_modeling_code(skeleton, staging)
        skeleton.config.dtype = torch_dtype
        skeleton.config.save_pretrained(staging)
        if skeleton.can_generate():
            skeleton.generation_config.save_pretrained(staging)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        hidden = config.hidden_size  # a skipped block's norm goes with it (as formats.dense drops it)
        dropped_norms = hidden * (2 * (geo.layers - len(kept_layers))
                                  + sum(len(p["skip"]) for p in per_layer.values()))
        params, projection_params = held_params(skeleton)  # shapes only: the skeleton is on the meta device
        report.update(saved_counts(selection, "dense", dense_parameters(config), params, projection_params,
                                   dropped_norms))
        report["streamed"] = True
        (staging / "pruning.json").write_text(json.dumps(report, indent=2) + "\n")

    atomic_folder(out, fill)
    return report


def stream_build(config, tokenizer, source, tensors: TensorFiles, sets, score_paths, selected, ratio: float, out: Path,
                 dtype: str, rule: str, budget: str, drop_layers: int, calibration: Calibration | None, refit: str,
                 ridge: float, ridge_scale: str, quiet: bool = False) -> dict:
    """``prune --stream``: the dense expert of ``selected`` (:class:`~cusprun.experts.build.ExpertSelection`),
    refit from ``calibration`` where given, written by :func:`stream_expert`; returns pruning.json's report,
    the same as :func:`cusprun.experts.build.build_expert` writes for the in-memory prune, plus ``streamed``."""
    import sys

    from .compensate import refit_widths, resolved_ridge_scale, thin_statistics_note

    sel = selected.selection
    settings = False
    if calibration is not None:
        widths = refit_widths(sel, config.num_hidden_layers)
        ridge_scale = resolved_ridge_scale(ridge_scale, calibration.tokens, widths)
        settings = {"ridge": ridge, "ridge_scale": ridge_scale, **refit_record(calibration, refit)}
    report = expert_report(source, config, sets, score_paths, selected, ratio, "dense", rule, budget,
                           drop_layers, settings)
    report = stream_expert(config, tensors, sel, out, dtype, tokenizer, report, calibration, refit, ridge, ridge_scale,
                           quiet)
    note = calibration is not None and thin_statistics_note(calibration.tokens, widths)
    if note:
        print(note, file=sys.stderr)
    return report
