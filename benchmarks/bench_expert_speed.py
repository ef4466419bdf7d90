"""Prefill and decode speed of dense experts at a large model's shapes, against the dense model and the FLOP
ideal, measured side by side in one run.

    python benchmarks/bench_expert_speed.py [--width 4096] [--layers 32] [--ratios 0.25,0.35,0.45]
                                            [--tokens 512] [--docs 8] [--batch 1] [--repetitions 10]
                                            [--logits all|last] [--decode-tokens 32] [--dtype bfloat16]
                                            [--device cuda] [--quick]

expert_quality.py times SmolLM2-135M's experts on the CPU; on a GPU that model is launch-bound, and a user's
8B model is not. A dense expert's speed depends only on its shapes (every kept matrix is dense), so this
script builds a randomly initialized Llama with Llama-3-8B's geometry (bench_score.random_llama: hidden
4096, intermediate 14336, 32 query and 8 k/v heads of 128, vocabulary 128,256; ``--width`` scales it), and
from it, through the same export as every expert (``cusprun.formats.dense.dense``), one expert per shape and ratio
(the ratio: the share of projection parameters removed, as in expert_quality.py):

- ``channels``: MLP channels only, attention whole, every layer losing its own share (a seeded profile
  between 0.5x and 1.5x the mean) in multiples of 64: the shape of the default expert (rank budget,
  ``--align 64``);
- ``channels-uniform``: the same number of channels in every layer;
- ``heads+channels``: the ratio's attention share as whole query heads, spread over the k/v groups (the
  shape of ``--neurons all``), the rest as channels;
- ``layers+channels``: a third of the ratio as whole decoder layers, evenly spaced, the rest as channels
  (``--drop-layers``, the paper's section 4.5 hybrid).

For each: prefill tokens/s over ``--docs`` documents of ``--tokens`` random token ids, ``--batch`` per
forward (cusprun.evaluation.evaluate.paired_prefill: the dense model timed right before the expert in every repetition,
the median of the paired ratios), with the logits of every token (``--logits all``, as perplexity and
expert_quality.py take them) or of the last one only (``last``: a generation's prefill); the ideal speed-up
from the FLOP count (expert_quality.prefill_flops: projections, lm_head for the tokens whose logits are
taken, attention), measured / ideal, and greedy decode tokens/s with the KV cache after a ``--tokens``
prompt (median of 3; Hugging Face's generate loop, so launch-bound on a GPU at batch 1). lm_head is a fixed
cost the experts keep: for Llama-3-8B at 25 / 35 / 45% the ideal is 1.30 / 1.48 / 1.71x with every token's
logits and 1.33 / 1.53 / 1.80x with the last one's. Prints the table and appends it to
benchmarks/results/bench_expert_speed.csv (not with ``--quick``, a tiny setting for the tests).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score import random_llama  # noqa: E402
from common import at_least, environment, report  # noqa: E402
from expert_quality import parse_ratios, prefill_flops  # noqa: E402

from cusprun.core.errors import CusprunError, OneLineArgumentParser, run_cli  # noqa: E402
from cusprun.core.neurons import Geometry, tensor_name  # noqa: E402
from cusprun.engine.score_corpora import check_device  # noqa: E402
from cusprun.evaluation.evaluate import decode_tokens_per_s, paired_prefill  # noqa: E402
from cusprun.formats.dense import dense  # noqa: E402
from cusprun.selection.plan import kept_params, propagate  # noqa: E402

SHAPES = ("channels", "channels-uniform", "heads+channels", "layers+channels")
ALIGN = 64  # the default expert's channel alignment
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def spread(total: int, weights: list[float], caps: list[int], unit: int) -> list[int]:
    """``total`` split over layers in proportion to ``weights``, in multiples of ``unit``, layer i at most
    ``caps[i]``: whole units first by the floor of each share, the rest one unit at a time to the layers with
    the largest remainders (as close to ``total`` as whole units and the caps allow)."""
    units = total // unit
    share = [units * w / sum(weights) for w in weights]
    out = [min(int(s), c // unit) for s, c in zip(share, caps)]
    order = sorted(range(len(out)), key=lambda i: share[i] - int(share[i]), reverse=True)
    while sum(out) < units and any(out[i] < caps[i] // unit for i in order):
        for i in order:
            if sum(out) < units and out[i] < caps[i] // unit:
                out[i] += 1
    return [n * unit for n in out]


def expert_plan(geo: Geometry, shape: str, ratio: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A plan removing ``ratio`` of the projection parameters (to within one 64-channel unit) in ``shape``.
    Which channels or heads go does not matter for speed; the first ones of each layer do."""
    plan = geo.full_plan()
    per_channel = 3 * geo.hidden  # its gate row, up row and down column
    layers = list(range(geo.layers))
    if shape == "layers+channels":
        n = max(1, round(ratio / 3 * geo.layers))
        dropped = sorted({int((i + 0.5) * geo.layers / n) for i in range(n)})
        for layer in dropped:
            for name in plan:
                if name.startswith(f"model.layers.{layer}."):
                    plan[name][:] = False
        layers = [layer for layer in layers if layer not in dropped]
    if shape == "heads+channels":
        attention = sum(o * i for p, (o, i) in geo.shape.items() if p.startswith("self_attn"))
        per_head = 2 * geo.hidden * geo.hd  # its q rows and o columns
        heads = min(geo.heads - 1, round(ratio * attention / per_head))
        for layer in layers:
            o_cols = plan[tensor_name(layer, "self_attn.o_proj", "cols")].view(geo.kv, geo.rep, geo.hd)
            for h in range(heads):  # round-robin over the k/v groups: group h % kv loses its next head
                o_cols[h % geo.kv, h // geo.kv] = False
    # what the layers or heads removed comes off the ratio; channels take the rest
    budget = ratio * geo.projection_params() - (geo.projection_params() - kept_params(propagate(plan, geo), geo))
    if shape == "channels":
        gen = torch.Generator().manual_seed(seed)
        weights = (0.5 + torch.rand(len(layers), generator=gen)).tolist()
    else:
        weights = [1.0] * len(layers)
    removed = spread(max(0, round(budget / per_channel)), weights, [geo.inter] * len(layers), ALIGN)
    for layer, n in zip(layers, removed):
        for proj, side in (("mlp.gate_proj", "rows"), ("mlp.up_proj", "rows"), ("mlp.down_proj", "cols")):
            plan[tensor_name(layer, proj, side)][:n] = False
    return propagate(plan, geo)


def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=4096, help="hidden size (4096: Llama-3-8B)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-3-8B)")
    ap.add_argument("--ratios", default="0.25,0.35,0.45", help="shares of the projection parameters removed")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"expert shapes, of {', '.join(SHAPES)}")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per document (and decode prompt)")
    ap.add_argument("--docs", type=int, default=8, help="documents per timed prefill")
    ap.add_argument("--batch", type=int, default=1, help="documents per forward (1: one request's prefill)")
    ap.add_argument("--repetitions", type=int, default=10, help="paired prefill repetitions (median)")
    ap.add_argument("--logits", choices=("all", "last"), default="all", help="the prefill's logits: every "
                    "token's (as perplexity takes them) or the last one's (a generation's prefill)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens timed per decode (0: skip)")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a tiny setting that runs every path; no CSV row")
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.tokens, args.docs, args.repetitions = 512, 3, 32, 2, 2
        args.decode_tokens = min(args.decode_tokens, 4)
    ratios = parse_ratios(args.ratios)
    unknown = sorted(set(args.shapes) - set(SHAPES))
    if unknown:
        raise CusprunError(f"--shapes {' '.join(unknown)}: unknown (known: {', '.join(SHAPES)})")
    for flag, value, least in (("--width", args.width, 128), ("--layers", args.layers, 1),
                               ("--tokens", args.tokens, 2), ("--docs", args.docs, 1), ("--batch", args.batch, 1),
                               ("--repetitions", args.repetitions, 1), ("--decode-tokens", args.decode_tokens, 0)):
        at_least(flag, value, least)
    if args.width % 512:
        raise CusprunError(f"--width {args.width}: must be a multiple of 512 (heads of 128, 4 per k/v head)")
    check_device(args.device)

    model = random_llama(args.width, args.layers, args.device).to(DTYPES[args.dtype])
    geo = Geometry(model.config)
    gen = torch.Generator().manual_seed(0)
    docs = torch.randint(0, model.config.vocab_size, (args.docs, args.tokens), generator=gen).tolist()
    keep = 1 if args.logits == "last" else 0

    def flops(m) -> int:  # per document; lm_head for the tokens whose logits are taken
        skipped = 0 if keep == 0 else (args.tokens - keep) * 2 * int(m.lm_head.weight.count_nonzero())
        return prefill_flops(m, args.tokens) - skipped
    base_flops = flops(model)
    dense_prefill, _ = paired_prefill(model, docs, args.repetitions, batch=args.batch, logits_to_keep=keep)

    def decode(m) -> float:
        if not args.decode_tokens:
            return math.nan
        return statistics.median(decode_tokens_per_s(m, docs[0], args.decode_tokens) for _ in range(3))
    dense_decode = decode(model)
    columns = ["model", "ratio", "removed", "layers", "prefill tok/s", "speed-up", "ideal", "measured/ideal",
               "decode tok/s", "decode x"]
    rows = [[f"dense ({args.dtype})", 0.0, 0.0, args.layers, dense_prefill, 1.0, 1.0, 1.0, dense_decode,
             dense_decode / dense_decode]]  # nan without decode
    for ratio in ratios:
        for shape in args.shapes:
            plan = expert_plan(geo, shape, ratio)
            removed = 1 - kept_params(plan, geo) / geo.projection_params()
            expert = dense(model, plan)
            ideal = base_flops / flops(expert)
            prefill, speedup = paired_prefill(expert, docs, args.repetitions, model, args.batch, keep)
            dec = decode(expert)
            rows.append([shape, ratio, removed, expert.config.num_hidden_layers, prefill, speedup, ideal,
                         speedup / ideal, dec, dec / dense_decode])
            del expert
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    env = {**environment(), "dtype": args.dtype, "width": args.width, "tokens": args.tokens, "docs": args.docs,
           "batch": args.batch, "logits": args.logits, "repetitions": args.repetitions}
    report("bench_expert_speed", columns, rows, env, append=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
