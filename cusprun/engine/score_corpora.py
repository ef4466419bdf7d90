"""Scoring corpora into score files: the library behind ``python -m cusprun.score`` and the main job.

:func:`score_corpus` scores one corpus with the engine (:mod:`cusprun.engine.layer_major`) and writes
``OUT/NAME.safetensors`` atomically, resumable from per-layer checkpoints; :func:`score_baseline` does
the same for a baseline method; :func:`open_scorer` loads the model in memory or streams it layer by
layer, as the memory budget decides.
"""

from __future__ import annotations

import hashlib
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..core.corpus import Document, corpus_sha256, read_corpus, tokenize
from ..core.errors import CusprunError
from ..core.models import DTYPES, load_weights, open_model, weights_digest
from ..core.progress import advance, progress_bar
from ..scores.baselines import baseline_scores
from ..scores.scorefile import score_metadata
from ..scores.scoreset import ScoreSet
from .checkpoint import Checkpoint, fingerprint
from .layer_major import Scorer
from .layer_scores import OUTPUTS_VERSION
from .parallel import Parallel

CHECKPOINTS = ".cusprun-checkpoint"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class CorpusSpec:
    name: str
    path: str
    documents: list[Document]


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
        if name.endswith(".stats"):  # NAME.stats.safetensors is the statistics file of corpus NAME
            raise CusprunError(f"--corpus {value!r}: NAME may not end in '.stats'")
        seen.add(name)
        specs.append(CorpusSpec(name, path, read_corpus(path)))
    return specs


def prepare_out(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A probe of its own per process: torchrun's ranks check the same folder at the same time,
        # and a shared probe name let one rank delete the file another was about to delete.
        with tempfile.NamedTemporaryFile(dir=path, prefix=".cusprun-write-test-"):
            pass
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
    """``60GiB``, ``500MB``, ``1e9`` -> bytes (a positive, finite size), or a one-line error."""
    match = re.fullmatch(r"\s*((?:\d+\.?\d*|\.\d+)(?:e\+?\d+)?)\s*([KMGT]i?)?B?\s*", text, re.IGNORECASE)
    unit = (match.group(2) or "").upper() if match else ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = float(match.group(1)) * scale if match else 0.0
    # zero would quietly stream every weight from disk, and a size past any machine's memory is a typo
    if not (1 <= size < 2**62):
        raise CusprunError(f"--max-memory {text!r}: expected a positive size such as 60GiB, 500MB or 1e9")
    return int(size)


def default_budget(device: str) -> int:
    """Memory the weights may take: 90% of the GPU's free memory, or half of the available RAM."""
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(0.9 * free)
    with open("/proc/meminfo") as fh:
        info = dict(line.split(":", 1) for line in fh)
    return int(info["MemAvailable"].split()[0]) * 1024 // 2


def open_scorer(config, source, measure: str, dtype: str, device: str, stream: bool, max_memory: int | None,
                parallel: Parallel, quiet: bool = False, batch_tokens: int | None = None, stats: bool = False):
    """An in-memory or a streaming scorer of the model ``open_model`` gave ``config`` and ``source`` for, as its
    size, ``stream`` and ``max_memory`` decide. Returns (scorer, memory budget, streamed)."""
    from .sources import StreamedLayers, loaded_bytes, open_tensors

    device = parallel.device(device)
    budget = max_memory if max_memory is not None else default_budget(device)
    if stream or loaded_bytes(source, DTYPES[dtype]) > budget:
        layers = StreamedLayers(open_tensors(source, config), config, DTYPES[dtype], device)
        return Scorer(measure=measure, layers=layers, batch_tokens=batch_tokens, stats=stats), budget, True
    weights = load_weights(source, dtype, device, quiet)
    return Scorer(weights, measure, batch_tokens=batch_tokens, stats=stats), budget, False


@dataclass
class CorpusResult:
    name: str
    docs: int
    tokens: int
    skipped: int
    seconds: float
    path: Path


@dataclass
class TokenizedCorpus:
    """A corpus's documents as token ids (``kept``), and where those without tokens were (``skipped``)."""

    spec: CorpusSpec
    kept: list[list[int]]
    skipped: list[str]


def tokenize_corpus(spec: CorpusSpec, tokenizer, max_tokens: int, vocab_size: int) -> TokenizedCorpus:
    """Every check a corpus needs (token ids in the vocabulary, a tokenizer for text, some document with
    tokens), with the model's config and tokenizer only: callers tokenize all corpora before the weights load."""
    ids = tokenize(spec.documents, tokenizer, max_tokens, vocab_size)
    kept = [t for t in ids if t]
    if not kept:
        raise CusprunError(f"corpus {spec.name} ({spec.path}) has no document with tokens")
    return TokenizedCorpus(spec, kept, [doc.where for doc, t in zip(spec.documents, ids) if not t])


def score_corpus(scorer: Scorer, corpus: TokenizedCorpus, source, out: Path, options: dict,
                 quiet: bool = False, parallel: Parallel | None = None, budget: float = float("inf")):
    """Score one corpus (:func:`tokenize_corpus` with ``options["max_tokens"]``) and write
    ``out/NAME.safetensors`` atomically (rank 0). Resumable: per-layer checkpoints live in
    ``out/.cusprun-checkpoint/NAME`` until the score file is written."""
    parallel = parallel or Parallel()
    config = scorer.config
    spec, kept, skipped = corpus.spec, corpus.kept, corpus.skipped
    if parallel.is_main:
        for where in skipped:
            print(f"warning: {where}: document has no tokens, skipped", file=sys.stderr)
    n_tokens = sum(map(len, kept))
    metadata = score_metadata(config, measure=scorer.measure, model=source.model_id, corpus=spec.path,
                              n_docs=len(kept), token_counts=[len(t) for t in kept], skipped=skipped,
                              corpus_sha256=corpus_sha256(spec.path), **options)
    tokens_hash = hashlib.sha256(repr(kept).encode()).hexdigest()
    checkpoint = Checkpoint(out / CHECKPOINTS / spec.name, fingerprint(metadata=metadata, tokens=tokens_hash,
                                                                        outputs=OUTPUTS_VERSION),
                            parallel.rank, parallel.world, weights=weights_digest(source))
    start = time.perf_counter()
    with progress_bar(n_tokens, spec.name, disable=quiet or not parallel.is_main) as bar:
        scores = scorer.score_documents(kept, partial(advance, bar, len(kept), config.num_hidden_layers), checkpoint,
                                        parallel, device_budget=budget / 4)
    seconds = time.perf_counter() - start
    target = out / f"{spec.name}.safetensors"
    if parallel.is_main:  # Gram matrices streamed from the checkpoint's layer files, one at a time
        grams = checkpoint.grams(config.num_hidden_layers) if scorer.stats else None
        ScoreSet(scores, metadata, grams).save(target)
    parallel.barrier()
    if parallel.is_main:
        checkpoint.remove()
    return CorpusResult(spec.name, len(kept), n_tokens, len(skipped), seconds, target)


def score_baseline(model_spec: str, method: str, corpora: list[CorpusSpec], out: Path, *, seed: int = 0,
                   max_tokens: int = 512, dtype: str = "float32", device: str = "cpu",
                   quiet: bool = False) -> list[CorpusResult]:
    """Score files of a baseline method (:mod:`cusprun.scores.baselines`): one per corpus, or OUT/METHOD.safetensors
    for methods that need no data."""
    config, tokenizer, source = open_model(model_spec, quiet=quiet)
    # every corpus checked before the weights load; a method that needs no data scores no documents
    tokenized = ([tokenize_corpus(spec, tokenizer, max_tokens, config.vocab_size) for spec in corpora]
                 or [TokenizedCorpus(CorpusSpec(method, "", []), [], [])])
    model = load_weights(source, dtype, device, quiet)
    results = []
    for corpus in tokenized:
        spec, ids = corpus.spec, corpus.kept
        fields = {"model": source.model_id, "max_tokens": str(max_tokens), "dtype": dtype}
        if spec.path:
            fields["corpus_sha256"] = corpus_sha256(spec.path)
        start = time.perf_counter()
        with progress_bar(sum(map(len, ids)), spec.name, disable=quiet or not ids) as bar:
            score_set = baseline_scores(model, method, ids, seed=seed, corpus=spec.path, on_doc=bar.update,
                                        metadata=fields)
        target = score_set.save(out / f"{spec.name}.safetensors")
        results.append(CorpusResult(spec.name, len(ids), sum(map(len, ids)), 0,
                                    time.perf_counter() - start, target))
    return results




def print_summary(results: list[CorpusResult]) -> None:
    """One line per scored corpus: documents, tokens, skipped, time, speed and file."""
    print(f"{'corpus':<16}{'docs':>6}{'tokens':>9}{'skipped':>9}{'seconds':>9}{'tok/s':>9}  file")
    for r in results:
        print(f"{r.name:<16}{r.docs:>6}{r.tokens:>9}{r.skipped:>9}{r.seconds:>9.1f}"
              f"{r.tokens / max(r.seconds, 1e-9):>9.1f}  "
              f"{r.path}")
