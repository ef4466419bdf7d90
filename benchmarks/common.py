"""Shared by the benchmark scripts: a count check for their arguments, environment description, a printed table,
appended CSV rows."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

from cusprun.core.errors import CusprunError
from cusprun.core.files import atomic_write

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


def append_records(path: Path, records: list[dict]) -> None:
    """Add ``records`` (one dict per row, each naming its run's date, device, versions and commit) to the CSV at
    ``path`` after the rows of earlier runs, rewritten atomically. A column that only some runs have stays
    empty in the others' rows, so a run that adds a column keeps the history readable by one DictReader."""
    try:
        with open(path, newline="") as fh:
            earlier = list(csv.DictReader(fh))
    except FileNotFoundError:
        earlier = []
    columns = list(dict.fromkeys(k for r in [*earlier, *records] for k in r))

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, columns, restval="")
            writer.writeheader()
            writer.writerows([*earlier, *records])
    atomic_write(path, write)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
