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


def save_model_dir(out: Path, model, tokenizer, report: dict, max_shard_size: str = "2GB") -> None:
    """config.json, model.safetensors (sharded when large), the tokenizer and pruning.json (and, for pruned
    architectures, their modeling code), all or nothing."""
    def fill(staging: Path) -> None:
        if model.config.model_type.startswith(PRUNED_PREFIX):
            ship_modeling_code(model, staging)
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "pruning.json").write_text(json.dumps(report, indent=2) + "\n")
    atomic_folder(out, fill)
