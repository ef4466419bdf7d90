"""``python -m cusprun.pipeline``: the main job, end to end, in one process (one model load); the work is
:mod:`cusprun.evaluation.main_job`'s.

score the calibration corpora (local measure) -> build each expert (the default selection: whole MLP
channels irrelevant to every dimension, down_proj refit over the kept channels on the Gram matrices of its own
corpora, made at build time, dense per-layer widths; also a GGUF file where llama-cpp-python is installed)
-> evaluate the dense model and every expert on held-out text of the target
dimensions and on general text -> a table (stdout), OUT/summary.json / OUT/summary.md, and each expert's
pictures (python -m cusprun.plot) in OUT/plots/EXPERT/.

Scoring resumes: a score file whose metadata matches the corpus, model and options is reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.errors import OneLineArgumentParser, run_cli
from .core.models import DEFAULT_MODEL
from .engine.layer_major import MEASURES
from .evaluation.main_job import DATA, DEFAULT_EVAL, DEFAULT_EXPERTS, MainJob, run_main_job


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m cusprun.pipeline", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", default=str(DATA), help="folder with corpora/NAME.jsonl and heldout/NAME.jsonl")
    p.add_argument("--expert", action="append", metavar="DIM[+DIM...]",
                   help=f"an expert as corpus names joined by '+' (default: {' and '.join(DEFAULT_EXPERTS)})")
    p.add_argument("--eval", action="append", metavar="NAME",
                   help=f"held-out texts to evaluate on (default: {', '.join(DEFAULT_EVAL)})")
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of projection parameters removed")
    p.add_argument("--docs", type=int, default=100,
                   help="calibration documents per corpus, at most (default 100: every document of the shipped "
                        "corpora, 100 German and 40 for the others; the compensated experts improved with every "
                        "step up to 100 in docs/experts.md, \"Calibration size\")")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per calibration document")
    p.add_argument("--eval-max-tokens", type=int, default=512)
    p.add_argument("--measure", choices=MEASURES, default="local",
                   help="local (default): one forward pass per corpus, enough for the default experts (whole MLP "
                        "channels score the same under both measures); block: every neuron's exact block score "
                        "(the paper's selection, the plots' q/k/v panels), about 25x slower on a CPU")
    p.add_argument("--no-compensate", action="store_true",
                   help="build the experts without refitting down_proj (no statistics are collected)")
    p.add_argument("--out", default="runs/main")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    job = MainJob(args.model, Path(args.data), args.expert or DEFAULT_EXPERTS, args.eval or DEFAULT_EVAL, args.ratio,
                  args.docs, args.max_tokens, args.eval_max_tokens, args.measure, not args.no_compensate,
                  Path(args.out), args.quiet)
    summary, table = run_main_job(job)
    print(table)
    print(f"\n{summary['seconds']:.0f} s; experts in {job.out / 'experts'}, summary in {job.out / 'summary.md'}, "
          f"plots in {job.out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
