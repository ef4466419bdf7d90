"""Peak memory and time of block-measure scoring of one long document (default 2048 tokens).

    python benchmarks/bench_long_document.py [--tokens 2048] [--model smollm2-135m] [--layers N]

A materialized [heads, head_dim, L, L] float32 tensor would take 9.7 GB per layer of SmolLM2 at
L = 2048; the engine's chunked ablation keeps the whole process under 4 GB of peak RSS. Every layer
needs the same working memory, so ``--layers N`` (score the first N layers only) measures the same
peak in a fraction of the time; the table says how many layers were scored.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score import documents  # noqa: E402
from common import at_least, environment, report  # noqa: E402

from cusprun.core.errors import OneLineArgumentParser, run_cli  # noqa: E402
from cusprun.core.models import load_model  # noqa: E402
from cusprun.engine.layer_major import Scorer  # noqa: E402


def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None, help="score only the first N layers (default: all)")
    args = ap.parse_args(argv)
    at_least("--tokens", args.tokens, 2)
    at_least("--layers", args.layers, 1)
    model, tokenizer, _ = load_model(args.model, quiet=True)
    if args.layers is not None:
        del model.model.layers[args.layers:]
        model.config.num_hidden_layers = len(model.model.layers)
    doc = documents(tokenizer, model.config.vocab_size, 1, args.tokens)
    c = model.config
    materialized_gb = c.num_attention_heads * c.head_dim * args.tokens**2 * 4 / 1e9
    start = time.perf_counter()
    Scorer(model, "block").score_documents(doc)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    scored = args.model if args.layers is None else f"{args.model} (first {c.num_hidden_layers} layers)"
    report("bench_long_document", ["tokens", "seconds", "tokens/s", "peak RSS GB", "[h,hd,L,L] GB per layer"],
           [[args.tokens, seconds, args.tokens / seconds, peak_gb, materialized_gb]],
           {**environment(), "model": scored})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
