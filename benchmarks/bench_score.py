"""Scoring throughput on SmolLM2-135M: plain forward vs local vs block scoring, side by side in one run.

    python benchmarks/bench_score.py [--docs 4] [--tokens 512] [--model smollm2-135m]

Prints tokens/s of a plain Hugging Face forward pass over the same documents, of local-measure
scoring and of block-measure scoring, and each one's time relative to the plain forward pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, report  # noqa: E402

from cusprun.corpus import read_corpus, tokenize  # noqa: E402
from cusprun.engine import Scorer  # noqa: E402
from cusprun.models import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "corpora"


def documents(tokenizer, vocab, n, length):
    """n documents of exactly ``length`` tokens from the shipped corpora (concatenated where short)."""
    ids = [i for f in sorted(DATA.glob("*.jsonl")) for i in
           sum(tokenize(read_corpus(f), tokenizer, 10**9, vocab), [])]
    if len(ids) < n * length:
        raise SystemExit(f"the shipped corpora hold {len(ids)} tokens, fewer than {n} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model, tokenizer, _ = load_model(args.model, device=args.device, quiet=True)
    docs = documents(tokenizer, model.config.vocab_size, args.docs, args.tokens)
    n_tokens = sum(map(len, docs))

    def plain():
        with torch.inference_mode():
            for d in docs:
                model.model(input_ids=torch.tensor([d], device=args.device), use_cache=False)

    runs = [("plain forward", plain)] + [
        (f"{m} scoring", lambda m=m: Scorer(model, m).score_documents(docs)) for m in ("local", "block")]
    plain()  # warm-up
    timings = {}
    for name, fn in runs:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - start
    base = timings["plain forward"]
    rows = [[name, args.docs, args.tokens, t, n_tokens / t, t / base] for name, t in timings.items()]
    report("bench_score", ["run", "docs", "tokens/doc", "seconds", "tokens/s", "x plain"], rows,
           {**environment(), "model": args.model})
    print(json.dumps({k: round(v, 3) for k, v in timings.items()}))


if __name__ == "__main__":
    main()
