"""Expert quality against the baselines, on SmolLM2-135M with real corpora (docs/expert-quality.md).

    python benchmarks/expert_quality.py            # the full benchmark (under an hour on 2 CPU cores)
    python benchmarks/expert_quality.py --quick    # a smoke test of every path (minutes; CI)

Experts, each built from the calibration corpora (data/corpora) of its dimensions:
  de                   German (Debian Reference)
  de+medical           German x medical (MEDLINE abstracts)
  de+medical+qa        German x medical x question answering (SQuAD-shifts new_wiki)
Methods at each ratio of projection parameters removed (every expert exported in the same dense format):
  cusprun-channels the library's default: whole MLP channels (attention and hidden size kept whole), rank
                   budget (layers lose what each corpus's rank threshold takes from them), block measure,
                   all-docs rule, every layer keeping a multiple of 64 channels (cusprun.selection.units; every
                   cusprun method below keeps that default alignment unless it names another)
  cusprun-channels-comp  the same channels, down_proj refit over the kept channels, independent (--refit
                   independent, cusprun.experts.compensate; Gram statistics from a local-measure scoring pass with
                   --stats; each input's ridge relative to its own energy where they hold 4 tokens per input,
                   --ridge-scale auto): the library's default refit until the sequential one won
  cusprun-channels-seqcomp  the same refit, sequential (--refit sequential, prune's default): each layer's
                   down_proj fit on the inputs the pruned and refit layers below give it; only when named in
                   --methods
  cusprun-channels-meanridge-comp  the same refit with one ridge for all inputs (--ridge-scale mean, the
                   rule before); only when named in --methods
  cusprun-channels-eqcorpus-comp  the same refit with every corpus weighing the same in the summed Gram
                   statistics (corpus_weight="equal"; the default weighs each corpus by its token count);
                   only when named in --methods
  cusprun-units    whole query heads and MLP channels, rank budget
  cusprun-channels-equal-comp  compensated channels, every layer losing the same number (--budget equal);
                   only when named in --methods
  cusprun-channels-unaligned-comp, cusprun-channels-align16-comp  compensated channels as selected
                   (--align 1) or keeping multiples of 16; only when named in --methods
  cusprun-channels-align64-comp  the default's alignment named explicitly (the same experts as
                   cusprun-channels-comp on SmolLM2); only when named in --methods
  cusprun-neurons  the paper's per-neuron selection (the same sigma share from every row/column group)
  cusprun-pairs, cusprun-pairs-comp, cusprun-pairs-local, cusprun-pairs-local-comp  MLP channels and RoPE
                   pairs of q and k (every k/v head of a layer drops its weakest pairs, the same number in
                   each; neurons="mlp+pairs"), block or local measure, with or without compensation; only
                   when named in --methods
  cusprun-layers-comp, cusprun-more-layers-comp  the paper's section 4.5: the decoder layers of lowest block
                   influence on the expert's corpora dropped first (a third, or two thirds, of the ratio as
                   whole layers), then compensated MLP channels of the other layers (the second only when
                   named in --methods)
  plnd      PLND importances on the same target corpora, the paper's selection
  wanda-sp, flap, shortgpt   on a general corpus (equal shares of every calibration corpus)
  magnitude, random          no data
Evaluation (data/heldout, disjoint from calibration): perplexity over the first 12 documents (up to 128
tokens each) of each held-out set a model is judged on (an expert: its target sets and the general ones; a
general baseline: all of them); an expert's *target* perplexity is the geometric mean over its dimensions of
each dimension's geometric mean over its sets (German: Debian Reference and news from another source, MLSUM;
medical: MEDLINE; QA: new_wiki and New York Times paragraphs); *general* perplexity the geometric mean over
English news (XSum) and English manual pages, which no expert targets.
Calibration: every shipped document of each dimension, up to 100 (German 100, medical 40, QA 40), of up
to 128 tokens: the main job's documents at half its length (the baselines' general mix: 20 of each of its
5 corpora, 100). Also at the first ratio, one change each from the default: the local measure, the equal
and relative budgets, the mean-rank and pooled rules (ablations); and the compensated German expert's
quality against its corpus size (sweep). Every model is evaluated as its dense export, which computes what
the masked model computes.
Speed of the main comparison's models, measured in the same run on each one's dense export
(cusprun.apply(..., format="dense"); models whose weights all have the same shapes run the same computation
and are timed once, their FLOP counts taken one by one): prefill
tokens/s on 512-token documents and decode tokens/s (greedy, KV cache), the median of several repetitions
(cusprun.evaluation.evaluate's harness, as the main job uses); prefill speed-ups against the dense model timed right
before each repetition (the median of the ratios, so the drift of the machine over the run cancels); the
ideal speed-up from the FLOP count of a 512-token prefill, and measured / ideal.

Writes benchmarks/results/expert_quality.{md,png} and expert_quality_sweep.png for this run, and adds its
rows to expert_quality.csv after earlier runs' (with --quick: under --out only, default a temporary
folder). Scores are cached under benchmarks/.cache/ so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_records, at_least, environment  # noqa: E402

import cusprun  # noqa: E402
from cusprun.core.corpus import read_corpus, tokenize  # noqa: E402
from cusprun.core.errors import CusprunError, OneLineArgumentParser, run_cli  # noqa: E402
from cusprun.core.files import atomic_write  # noqa: E402
from cusprun.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from cusprun.core.neurons import influence_name  # noqa: E402
from cusprun.engine.score_corpora import prepare_out  # noqa: E402
from cusprun.engine.sources import InMemoryLayers  # noqa: E402
from cusprun.evaluation.evaluate import paired_prefill, parameter_count, perplexity  # noqa: E402
from cusprun.experts.calibration import refit_layers  # noqa: E402
from cusprun.experts.compensate import (  # noqa: E402
    DEFAULT_RIDGE,
    DEFAULT_RIDGE_SCALE,
    compensate,
    refit_widths,
    resolved_ridge_scale,
)
from cusprun.scores.baselines import baseline_scores  # noqa: E402
from cusprun.scores.scoreset import ScoreSet  # noqa: E402
from cusprun.scores.stats import DEFAULT_CORPUS_WEIGHT  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"
CACHE = Path(__file__).resolve().parent / ".cache" / "expert_quality"
EXPERTS = (("de",), ("de", "medical"), ("de", "medical", "qa"))
EVAL_SETS = {"de": ("de", "de_news"), "medical": ("medical",), "qa": ("qa", "qa_nyt")}
GENERAL_SETS = ("en_news", "en_man")
GENERAL_CALIBRATION = ("de", "en", "medical", "legal", "qa")
# methods whose scores come from the expert's own corpora, with the selection settings each uses
TARGETED = {"cusprun-channels": dict(granularity="unit", neurons="mlp"),
            # the same channels (local and block channel scores are equal), down_proj refit by ridge least squares
            "cusprun-channels-comp": dict(granularity="unit", neurons="mlp", measure="local", compensate=DEFAULT_RIDGE),
            "cusprun-units": dict(granularity="unit", neurons="all"),
            "cusprun-neurons": dict(granularity="neuron", neurons="all"), "plnd": {},
            # every layer loses the same number of channels (the strictly uniform budget the default's
            # cross-layer rank threshold is measured against), compensated
            "cusprun-channels-equal-comp": dict(granularity="unit", neurons="mlp", measure="local",
                                                compensate=DEFAULT_RIDGE, budget="equal"),
            # the paper's §4.5 combination: the least influential layers dropped first (a third, or two thirds,
            # of the ratio as whole layers), compensated channels of the other layers for the rest
            "cusprun-layers-comp": dict(granularity="unit", neurons="mlp", measure="local", compensate=DEFAULT_RIDGE,
                                        drop_share=1 / 3),
            # compensated channels as selected, or every layer keeping a multiple of 16 or of 64 of them
            # (units.align_channels; 64 is the default on MLPs at least 1024 wide, SmolLM2's included)
            "cusprun-channels-unaligned-comp": dict(granularity="unit", neurons="mlp", measure="local",
                                                    compensate=DEFAULT_RIDGE, align=1),
            "cusprun-channels-align16-comp": dict(granularity="unit", neurons="mlp", measure="local",
                                                  compensate=DEFAULT_RIDGE, align=16),
            "cusprun-channels-align64-comp": dict(granularity="unit", neurons="mlp", measure="local",
                                                  compensate=DEFAULT_RIDGE, align=64),
            # the default's channels refit with one ridge for all inputs (the rule before the per-input one)
            "cusprun-channels-meanridge-comp": dict(granularity="unit", neurons="mlp", measure="local",
                                                    compensate=DEFAULT_RIDGE, ridge_scale="mean"),
            # the default's channels refit sequentially: each layer's down_proj fit on the inputs the pruned and refit
            # layers below give it, to what its dense weights compute on them (cusprun.experts.calibration)
            "cusprun-channels-seqcomp": dict(granularity="unit", neurons="mlp", measure="local",
                                             compensate=DEFAULT_RIDGE, refit="sequential"),
            # the default's channels refit on Gram statistics weighing every corpus the same (not by token count)
            "cusprun-channels-eqcorpus-comp": dict(granularity="unit", neurons="mlp", measure="local",
                                                   compensate=DEFAULT_RIDGE, corpus_weight="equal"),
            "cusprun-more-layers-comp": dict(granularity="unit", neurons="mlp", measure="local",
                                             compensate=DEFAULT_RIDGE, drop_share=2 / 3),
            # channels and RoPE pair slots of q and k, each kind losing the same share: pair scores from the
            # block measure's exact q/k-row ablations or from the local measure's key norms, and compensated
            "cusprun-pairs": dict(granularity="unit", neurons="mlp+pairs"),
            "cusprun-pairs-local": dict(granularity="unit", neurons="mlp+pairs", measure="local"),
            "cusprun-pairs-comp": dict(granularity="unit", neurons="mlp+pairs", compensate=DEFAULT_RIDGE),
            "cusprun-pairs-local-comp": dict(granularity="unit", neurons="mlp+pairs", measure="local",
                                             compensate=DEFAULT_RIDGE)}
# measured once (benchmarks/results/expert_quality_{layers,pairs,align}.md) and run only when named
# in --methods, which keeps the full benchmark under an hour
BY_NAME_ONLY = ("cusprun-channels-equal-comp", "cusprun-channels-unaligned-comp", "cusprun-channels-align16-comp",
                "cusprun-channels-align64-comp", "cusprun-channels-meanridge-comp", "cusprun-channels-seqcomp",
                "cusprun-channels-eqcorpus-comp",
                "cusprun-more-layers-comp",
                "cusprun-pairs", "cusprun-pairs-local", "cusprun-pairs-comp", "cusprun-pairs-local-comp")
DEFAULT = "cusprun-channels"  # the library's default selection (cusprun.scores.scoreset.ScoreSet.select)
# the corpus-size sweep's method: the main job's expert, whose refit and selection gain from more calibration
# documents (docs/experts.md, "Calibration size")
SWEPT = "cusprun-channels-comp"
GENERAL_METHODS = ("wanda-sp", "flap", "shortgpt", "magnitude", "random")
# one change each from the default (TARGETED[DEFAULT])
ABLATIONS = {"local measure": dict(measure="local"), "equal budget": dict(budget="equal"),
             "relative budget": dict(budget="relative"),
             "mean-rank rule": dict(rule="mean-rank"), "pooled rule": dict(rule="pooled")}
SCORED_AS = {m: "cusprun" for m in TARGETED if m.startswith("cusprun")}  # one score file, several selections
# --ablations: every variant at every ratio, and two changes together
ALL_RATIO_VARIANTS = {"default": {}, **ABLATIONS, "local measure + mean-rank": dict(measure="local", rule="mean-rank")}


@dataclass(frozen=True)
class Settings:
    ratios: tuple[float, ...]
    docs: int  # calibration documents per dimension, at most (a corpus holding fewer gives all it holds)
    sweep: tuple[int, ...]
    max_tokens: int
    eval_docs: int
    general_docs: int  # per corpus of the general calibration mix
    experts: tuple[tuple[str, ...], ...]
    speed_docs: int = 1  # 512-token documents timed per prefill repetition
    speed_tokens: int = 512
    decode_tokens: int = 32
    # 5, not 3: with 3, two models of identical shapes measured 0.86 and 0.90 of the same ideal in one run
    repetitions: int = 5
    # decode (reported, no target) is timed fewer times: 32 tokens one forward each cost as much as a prefill
    decode_repetitions: int = 3


# 12 held-out documents per set (1,500 tokens), not 16: evaluation was half of the run's time, and 12 keep the
# full run under an hour on a slow day of a 2-core CPU (docs/expert-quality.md)
FULL = Settings((0.25, 0.35, 0.45), 100, (10, 25, 50, 100), 128, 12, 20, EXPERTS)
QUICK = Settings((0.25,), 2, (1, 2), 24, 2, 1, EXPERTS[:2], speed_docs=1, speed_tokens=64, decode_tokens=4,
                 repetitions=1, decode_repetitions=1)


def expert_name(dims) -> str:
    return "+".join(dims)


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values))


class Bench:
    def __init__(self, settings: Settings, quiet: bool, cache: Path):
        self.s, self.quiet, self.cache = settings, quiet, cache
        self.model, self.tokenizer, _ = load_model(DEFAULT_MODEL, quiet=quiet)
        vocab = self.model.config.vocab_size
        dims = sorted({d for e in settings.experts for d in e})
        calib_n = {d: max(settings.docs, *settings.sweep) if d == "de" else settings.docs for d in dims}
        self.calib = {d: self._ids(DATA / "corpora" / f"{d}.jsonl", calib_n[d], vocab, at_most=True) for d in dims}
        self.general = [i for c in GENERAL_CALIBRATION
                        for i in self._ids(DATA / "corpora" / f"{c}.jsonl", settings.general_docs, vocab)]
        sets = {s for d in dims for s in EVAL_SETS[d]} | set(GENERAL_SETS)
        self.heldout = {s: self._ids(DATA / "heldout" / f"{s}.jsonl", settings.eval_docs, vocab) for s in sorted(sets)}
        self.heldout_digest = hashlib.sha256(repr(sorted(self.heldout.items())).encode()).digest()
        # speed: held-out English news concatenated into documents of exactly speed_tokens tokens
        stream = [t for ids in tokenize(read_corpus(DATA / "heldout" / "en_news.jsonl"), self.tokenizer, 4096, vocab)
                  for t in ids]
        n = settings.speed_tokens
        self.speed_docs = [stream[i * n:(i + 1) * n] for i in range(settings.speed_docs)]
        self.dense_speed = None
        self.speeds: dict[tuple, dict[str, float]] = {}  # by architecture (see speed)
        self.seconds = dict.fromkeys(("scoring", "building", "evaluation", "speed"), 0.0)  # where the run's time went

    def _ids(self, path: Path, n: int, vocab: int, at_most: bool = False) -> list[list[int]]:
        """The first ``n`` non-empty documents of ``path``, tokenized (all of them, if ``at_most`` and fewer)."""
        ids = [t for t in tokenize(read_corpus(path), self.tokenizer, self.s.max_tokens, vocab) if t][:n]
        if len(ids) < n and not at_most:
            raise CusprunError(f"{path} holds {len(ids)} documents, {n} are needed")
        return ids

    def scores(self, method: str, corpus: str, docs: list[list[int]], measure: str = "block",
               stats: bool = False) -> ScoreSet:
        """A cached ScoreSet: the file name carries the method and a hash of the exact tokens scored."""
        digest = hashlib.sha256(repr(docs).encode()).hexdigest()[:16]
        # local scores always come from a pass that also collects the statistics: the scores are the same with or
        # without them, and the compensated experts need that pass over the same documents anyway
        collect = stats or measure == "local"
        tag = (measure + ("-stats" if collect else "")) if method == "cusprun" else method
        path = self.cache / f"{tag}-{corpus}-{len(docs)}docs-{digest}.safetensors"
        if path.exists():
            cached = ScoreSet.load(path, stats=stats)
            if method != "cusprun" or influence_name(0) in cached.scores:  # older files lack block influence
                return cached
        start = time.perf_counter()
        if method == "cusprun":
            result = cusprun.score(self.model, docs, measure, corpus=corpus, progress=not self.quiet, stats=collect)
        else:
            result = baseline_scores(self.model, method, docs, corpus=corpus)
        seconds = time.perf_counter() - start
        self.seconds["scoring"] += seconds
        result.metadata["seconds"] = f"{seconds:.1f}"
        self.cache.mkdir(parents=True, exist_ok=True)
        result.save(path)
        return ScoreSet.load(path, stats=stats)  # as a rerun will see it (metadata as stored)

    def doc_counts(self, dims, n_docs: int | None = None) -> str:
        """The calibration documents each dimension gives an expert, e.g. ``"100+40"``."""
        return "+".join(str(min(n_docs or self.s.docs, len(self.calib[d]))) for d in dims)

    def expert_scores(self, method: str, dims, n_docs: int | None = None, measure: str = "block",
                      stats: bool = False, corpus_weight: str = DEFAULT_CORPUS_WEIGHT) -> ScoreSet:
        """The intersection over ``dims`` of each dimension's first ``n_docs`` documents' scores (its statistics
        summed with ``corpus_weight``, cusprun.scores.stats.corpus_weights).

        A document's scores do not depend on the others, so every dimension is scored once over the
        comparison's documents (or the sweep's, where it asks for more) and smaller sizes take leading rows."""
        n = n_docs or self.s.docs
        if stats and measure == "block":
            # The statistics are XᵀX of o_proj's and down_proj's inputs in the unpruned forward pass, the same
            # under both measures (`cusprun.score --stats` collects them in either pass): block scores with the
            # local pass's statistics, instead of a second block pass with --stats
            block = self.expert_scores(method, dims, n, "block")
            return replace(block, stats=self.expert_scores(method, dims, n, "local", True, corpus_weight).stats)
        if stats:  # Gram matrices are sums over the documents: score exactly the first n
            return cusprun.intersect(*(self.scores(method, d, self.calib[d][:n], measure, True) for d in dims),
                                     corpus_weight=corpus_weight)
        scored = max(n, self.s.docs)  # the comparison's documents, or more for the sweep
        return cusprun.intersect(*(first_documents(self.scores(method, d, self.calib[d][:scored], measure), n)
                                   for d in dims))

    def speed(self, model) -> dict[str, float]:
        """Prefill and decode tokens/s of ``model`` (the dense model or an expert's dense export), the median
        over repetitions, and the FLOP count of one prefill; measured in this run, never read from the cache
        (within the run, an expert whose weights have the shapes of one timed before reuses that timing).

        For an expert every repetition times the dense model's prefill right before its own, and its prefill
        speed-up is the median of the repetitions' ratios (cusprun.evaluation.evaluate.paired_prefill): this machine
        drifts by more than the differences measured (the dense prefill went from 451 to 567 tokens/s over one
        run), so a reference timed once at the start and once at the end would favour whichever models ran when
        the machine was fast. (Decode speed-ups, not a target, are against that start-and-end mean: pairing
        them too would add minutes.)"""
        expert = model is not self.model
        counts = {"flops": prefill_flops(model, self.s.speed_tokens), "params": parameter_count(model)}
        # Models of one architecture (every weight's shape: the compensated and plain channels of one expert and
        # ratio) run the same dense computation, so they are timed once. (Their FLOP counts can still differ:
        # the ideal counts nonzero weights, and a refit fills the few exact zeros of the original weights.)
        arch = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
        if expert and arch in self.speeds:
            return {**self.speeds[arch], **counts}
        start = time.perf_counter()
        prefill, speedup = paired_prefill(model, self.speed_docs, self.s.repetitions, self.model if expert else None)
        prompt = self.speed_docs[0][:32]
        decode = [decode_tokens_per_s(model, prompt, self.s.decode_tokens) for _ in range(self.s.decode_repetitions)]
        timing = {"prefill_tps": prefill, "decode_tps": statistics.median(decode)}
        if expert:
            timing["prefill_speedup"] = speedup
            self.speeds[arch] = timing
        self.seconds["speed"] += time.perf_counter() - start
        return {**timing, **counts}

    def evaluate(self, selection, model, tag: str = "", dims=None) -> dict[str, float]:
        """Perplexity of ``model`` (``selection``'s dense export, or the dense model for None) on the held-out
        sets an expert with dimensions ``dims`` is judged on (its target sets and the general ones; every set for
        None, as a general model is reported for every expert); cached by the plan's masks and the exact
        held-out tokens, so a rerun evaluates only the sets it has not seen for that plan. ``tag`` names weights
        changed beyond the plan (compensation)."""
        h = hashlib.sha256(self.heldout_digest + tag.encode())
        if selection is not None:
            for name in sorted(selection.plan):
                h.update(name.encode() + selection.plan[name].numpy().tobytes())
        path = self.cache / f"ppl-{h.hexdigest()[:20]}.json"
        ppl = json.loads(path.read_text()) if path.exists() else {}
        wanted = self.heldout if dims is None else [*(s for d in dims for s in EVAL_SETS[d]), *GENERAL_SETS]
        missing = [name for name in wanted if name not in ppl]
        if missing:
            start = time.perf_counter()
            ppl.update({name: perplexity(model, self.heldout[name])[0] for name in missing})
            self.seconds["evaluation"] += time.perf_counter() - start
            self.cache.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(ppl)))
        return {name: ppl[name] for name in wanted}


@torch.inference_mode()
def decode_tokens_per_s(model, prompt: list[int], new_tokens: int) -> float:
    """Greedy decoding with the model's KV cache, one token per forward: new tokens per second, the prompt's
    prefill not timed. (A plain loop: generate()'s per-call setup would dominate a few tokens on a CPU.)"""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return new_tokens / (time.perf_counter() - start)


def linear_flops(model, tokens: int) -> int:
    """2 per nonzero weight of every linear layer (projections and lm_head) per token: the GEMM part of
    :func:`prefill_flops`."""
    return 2 * tokens * sum(int(m.weight.count_nonzero()) for m in model.modules() if isinstance(m, torch.nn.Linear))


def prefill_flops(model, tokens: int) -> int:
    """Multiply-add FLOPs (2 per nonzero weight per token) of a ``tokens``-token causal prefill: every linear
    layer (projections and lm_head) plus attention scores and values, 2 · heads · (qk_dim + head_dim) per
    (query, key) pair (qk_dim: q and k's head dimension, narrower where RoPE pairs went), keys limited to the
    sliding window where there is one. Norms, activations and RoPE are left out.
    Weights that are exactly zero (neurons removed inside a kept unit) do not count: the ideal is what the
    plan removes, whether or not the export can skip it."""
    total = linear_flops(model, tokens)
    window = getattr(model.config, "sliding_window", None)
    for layer in model.model.layers:
        attn = layer.self_attn
        if attn is None:
            continue
        heads = attn.o_proj.in_features // attn.head_dim
        layer_window = getattr(attn, "sliding_window", window) or tokens
        pairs = sum(min(t, layer_window) for t in range(1, tokens + 1))
        total += 2 * heads * (getattr(attn, "qk_dim", attn.head_dim) + attn.head_dim) * pairs
    return total


def first_documents(score_set: ScoreSet, n: int) -> ScoreSet:
    """The scores of ``score_set``'s first ``n`` documents (all of them, where it holds fewer)."""
    n = min(n, len(score_set.metadata["token_counts"]))
    meta = {**score_set.metadata, "n_docs": n, "token_counts": score_set.metadata["token_counts"][:n]}
    return ScoreSet({name: t[:n] for name, t in score_set.scores.items()}, meta)


def summarize(ppl: dict[str, float], dims) -> tuple[float, float]:
    """(target, general) perplexity of an expert with dimensions ``dims``."""
    target = geomean(geomean(ppl[s] for s in EVAL_SETS[d]) for d in dims)
    return target, geomean(ppl[s] for s in GENERAL_SETS)


def run(settings: Settings, quiet: bool, cache: Path = CACHE, ablations_only: bool = False,
        methods: tuple[str, ...] | None = None, extras: bool = True,
        variants: tuple[str, ...] | None = None, speed: bool = True) -> tuple[list[dict], dict[str, float]]:
    """Evaluate every job; ``methods`` limits the main comparison, ``variants`` the ablations, ``extras`` False
    skips ablations and sweep, ``speed`` False the speed measurements (rows still count the parameters). Returns
    the rows and the seconds spent scoring, building, evaluating and timing (work the cache saved is not
    counted)."""
    bench = Bench(settings, quiet, cache)
    rows: list[dict] = []
    jobs = ["dense"]
    first = settings.ratios[0]
    targeted = [m for m in TARGETED if (methods is None and m not in BY_NAME_ONLY) or (methods and m in methods)]
    general = [m for m in GENERAL_METHODS if methods is None or m in methods]
    if ablations_only:
        jobs += [("ablation", ratio, DEFAULT, dims, {"variant": v, **kw}) for ratio in settings.ratios
                 for v, kw in ALL_RATIO_VARIANTS.items() for dims in settings.experts]
    else:
        for ratio in settings.ratios:
            jobs += [("main", ratio, m, dims, {}) for dims in settings.experts for m in targeted]
            jobs += [("main", ratio, m, None, {}) for m in general]
        if extras:
            jobs += [("ablation", first, DEFAULT, dims, {"variant": v, **kw})
                     for v, kw in ABLATIONS.items() for dims in settings.experts if variants is None or v in variants]
            jobs += [("sweep", first, SWEPT, ("de",), {"docs": n}) for n in settings.sweep
                     if n != settings.docs]
    speeds = speed and not ablations_only
    if speeds:
        bench.dense_speed = [bench.speed(bench.model)]
    bar = tqdm(jobs, desc="models", unit="model", disable=quiet, file=sys.stderr, dynamic_ncols=True)
    for job in bar:
        if job == "dense":
            ppl = bench.evaluate(None, bench.model)
            for dims in settings.experts:
                rows.append(_row("main", "dense", dims, 0.0, 0.0, "-", ppl, "-"))
            continue
        experiment, ratio, method, dims, kw = job
        bar.set_postfix_str(f"{experiment} {method} {expert_name(dims) if dims else 'general'} {ratio:.0%}")
        kw = {**TARGETED.get(method, {}), **kw}
        variant = kw.pop("variant", "default")
        n_docs = kw.pop("docs", settings.docs)
        measure = kw.pop("measure", "block")
        ridge = kw.pop("compensate", None)  # a ridge: refit the output projections (needs the Gram statistics)
        ridge_scale = kw.pop("ridge_scale", DEFAULT_RIDGE_SCALE)
        refit = kw.pop("refit", "independent")
        corpus_weight = kw.pop("corpus_weight", DEFAULT_CORPUS_WEIGHT)
        if "drop_share" in kw:  # that share of the ratio as whole layers, the nearest whole number of them
            kw["drop_layers"] = math.floor(kw.pop("drop_share") * ratio * bench.model.config.num_hidden_layers + 0.5)
        if dims is None:  # general-corpus and data-free baselines: one model, reported for every expert
            docs = None if method in ("magnitude", "random") else bench.general
            score_set = bench.scores(method, "general", docs) if docs else baseline_scores(bench.model, method)
        else:
            score_set = bench.expert_scores(SCORED_AS.get(method, method), dims, n_docs, measure, ridge is not None,
                                            corpus_weight)
        start = time.perf_counter()
        selection = score_set.select(ratio, **kw)
        if ridge is not None:  # auto resolved as prune resolves it, from the statistics' token count
            ridge_scale = resolved_ridge_scale(ridge_scale, sum(score_set.metadata.get("token_counts", [])),
                                               refit_widths(selection.plan, bench.model.config.num_hidden_layers))
        if ridge is None:
            source = bench.model
        elif refit == "sequential":  # Gram matrices of the pruned model's own inputs, made layer by layer
            source = copy.deepcopy(bench.model)
            documents = [ids for d in dims for ids in bench.calib[d][:n_docs]]
            refit_layers(InMemoryLayers(source), selection.plan, documents, refit, ridge, ridge_scale)
        else:
            source = compensate(bench.model, selection.plan, score_set.stats, ridge, ridge_scale)
        model = cusprun.apply(source, selection, format="dense")
        bench.seconds["building"] += time.perf_counter() - start
        # the per-input rule's tag names its scale; the mean rule's is the one its cached perplexities carry
        tag = "" if ridge is None else f"compensate toward W {ridge}" + ("" if ridge_scale == "mean" else
                                                                         f" {ridge_scale} ridge")
        if ridge is not None:  # the refit weights depend on the statistics' documents, not only on the plan
            tag += f" statistics of {bench.doc_counts(dims, n_docs)} documents"
            tag += " sequential refit" if refit == "sequential" else ""
            if corpus_weight != "tokens" and len(dims) > 1:  # the tokens rule's tag is the one cached before
                tag += f" corpora weighted {corpus_weight}"
        ppl = bench.evaluate(selection, model, tag, dims)
        timing = (bench.speed(model) if speeds else {"params": parameter_count(model)}) if experiment == "main" else {}
        del model
        for expert in [dims] if dims else settings.experts:
            rows.append(_row(experiment, method, expert, ratio, selection.removed_fraction,
                             bench.doc_counts(dims, n_docs) if dims else len(docs) if docs else "-", ppl, variant)
                         | timing)
    if speeds:  # the dense model again at the end: its row shows the mean, the drift shows in the CSV
        bench.dense_speed.append(bench.speed(bench.model))
        reference = {k: statistics.mean(d[k] for d in bench.dense_speed) for k in ("prefill_tps", "decode_tps")}
        dense = bench.dense_speed[0]
        for r in rows:
            if r["method"] == "dense":
                r.update(dense, prefill_tps=reference["prefill_tps"], decode_tps=reference["decode_tps"],
                         dense_prefill_tps_runs="/".join(f"{d['prefill_tps']:.0f}" for d in bench.dense_speed))
            if "prefill_tps" in r:
                for kind in ("prefill", "decode"):  # experts' prefill: against the dense model timed beside it
                    speedup = r.get(f"{kind}_speedup", r[f"{kind}_tps"] / reference[f"{kind}_tps"])
                    r[f"{kind}_speedup"] = round(speedup, 3)
                r["ideal_speedup"] = round(dense["flops"] / r["flops"], 3)
                r["measured_over_ideal"] = round(r["prefill_speedup"] / r["ideal_speedup"], 3)
                r["prefill_tps"], r["decode_tps"] = round(r["prefill_tps"], 1), round(r["decode_tps"], 2)
    return rows, bench.seconds


def _row(experiment, method, dims, ratio, achieved, docs, ppl, variant) -> dict:
    target, general = summarize(ppl, dims)
    return {"experiment": experiment, "expert": expert_name(dims), "method": method, "variant": variant,
            "ratio": ratio, "achieved": round(achieved, 4), "docs": docs, "target_ppl": round(target, 2),
            "general_ppl": round(general, 2), **{f"ppl_{k}": round(v, 2) for k, v in ppl.items()}}


def _preamble(caption: str, env: dict, experts: list[str], first_column: str) -> list[str]:
    """Caption, environment line and the header of a table with a target / general column per expert."""
    return [caption, "", "`" + " | ".join(f"{k}={v}" for k, v in env.items()) + "`", "",
            f"| {first_column} | " + " | ".join(f"{e} target / general" for e in experts) + " |",
            "|---|" + "---|" * (len(experts) + first_column.count("|"))]


def _cells(by_expert: dict[str, dict], experts: list[str], best: dict[str, float] | None = None) -> str:
    """``target / general`` per expert, the target bold where it equals ``best[expert]``."""
    cells = []
    for e in experts:
        r = by_expert[e]
        target = f"{r['target_ppl']:.1f}"
        if best is not None and r["target_ppl"] == best[e]:
            target = f"**{target}**"
        cells.append(f"{target} / {r['general_ppl']:.1f}")
    return " | ".join(cells) + " |"


def _best_targets(rows: list[dict], experts: list[str]) -> dict[str, float]:
    return {e: min(r["target_ppl"] for r in rows if r["expert"] == e) for e in experts}


def _dense_row(rows: list[dict], experts: list[str]) -> str:
    return "| 0 | dense | " + _cells({r["expert"]: r for r in rows if r["method"] == "dense"}, experts)


def _sweep_rows(rows: list[dict], ratio: float) -> list[dict]:
    """The German expert's swept rows (:data:`SWEPT`) at ``ratio``, by corpus size."""
    return sorted((r for r in rows if r["expert"] == "de" and r["method"] == SWEPT and r["ratio"] == ratio
                   and r["variant"] == "default"), key=lambda r: int(r["docs"]))


def markdown(rows: list[dict], settings: Settings, env: dict) -> str:
    experts = [expert_name(d) for d in settings.experts]
    main = [r for r in rows if r["experiment"] == "main"]
    lines = _preamble(f"Expert quality on {DEFAULT_MODEL}: perplexity, target (geometric mean over the expert's "
                      "dimensions) / general (English news and manual pages). Lower is better; the best target per "
                      "expert and ratio is bold.", env, experts, "ratio | method")
    lines.append(_dense_row(main, experts))
    for ratio in settings.ratios:
        at = [r for r in main if r["ratio"] == ratio]
        best = _best_targets(at, experts)
        for method in (*TARGETED, *GENERAL_METHODS):
            by = {r["expert"]: r for r in at if r["method"] == method}
            if not by:  # left out with --methods
                continue
            achieved = next(iter(by.values()))["achieved"]
            label = method if abs(achieved - ratio) < 0.005 else f"{method} ({achieved:.1%} removed)"
            lines.append(f"| {ratio:.0%} | {label} | " + _cells(by, experts, best))
    first = settings.ratios[0]
    lines += speed_table(main, settings)
    lines += ["", f"Ablations at {first:.0%} (one change each from the default, {DEFAULT}: whole MLP channels, the "
              "rank budget, block measure, all-docs rule):", "",
              "| variant | " + " | ".join(f"{e} target / general" for e in experts) + " |",
              "|---|" + "---|" * len(experts)]
    variants = {"default": [r for r in main if r["method"] == DEFAULT and r["ratio"] == first]}
    for v in ABLATIONS:
        variants[v] = [r for r in rows if r["experiment"] == "ablation" and r["variant"] == v]
    for v, vrows in variants.items():
        if len(vrows) == len(experts):
            lines.append(f"| {v} | " + _cells({r["expert"]: r for r in vrows}, experts))
    lines += ["", f"Corpus size, German expert at {first:.0%} ({SWEPT}):", "",
              "| documents | target | general |", "|---|---|---|"]
    lines += [f"| {r['docs']} | {r['target_ppl']:.1f} | {r['general_ppl']:.1f} |" for r in _sweep_rows(rows, first)]
    return "\n".join(lines) + "\n"


def speed_table(main: list[dict], settings: Settings) -> list[str]:
    """Speed of every main model's dense export: one line per model (baselines' general models once; models
    of identical shapes share one timing, so their tok/s are equal)."""
    lines = ["", f"Speed of the dense exports ({settings.speed_docs} documents of {settings.speed_tokens} tokens per "
             f"prefill, {settings.decode_tokens} decoded tokens; median of {settings.repetitions} prefill and "
             f"{settings.decode_repetitions} decode repetitions; "
             "prefill speed-up: the median over the repetitions of the model's speed over the dense model's, "
             "timed right before it in each repetition; decode against the dense model's mean; ideal = dense "
             "FLOPs / expert FLOPs of the prefill; models of identical shapes are timed once):", "",
             "| ratio | method | expert | params | prefill tok/s | speed-up | ideal | measured / ideal | "
             "decode tok/s | decode speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in main:
        key = (r["ratio"], r["method"], r["expert"] if r["method"] in TARGETED else "")
        if "prefill_speedup" not in r or key in seen:
            continue
        seen.add(key)
        expert = r["expert"] if r["method"] in TARGETED else "(all)"
        lines.append(f"| {r['ratio']:.0%} | {r['method']} | {expert} | {r['params'] / 1e6:.1f}M | "
                     f"{r['prefill_tps']:.0f} | {r['prefill_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
                     f"{r['measured_over_ideal']:.2f} | {r['decode_tps']:.1f} | {r['decode_speedup']:.2f}x |")
    return lines


def markdown_ablations(rows: list[dict], settings: Settings, env: dict) -> str:
    """--ablations: target / general perplexity of every Cus-Prun variant at every ratio."""
    experts = [expert_name(d) for d in settings.experts]
    lines = _preamble(f"Cus-Prun variants on {DEFAULT_MODEL} at every ratio: perplexity target / general (as in "
                      f"expert_quality.md); one change from the default ({DEFAULT}: whole MLP channels, the same "
                      "share from every layer, block measure, all-docs rule) per row, and the last row two. The "
                      "best target per expert and ratio is bold.",
                      env, experts, "ratio | variant")
    lines.append(_dense_row(rows, experts))
    for ratio in settings.ratios:
        at = [r for r in rows if r["experiment"] == "ablation" and r["ratio"] == ratio]
        best = _best_targets(at, experts)
        for v in ALL_RATIO_VARIANTS:
            lines.append(f"| {ratio:.0%} | {v} | " + _cells({r["expert"]: r for r in at if r["variant"] == v},
                                                           experts, best))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], settings: Settings, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = [expert_name(d) for d in settings.experts]
    main = [r for r in rows if r["experiment"] == "main"]
    fig, axes = plt.subplots(2, len(experts), figsize=(4.6 * len(experts), 7.5), squeeze=False, sharex=True)
    for col, e in enumerate(experts):
        for row, key in enumerate(("target_ppl", "general_ppl")):
            ax = axes[row][col]
            for method in (*TARGETED, *GENERAL_METHODS):
                pts = sorted((r["ratio"], r[key]) for r in main if r["expert"] == e and r["method"] == method)
                if not pts:  # left out with --methods
                    continue
                style = "-o" if method in TARGETED else "--."
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method,
                        linewidth=2.2 if method == DEFAULT else 1.2)
            dense = next(r[key] for r in main if r["expert"] == e and r["method"] == "dense")
            ax.axhline(dense, color="black", linewidth=0.8, linestyle=":", label="dense")
            ax.set_yscale("log")
            ax.set_title(f"{e}: {'target' if row == 0 else 'general'} perplexity", fontsize=10)
            if row == 1:
                ax.set_xlabel("projection parameters removed")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "expert_quality.png"]
    _save(fig, paths[0])
    first = settings.ratios[0]
    sweep = _sweep_rows(rows, first)
    if len(sweep) > 1:  # without the sweep (--no-extras) there is no curve to draw
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for key, label in (("target_ppl", "German (target)"), ("general_ppl", "general")):
            ax.plot([int(r["docs"]) for r in sweep], [r[key] for r in sweep], "-o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([int(r["docs"]) for r in sweep], [str(r["docs"]) for r in sweep])
        ax.set_xlabel("calibration documents")
        ax.set_ylabel("perplexity")
        ax.set_title(f"German expert at {first:.0%} ({SWEPT}): corpus size", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "expert_quality_sweep.png")
        _save(fig, paths[1])
    plt.close("all")
    return paths


def _save(fig, path: Path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def parse_ratios(text: str) -> tuple[float, ...]:
    """``--ratios``: comma-separated fractions, each strictly between 0 and 1."""
    try:
        ratios = tuple(float(r) for r in text.split(","))
    except ValueError:
        raise CusprunError(f"--ratios {text!r}: expected comma-separated numbers such as 0.25,0.45") from None
    if not all(0 < r < 1 for r in ratios):
        raise CusprunError(f"--ratios {text!r}: every ratio must lie strictly between 0 and 1")
    return ratios


def parse_experts(text: str, known) -> tuple[tuple[str, ...], ...]:
    """``--experts``: comma-separated experts, each dimensions joined by '+', every dimension one of ``known``."""
    experts = tuple(tuple(e.split("+")) for e in text.split(","))
    unknown = [d for dims in experts for d in dims if d not in known]
    if unknown:
        raise CusprunError(f"--experts {text!r}: unknown dimension {unknown[0]!r} (known: {', '.join(known)})")
    return experts


def _listed(flag: str, value: str | None, known) -> tuple[str, ...] | None:
    """The comma-separated names of ``value``, each one of ``known`` (None: not given)."""
    if value is None:
        return None
    names = tuple(value.split(","))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CusprunError(f"{flag} {value!r}: unknown {unknown[0]!r} (known: {', '.join(known)})")
    return names


def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings: every path in a few minutes (CI)")
    ap.add_argument("--out", help="folder for the results (default: benchmarks/results; with --quick a temporary "
                                  "folder)")
    ap.add_argument("--ablations", action="store_true",
                    help="instead of the comparison: every Cus-Prun variant at every ratio "
                         "(expert_quality_ablations.{csv,md})")
    ap.add_argument("--cache", default=str(CACHE), help=f"score cache (default: {CACHE})")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--ratios", help="comma-separated ratios instead of the settings' (e.g. 0.25,0.45)")
    ap.add_argument("--experts", help="comma-separated experts instead of all (e.g. de,de+medical+qa)")
    ap.add_argument("--methods", help=f"comma-separated methods of the comparison (default: all of "
                                      f"{', '.join([*TARGETED, *GENERAL_METHODS])})")
    ap.add_argument("--no-extras", action="store_true", help="skip the ablations and the corpus-size sweep")
    ap.add_argument("--no-speed", action="store_true",
                    help="skip the speed measurements (perplexity only; the speed table stays empty)")
    ap.add_argument("--variants", help="comma-separated ablations to run (default: all; implies no sweep)")
    ap.add_argument("--docs", type=int, help="calibration documents per dimension, at most, instead of the settings'")
    ap.add_argument("--eval-docs", type=int, help="held-out documents per set instead of the settings'")
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.ratios is not None:  # "" is a mistake, not "the settings' ratios"
        settings = replace(settings, ratios=parse_ratios(args.ratios))
    if args.experts is not None:
        settings = replace(settings, experts=parse_experts(args.experts, list(EVAL_SETS)))
    at_least("--docs", args.docs, 1)
    at_least("--eval-docs", args.eval_docs, 1)
    if args.docs:
        settings = replace(settings, docs=args.docs)
    if args.eval_docs:
        settings = replace(settings, eval_docs=args.eval_docs)
    if args.no_extras or args.variants:  # no sweep: German is scored over its first settings.docs documents only
        settings = replace(settings, sweep=(settings.docs,))
    variants = _listed("--variants", args.variants, ABLATIONS)
    methods = _listed("--methods", args.methods, [*TARGETED, *GENERAL_METHODS])
    out = prepare_out(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="expert-quality-")) if args.quick
                                                  else RESULTS)
    torch.manual_seed(0)
    start = time.perf_counter()
    rows, seconds = run(settings, args.quiet, Path(args.cache), ablations_only=args.ablations, methods=methods,
                        extras=not args.no_extras, variants=variants, speed=not args.no_speed)
    env = {**environment(), "minutes": f"{(time.perf_counter() - start) / 60:.1f}",
           "minutes_by_phase": " ".join(f"{k}:{v / 60:.1f}" for k, v in seconds.items()),
           "settings": "quick" if args.quick else "full"}
    if args.ablations:
        table = markdown_ablations(rows, settings, env)
        print(table)
        append_records(out / "expert_quality_ablations.csv", [{**env, **r} for r in rows])
        atomic_write(out / "expert_quality_ablations.md", lambda tmp: Path(tmp).write_text(table))
        print(f"wrote {out / 'expert_quality_ablations.csv'} and {out / 'expert_quality_ablations.md'}")
        return 0
    table = markdown(rows, settings, env)
    print(table)
    append_records(out / "expert_quality.csv", [{**env, **r} for r in rows])
    atomic_write(out / "expert_quality.md", lambda tmp: Path(tmp).write_text(table))
    for path in plot(rows, settings, out):
        print(f"wrote {path}")
    print(f"wrote {out / 'expert_quality.csv'} and {out / 'expert_quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
