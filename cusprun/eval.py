"""``python -m cusprun.eval``: perplexity per text file, parameter count, prefill and decode speed."""

from __future__ import annotations

import argparse
import json
import sys

from .corpus import read_corpus, tokenize
from .errors import CusprunError, OneLineArgumentParser, run_cli
from .evaluate import decode_tokens_per_s, parameter_count, perplexity, prefill_tokens_per_s
from .models import DEFAULT_MODEL, DTYPES, load_model

DESCRIPTION = """\
Evaluate a dense or pruned model: for each --text file (read like a scoring corpus: .jsonl, .txt or a
folder of .txt), the token-weighted perplexity of its documents, each truncated to --max-tokens; the
model's parameter count; prefill and greedy-decode tokens per second.
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


def evaluate(model, tokenizer, texts: list[str], max_tokens: int, decode_tokens: int, model_name: str) -> dict:
    files, all_docs = {}, []
    for path in texts:
        docs = [d for d in tokenize(read_corpus(path), tokenizer, max_tokens, model.config.vocab_size) if d]
        if not docs:
            raise CusprunError(f"{path}: no document with tokens")
        ppl, n = perplexity(model, docs)
        files[path] = {"perplexity": ppl, "tokens": n}
        all_docs.extend(docs)
    prompt = next(d for d in all_docs)[:64]
    return {"model": model_name, "params": parameter_count(model), "files": files,
            "prefill_tokens_per_s": prefill_tokens_per_s(model, all_docs[:8]),
            "decode_tokens_per_s": decode_tokens_per_s(model, prompt, decode_tokens)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 2:
        raise CusprunError("--max-tokens must be at least 2")
    model, tokenizer, source = load_model(args.model, args.dtype, args.device, quiet=args.quiet, allow_sliced=True)
    result = evaluate(model, tokenizer, args.text, args.max_tokens, args.decode_tokens, source.model_id)
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
