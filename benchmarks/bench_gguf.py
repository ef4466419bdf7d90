"""Prefill and decode speed, and perplexity, of GGUF experts in llama.cpp (llama-cpp-python), against the dense
model and the ideals, measured side by side in one run.

    python benchmarks/bench_gguf.py --scores SCORES.safetensors [--model smollm2-135m] [--ratios 0.25,0.35,0.45]
                                    [--types f32,q8_0,q4_k_m] [--pad-mlp 1[,256]] [--prompt 512] [--decode 64]
                                    [--repetitions 5] [--text data/heldout/de.jsonl] [--docs 8] [--quick]

The experts are built from the score file as ``python -m cusprun.prune --format gguf`` builds them (the default
selection: whole MLP channels, aligned widths; the default refit of down_proj, calibrated at build time on the
corpus the score file names; ``--no-compensate`` for a baseline's score file), at each ratio, and the dense
model is written the same way (``cusprun.formats.gguf``); each is quantized with
llama.cpp's own quantizer. ``--pad-mlp 1,256`` writes every type both ways (MLP widths as selected, and padded
with zero channels to multiples of 256, which is exact), so padding is measured side by side with the files
it would replace. For each type (and padding), every repetition times the dense model and then each expert:

- prefill: one ``--prompt``-token prompt from an empty KV cache (logits of the last token, as a generation's
  prefill); ideal speed-up = dense FLOPs / expert FLOPs of that prefill (projections at the file's widths,
  attention scores and values over the causal prompt, the output head for one token);
- decode: ``--decode`` single-token steps after a 64-token prompt; ideal speed-up = dense bytes / expert bytes
  of the weights a step reads (every tensor in the file: the tied output head reads the whole embedding).

Speed-ups are medians of the repetitions' paired ratios (a shared 2-core CPU drifts by more than the differences
measured; a pair is timed seconds apart). Perplexity: llama.cpp's, token-weighted over ``--docs`` documents of
``--text`` (tokenized as cusprun.eval tokenizes, F32 KV cache). Rows go to benchmarks/results/bench_gguf.csv
with the device, versions and commit (not with ``--quick``, a tiny setting for the tests).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, environment, report  # noqa: E402

from cusprun.core.errors import CusprunError, OneLineArgumentParser, run_cli  # noqa: E402
from cusprun.core.models import load_model, local_folder  # noqa: E402
from cusprun.evaluation import llama_cpp as engine  # noqa: E402
from cusprun.evaluation.evaluate import read_texts, tokenize_texts  # noqa: E402
from cusprun.experts.build import build_expert, load_score_sets  # noqa: E402
from cusprun.experts.calibration import DEFAULT_REFIT, calibration_documents  # noqa: E402
from cusprun.formats.gguf import DTYPES, QUANT_TYPES, quantize, quantizer, tokenizer_source, write_gguf  # noqa: E402

DE = Path(__file__).resolve().parents[1] / "data" / "heldout" / "de.jsonl"


def gguf_costs(path, prompt: int) -> tuple[float, int]:
    """(prefill FLOPs of a ``prompt``-token prompt, weight bytes one decode step reads) of a deci GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    value = lambda key: reader.fields[key].contents()  # noqa: E731
    hidden, hd = value("deci.embedding_length"), value("deci.attention.key_length")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    flops = 2.0 * hidden * vocab  # the output head, for the last token only
    for heads, kv, ff in zip(value("deci.attention.head_count"), value("deci.attention.head_count_kv"),
                             value("deci.feed_forward_length")):
        per_token = hidden * hd * (2 * heads + 2 * kv) + 3 * hidden * ff  # multiply-adds of the projections
        flops += 2.0 * prompt * per_token + 2.0 * 2 * heads * hd * prompt * (prompt + 1) / 2  # q·k and p·v
    return flops, sum(int(t.n_bytes) for t in reader.tensors)


def kind_name(kind: str, pad: int) -> str:
    """The table's name of a file type written with MLP widths padded to multiples of ``pad`` (1: as selected)."""
    return kind if pad == 1 else f"{kind}+pad{pad}"


def build_files(args, tmp: Path, types: list[str], pads: list[int], ratios: list[float]):
    """{(model name, kind): GGUF path} for the dense model and each ratio's expert, each type in each padding
    (:func:`kind_name`), the documents and the prompt."""
    from transformers import AutoModelForCausalLM

    texts = read_texts([args.text])
    sets = load_score_sets([args.scores], stats=False)
    model, tokenizer, source = load_model(args.model, quiet=True)
    documents = tokenize_texts(texts, tokenizer, 512, model.config.vocab_size)[args.text][:args.docs]
    prompt = [ids for doc in documents for ids in doc] * (args.prompt // sum(map(len, documents)) + 1)
    tokens_from = tokenizer_source(source, local_folder(source))
    models, f32 = {"dense": model}, {"dense": tmp / "dense.f32.gguf"}
    calibration = (calibration_documents(sets, [args.scores], tokenizer, model.config.vocab_size)
                   if args.compensate else None)
    for ratio in ratios:
        name = f"expert-{ratio:.0%}"
        try:
            build_expert(model, tokenizer, source, sets, [args.scores], ratio, "dense", tmp / name,
                         compensate=args.compensate, calibration=calibration)
        except ValueError as exc:  # a ratio the default selection cannot reach
            raise CusprunError(str(exc)) from None
        models[name] = AutoModelForCausalLM.from_pretrained(tmp / name).eval()
        f32[name] = tmp / f"expert{ratio}.f32.gguf"
    files = {}
    for name, plain in f32.items():
        for pad in pads:
            path = plain.with_suffix(f".pad{pad}.gguf")
            write_gguf(models[name], path, tokens_from, pad_mlp=pad)
            for kind in types:
                key = name, kind_name(kind, pad)
                files[key] = path if kind == "f32" else tmp / f"{name}.{key[1]}.gguf"
                if kind == "f32":
                    continue
                if kind in QUANT_TYPES:  # llama.cpp's quantizer reads the F32 file
                    quantize(path, files[key], kind)
                else:
                    write_gguf(models[name], files[key], tokens_from, kind, pad_mlp=pad)
    return files, documents, prompt[:args.prompt]


def measure(files: dict, names: list[str], kinds: list[str], prompt: list[int], documents, args) -> list[list]:
    """One row per (model, kind): size, perplexity (and against the unpadded F32 file's, where measured), and
    paired prefill / decode speeds against the ideals."""
    rows, f32_ppl = [], {}
    for kind in kinds:
        if not args.speed:
            prefill = decode = {name: [float("nan")] for name in names}
        else:
            prefill, decode = timed(files, names, kind, prompt, args)
        dense_flops, dense_bytes = gguf_costs(files["dense", kind], len(prompt))
        for name in names:
            flops, weight_bytes = gguf_costs(files[name, kind], len(prompt))
            ppl = engine.perplexity(files[name, kind], documents)
            if kind == "f32":
                f32_ppl[name] = ppl
            prefill_x = statistics.median(d / e for d, e in zip(prefill["dense"], prefill[name]))
            decode_x = statistics.median(d / e for d, e in zip(decode["dense"], decode[name]))
            flop_ideal, bytes_ideal = dense_flops / flops, dense_bytes / weight_bytes
            rows.append([name, kind, files[name, kind].stat().st_size / 2**20, ppl,
                         ppl / f32_ppl[name] - 1 if name in f32_ppl else float("nan"),
                         len(prompt) / statistics.median(prefill[name]), prefill_x, flop_ideal, prefill_x / flop_ideal,
                         args.decode / statistics.median(decode[name]), decode_x, bytes_ideal, decode_x / bytes_ideal])
    return rows


def timed(files: dict, names: list[str], kind: str, prompt: list[int], args) -> tuple[dict, dict]:
    """Seconds per repetition of each model's prefill and decode in ``kind`` ({name: [seconds]} twice), the dense
    model first in every repetition, so each expert's ratio is paired with a dense timing seconds before it."""
    llms = {name: engine.open_gguf(files[name, kind], len(prompt) + 64 + args.decode, threads=args.threads)
            for name in names}
    try:
        for llm in llms.values():  # warm-up, not timed
            engine.prefill_seconds(llm, prompt[:32])
        prefill = {name: [] for name in names}
        decode = {name: [] for name in names}
        for _ in range(args.repetitions):
            for name, llm in llms.items():
                prefill[name].append(engine.prefill_seconds(llm, prompt))
                decode[name].append(engine.decode_seconds(llm, prompt[:64], args.decode))
    finally:
        for llm in llms.values():
            llm.close()
    return prefill, decode


def main(argv=None) -> int:
    p = OneLineArgumentParser(prog="python benchmarks/bench_gguf.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", required=True, help="a score file of --model (python -m cusprun.score)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default="0.25,0.35,0.45")
    p.add_argument("--types", default="f32,f16,q8_0,q4_k_m", help="f32, f16, bf16 and llama.cpp quantization types")
    p.add_argument("--pad-mlp", default="1", help="pad MLP widths with zero channels to a multiple of N; "
                   "several (1,256): every type written and timed each way")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--text", default=str(DE), help="held-out text for the perplexity column")
    p.add_argument("--docs", type=int, default=8, help="documents of --text (up to 512 tokens each)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: every core)")
    p.add_argument("--no-compensate", dest="compensate", action="store_false",
                   help="experts without the refit (a baseline's score file)")
    p.add_argument("--no-speed", dest="speed", action="store_false",
                   help="perplexity only (the speed columns stay empty); for a machine that is not quiet")
    p.add_argument("--quick", action="store_true", help="tiny setting for the tests; no CSV rows")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt, args.decode, args.repetitions, args.docs = 32, 4, 1, 2
    for flag, value in (("--prompt", args.prompt), ("--decode", args.decode), ("--repetitions", args.repetitions),
                        ("--docs", args.docs)):
        at_least(flag, value, 1)
    ratios = [float(r) for r in args.ratios.split(",")]
    types = args.types.split(",")
    if any(t not in DTYPES and t not in QUANT_TYPES for t in types):
        raise CusprunError(f"--types {args.types}: choose among {', '.join(DTYPES + QUANT_TYPES)}")
    try:
        pads = [int(pad) for pad in args.pad_mlp.split(",")]
    except ValueError:
        raise CusprunError(f"--pad-mlp {args.pad_mlp}: expected whole numbers, e.g. 1 or 1,256") from None
    for pad in pads:
        at_least("--pad-mlp", pad, 1)
    kinds = [kind_name(kind, pad) for pad in pads for kind in types]
    quantizer()
    with tempfile.TemporaryDirectory(prefix="bench_gguf.") as tmp:
        files, documents, prompt = build_files(args, Path(tmp), types, pads, ratios)
        names = list(dict.fromkeys(name for name, _ in files))
        rows = measure(files, names, kinds, prompt, documents, args)
    env = environment()
    env["llama_cpp_python"] = importlib.metadata.version("llama-cpp-python")
    env["threads"] = str(args.threads)
    columns = ["model", "type", "refit", "file MiB", "ppl", "ppl vs f32", "prefill tok/s", "prefill x",
               "FLOP ideal x", "prefill/ideal", "decode tok/s", "decode x", "bytes ideal x", "decode/ideal"]
    refit = DEFAULT_REFIT if args.compensate else "none"
    report("bench_gguf", columns, [[r[0], r[1], refit if r[0] != "dense" else "-", *r[2:]] for r in rows], env,
           append=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
