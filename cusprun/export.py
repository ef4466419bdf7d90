"""Write a pruned model folder atomically: build it beside OUT, then rename it into place."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .errors import CusprunError


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CusprunError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=out.parent).cleanup()
    except OSError as exc:
        raise CusprunError(f"--out {out}: parent folder not writable ({exc.strerror})") from None
    return out


def save_model_dir(out: Path, model, tokenizer, report: dict, max_shard_size: str = "2GB") -> None:
    """config.json, model.safetensors (sharded when large), the tokenizer and pruning.json, all or nothing."""
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "pruning.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
