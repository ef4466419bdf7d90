"""The main job, end to end, in one process (one model load): the library behind ``python -m cusprun.pipeline``.

score the calibration corpora (local measure) -> build each expert (the default selection: whole MLP
channels irrelevant to every dimension, down_proj refit over the kept channels on the Gram matrices of its own
corpora, made at build time, dense per-layer widths; also a GGUF file where llama-cpp-python is installed)
-> evaluate the dense model and every expert on held-out text of the target
dimensions and on general text -> a table, OUT/summary.json / OUT/summary.md, and each expert's
pictures (:mod:`cusprun.evaluation.figures`) in OUT/plots/EXPERT/.

Scoring resumes: a score file whose metadata matches the corpus, model and options is reused.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.corpus import corpus_sha256, read_corpus, read_text_file
from ..core.errors import CusprunError
from ..core.files import atomic_write_text
from ..core.models import load_model
from ..core.neurons import Geometry, config_hash
from ..core.version import __version__
from ..engine.layer_major import Scorer
from ..engine.score_corpora import CorpusSpec, prepare_out, score_corpus, tokenize_corpus
from ..experts.build import build_expert, check_ratio
from ..experts.calibration import DEFAULT_REFIT, Calibration
from ..scores.scorefile import load_scores
from ..scores.scoreset import ScoreSet
from ..selection.units import reachable
from .evaluate import evaluate, read_texts, tokenize_texts
from .figures import write_plots

DATA = Path(__file__).resolve().parents[2] / "data"
DEFAULT_EXPERTS = ["de", "de+medical"]
DEFAULT_EVAL = ["de", "de_man", "medical", "en_man"]
GGUF_TYPE = "f16"  # each expert's GGUF where llama-cpp-python is installed; Q8_0 missed 2% (docs/deploy.md)


@dataclass
class MainJob:
    """What the main job runs: experts as corpus names joined by '+', held-out texts, and the settings."""

    model: str
    data: Path
    experts: list[str]
    evals: list[str]
    ratio: float = 0.25
    docs: int = 100  # at most, per corpus: every shipped one's (40-100); more made better experts (docs/experts.md)
    max_tokens: int = 256
    eval_max_tokens: int = 512
    measure: str = "local"  # the default experts' channel scores are the same under both measures
    compensate: bool = True  # refit down_proj over the kept channels (measured: better target perplexity)
    out: Path = Path("runs/main")
    quiet: bool = False

    def check(self) -> None:
        """Every input checked before the model loads."""
        for expert in self.experts:
            if not all(expert.split("+")):
                raise CusprunError(f"--expert {expert!r}: expected corpus names joined by '+', e.g. de+medical")
        for name in self.dimensions():
            if not (self.data / "corpora" / f"{name}.jsonl").is_file():
                raise CusprunError(f"no calibration corpus {self.data / 'corpora' / name}.jsonl")
        for name in self.evals:
            if not (self.data / "heldout" / f"{name}.jsonl").is_file():
                raise CusprunError(f"no held-out text {self.data / 'heldout' / name}.jsonl")
        check_ratio(self.ratio)
        for value, flag in ((self.docs, "--docs"), (self.max_tokens, "--max-tokens")):
            if value < 1:
                raise CusprunError(f"{flag} must be at least 1")
        if self.eval_max_tokens < 2:
            raise CusprunError("--eval-max-tokens must be at least 2")
        prepare_out(str(self.out))

    def dimensions(self) -> list[str]:
        return sorted({d for e in self.experts for d in e.split("+")})


def subset_corpus(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` documents of ``src`` as ``dst`` (rewritten only when they differ, so hashes stay put)."""
    lines = [line for line in read_text_file(src).splitlines() if line.strip()][:n]
    text = "".join(line + "\n" for line in lines)
    if not dst.exists() or dst.read_text() != text:
        atomic_write_text(dst, text)


def reusable(path: Path, corpus: Path, measure: str, options: dict, model_hash: str) -> bool:
    """Whether a score file was made from this corpus, model and options (then the job reuses it)."""
    if not path.exists():
        return False
    try:
        _, meta = load_scores(path)
    except CusprunError:
        return False
    return (meta.get("corpus_sha256") == corpus_sha256(corpus) and meta.get("measure") == measure
            and meta.get("config_hash") == model_hash
            and all(meta.get(k) == str(v) for k, v in options.items()))


def run_main_job(job: MainJob) -> tuple[dict, str]:
    """Score, build the experts, evaluate; write OUT/summary.{json,md} and the plots. Returns (summary, table)."""
    job.check()
    experts, evals, data, out, quiet = job.experts, job.evals, job.data, job.out, job.quiet
    dims = job.dimensions()
    for sub in ("corpora", "scores", "experts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # every corpus and held-out set read (and so checked) before the model loads
    specs = {}
    for name in dims:
        corpus = out / "corpora" / f"{name}.jsonl"
        subset_corpus(data / "corpora" / f"{name}.jsonl", corpus, job.docs)
        specs[name] = CorpusSpec(name, str(corpus), read_corpus(corpus))
    texts = read_texts([str(data / "heldout" / f"{name}.jsonl") for name in evals])
    started = time.perf_counter()
    model, tokenizer, source = load_model(job.model, quiet=quiet)
    largest = reachable(Geometry(model.config), ("channels",))
    if job.ratio > largest:  # before any scoring: the default experts remove whole MLP channels only
        raise CusprunError(f"--ratio {job.ratio}: the default experts remove whole MLP channels, which reach at most "
                           f"{largest:.4f} of {source.model_id}'s projection parameters")
    from transformers import AutoModelForCausalLM

    import cusprun_kernels

    cusprun_kernels.set_quiet(quiet)
    # no statistics files: the refit's Gram matrices are made per expert from its corpora (build-time calibration)
    scorer = Scorer(model, job.measure)
    options = {"max_tokens": job.max_tokens, "dtype": "float32", "backend": cusprun_kernels.resolve_backend("cpu"),
               "stats": False}
    # every corpus and held-out text tokenized before the first is scored
    corpora = {name: tokenize_corpus(spec, tokenizer, job.max_tokens, model.config.vocab_size)
               for name, spec in specs.items()}
    tokenized_texts = tokenize_texts(texts, tokenizer, job.eval_max_tokens, model.config.vocab_size)
    score_files = {}
    for name, tokenized in corpora.items():
        target = out / "scores" / f"{name}.safetensors"
        if reusable(target, Path(tokenized.spec.path), job.measure, options, config_hash(model.config)):
            print(f"scores for {name}: reusing {target}", file=sys.stderr)
        else:
            score_corpus(scorer, tokenized, source, out / "scores", options, quiet)
        score_files[name] = target
    rows = [("dense", evaluate(model, tokenized_texts, 32, "dense", quiet), None)]
    plots = importlib.util.find_spec("matplotlib") is not None
    if not plots:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
    for expert in experts:
        paths = [score_files[d] for d in expert.split("+")]
        sets = [ScoreSet.load(p) for p in paths]
        calibration = Calibration([ids for d in expert.split("+") for ids in corpora[d].kept],
                                  {d: corpora[d].spec.path for d in expert.split("+")})
        report = build_expert(model, tokenizer, source, sets, paths, job.ratio, "dense", out / "experts" / expert,
                              compensate=job.compensate, calibration=calibration, refit=DEFAULT_REFIT)
        pruned = AutoModelForCausalLM.from_pretrained(out / "experts" / expert).eval()
        rows.append((expert, evaluate(pruned, tokenized_texts, 32, expert, quiet, reference=model), report))
        if importlib.util.find_spec("llama_cpp") is not None:
            from .llama_cpp import write_and_measure

            try:
                gguf = write_and_measure(pruned, source, out / "experts" / f"{expert}.{GGUF_TYPE}.gguf", GGUF_TYPE,
                                         tokenized_texts)
            except CusprunError as exc:  # a model GGUF cannot hold (no tokenizer, a sliding window): the rest stands
                print(f"{expert}: no GGUF ({exc})", file=sys.stderr)
            else:
                rows[-1][1]["llama_cpp"] = gguf
                shown = ", ".join(f"{Path(t).stem} {p:.2f}" for t, p in gguf["perplexity"].items())
                print(f"{expert}: {gguf['run']}   (llama.cpp perplexity: {shown})")
        if plots:
            write_plots(sets, out / "plots" / expert, expert=out / "experts" / expert)
    summary = {"cusprun_version": __version__, "model": source.model_id, "ratio": job.ratio,
               "measure": job.measure, "compensate": job.compensate, "docs_per_corpus": job.docs,
               "max_tokens": job.max_tokens,
               "seconds": time.perf_counter() - started,
               "results": [{"model": name, **result,
                            "ratio_achieved_projection": None if rep is None else rep["ratio_achieved_projection"]}
                           for name, result, rep in rows]}
    table = format_table(rows, evals, list(texts))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.md", table + "\n")
    return summary, table




def format_table(rows, evals, texts) -> str:
    """The markdown table: parameters, removed share, perplexity per held-out text, prefill speed and speed-up
    (an expert's against the dense model timed beside it, :func:`cusprun.evaluation.evaluate.evaluate`)."""
    head = ["model", "params", "removed (proj.)"] + [f"ppl {e}" for e in evals] + ["prefill tok/s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, result, report in rows:
        removed = "—" if report is None else f"{report['ratio_achieved_projection']:.3f}"
        cells = [name, f"{result['params'] / 1e6:.1f}M", removed]
        cells += [f"{result['files'][t]['perplexity']:.2f}" for t in texts]
        cells += [f"{result['prefill_tokens_per_s']:.0f}", f"{result.get('prefill_speedup', 1.0):.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
