"""``python -m cusprun.prune``: score files -> an expert model (the command; the work is in cusprun.experts.build)."""

from __future__ import annotations

import argparse
import math
import sys

from .core.errors import CusprunError, OneLineArgumentParser, run_cli
from .core.models import DEFAULT_MODEL, DTYPES, load_weights, local_folder, open_model
from .engine.score_corpora import default_budget, parse_bytes
from .experts.build import (
    build_expert,
    check_against_model,
    check_ratio,
    load_score_sets,
    local_qk_note,
    select_expert,
)
from .experts.calibration import (
    DEFAULT_REFIT,
    REFITS,
    calibration_documents,
    check_refit_scores,
    parse_calibration,
)
from .experts.compensate import DEFAULT_RIDGE, DEFAULT_RIDGE_SCALE, RIDGE_SCALES
from .experts.stream import check_free_space, expert_bytes, should_stream, stream_build, streamed_tensors
from .formats.apply import FORMATS
from .formats.folder import check_out_dir
from .formats.gguf import check_exportable, check_out_file, tokenizer_source
from .scores.methods import method_of
from .scores.scoreset import GRANULARITIES, NEURONS
from .selection.algorithm import RULES
from .selection.units import BUDGETS

DESCRIPTION = """\
Build an expert model from one score file per dimension (language, domain, task).

selection (the defaults are what measured best, docs/expert-quality.md):
  default   whole MLP channels; attention and the hidden size stay whole. A channel's score in a
            document is the norm of its whole contribution to the MLP output, ||W_down[:, k]|| * ||A[:, k]||
            (the same under both measures). A channel is irrelevant to a corpus when it ranks in the
            lowest sigma of its layer's channels in every document, sigma searched so that --ratio of the
            decoder layers' projection parameters is removed (one threshold over all layers, so layers
            lose different shares). With several corpora, each corpus's own selection sets how much
            each layer loses (averaged), and the channels weakest in every corpus go (the intersection).
  --neurons all                          whole query heads too (each head with its q rows and o columns)
  --neurons mlp+pairs                    RoPE pairs of q and k too: every k/v head of a layer drops the
                                         same number of its weakest pairs (d, d + head_dim/2), so q and k
                                         get a narrower head dimension; v, o and the heads stay
  --granularity neuron                   the paper's selection: every row and column ranked within its group
                                         (layer, projection, rows or columns), plus what its removal makes dead
  --drop-layers N                        first drop the N decoder layers of lowest block influence on the
                                         corpora (mean over each corpus's documents of 1 - cos(h_in, h_out),
                                         the largest over the corpora), then select in the other layers up
                                         to --ratio: the paper's layer + neuron combination for aggressive
                                         ratios (section 4.5); docs/expert-quality.md for what it measured
  --align N                              every layer keeps a multiple of N MLP channels (or all of them),
                                         the nearest to what the selection keeps: widths GEMM kernels tile
                                         evenly. Default 64 where the MLP is at least 1024 channels wide,
                                         else 1 (as selected); docs/expert-quality.md: "Where a prefill's time goes, and
                                         aligned widths"

rules (--rule), how a corpus's documents are combined:
  all-docs   (default, the paper's) irrelevant = in the lowest σ in every document
  mean-rank  irrelevant = mean rank fraction over the documents below σ
  pooled     the corpus ranked as one document (squared scores summed over documents)

Score files of a baseline method (python -m cusprun.score --method ...) go through the same path:
ShortGPT's remove whole layers; FLAP's, Wanda-sp's and magnitude's whole query heads (q rows and o
columns; a k/v group goes with its last head) and whole MLP channels, as their papers do.

Every selection removes at least --ratio of the projection parameters (the fewest units, neurons or
layers that do), or says it cannot and names the largest ratio it can reach. The report counts what the
saved model holds; where the format keeps removed neurons as zeros (masked; the dense format for neurons
inside kept heads or channels, as per-neuron plans remove), it also gives the plan's count.

formats:
  dense   (default) every kept matrix dense, each layer with its own numbers of query heads, k/v heads and
          MLP channels (transformers' per_layer_config); removed blocks are skipped, removed layers dropped.
          Computes exactly what the masked model computes; faster by the whole units the plan removes.
  sliced  each matrix keeps only its live rows and columns: physically smaller, computes exactly what the
          masked model computes, but scattered rows and columns cost gathers and scatters at full width.
  masked  the original architecture with removed rows, biases and columns set to zero.
  stock   the original architecture class (LlamaForCausalLM, ...) with fewer MLP channels and k/v groups:
          the plan is made uniform across layers (same number of channels and of k/v groups, each with
          its query heads, kept in every layer), so plain transformers and serving engines load it.
          It removes at least the asked ratio, overshooting by up to a channel per layer (reported).
  gguf    the dense expert as a llama.cpp GGUF file (--out FILE.gguf, in --dtype; pruning.json kept inside as
          the key cusprun.pruning): runs in llama.cpp, llama-cpp-python and engines built on them. Quantize
          or pad it with python -m cusprun.export (docs/deploy.md).

Sliced and dense models carry their modeling code (modeling_cusprun.py, auto_map in config.json): they load
with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) where cusprun is not installed.
"""


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m cusprun.prune", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the model that was scored (default: {DEFAULT_MODEL})")
    p.add_argument("--scores", action="append", required=True, metavar="FILE",
                   help="a score file from python -m cusprun.score (repeat: one per dimension)")
    p.add_argument("--ratio", type=float, required=True, help="fraction of projection parameters to remove, in (0, 1)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--format", choices=(*FORMATS, "gguf"), default="dense", help="see formats above (default: dense)")
    p.add_argument("--rule", choices=RULES, default="all-docs", help="aggregation over documents (default: all-docs)")
    p.add_argument("--neurons", choices=tuple(NEURONS),
                   help="mlp (Cus-Prun's default): choose only MLP channels, keep attention whole; mlp+pairs: MLP "
                        "channels and RoPE pairs of q and k (with --granularity unit); all: every projection "
                        "(baselines' scores: their own default)")
    p.add_argument("--granularity", choices=GRANULARITIES,
                   help="unit (Cus-Prun's default): whole MLP channels, query heads, RoPE pair slots; neuron: the "
                        "paper's per-row/column selection of every projection")
    p.add_argument("--budget", choices=BUDGETS, default="rank",
                   help="with --granularity unit, how layers share the ratio: rank (default: within-block rank "
                        "fractions combined over documents, one threshold over all layers, so a layer loses more "
                        "where its weak units are weak in every document), equal (every layer loses the same "
                        "number of units) or relative (score over block output norm; measured far worse); see "
                        "docs/experts.md")
    p.add_argument("--drop-layers", type=int, default=0, metavar="N",
                   help="drop the N least influential decoder layers first, then select up to --ratio (default 0)")
    p.add_argument("--align", type=int, default=None, metavar="N",
                   help="with whole MLP channels: every layer keeps a multiple of N of them or all (1: as selected). "
                        "Default: 64 where Cus-Prun's scores select whole channels of an MLP at least 1024 wide "
                        "(GEMMs tile such widths evenly; docs/expert-quality.md, \"Where a prefill's time goes, "
                        "and aligned widths\"), else 1")
    refit = p.add_mutually_exclusive_group()
    refit.add_argument("--compensate", dest="compensate", action="store_true", default=None,
                       help="refit o_proj and down_proj over the kept columns by ridge least squares, from the "
                            "Gram matrices of their inputs on the calibration documents, made here layer by layer "
                            "(the corpora the score files name, or --calibration). Default: on for Cus-Prun's "
                            "score files (it won on target and general perplexity in every measured cell, "
                            "docs/expert-quality.md), off for the baselines'")
    refit.add_argument("--no-compensate", dest="compensate", action="store_false",
                       help="keep the kept columns' weights (no calibration pass)")
    p.add_argument("--calibration", action="append", default=[], metavar="NAME=PATH",
                   help="calibrate dimension NAME (the score file NAME.safetensors) on the corpus at PATH instead of "
                        "the one its score file records (repeat per dimension). By default every score file's own "
                        "corpus, which must be unchanged (its sha256 is checked)")
    p.add_argument("--refit", choices=REFITS, default=None,  # None: not given (an error with --no-compensate)
                   help=f"with the refit: independent (every layer fit on the dense model's inputs, what score --stats "
                        f"files hold) or sequential (every block fit on the inputs the pruned and refit blocks below "
                        f"give it, to its dense weights' outputs on them); default {DEFAULT_REFIT}, the lower target "
                        f"perplexity in every measured cell (docs/experts.md, \"Sequential refit\"). Statistics files "
                        f"beside the score files (score --stats) are used for the independent refit when no "
                        f"--calibration is given")
    p.add_argument("--stream", action="store_true",
                   help="read, refit and write one decoder layer at a time (safetensors models, or GGUF files of "
                        "the llama and qwen2 architectures; --format dense); automatic when the loaded model would "
                        "exceed --max-memory")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory budget for the weights, e.g. 60GiB (default: half of the available RAM)")
    p.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                   help=f"with --compensate: how strongly the kept columns stay near their original weights, "
                        f"relative to their inputs' energy on the calibration tokens (default {DEFAULT_RIDGE})")
    p.add_argument("--ridge-scale", choices=RIDGE_SCALES, default=DEFAULT_RIDGE_SCALE,
                   help="with --compensate: each kept input's ridge relative to its own energy (per-input) or "
                        "one ridge relative to their mean energy (mean, the rule before); auto (default): "
                        "per-input where the statistics hold 4 or more tokens per input of the widest refit "
                        "projection, mean below (docs/experts.md, \"Closed-form compensation\")")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the saved model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_ratio(args.ratio)
    out = check_out_file(args.out, args.overwrite) if args.format == "gguf" else check_out_dir(args.out, args.overwrite)
    if not (math.isfinite(args.ridge) and args.ridge > 0):
        raise CusprunError(f"--ridge {args.ridge}: must be a positive number")
    if args.drop_layers < 0:
        raise CusprunError(f"--drop-layers {args.drop_layers}: must be 0 or more")
    if args.align is not None and args.align < 1:
        raise CusprunError(f"--align {args.align}: must be a whole number of channels, 1 or more")
    import cusprun_kernels

    cusprun_kernels.set_quiet(args.quiet)  # the calibration pass's gram op would announce its backend
    max_memory = parse_bytes(args.max_memory) if args.max_memory else None
    overrides = parse_calibration(args.calibration, args.scores)
    refit_given, args.refit = args.refit is not None, args.refit or DEFAULT_REFIT
    # statistics files serve the independent refit only, and only where no other corpus is asked for
    stats_usable = args.compensate is not False and args.refit == "independent" and not overrides
    try:
        sets = load_score_sets(args.scores, stats=stats_usable)
    except CusprunError as exc:
        if args.compensate is None and ".stats." in str(exc):  # a damaged or foreign statistics file
            raise CusprunError(f"{exc} (or prune with --no-compensate)") from None
        raise
    if args.budget != "rank":
        _, granularity = sets[0].selection_settings(args.neurons, args.granularity, uniform=args.format == "stock")
        method = method_of(sets[0].metadata)
        if granularity != "unit" or args.format == "stock" or method.granularity == "layer":
            raise CusprunError(f"--budget {args.budget} would have no effect: only a --granularity unit selection "
                               "shares the ratio by budget (not --format stock or whole-layer methods)")
    cusprun_scores = all(method_of(s.metadata).name == "cusprun" for s in sets)
    if args.compensate:
        check_refit_scores(sets, args.scores)
    compensate = cusprun_scores if args.compensate is None else args.compensate
    if not compensate:
        given = [flag for flag, on in (("--ridge", args.ridge != DEFAULT_RIDGE),
                                       ("--ridge-scale", args.ridge_scale != DEFAULT_RIDGE_SCALE),
                                       ("--refit", refit_given), ("--calibration", overrides)) if on]
        if given:
            why = "--no-compensate turns it off" if args.compensate is False else "baseline methods' score files"
            raise CusprunError(f"{given[0]} sets the refit, which is off here ({why})")
    config, tokenizer, source = open_model(args.model, quiet=args.quiet)
    stream = should_stream(source, args.stream, max_memory if max_memory is not None else default_budget("cpu"),
                           args.dtype)
    tensors = streamed_tensors(source, config, args.format) if stream else None
    check_against_model(sets, args.scores, config)  # before the weights load
    use_stats = compensate and stats_usable and not stream and all(s.stats is not None for s in sets)
    calibration = None
    if compensate and not use_stats:  # every calibration document read and tokenized before the weights load
        calibration = calibration_documents(sets, args.scores, tokenizer, config.vocab_size, overrides)
    if args.format == "gguf":
        check_exportable(config)
        tokenizer_source(source, local_folder(source))
    if args.align is not None:
        try:
            sets[0].check_align(args.align, config, args.format == "stock", args.granularity)
        except ValueError as exc:
            raise CusprunError(f"--{exc}") from None
    try:  # before the weights load: a ratio the candidate neurons cannot reach, a drop of too many layers, a
        # stock plan from layer scores
        selected = select_expert(sets, config, args.ratio, args.format, args.rule, args.neurons, args.granularity,
                                 args.budget, args.drop_layers, args.align)
    except ValueError as exc:
        raise CusprunError(str(exc)) from None
    local_qk_note(sets, selected)
    check_free_space(out, expert_bytes(config, selected.selection, args.dtype))
    if args.format == "gguf" and "pairs" in selected.neurons:
        raise CusprunError("--neurons with RoPE pairs gives narrower q/k per group, which GGUF cannot express; "
                           "prune with --format dense and run the expert in transformers")
    try:
        if stream:
            report = stream_build(config, tokenizer, source, tensors, sets, args.scores, selected, args.ratio, out,
                                  args.dtype, args.rule, args.budget, args.drop_layers, calibration, args.refit,
                                  args.ridge, args.ridge_scale, args.quiet)
        else:
            model = load_weights(source, args.dtype, quiet=args.quiet)
            report = build_expert(model, tokenizer, source, sets, args.scores, args.ratio, args.format, out,
                                  rule=args.rule, budget=args.budget, compensate=compensate, ridge=args.ridge,
                                  ridge_scale=args.ridge_scale, drop_layers=args.drop_layers, selected=selected,
                                  calibration=calibration, refit=args.refit, in_place=True, quiet=args.quiet)
    except ValueError as exc:
        raise CusprunError(str(exc)) from None
    print(f"expert model   {out} ({args.format})")
    print(f"corpora        {', '.join(str(c['corpus']) for c in report['corpora'])}")
    sigma = report["sigma"]
    why = "aligned widths, see --align" if report["align"] > 1 else "layer shares, see --budget"
    shown = f"- (no single threshold: {why})" if sigma is None else f"{sigma:.4f}"
    print(f"sigma          {shown}")
    if report["align"] > 1:
        print(f"aligned        every layer keeps a multiple of {report['align']} MLP channels, or all of them")
    plan = report.get("plan", report)
    print(f"removed        {plan['ratio_achieved_projection']:.4f} of projection parameters (asked {args.ratio})")
    print(f"saved model    {report['params']:,} parameters (dense {report['params_dense']:,}): "
          f"{report['ratio_achieved_projection']:.4f} of projection parameters and "
          f"{report['ratio_achieved_all']:.4f} of all parameters fewer")
    if "plan" in report:
        print(f"plan           {plan['params']:,} parameters if every removed neuron were dropped; the {args.format} "
              "format keeps some as zeros (pruning.json: plan)")
    if compensate:
        where = ("the statistics files" if calibration is None else
                 f"{calibration.tokens} calibration tokens, {args.refit}")
        print(f"compensated    yes: pruned output projections refit on {where} (ridge {args.ridge}, "
              f"{report['ridge_scale']})")
    if stream:
        print("streamed       one decoder layer at a time")
    if report["dropped_layers"]:
        print(f"layers dropped {', '.join(map(str, report['dropped_layers']))}")
    if args.format == "stock":
        print(f"uniform plan   {report['stock']['intermediate_size']} MLP channels, "
              f"{report['stock']['num_key_value_heads']} k/v groups per layer: "
              f"{report['stock']['share_of_asked']:.1%} of the asked ratio")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
