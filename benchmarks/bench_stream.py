"""Layer streaming on this machine: score, then prune, a model whose weights are larger than RAM.

    python benchmarks/bench_stream.py [--ram-multiple 1.5] [--docs 4] [--tokens 64] [--measure block]
    python benchmarks/bench_stream.py --prune [--layers N]   # also build the 25% compensated expert

Builds once (cached in benchmarks/.cache/) a random Llama-architecture model at Llama-3-70B width
(hidden 8192, 64 heads, 8 k/v heads, intermediate 28672) with enough layers that its bfloat16 weights
on disk are at least ``--ram-multiple`` times this machine's RAM, written shard by shard so it never
exists in memory. It then scores a small corpus with ``python -m cusprun.score --stream`` and, for
comparison, a model of the same width that fits (2 layers) in memory, each in a child process that
reports its own peak RSS. Prints a table and appends rows to benchmarks/results/bench_stream.csv.

With ``--prune``, both models are then scored with the local measure and pruned at 25% with compensation
(``python -m cusprun.prune``, calibrated on the scored corpus, bfloat16 like the weights): the large one with
``--stream``, the 2-layer slice in memory. Its table (bench_stream_prune.csv): time, peak RSS, what was written
(the expert folder: disk written and its largest file, against one decoder layer's bfloat16 size), and the
expert's load and one forward pass (peak RSS of that child; the expert loads as transformers loads a model
larger than its memory budget, with accelerate's disk offload and a budget of a quarter of RAM). ``--layers N``
sets the streamed model's depth instead of ``--ram-multiple`` (a reduced run: each layer's refit at this width
solves a system of about 20,000 unknowns per output, minutes per layer on a small CPU). Both models and, with
``--prune``, the larger expert must fit on the disk (checked first; each expert is deleted once measured): about
2.7x RAM at ``--ram-multiple 1.5``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, environment, report  # noqa: E402

from cusprun.core.errors import CusprunError, OneLineArgumentParser, run_cli  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
WIDTH = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
             head_dim=128, vocab_size=32000)
CHILD = """
import resource, sys, time
from cusprun.core.errors import run_cli
from cusprun.score import main
start = time.perf_counter()
code = run_cli(main, sys.argv[1:])
print(f"BENCH {time.perf_counter() - start:.3f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}",
      file=sys.stderr)
sys.exit(code)
"""


def ram_bytes() -> int:
    with open("/proc/meminfo") as fh:
        return int(next(line for line in fh if line.startswith("MemTotal")).split()[1]) * 1024


def layer_bytes() -> int:
    h, i, kv = WIDTH["hidden_size"], WIDTH["intermediate_size"], WIDTH["num_key_value_heads"] * WIDTH["head_dim"]
    return 2 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)


def expert_bytes(layers: int) -> int:
    """The 25% expert's bfloat16 size: each layer less a quarter of its MLP channels (gate, up and down)."""
    mlp = 2 * 3 * WIDTH["hidden_size"] * WIDTH["intermediate_size"]
    return layers * (layer_bytes() - mlp // 4) + 2 * 2 * WIDTH["vocab_size"] * WIDTH["hidden_size"]


def check_disk(layers: int, prune: bool) -> None:
    """One line, before anything is written, when the models (and with ``prune`` the larger expert: each is
    deleted once measured) do not fit on the disk of benchmarks/.cache, with 2 GB to spare for the scores, the
    hidden states the engine may spill and the safetensors headers; models already built count as written."""
    rest = 2 * 2 * WIDTH["vocab_size"] * WIDTH["hidden_size"]
    need = 2 * 10**9 + (expert_bytes(layers) if prune else 0)
    for depth in (layers, 2):
        folder = CACHE / f"llama-8192-{depth}L"
        need += 0 if (folder / "model.safetensors.index.json").exists() else depth * layer_bytes() + rest
    CACHE.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(CACHE).free
    if free < need:
        raise CusprunError(f"not enough disk in {CACHE}: {need / 1e9:.0f} GB needed, {free / 1e9:.0f} GB free "
                           "(lower --ram-multiple or set --layers)")


def build(folder: Path, layers: int) -> Path:
    """A random Llama checkpoint, one safetensors shard per layer; skipped when already complete."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False, **WIDTH)
    gen = torch.Generator().manual_seed(0)
    h, inter = WIDTH["hidden_size"], WIDTH["intermediate_size"]
    kv = WIDTH["num_key_value_heads"] * WIDTH["head_dim"]

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    weight_map = {}

    def shard(name: str, tensors: dict):
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))

    shard("embed.safetensors", {"model.embed_tokens.weight": rand(WIDTH["vocab_size"], h),
                                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                                "lm_head.weight": rand(WIDTH["vocab_size"], h)})
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                  "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                  "mlp.down_proj": (h, inter)}
        tensors = {f"{p}{name}.weight": rand(*shape) for name, shape in shapes.items()}
        tensors[f"{p}input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[f"{p}post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        shard(f"layer-{layer:03d}.safetensors", tensors)
        print(f"  wrote layer {layer + 1}/{layers}", file=sys.stderr)
    config.save_pretrained(folder)
    index = {"metadata": {"total_size": sum(f.stat().st_size for f in folder.glob("*.safetensors"))},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))  # last: marks the build complete
    return folder


PRUNE_CHILD = CHILD.replace("from cusprun.score import main", "from cusprun.prune import main")
# The expert of a model larger than RAM is itself about 0.8x RAM: it loads as transformers loads any model larger
# than its memory budget, with accelerate's disk offload (device_map="auto", max_memory: layers past the budget
# stay in the expert's own safetensors files and are read as the forward pass reaches them).
FORWARD_CHILD = """
import resource, sys, tempfile, time
import torch
from transformers import AutoModelForCausalLM
import cusprun
start = time.perf_counter()
with tempfile.TemporaryDirectory(dir=sys.argv[1] + "/..") as offload:  # used only for weights it must convert
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={"cpu": int(sys.argv[2])}, offload_folder=offload)
    with torch.no_grad():
        logits = model.eval()(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).logits
assert torch.isfinite(logits.float()).all()
print(f"BENCH {time.perf_counter() - start:.3f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}",
      file=sys.stderr)
"""


def run(model: Path, corpus: Path, out: Path, extra: list[str], child: str = CHILD) -> tuple[float, int]:
    """A scoring run (or with ``child``, another command) in a child process: (seconds, its peak RSS bytes)."""
    cmd = [sys.executable, "-c", child, *(["--model", str(model), "--corpus", f"bench={corpus}", "--out", str(out),
                                           "--quiet"] if child == CHILD else []), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"child failed: {res.stderr.strip().splitlines()[-1]}")
    line = next(x for x in res.stderr.splitlines() if x.startswith("BENCH "))
    seconds, rss = line.split()[1:]
    return float(seconds), int(rss)


def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ram-multiple", type=float, default=1.5,
                    help="the streamed model's weights as a multiple of this machine's RAM (more than 1)")
    ap.add_argument("--docs", type=int, default=4, help="documents scored")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per document")
    ap.add_argument("--measure", default="block", choices=["block", "local"])
    ap.add_argument("--prune", action="store_true", help="also prune both models at 25%% with compensation (see above)")
    ap.add_argument("--layers", type=int, help="the streamed model's depth instead of --ram-multiple's (reduced run)")
    args = ap.parse_args(argv)
    # checked before a model larger than RAM is written to disk
    if not (math.isfinite(args.ram_multiple) and args.ram_multiple > 1):
        raise CusprunError(f"--ram-multiple {args.ram_multiple}: must be a number above 1 (weights larger than RAM)")
    at_least("--docs", args.docs, 1)
    at_least("--tokens", args.tokens, 2)
    at_least("--layers", args.layers, 1)
    ram = ram_bytes()
    layers = args.layers or int(-(-(args.ram_multiple * ram - 2 * 2 * WIDTH["vocab_size"] * WIDTH["hidden_size"])
                                  // layer_bytes()))
    check_disk(layers, args.prune)
    big = build(CACHE / f"llama-8192-{layers}L", layers)
    small = build(CACHE / "llama-8192-2L", 2)
    corpus = CACHE / f"corpus-{args.docs}x{args.tokens}.jsonl"
    gen = torch.Generator().manual_seed(1)
    corpus.write_text("".join(json.dumps({"input_ids": torch.randint(0, WIDTH["vocab_size"], (args.tokens,),
                                                                     generator=gen).tolist()}) + "\n"
                              for _ in range(args.docs)))
    tokens = args.docs * args.tokens
    rows, scored = [], {}
    for name, model, extra in (("streamed", big, ["--stream"]), ("in memory", small, [])):
        disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        start = time.perf_counter()
        seconds, rss = run(model, corpus, CACHE / f"scores-{model.name}", ["--measure", args.measure, *extra])
        scored[model] = seconds, rss
        layer_count = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        rows.append([name, layer_count, disk / 1e9, disk / ram, rss / 1e9, rss / ram, seconds,
                     tokens / seconds, tokens * layer_count / seconds])
        print(f"  {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    report("bench_stream", ["run", "layers", "weights GB", "x RAM", "peak RSS GB", "RSS / RAM", "seconds",
                            "tokens/s", "token-layers/s"], rows,
           {**environment(), "ram_gb": f"{ram / 1e9:.1f}", "measure": args.measure, "dtype": "float32"})
    if args.prune:  # the local scores just made are the ones prune needs; other measures score again
        prune_table(big, small, corpus, ram, scored if args.measure == "local" else {})
    return 0


def prune_table(big: Path, small: Path, corpus: Path, ram: int, scored: dict) -> None:
    """Score both models with the local measure (unless ``scored`` {model: (seconds, peak RSS)} says they were,
    into ``scores-<model>``), prune them at 25% with compensation (the large one streamed), load each expert and
    run one forward pass; print and append the table."""
    rows = []
    for name, model, extra in (("streamed", big, ["--stream"]), ("in memory", small, [])):
        scores, expert = CACHE / f"scores-{model.name}", CACHE / f"expert-{model.name}"
        if model in scored:
            score_seconds, score_rss = scored[model]
        else:
            score_seconds, score_rss = run(model, corpus, scores, ["--measure", "local", *extra])
        seconds, rss = run(model, corpus, expert, ["--model", str(model), "--scores", str(scores / "bench.safetensors"),
                                                   "--ratio", "0.25", "--out", str(expert), "--overwrite", "--quiet",
                                                   "--dtype", "bfloat16", *extra], child=PRUNE_CHILD)
        files = [f for f in expert.iterdir() if f.is_file()]
        written, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
        report_json = json.loads((expert / "pruning.json").read_text())
        assert report_json["compensate"] and report_json.get("streamed", False) == (name == "streamed")
        forward_seconds, forward_rss = run(expert, corpus, expert, [str(expert), str(ram // 4)], child=FORWARD_CHILD)
        shutil.rmtree(expert)  # measured: its disk goes to the next one (the large model's expert is ~0.75x it)
        layer_count = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        rows.append([name, layer_count, score_seconds, score_rss / 1e9, seconds, rss / 1e9, rss / ram,
                     written / 1e9, largest / 1e9, largest / layer_bytes(), forward_seconds, forward_rss / 1e9])
        print(f"  {name} prune: {seconds:.0f} s", file=sys.stderr)
    report("bench_stream_prune", ["run", "layers", "local scoring s", "scoring peak RSS GB", "prune s",
                                  "prune peak RSS GB", "RSS / RAM", "expert GB", "largest file GB",
                                  "largest / layer", "load + forward s", "forward peak RSS GB"],
           rows, {**environment(), "ram_gb": f"{ram / 1e9:.1f}", "ratio": "0.25", "compensate": "yes",
                  "dtype": "bfloat16", "layer_gb": f"{layer_bytes() / 1e9:.2f}"})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
