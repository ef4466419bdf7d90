"""Write a pruned model folder atomically: build it beside OUT, then rename it into place."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..core.architectures import PRUNED_PREFIX
from ..core.errors import CusprunError
from ..core.files import atomic_folder


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:  # --overwrite would replace the folder we are in
        raise CusprunError(f"--out {out}: the current folder or one above it; name a new folder for the model")
    if out.exists() and not out.is_dir():
        raise CusprunError(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CusprunError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=out.parent).cleanup()
    except OSError as exc:
        raise CusprunError(f"--out {out}: parent folder not writable ({exc.strerror})") from None
    return out


def ship_modeling_code(model, folder: Path) -> None:
    """Sliced models: put modeling_cusprun.py (torch + transformers only) beside the weights and name its
    classes in ``auto_map``, so ``from_pretrained(folder, trust_remote_code=True)`` needs no cusprun."""
    from . import modeling_cusprun

    shutil.copyfile(modeling_cusprun.__file__, folder / "modeling_cusprun.py")
    model.config.auto_map = {"AutoConfig": f"modeling_cusprun.{type(model.config).__name__}",
                             "AutoModelForCausalLM": f"modeling_cusprun.{type(model).__name__}"}


# Config entries a model inherits from its source that are false of the expert written from it: transformers
# records a GGUF source's quantization (the expert's tensors are plain floats, and that file is not in the
# folder) and the source's own name. pruning.json records the source instead.
INHERITED_FROM_SOURCE = ("quantization_config", "_model_name_or_path")


def source_record(config) -> dict:
    """What the source's config says about where it came from (for pruning.json), before :func:`save_model_dir`
    strips it from the expert's config."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    if quantization is not None and quantization.get("quant_method") == "gguf":
        # transformers' marker of a GGUF file it loaded: the record's gguf_file says so, and a streamed prune,
        # which reads the file without transformers' loader, records the same source the same way
        quantization = None
    return {"name": getattr(config, "_model_name_or_path", None), "quantization_config": quantization}


def drop_inherited(model) -> None:
    """Strip what :data:`INHERITED_FROM_SOURCE` names from ``model``'s config, and the quantizer transformers
    attached for a quantized source (the weights were dequantized when it loaded)."""
    for key in INHERITED_FROM_SOURCE:
        if key in model.config.__dict__:
            delattr(model.config, key)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False


def save_model_dir(out: Path, model, tokenizer, report: dict, max_shard_size: str = "2GB") -> None:
    """config.json, model.safetensors (sharded when large), the tokenizer and pruning.json (and, for pruned
    architectures, their modeling code), all or nothing. The config keeps nothing inherited that is false of
    the expert (:data:`INHERITED_FROM_SOURCE`)."""
    drop_inherited(model)

    def fill(staging: Path) -> None:
        if model.config.model_type.startswith(PRUNED_PREFIX):
            ship_modeling_code(model, staging)
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "pruning.json").write_text(json.dumps(report, indent=2) + "\n")
    atomic_folder(out, fill)
