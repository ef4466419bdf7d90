"""``python -m cusprun.plot``: pictures of an expert and of the scores behind it (the command; the pictures
are :mod:`cusprun.evaluation.figures`').

* ``kept.png`` — kept fraction of each projection's parameters, per layer (heatmap);
* ``overlap.png`` — how the dimensions' irrelevant sets overlap at the expert's σ: neurons per exact
  combination of dimensions, and per layer the share irrelevant to each dimension and to all;
* ``distributions.png`` — per-document score distributions of one layer's projections, by corpus.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.errors import CusprunError, OneLineArgumentParser, run_cli
from .evaluation.figures import load_sets, write_plots


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m cusprun.plot", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", action="append", required=True, metavar="FILE",
                   help="a score file (repeat: one per dimension, as given to cusprun.prune)")
    p.add_argument("--expert", metavar="DIR", help="an expert folder from cusprun.prune: plot its plan and σ "
                   "(default: select at --ratio from the score files)")
    p.add_argument("--ratio", type=float, default=0.25, help="ratio to select at when no --expert is given")
    p.add_argument("--layer", type=int, help="layer of the score distributions (default: the middle one)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.expert is None and not 0 < args.ratio < 1:
        raise CusprunError(f"--ratio {args.ratio}: must be strictly between 0 and 1")
    sets = load_sets(args.scores)
    for path in write_plots(sets, Path(args.out), args.ratio, args.expert, args.layer):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
