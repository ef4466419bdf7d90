"""``python -m cusprun.eval``: perplexity per text file, parameter count, prefill and decode speed (the command;
the measurements are :mod:`cusprun.evaluation.evaluate`'s)."""

from __future__ import annotations

import argparse
import json
import sys

from .core.errors import CusprunError, OneLineArgumentParser, run_cli
from .core.models import DEFAULT_MODEL, DTYPES, load_weights, open_model
from .engine.score_corpora import check_device
from .evaluation.evaluate import evaluate, read_texts, tokenize_texts

DESCRIPTION = """\
Evaluate a dense or pruned model: for each --text file (read like a scoring corpus: .jsonl, .txt or a
folder of .txt), the token-weighted perplexity of its documents, each truncated to --max-tokens; the
model's parameter count; prefill tokens per second (the median of three passes over up to 8 documents, after
a warm-up) and greedy-decode tokens per second.
"""


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m cusprun.eval", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model, alias or a folder written by cusprun.prune")
    p.add_argument("--text", action="append", required=True, metavar="FILE", help="text to evaluate (repeatable)")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated for the decode speed")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of a table")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 2:
        raise CusprunError("--max-tokens must be at least 2")
    if args.decode_tokens < 1:
        raise CusprunError("--decode-tokens must be at least 1")
    texts = read_texts(args.text)  # every input checked before the model loads
    check_device(args.device)
    config, tokenizer, source = open_model(args.model, quiet=args.quiet, allow_pruned=True)
    tokenized = tokenize_texts(texts, tokenizer, args.max_tokens, config.vocab_size)
    model = load_weights(source, args.dtype, args.device, args.quiet)
    result = evaluate(model, tokenized, args.decode_tokens, source.model_id, quiet=args.quiet)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {result['model']}   parameters {result['params']:,}   "
          f"prefill {result['prefill_tokens_per_s']:.1f} tok/s   decode {result['decode_tokens_per_s']:.1f} tok/s")
    width = max(len(p) for p in result["files"])
    print(f"{'text':<{width}}  {'tokens':>8}  {'perplexity':>10}")
    for path, r in result["files"].items():
        print(f"{path:<{width}}  {r['tokens']:>8}  {r['perplexity']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
