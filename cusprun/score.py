"""``python -m cusprun.score``: every neuron's relevance score for each document of each corpus."""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import __version__
from .api import advance, progress_bar
from .baselines import DATA_FREE, METHODS, baseline_scores
from .checkpoint import Checkpoint, fingerprint
from .corpus import Document, corpus_sha256, read_corpus, tokenize
from .engine import MEASURES, Scorer
from .errors import CusprunError, OneLineArgumentParser, run_cli
from .models import ALIASES, DEFAULT_MODEL, DTYPES, config_hash, load_weights, local_folder, open_model
from .parallel import Parallel
from .scoreset import ScoreSet, architecture

DESCRIPTION = """\
Score every neuron (each row and each column of q, k, v, o, gate, up and down in every layer) by
how much removing it changes the model's computation on each document, and write one score file
per corpus: OUT/NAME.safetensors (format cusprun-scores/1, see the README).

measures:
  block  (default) the change of the enclosing attention or MLP block's output, recomputed exactly
         (RoPE, grouped k/v heads, causal softmax, SiLU gate, o_proj); input columns of q, k, v,
         gate and up use the local definition.
  local  the change of the projection's own output: rows ‖Y[:, i]‖, columns ‖W[:, j]‖·‖X[:, j]‖.

methods (--method): cusprun (default) scores with the measure above; the baselines random,
magnitude, wanda-sp, flap, plnd and shortgpt (README, "Baselines") write score files of the same
format, so python -m cusprun.prune turns any of them into a model. wanda-sp, flap and shortgpt take
a general calibration corpus, plnd the target corpus; random and magnitude need none (then the
file is OUT/METHOD.safetensors).

corpora: NAME=PATH where PATH is a .jsonl file (one document per line, field "text" or pre-tokenized
"input_ids"), a .txt file (documents separated by blank lines) or a folder of .txt files.
"""
CHECKPOINTS = ".cusprun-checkpoint"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class CorpusSpec:
    name: str
    path: str
    documents: list[Document]


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m cusprun.score", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model directory (safetensors), .gguf file, cached hub id, "
                        f"or alias: {DEFAULT_MODEL} "
                        f"(default, embedded), {', '.join(ALIASES)}")
    p.add_argument("--corpus", action="append", default=[], metavar="NAME=PATH",
                   help="a corpus to score (repeat for several; one model load)")
    p.add_argument("--out", required=True, help="output folder for NAME.safetensors score files")
    p.add_argument("--measure", choices=MEASURES, default="block", help="score definition (default: block)")
    p.add_argument("--method", choices=("cusprun", *METHODS), default="cusprun",
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_corpora(values: list[str]) -> list[CorpusSpec]:
    specs, seen = [], set()
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise CusprunError(f"--corpus {value!r}: expected NAME=PATH")
        if not NAME_RE.match(name):
            raise CusprunError(f"--corpus {value!r}: NAME may hold letters, digits, '_', '.', '-'")
        if name in seen:
            raise CusprunError(f"--corpus: the name {name!r} is given twice")
        seen.add(name)
        specs.append(CorpusSpec(name, path, read_corpus(path)))
    return specs


def prepare_out(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".cusprun-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CusprunError(f"--out {out}: not writable ({exc.strerror})") from None
    return path


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CusprunError(f"--device {device}: no CUDA device is available (torch {torch.__version__})")
    if not re.match(r"^(cpu|cuda(:\d+)?)$", device):
        raise CusprunError(f"--device {device!r}: expected cpu or cuda[:N]")


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?)?B?\s*", text, re.IGNORECASE)
    if not match:
        raise CusprunError(f"--max-memory {text!r}: expected a size such as 60GiB, 500MB or 1e9")
    unit = (match.group(2) or "").upper()
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(match.group(1)) * scale)


def default_budget(device: str) -> int:
    """Memory the weights may take: 90% of the GPU's free memory, or half of the available RAM."""
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(0.9 * free)
    with open("/proc/meminfo") as fh:
        info = dict(line.split(":", 1) for line in fh)
    return int(info["MemAvailable"].split()[0]) * 1024 // 2


def open_scorer(args, max_memory: int | None, parallel: Parallel):
    """An in-memory or a streaming scorer, as the model's size, --stream and --max-memory decide.
    Returns (scorer, tokenizer, source, memory budget, streamed)."""
    from .layers import StreamedLayers, weights_bytes

    config, tokenizer, source = open_model(args.model, quiet=args.quiet)
    device = parallel.device(args.device)
    folder = local_folder(source)
    budget = max_memory if max_memory is not None else default_budget(device)
    if args.stream or (folder is not None and weights_bytes(folder) > budget):
        if folder is None:
            raise CusprunError(f"--stream needs a model in safetensors format; {args.model} is a GGUF file")
        layers = StreamedLayers(folder, config, DTYPES[args.dtype], device)
        return Scorer(measure=args.measure, layers=layers), tokenizer, source, budget, True
    model = load_weights(source, args.dtype, device, args.quiet)
    return Scorer(model, args.measure), tokenizer, source, budget, False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise CusprunError("--max-tokens must be at least 1")
    max_memory = parse_bytes(args.max_memory) if args.max_memory else None
    if not args.corpus and args.method not in DATA_FREE:
        raise CusprunError(f"--corpus is required (method {args.method})")
    corpora = parse_corpora(args.corpus)
    out = prepare_out(args.out)
    check_device(args.device)
    if args.method != "cusprun":
        return run_baseline(args, corpora, out)
    import cusprun_kernels

    cusprun_kernels.set_quiet(args.quiet)
    try:  # fail before the model loads; the ops announce auto's choice when they first run
        backend = cusprun_kernels.resolve_backend(args.device.split(":")[0], announce=False)
    except cusprun_kernels.BackendUnavailable as exc:
        raise CusprunError(str(exc)) from None
    parallel = Parallel()
    try:
        scorer, tokenizer, source, budget, streamed = open_scorer(args, max_memory, parallel)
        options = {"max_tokens": args.max_tokens, "dtype": args.dtype, "backend": backend}
        results = [score_corpus(scorer, tokenizer, source, spec, out, options, args.quiet, parallel, budget)
                   for spec in corpora]
    finally:
        parallel.close()
    if parallel.is_main:
        print_summary(results)
        if streamed:
            print("(weights streamed one decoder layer at a time)")
    return 0


@dataclass
class CorpusResult:
    name: str
    docs: int
    tokens: int
    skipped: int
    seconds: float
    path: Path


def score_corpus(scorer: Scorer, tokenizer, source, spec: CorpusSpec, out: Path, options: dict,
                 quiet: bool = False, parallel: Parallel | None = None, budget: float = float("inf")):
    """Score one corpus and write ``out/NAME.safetensors`` atomically (rank 0). Resumable: per-layer
    checkpoints live in ``out/.cusprun-checkpoint/NAME`` until the score file is written."""
    parallel = parallel or Parallel()
    config = scorer.config
    ids = tokenize(spec.documents, tokenizer, options["max_tokens"], config.vocab_size)
    skipped = [doc.where for doc, t in zip(spec.documents, ids) if not t]
    kept = [t for t in ids if t]
    if not kept:
        raise CusprunError(f"corpus {spec.name} ({spec.path}) has no document with tokens")
    if parallel.is_main:
        for where in skipped:
            print(f"warning: {where}: document has no tokens, skipped", file=sys.stderr)
    n_tokens = sum(map(len, kept))
    metadata = {
        "measure": scorer.measure, "model": source.model_id, "config_hash": config_hash(config),
        "architecture": architecture(config),
        "corpus": spec.path, "corpus_sha256": corpus_sha256(spec.path), "n_docs": len(kept),
        "token_counts": [len(t) for t in kept], "skipped": skipped, "cusprun_version": __version__, **options,
    }
    tokens_hash = hashlib.sha256(repr(kept).encode()).hexdigest()
    checkpoint = Checkpoint(out / CHECKPOINTS / spec.name, fingerprint(metadata=metadata, tokens=tokens_hash),
                            parallel.rank, parallel.world)
    start = time.perf_counter()
    with progress_bar(n_tokens, spec.name, disable=quiet or not parallel.is_main) as bar:
        scores = scorer.score_documents(kept, partial(advance, bar, len(kept), config.num_hidden_layers), checkpoint,
                                        parallel, device_budget=budget / 4)
    seconds = time.perf_counter() - start
    target = out / f"{spec.name}.safetensors"
    if parallel.is_main:
        ScoreSet(scores, metadata).save(target)
    parallel.barrier()
    if parallel.is_main:
        checkpoint.remove()
    return CorpusResult(spec.name, len(kept), n_tokens, len(skipped), seconds, target)


def run_baseline(args, corpora: list[CorpusSpec], out: Path) -> int:
    """Score files of a baseline method: one per corpus, or OUT/METHOD.safetensors for data-free ones."""
    config, tokenizer, source = open_model(args.model, quiet=args.quiet)
    model = load_weights(source, args.dtype, args.device, args.quiet)
    results = []
    for spec in corpora or [CorpusSpec(args.method, "", [])]:
        ids = [t for t in tokenize(spec.documents, tokenizer, args.max_tokens, config.vocab_size) if t]
        if spec.documents and not ids:
            raise CusprunError(f"corpus {spec.name} ({spec.path}) has no document with tokens")
        start = time.perf_counter()
        with progress_bar(sum(map(len, ids)), spec.name, disable=args.quiet or not ids) as bar:
            score_set = baseline_scores(model, args.method, ids, seed=args.seed, corpus=spec.path,
                                        on_doc=bar.update)
        score_set.metadata.update({"model": source.model_id, "max_tokens": str(args.max_tokens),
                                   "dtype": args.dtype})
        if spec.path:
            score_set.metadata["corpus_sha256"] = corpus_sha256(spec.path)
        target = score_set.save(out / f"{spec.name}.safetensors")
        results.append(CorpusResult(spec.name, len(ids), sum(map(len, ids)), 0,
                                    time.perf_counter() - start, target))
    print_summary(results)
    return 0


def print_summary(results: list[CorpusResult]) -> None:
    print(f"{'corpus':<16}{'docs':>6}{'tokens':>9}{'skipped':>9}{'seconds':>9}{'tok/s':>9}  file")
    for r in results:
        print(f"{r.name:<16}{r.docs:>6}{r.tokens:>9}{r.skipped:>9}{r.seconds:>9.1f}"
              f"{r.tokens / max(r.seconds, 1e-9):>9.1f}  "
              f"{r.path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
