"""The build-time calibration pass against the local scoring pass, on the same documents in one run.

    python benchmarks/bench_calibration.py [--docs 40] [--tokens 128] [--ratio 0.25] [--repetitions 3]

On SmolLM2-135M (the default model) and the first ``--docs`` German calibration documents: the local-measure
scoring pass (``python -m cusprun.score``'s default), then ``prune``'s calibration pass for the default expert
at ``--ratio`` (:func:`cusprun.experts.calibration.refit_layers`, with the refit solves), independent and
sequential, each on a fresh copy of the model. The three alternate for ``--repetitions`` rounds; the table shows
each one's median seconds and its ratio to scoring. Rows are appended to benchmarks/results/bench_calibration.csv.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, environment, report  # noqa: E402

import cusprun  # noqa: E402
import cusprun_kernels  # noqa: E402
from cusprun.core.corpus import read_corpus, tokenize  # noqa: E402
from cusprun.core.errors import OneLineArgumentParser, run_cli  # noqa: E402
from cusprun.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from cusprun.engine.layer_major import Scorer  # noqa: E402
from cusprun.engine.sources import InMemoryLayers  # noqa: E402
from cusprun.experts.calibration import refit_layers  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "corpora" / "de.jsonl"


def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=40, help="calibration documents")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per document, at most")
    ap.add_argument("--ratio", type=float, default=0.25, help="the expert's ratio (which channels are refit)")
    ap.add_argument("--repetitions", type=int, default=3, help="rounds of the three passes")
    args = ap.parse_args(argv)
    at_least("--docs", args.docs, 1)
    at_least("--tokens", args.tokens, 2)
    at_least("--repetitions", args.repetitions, 1)
    model, tokenizer, _ = load_model(DEFAULT_MODEL, quiet=True)
    docs = [t for t in tokenize(read_corpus(DATA), tokenizer, args.tokens, model.config.vocab_size) if t][:args.docs]
    cusprun_kernels.set_quiet(True)
    plan = cusprun.score(model, docs, "local", progress=False).select(args.ratio).plan
    times = {"local scoring": [], "calibration, independent": [], "calibration, sequential": []}
    for _ in range(args.repetitions):
        start = time.perf_counter()
        Scorer(model, "local").score_documents(docs)
        times["local scoring"].append(time.perf_counter() - start)
        for mode in ("independent", "sequential"):
            fresh = copy.deepcopy(model)
            start = time.perf_counter()
            refit_layers(InMemoryLayers(fresh), plan, docs, mode, 0.1, "per-input")
            times[f"calibration, {mode}"].append(time.perf_counter() - start)
            del fresh
    base = statistics.median(times["local scoring"])
    rows = [[name, statistics.median(t), statistics.median(t) / base, "/".join(f"{x:.1f}" for x in t)]
            for name, t in times.items()]
    report("bench_calibration", ["pass", "median s", "x local scoring", "each round s"], rows,
           {**environment(), "model": DEFAULT_MODEL, "docs": str(len(docs)), "tokens": str(sum(map(len, docs))),
            "ratio": str(args.ratio)})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
