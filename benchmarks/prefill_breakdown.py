"""Where a prefill's time goes, dense model against channel experts: why measured speed-ups fall short of the
FLOP ideal, and how far they could go.

    python benchmarks/prefill_breakdown.py [--ratios 0.25,0.45] [--experts de,de+medical] [--align 1,16]
                                           [--quick]

The experts are expert_quality.py's cusprun-channels (the compensated ones have the same shapes, so the same
speed), built from its score cache (scored first where the cache lacks them), each layer's channels as
selected or rounded to a multiple of each ``--align`` (ScoreSet.select's align). For the dense model and each
expert, on the same 512-token document:

- the prefill speed-up against the dense model (cusprun.evaluation.evaluate.paired_prefill) and the ideal speed-up from
  the FLOP count (expert_quality.prefill_flops), as in expert_quality.py;
- a torch.profiler split of one prefill's operator time into GEMMs (aten::mm, addmm, bmm), fused attention
  (scaled_dot_product_*) and everything else (norms, RoPE, activations, adds, copies);
- attention's share of the dense model's FLOPs beside its share of the time;
- the GEMMs' speed-up against the drop in linear FLOPs (1.00: the narrower GEMMs run as fast per FLOP);
- the ceiling: measured / ideal had the GEMMs shrunk exactly with their FLOPs while attention and the rest
  took the time they took. A channel expert keeps attention whole, so where attention runs at a lower FLOP
  rate than the GEMMs this ceiling sits below 1 and falls with the ratio.

Prints the table and appends it to benchmarks/results/prefill_breakdown.csv (with --quick, a tiny setting
for CI, nothing is appended).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# before torch loads: the profiler's backend (Kineto) would print two log lines per profiled forward
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402
from torch.profiler import profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, environment, report  # noqa: E402
from expert_quality import (  # noqa: E402
    CACHE,
    FULL,
    QUICK,
    TARGETED,
    Bench,
    linear_flops,
    parse_experts,
    parse_ratios,
    prefill_flops,
)

import cusprun  # noqa: E402
from cusprun.core.errors import CusprunError, OneLineArgumentParser, run_cli  # noqa: E402
from cusprun.evaluation.evaluate import paired_prefill  # noqa: E402

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
PROFILED_ROUNDS = 5
SHARES = ("gemm", "attention", "other", "outside")  # time_split's parts


@torch.inference_mode()
def time_split(model, ids: list[int]) -> dict[str, float]:
    """Seconds of one prefill of ``ids``: in GEMMs, in fused attention, in the other operators (self CPU time
    under torch.profiler), and outside operators (an unprofiled forward's wall time minus the operators':
    Python, module calls, mask building)."""
    x = torch.tensor([ids])
    start = time.perf_counter()
    model(input_ids=x, use_cache=False)
    wall = time.perf_counter() - start
    with profile() as prof:
        model(input_ids=x, use_cache=False)
    split = dict.fromkeys(SHARES, 0.0)
    for event in prof.key_averages():
        kind = ("gemm" if event.key in GEMM_OPS else "attention" if "scaled_dot_product" in event.key else "other")
        split[kind] += event.self_cpu_time_total / 1e6
    split["outside"] = max(wall - sum(split.values()), 0.0)
    return split


def paired_splits(model, reference, ids: list[int], rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """(model's, reference's) median time_split over ``rounds`` rounds, the reference profiled right before the
    model in each (as paired_prefill times them, so the machine's drift cancels), after one untimed forward each."""
    with torch.inference_mode():
        for m in (reference, model):
            m(input_ids=torch.tensor([ids]), use_cache=False)
    pairs = [(time_split(reference, ids), time_split(model, ids)) for _ in range(rounds)]
    return tuple({k: statistics.median(p[i][k] for p in pairs) for k in SHARES} for i in (1, 0))


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.25,0.35,0.45", help="comma-separated ratios (default: 0.25,0.35,0.45)")
    ap.add_argument("--experts", default="de", help="comma-separated experts (default: de)")
    ap.add_argument("--cache", default=str(CACHE), help=f"expert_quality.py's score cache (default: {CACHE})")
    ap.add_argument("--align", default="1", help="comma-separated channel alignments to compare, each a row "
                                                 "(ScoreSet.select's align; default: 1, as selected)")
    ap.add_argument("--repetitions", type=int, help="paired prefill repetitions (default: expert_quality.py's)")
    ap.add_argument("--quick", action="store_true", help="tiny settings for CI; nothing is appended to the CSV")
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL
    ratios = parse_ratios(args.ratios)
    experts = parse_experts(args.experts, sorted({d for e in settings.experts for d in e}))
    try:
        aligns = [int(a) for a in args.align.split(",")]
    except ValueError:
        raise CusprunError(f"--align {args.align!r}: expected comma-separated whole numbers such as 1,16,64") from None
    if not all(a >= 1 for a in aligns):
        raise CusprunError(f"--align {args.align!r}: every alignment must be 1 or more")
    at_least("--repetitions", args.repetitions, 1)
    repetitions = args.repetitions or settings.repetitions
    bench = Bench(settings, True, Path(args.cache))
    dense, ids, tokens = bench.model, bench.speed_docs[0], settings.speed_tokens
    dense_flops, dense_linear = prefill_flops(dense, tokens), linear_flops(dense, tokens)
    attention_flop_share = (dense_flops - dense_linear) / dense_flops
    rows, dense_splits = [], []
    for dims in experts:
        scores = bench.expert_scores("cusprun", dims)
        for ratio, align in ((r, a) for r in ratios for a in aligns):
            try:
                plan = scores.select(ratio, **TARGETED["cusprun-channels"], align=align)
            except ValueError as exc:  # a ratio channels alone cannot reach, an alignment wider than the MLP
                raise CusprunError(str(exc)) from None
            model = cusprun.apply(dense, plan, format="dense")
            _, speedup = paired_prefill(model, bench.speed_docs, repetitions, dense)
            ideal = dense_flops / prefill_flops(model, tokens)
            split, dense_split = paired_splits(model, dense, ids, PROFILED_ROUNDS)
            dense_splits.append(dense_split)
            total, dense_time = sum(split.values()), sum(dense_split.values())
            linear_drop = dense_linear / linear_flops(model, tokens)
            gemm_efficiency = dense_split["gemm"] / split["gemm"] / linear_drop
            ceiling = dense_time / (total - split["gemm"] + dense_split["gemm"] / linear_drop) / ideal
            rows.append(["cusprun-channels", "+".join(dims), f"{ratio:.0%}", align, ideal, speedup, speedup / ideal,
                         dense_time / total / ideal, *(split[k] / total for k in SHARES), gemm_efficiency, ceiling])
            del model
    dense_split = {k: statistics.median(s[k] for s in dense_splits) for k in SHARES}
    dense_time = sum(dense_split.values())
    shares = [dense_split[k] / dense_time for k in SHARES]
    rows.insert(0, ["dense", "-", "0%", "-", 1.0, 1.0, 1.0, 1.0, *shares, 1.0, 1.0])
    columns = ["method", "expert", "ratio", "align", "ideal", "speed-up", "measured/ideal", "profiled/ideal",
               *(f"{k} share" for k in SHARES), "GEMM speed-up/linear FLOP drop", "ceiling/ideal"]
    env = {**environment(), "tokens": str(tokens), "repetitions": str(repetitions),
           "dense_prefill_ms": f"{dense_time * 1e3:.0f}",
           "dense_attention_flop_share": f"{attention_flop_share:.3f}"}
    report("prefill_breakdown", columns, rows, env, append=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
