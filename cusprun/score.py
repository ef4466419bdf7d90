"""``python -m cusprun.score``: every neuron's relevance score for each document of each corpus (the command;
the work is :mod:`cusprun.engine.score_corpora`'s)."""

from __future__ import annotations

import argparse
import sys
import types

from .core.errors import CusprunError, OneLineArgumentParser, run_cli
from .core.models import ALIASES, DEFAULT_MODEL, DTYPES, open_model
from .engine.api import score
from .engine.layer_major import MEASURES
from .engine.parallel import Parallel
from .engine.score_corpora import (
    check_device,
    open_scorer,
    parse_bytes,
    parse_corpora,
    prepare_out,
    print_summary,
    score_baseline,
    score_corpus,
    tokenize_corpus,
)
from .scores.methods import methods

DESCRIPTION = """\
Score every neuron (each row and each column of q, k, v, o, gate, up and down in every layer) by
how much removing it changes the model's computation on each document, and write one score file
per corpus: OUT/NAME.safetensors (format cusprun-scores/1, see docs/scores.md).

measures:
  local  (default) the change of the projection's own output: rows ‖Y[:, i]‖, columns ‖W[:, j]‖·‖X[:, j]‖.
         About one forward pass. The default expert (whole MLP channels) needs nothing more: a channel's
         score, ‖W_down[:, k]‖·‖A[:, k]‖, is the same under both measures.
  block  the change of the enclosing attention or MLP block's output, recomputed exactly (RoPE, grouped
         k/v heads, causal softmax, SiLU gate, o_proj); input columns of q, k, v, gate and up use the
         local definition. About 12x a forward pass on a CPU: for the paper's per-neuron selection
         (prune --granularity neuron) and selections of attention rows (--neurons all, mlp+pairs).

methods (--method): cusprun (default) scores with the measure above; the baselines
(docs/baselines.md) write score files of the same format, so python -m cusprun.prune turns any of them into
a model. Methods calibrated on a general corpus take it as --corpus; those needing no data write
OUT/METHOD.safetensors.
{methods}

corpora: NAME=PATH where PATH is a .jsonl file (one document per line, field "text" or pre-tokenized
"input_ids"), a .txt file (documents separated by blank lines) or a folder of .txt files.
"""


def build_parser() -> OneLineArgumentParser:
    listing = "\n".join(f"  {m.name:<10} {m.summary} [data: {m.data}]" for m in methods().values())
    p = OneLineArgumentParser(prog="python -m cusprun.score", description=DESCRIPTION.format(methods=listing),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model directory (safetensors), .gguf file, cached hub id, "
                        f"or alias: {DEFAULT_MODEL} "
                        f"(default, embedded), {', '.join(ALIASES)}")
    p.add_argument("--corpus", action="append", default=[], metavar="NAME=PATH",
                   help="a corpus to score (repeat for several; one model load)")
    p.add_argument("--out", required=True, help="output folder for NAME.safetensors score files")
    p.add_argument("--measure", choices=MEASURES,
                   help="score definition (default: local, what the default expert needs; block for the paper's "
                        "per-neuron selection, see measures above)")
    p.add_argument("--method", choices=tuple(methods()), default="cusprun",
                   help="cusprun (default) or a baseline scorer (see methods above)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: 0)")
    p.add_argument("--max-tokens", type=int, default=512, help="truncate each document to this many tokens")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="model dtype (scores accumulate in float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--stream", action="store_true",
                   help="hold one decoder layer's weights on the device at a time (automatic when the model "
                        "does not fit --max-memory)")
    p.add_argument("--max-memory", metavar="SIZE", help="memory budget for weights, e.g. 60GiB (default: 90%% of "
                   "the GPU's free memory, or half of the available RAM)")
    p.add_argument("--batch-tokens", type=int, metavar="N",
                   help="tokens per batch of packed documents (default: 4096 on a CPU, 32768 on a GPU); scores do "
                        "not depend on it")
    p.add_argument("--stats", action="store_true",
                   help="also write NAME.stats.safetensors: the Gram matrices of o_proj's and down_proj's inputs, "
                        "from which python -m cusprun.prune refits the kept columns (--compensate, on by default "
                        "where they exist; SmolLM2-135M: 320 MB per corpus)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    measure = args.measure or "local"
    if args.max_tokens < 1:
        raise CusprunError("--max-tokens must be at least 1")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise CusprunError("--batch-tokens must be at least 1")
    max_memory = parse_bytes(args.max_memory) if args.max_memory else None
    if not args.corpus and methods()[args.method].data != "none":
        raise CusprunError(f"--corpus is required (method {args.method})")
    if args.corpus and methods()[args.method].data == "none":
        raise CusprunError(f"--corpus: method {args.method} needs no data (it writes OUT/{args.method}.safetensors)")
    corpora = parse_corpora(args.corpus)
    out = prepare_out(args.out)
    check_device(args.device)
    if args.seed != 0 and args.method != "random":
        raise CusprunError(f"--seed: only the random baseline draws numbers, not --method {args.method}")
    if args.method != "cusprun":
        if args.stats:
            raise CusprunError("--stats: statistics come from Cus-Prun's own scoring pass (--method cusprun)")
        engine_only = (("--measure", args.measure, None), ("--stream", args.stream, False),
                       ("--max-memory", args.max_memory, None), ("--batch-tokens", args.batch_tokens, None))
        given = [flag for flag, value, default in engine_only if value != default]
        if given:  # baselines score in memory, one document at a time, by their own definition
            raise CusprunError(f"{given[0]}: applies to Cus-Prun's scoring only, not --method {args.method}")
        print_summary(score_baseline(args.model, args.method, corpora, out, seed=args.seed, max_tokens=args.max_tokens,
                                     dtype=args.dtype, device=args.device, quiet=args.quiet))
        return 0
    import cusprun_kernels

    cusprun_kernels.set_quiet(args.quiet)
    try:  # fail before the model loads; the ops announce auto's choice when they first run
        backend = cusprun_kernels.resolve_backend(args.device.split(":")[0], announce=False)
    except cusprun_kernels.BackendUnavailable as exc:
        raise CusprunError(str(exc)) from None
    config, tokenizer, source = open_model(args.model, quiet=args.quiet)
    # every corpus checked before the weights load and the first is scored
    tokenized = [tokenize_corpus(spec, tokenizer, args.max_tokens, config.vocab_size) for spec in corpora]
    parallel = Parallel()
    try:
        scorer, budget, streamed = open_scorer(config, source, measure, args.dtype, args.device, args.stream,
                                               max_memory, parallel, args.quiet, args.batch_tokens, args.stats)
        # "stats" in the options: part of the metadata, so a checkpoint without Gram matrices is not resumed
        options = {"max_tokens": args.max_tokens, "dtype": args.dtype, "backend": backend, "stats": args.stats}
        results = [score_corpus(scorer, corpus, source, out, options, args.quiet, parallel, budget)
                   for corpus in tokenized]
    except cusprun_kernels.BackendUnavailable as exc:  # a named backend that failed its check at first use
        raise CusprunError(str(exc)) from None
    finally:
        parallel.close()
    if parallel.is_main:
        print_summary(results)
        if streamed:
            print("(weights streamed one decoder layer at a time)")
    return 0


class _CallableModule(types.ModuleType):
    """``cusprun.score`` is both this command's module and the API function: importing the module (as
    ``python -m cusprun.score`` or any ``import cusprun.score`` does) rebinds the package attribute to it, so the
    module calls the function, and ``cusprun.score(model, documents)`` works whichever the attribute holds."""

    def __call__(self, *args, **kwargs):
        return score(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(run_cli(main))
