"""``python -m cusprun.pipeline``: the main job, end to end, in one process (one model load).

score the calibration corpora -> build each expert (intersection of its dimensions' irrelevant
neurons, sliced) -> evaluate the dense model and every expert on held-out text of the target
dimensions and on general text -> a table (stdout), OUT/summary.json / OUT/summary.md, and each expert's
pictures (python -m cusprun.plot) in OUT/plots/EXPERT/.

Scoring resumes: a score file whose metadata matches the corpus, model and options is reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from . import __version__
from .corpus import corpus_sha256, read_corpus
from .engine import MEASURES, Scorer
from .errors import CusprunError, OneLineArgumentParser, run_cli
from .eval import evaluate
from .models import DEFAULT_MODEL, config_hash, load_model
from .plot import write_plots
from .prune import build_expert, check_ratio
from .score import CorpusSpec, score_corpus
from .scorefile import atomic_write, load_scores
from .scoreset import ScoreSet

DATA = Path(__file__).resolve().parents[1] / "data"
DEFAULT_EXPERTS = ["de", "de+medical"]
DEFAULT_EVAL = ["de", "de_man", "medical", "en_man"]


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
    p.add_argument("--docs", type=int, default=16, help="calibration documents per corpus")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per calibration document")
    p.add_argument("--eval-max-tokens", type=int, default=512)
    p.add_argument("--measure", choices=MEASURES, default="block")
    p.add_argument("--out", default="runs/main")
    p.add_argument("--quiet", action="store_true")
    return p


def subset_corpus(src: Path, dst: Path, n: int) -> None:
    lines = [line for line in src.read_text().splitlines() if line.strip()][:n]
    text = "".join(line + "\n" for line in lines)
    if not dst.exists() or dst.read_text() != text:
        atomic_write(dst, lambda tmp: Path(tmp).write_text(text))


def reusable(path: Path, corpus: Path, measure: str, options: dict, model_hash: str) -> bool:
    if not path.exists():
        return False
    try:
        _, meta = load_scores(path)
    except CusprunError:
        return False
    return (meta.get("corpus_sha256") == corpus_sha256(corpus) and meta.get("measure") == measure
            and meta.get("config_hash") == model_hash
            and all(meta.get(k) == str(v) for k, v in options.items()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    experts = args.expert or DEFAULT_EXPERTS
    evals = args.eval or DEFAULT_EVAL
    data, out = Path(args.data), Path(args.out)
    dims = sorted({d for e in experts for d in e.split("+")})
    for name in dims:
        if not (data / "corpora" / f"{name}.jsonl").is_file():
            raise CusprunError(f"no calibration corpus {data / 'corpora' / name}.jsonl")
    for name in evals:
        if not (data / "heldout" / f"{name}.jsonl").is_file():
            raise CusprunError(f"no held-out text {data / 'heldout' / name}.jsonl")
    check_ratio(args.ratio)
    for sub in ("corpora", "scores", "experts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, tokenizer, source = load_model(args.model, quiet=args.quiet)
    from transformers import AutoModelForCausalLM

    import cusprun_kernels

    cusprun_kernels.set_quiet(args.quiet)
    scorer = Scorer(model, args.measure)
    options = {"max_tokens": args.max_tokens, "dtype": "float32", "backend": cusprun_kernels.resolve_backend("cpu")}
    score_files = {}
    for name in dims:
        corpus = out / "corpora" / f"{name}.jsonl"
        subset_corpus(data / "corpora" / f"{name}.jsonl", corpus, args.docs)
        target = out / "scores" / f"{name}.safetensors"
        if reusable(target, corpus, args.measure, options, config_hash(model.config)):
            print(f"scores for {name}: reusing {target}", file=sys.stderr)
        else:
            spec = CorpusSpec(name, str(corpus), read_corpus(corpus))
            score_corpus(scorer, tokenizer, source, spec, out / "scores", options, args.quiet)
        score_files[name] = target
    texts = [str(data / "heldout" / f"{name}.jsonl") for name in evals]
    rows = [("dense", evaluate(model, tokenizer, texts, args.eval_max_tokens, 32, source.model_id), None)]
    plots = importlib.util.find_spec("matplotlib") is not None
    if not plots:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
    for expert in experts:
        paths = [score_files[d] for d in expert.split("+")]
        sets = [ScoreSet.load(p) for p in paths]
        report = build_expert(model, tokenizer, source, sets, paths, args.ratio, "sliced", out / "experts" / expert)
        pruned = AutoModelForCausalLM.from_pretrained(out / "experts" / expert).eval()
        rows.append((expert, evaluate(pruned, tokenizer, texts, args.eval_max_tokens, 32, expert), report))
        if plots:
            write_plots(sets, out / "plots" / expert, expert=out / "experts" / expert)
    summary = {"cusprun_version": __version__, "model": source.model_id, "ratio": args.ratio,
               "measure": args.measure, "docs_per_corpus": args.docs, "max_tokens": args.max_tokens,
               "seconds": time.perf_counter() - started,
               "results": [{"model": name, **result,
                            "ratio_achieved_projection": None if rep is None else rep["ratio_achieved_projection"]}
                           for name, result, rep in rows]}
    table = format_table(rows, evals, texts)
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    print(table)
    print(f"\n{summary['seconds']:.0f} s; experts in {out / 'experts'}, summary in {out / 'summary.md'}, "
          f"plots in {out / 'plots'}")
    return 0


def format_table(rows, evals, texts) -> str:
    dense_speed = rows[0][1]["prefill_tokens_per_s"]
    head = ["model", "params", "removed (proj.)"] + [f"ppl {e}" for e in evals] + ["prefill tok/s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, result, report in rows:
        removed = "—" if report is None else f"{report['ratio_achieved_projection']:.3f}"
        cells = [name, f"{result['params'] / 1e6:.1f}M", removed]
        cells += [f"{result['files'][t]['perplexity']:.2f}" for t in texts]
        cells += [f"{result['prefill_tokens_per_s']:.0f}", f"{result['prefill_tokens_per_s'] / dense_speed:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_cli(main))
