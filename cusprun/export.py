"""``python -m cusprun.export``: an expert (or the unpruned model) as a GGUF file for llama.cpp (the command; the
writer is :mod:`cusprun.formats.gguf`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .core.errors import CusprunError, OneLineArgumentParser, run_cli
from .core.models import load_weights, local_folder, open_model
from .formats.gguf import (
    DTYPES,
    QUANT_TYPES,
    SETUP,
    check_exportable,
    check_out_file,
    check_quant_type,
    export_gguf,
    quantizer,
    tensor_types,
    tokenizer_source,
)

DESCRIPTION = f"""\
Write MODEL as a llama.cpp GGUF of architecture `deci`, which holds each layer's own number of query heads,
k/v heads and MLP channels. MODEL is a folder written by `python -m cusprun.prune --format dense`, or an unpruned
model (a folder, a .gguf file or the alias smollm2-135m) to compare with. The F32 file computes what the
expert computes in transformers (tested to 1e-3 of the logits' scale with an F32 KV cache).

The tokenizer (vocabulary, merges, special tokens, chat template) is copied from the GGUF the expert was pruned
from, or converted from the folder's byte-level BPE tokenizer.json.

--quantize runs llama.cpp's own quantizer (llama-cpp-python; `{SETUP}` installs it). --pad-mlp N pads each
layer's MLP width with zero channels to a multiple of N (exact: a zero channel adds nothing), so that Q8_0 (32)
or k-quants (256) quantize the down projection instead of falling back to another type.

Run the file:  llama-cli -m FILE.gguf   or   python -c "from llama_cpp import Llama; Llama('FILE.gguf')"
"""


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m cusprun.export", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="expert folder (--format dense), model folder, .gguf or alias")
    p.add_argument("--to", choices=["gguf"], default="gguf", help="output format (default: gguf)")
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="the file to write")
    p.add_argument("--dtype", choices=DTYPES, default="f32",
                   help="type of the weight matrices (norms and biases stay f32; default f32, exact)")
    p.add_argument("--quantize", metavar="TYPE", help=f"quantize with llama.cpp: {', '.join(QUANT_TYPES)}")
    p.add_argument("--pad-mlp", type=int, default=1, metavar="N",
                   help="pad each MLP width with zero channels to a multiple of N (default 1: no padding)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_quant_type(args.quantize)
    if args.pad_mlp < 1:
        raise CusprunError(f"--pad-mlp {args.pad_mlp}: must be 1 or more")
    out = check_out_file(args.out, args.overwrite)
    if args.quantize:
        quantizer()
        if args.dtype != "f32":
            raise CusprunError("--dtype sets an unquantized file's type; --quantize reads an F32 one (drop --dtype)")
    config, _, source = open_model(args.model, quiet=args.quiet, allow_pruned=True, need_tokenizer=False)
    check_exportable(config)
    folder = local_folder(source)
    tokenizer_from = tokenizer_source(source, folder)
    report = None
    if folder is not None and (folder / "pruning.json").is_file():
        report = json.loads((folder / "pruning.json").read_text())
    model = load_weights(source, "float32", quiet=args.quiet)
    arrays = export_gguf(model, out, tokenizer_from, args.dtype, args.quantize, args.pad_mlp,
                         name=Path(source.model_id).name, report=report)
    kind = args.quantize or args.dtype
    print(f"gguf           {out} ({kind}, {len(arrays['heads'])} layers, {out.stat().st_size / 2**20:.1f} MiB)")
    print(f"tensor types   {', '.join(f'{k} {n}' for k, n in tensor_types(out).items())}")
    print(f"query heads    {arrays['heads']}")
    print(f"k/v heads      {arrays['kv']}")
    print(f"mlp widths     {arrays['ff']}")
    print(f"run it         llama-cli -m {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
