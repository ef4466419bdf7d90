"""Shared by the benchmark scripts: a count check for their arguments, environment description, a printed table, an
appended CSV row."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

from cusprun.errors import CusprunError

RESULTS = Path(__file__).resolve().parent / "results"


def at_least(flag: str, value: int | None, least: int) -> None:
    """A one-line error (exit 2 through ``run_cli``) when ``value`` (None: not given) is below ``least``."""
    if value is not None and value < least:
        raise CusprunError(f"{flag} {value}: must be {least} or more")


def environment() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device, "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"), "commit": commit or "unknown",
    }


def report(name: str, columns: list[str], rows: list[list], env: dict[str, str], append: bool = True) -> None:
    """Print a table headed by the environment and (``append``) add its rows to benchmarks/results/NAME.csv."""
    print(" | ".join(f"{k}={v}" for k, v in env.items()))
    widths = [max(len(str(c)), *(len(_fmt(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(str(c).rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(v).rjust(w) for v, w in zip(r, widths)))
    if not append:
        return
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow([*env, *columns])
        for r in rows:
            writer.writerow([*env.values(), *(_fmt(v) for v in r)])


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
