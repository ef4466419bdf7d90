"""The kernels' small persistent JSON caches (variant timings, backend verdicts), written atomically.

They live in ``CUSPRUN_CACHE_DIR`` (default ``~/.cache/cusprun``); deleting a file makes the next run
measure or verify again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("CUSPRUN_CACHE_DIR") or Path.home() / ".cache" / "cusprun")


def load(path: Path) -> dict:
    """The table in ``path``; empty when missing or damaged (it is then rebuilt)."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def store(path: Path, key: str, entry: dict) -> None:
    """Merge one entry into the table in ``path``, written atomically (never half-written)."""
    from cusprun.core.files import atomic_write  # the package's one atomic writer (imported late: no cycle)

    path.parent.mkdir(parents=True, exist_ok=True)
    table = {**load(path), key: entry}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(table, indent=1, sort_keys=True)))
