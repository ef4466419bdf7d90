"""User-facing errors: one line, exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class CusprunError(Exception):
    """A problem with the user's input or environment, reported as one line."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line (exit 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command's ``main``; a :class:`CusprunError` becomes ``prog: error: ...`` and exit 2."""
    try:
        return main(argv)
    except CusprunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
