"""Peak memory and time of block-measure scoring of one long document (default 2048 tokens).

    python benchmarks/bench_long_document.py [--tokens 2048] [--model smollm2-135m]

A materialized [heads, head_dim, L, L] float32 tensor would take 9.7 GB per layer of SmolLM2 at
L = 2048; the engine's chunked ablation keeps the whole process under 4 GB of peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score import documents  # noqa: E402
from common import environment, report  # noqa: E402

from cusprun.engine import Scorer  # noqa: E402
from cusprun.models import load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    model, tokenizer, _ = load_model(args.model, quiet=True)
    doc = documents(tokenizer, model.config.vocab_size, 1, args.tokens)
    c = model.config
    materialized_gb = c.num_attention_heads * c.head_dim * args.tokens**2 * 4 / 1e9
    start = time.perf_counter()
    Scorer(model, "block").score_documents(doc)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    report("bench_long_document", ["tokens", "seconds", "tokens/s", "peak RSS GB", "[h,hd,L,L] GB per layer"],
           [[args.tokens, seconds, args.tokens / seconds, peak_gb, materialized_gb]],
           {**environment(), "model": args.model})


if __name__ == "__main__":
    main()
