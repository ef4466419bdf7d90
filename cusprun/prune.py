"""``python -m cusprun.prune``: score files -> an expert model (threshold, intersect, slice)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .apply import FORMATS, apply
from .engine import score_shapes
from .errors import CusprunError, OneLineArgumentParser, run_cli
from .export import check_out_dir, save_model_dir
from .models import DEFAULT_MODEL, DTYPES, config_hash, load_model
from .plan import Geometry, kept_counts
from .scoreset import NEURONS, ScoreSet, intersect
from .selection import RULES

DESCRIPTION = """\
Build an expert model from one score file per dimension (language, domain, task).

A neuron is irrelevant to a corpus when it ranks in the lowest σ of its group (layer, projection,
rows or columns) in every document of that corpus; the expert removes the neurons irrelevant to
every given corpus (the intersection), plus everything their removal makes dead. σ is searched so
that --ratio of the decoder layers' projection parameters is removed.

rules (--rule), how a corpus's documents are combined:
  all-docs   (default, the paper's) irrelevant = in the lowest σ in every document
  mean-rank  irrelevant = mean rank fraction over the documents below σ
  pooled     the corpus ranked as one document (squared scores summed over documents)

Score files of a baseline method (python -m cusprun.score --method ...) go through the same path:
ShortGPT's remove whole layers; FLAP's, Wanda-sp's and magnitude's only attention heads and MLP
channels.

formats:
  sliced  (default) each matrix keeps only its live rows and columns: physically smaller, computes
          exactly what the masked model computes; loads with `import cusprun` and AutoModelForCausalLM.
  masked  the original architecture with removed rows, biases and columns set to zero.
  stock   the original architecture class (LlamaForCausalLM, ...) with fewer MLP channels and k/v groups:
          the plan is made uniform across layers (same number of channels and of k/v groups, each with
          its query heads, kept in every layer), so plain transformers and serving engines load it.
          It reaches the asked ratio only as closely as whole units allow (reported).

Sliced models carry their modeling code (modeling_cusprun.py, auto_map in config.json): they load
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
    p.add_argument("--format", choices=FORMATS, default="sliced")
    p.add_argument("--rule", choices=RULES, default="all-docs", help="aggregation over documents (default: all-docs)")
    p.add_argument("--neurons", choices=tuple(NEURONS), default="all",
                   help="all (default) or mlp: choose only MLP channels, keep attention whole")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the saved model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_ratio(ratio: float) -> None:
    if not 0 < ratio < 1:
        raise CusprunError(f"--ratio {ratio}: must be strictly between 0 and 1")


def load_score_sets(paths: list[str]) -> list[ScoreSet]:
    sets = []
    for path in paths:
        if not Path(path).is_file():
            raise CusprunError(f"score file not found: {path}")
        sets.append(ScoreSet.load(path))
    measures = {s.metadata.get("measure") for s in sets}
    if len(measures) > 1:
        raise CusprunError(f"score files mix measures ({', '.join(sorted(map(str, measures)))}): score all corpora "
                           "with the same --measure")
    return sets


def check_against_model(sets: list[ScoreSet], paths, config) -> None:
    expected_hash, shapes = config_hash(config), score_shapes(config)
    for score_set, path in zip(sets, paths):
        meta, tensors = score_set.metadata, score_set.scores
        if meta.get("config_hash") != expected_hash:
            raise CusprunError(f"{path} was scored on another model ({meta.get('model')}, config hash differs)")
        for name, n in shapes.items():
            if name not in tensors or tensors[name].dim() != 2 or tensors[name].shape[1] != n:
                raise CusprunError(f"{path}: tensor {name} missing or not [n_docs, {n}] (another model?)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_ratio(args.ratio)
    out = check_out_dir(args.out, args.overwrite)
    sets = load_score_sets(args.scores)
    model, tokenizer, source = load_model(args.model, args.dtype, quiet=args.quiet)
    check_against_model(sets, args.scores, model.config)
    try:
        report = build_expert(model, tokenizer, source, sets, args.scores, args.ratio, args.format, out,
                              rule=args.rule, neurons=args.neurons)
    except ValueError as exc:  # a ratio the candidate neurons cannot reach, a stock plan from layer scores
        raise CusprunError(str(exc)) from None
    print(f"expert model   {out} ({args.format})")
    print(f"corpora        {', '.join(str(c['corpus']) for c in report['corpora'])}")
    print(f"sigma          {report['sigma']:.4f}")
    print(f"removed        {report['ratio_achieved_projection']:.4f} of projection parameters (asked {args.ratio}), "
          f"{report['ratio_achieved_all']:.4f} of all parameters")
    print(f"parameters     {report['params']:,} (dense {report['params_dense']:,})")
    if args.format == "stock":
        print(f"uniform plan   {report['stock']['intermediate_size']} MLP channels, "
              f"{report['stock']['num_key_value_heads']} k/v groups per layer: "
              f"{report['stock']['share_of_asked']:.1%} of the asked ratio")
    return 0


def build_expert(model, tokenizer, source, sets: list[ScoreSet], score_paths, ratio: float, format: str,
                 out: Path, rule: str = "all-docs", neurons: str = "all") -> dict:
    """Select at ``ratio``, apply, and save the expert to ``out`` with its pruning.json; returns the report."""
    geo = Geometry(model.config)
    dense_params = sum(p.numel() for p in model.parameters())
    sel = intersect(*sets).select(ratio, model.config, uniform=format == "stock", rule=rule, neurons=neurons)
    pruned = apply(model, sel, format)
    params = dense_params - (sel.total_projection_params - sel.kept_projection_params)
    report = {
        "cusprun_version": __version__, "model": source.model_id, "config_hash": config_hash(model.config),
        "format": format, "measure": sets[0].metadata.get("measure"), "rule": rule, "neurons": neurons,
        "ratio_asked": ratio,
        "ratio_achieved_projection": sel.removed_fraction, "ratio_achieved_all": 1 - params / dense_params,
        "sigma": sel.sigma, "params_dense": dense_params, "params": params,
        "projection_params_dense": sel.total_projection_params, "projection_params": sel.kept_projection_params,
        "corpora": [{"scores": str(p), "corpus": s.metadata.get("corpus"),
                     "corpus_sha256": s.metadata.get("corpus_sha256"), "n_docs": s.n_docs}
                    for p, s in zip(score_paths, sets)],
        "kept": kept_counts(sel.plan, geo),
    }
    if format == "stock":
        report["stock"] = {"intermediate_size": pruned.config.intermediate_size,
                           "num_key_value_heads": pruned.config.num_key_value_heads,
                           "num_attention_heads": pruned.config.num_attention_heads,
                           "share_of_asked": sel.removed_fraction / ratio}
    save_model_dir(out, pruned, tokenizer, report)
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
