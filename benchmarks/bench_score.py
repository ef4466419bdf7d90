"""Scoring throughput on SmolLM2-135M: plain forward vs local vs block scoring, side by side in one run,
and the exact q/k-row ablation of one layer against a materialized reference.

    python benchmarks/bench_score.py [--docs 4] [--tokens 512] [--model smollm2-135m] [--qk-layers 2]
    python benchmarks/bench_score.py --random-width 4096 [--layers 2]   # Llama-3-8B geometry, random weights

Prints tokens/s of a plain Hugging Face forward pass over the same documents, of local-measure
scoring and of block-measure scoring, and each one's time relative to the plain forward pass. Then,
on the q, k, v of the first ``--qk-layers`` layers of the first document (the model's own activations),
seconds per layer for all q and k rows: the op's resolved backend (on the CPU the torch backend, shared
logits) and PyTorch's fused attention, one pass per removed row (sdpa), against the materialized
reference (PLND-style: the full [L, L] attention of every ablated dimension built, softmaxed and
multiplied out), with their largest relative disagreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, environment, report  # noqa: E402

import cusprun_kernels as ops  # noqa: E402
from cusprun.core.corpus import read_corpus, tokenize  # noqa: E402
from cusprun.core.errors import CusprunError, OneLineArgumentParser, run_cli  # noqa: E402
from cusprun.core.models import load_model  # noqa: E402
from cusprun.engine.layer_major import Scorer  # noqa: E402
from cusprun.engine.score_corpora import check_device  # noqa: E402
from cusprun_kernels.backend import resolved_backends  # noqa: E402
from cusprun_kernels.qk_ablation import attention_mask, qk_row_ablation_sdpa  # noqa: E402
from cusprun_kernels.rope import apply_rope  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "corpora"


def documents(tokenizer, vocab, n, length):
    """n documents of exactly ``length`` tokens from the shipped corpora (concatenated where short)."""
    ids = [i for f in sorted(DATA.glob("*.jsonl")) for i in
           sum(tokenize(read_corpus(f), tokenizer, 10**9, vocab), [])]
    if len(ids) < n * length:
        raise SystemExit(f"the shipped corpora hold {len(ids)} tokens, fewer than {n} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def random_llama(width: int, layers: int, device: str):
    """A randomly initialized Llama with Llama-3-8B's geometry at hidden size ``width`` (head_dim 128, 4 query
    heads per k/v head, intermediate 3.5 x width, 128,256-token vocabulary); nothing is downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = width // 128
    config = LlamaConfig(hidden_size=width, intermediate_size=width * 7 // 2, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 4), head_dim=128, num_hidden_layers=layers,
                         vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


def attention_inputs(model, ids, n_layers, device):
    """q, k, v [L, heads, hd] (pre-RoPE), cos, sin [L, hd], w_o of the first ``n_layers`` layers for one document."""
    captured = []

    def grab(attn, args, kwargs):
        if len(captured) < n_layers:
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            h = h.reshape(-1, h.shape[-1])
            cos, sin = kwargs["position_embeddings"]
            shape = (h.shape[0], -1, attn.head_dim)
            captured.append((attn.q_proj(h).reshape(shape), attn.k_proj(h).reshape(shape),
                             attn.v_proj(h).reshape(shape), cos[0], sin[0], attn.o_proj.weight, attn.scaling))
    handles = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers]
    with torch.inference_mode():
        model.model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    for h in handles:
        h.remove()
    return captured


def materialized_qk(q, k, v, cos, sin, w_o, n_rep, scaling, chunk=16):
    """PLND-style reference: for every removed q or k row, the full [L, L] ablated attention is built
    (chunk dimensions at a time), softmaxed and multiplied out; squared change of the block output."""
    L, nh, hd = q.shape
    mask = attention_mask(L, None, q.device)
    w = w_o.float().reshape(w_o.shape[0], -1, n_rep * hd)
    gram = torch.einsum("kgi,kgj->gij", w, w)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def outputs(qrot, krot, vv):  # [c, L, hd] x3 -> [c, L, hd]
        return torch.softmax(scaling * qrot @ krot.transpose(-1, -2) + mask, dim=-1) @ vv

    q_sq, k_sq = torch.empty(nh, hd), torch.empty(k.shape[1], hd)
    for g in range(k.shape[1]):
        heads = range(g * n_rep, (g + 1) * n_rep)
        base = [outputs(qr[None, :, h], kr[None, :, g], v[None, :, g])[0] for h in heads]
        for d0 in range(0, hd, chunk):
            dims = range(d0, min(hd, d0 + chunk))
            for r, h in enumerate(heads):
                zeroed = q[:, h].repeat(len(dims), 1, 1)
                zeroed[range(len(dims)), :, list(dims)] = 0
                d_o = outputs(apply_rope(zeroed.transpose(0, 1), cos, sin).transpose(0, 1), kr[None, :, g],
                              v[None, :, g]) - base[r]
                g_h = gram[g, r * hd:(r + 1) * hd, r * hd:(r + 1) * hd]
                q_sq[h, d0:d0 + len(dims)] = torch.einsum("cti,ij,ctj->c", d_o, g_h, d_o)
            zeroed = k[:, g].repeat(len(dims), 1, 1)
            zeroed[range(len(dims)), :, list(dims)] = 0
            k_rot = apply_rope(zeroed.transpose(0, 1), cos, sin).transpose(0, 1)
            d_o = torch.cat([outputs(qr[None, :, h], k_rot, v[None, :, g]) - base[r] for r, h in enumerate(heads)],
                            dim=-1)
            k_sq[g, d0:d0 + len(dims)] = torch.einsum("cti,ij,ctj->c", d_o, gram[g], d_o)
    return q_sq.reshape(-1), k_sq.reshape(-1)


def timed(fn, device, *args, **kwargs):
    """(seconds, fn(*args, **kwargs)), the device synchronized around it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--qk-layers", type=int, default=2, help="layers on which the q/k-row ablation is compared "
                    "with the materialized reference (0: skip)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="the engine's token budget per batch "
                    "(default: its per-device default)")
    ap.add_argument("--random-width", type=int, metavar="N", help="instead of --model: a random Llama with "
                    "Llama-3-8B geometry at hidden size N (4096 is Llama-3-8B's), random token ids")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the --random-width model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    for flag, value, least in (("--docs", args.docs, 1), ("--tokens", args.tokens, 2),
                               ("--qk-layers", args.qk_layers, 0), ("--layers", args.layers, 1)):
        at_least(flag, value, least)
    if args.batch_tokens is not None and args.batch_tokens < args.tokens:
        raise CusprunError(f"--batch-tokens {args.batch_tokens}: must hold one document of --tokens {args.tokens}")
    check_device(args.device)
    if args.random_width:
        if args.random_width % 512 or args.random_width < 512:
            raise CusprunError(f"--random-width {args.random_width}: must be a positive multiple of 512 (heads of "
                               "128, 4 per k/v head)")
        model = random_llama(args.random_width, args.layers, args.device)
        args.model = f"random-llama3-geometry-width{args.random_width}-layers{args.layers}"
        gen = torch.Generator().manual_seed(0)
        docs = torch.randint(0, model.config.vocab_size, (args.docs, args.tokens), generator=gen).tolist()
    else:
        model, tokenizer, _ = load_model(args.model, device=args.device, quiet=True)
        docs = documents(tokenizer, model.config.vocab_size, args.docs, args.tokens)
    n_tokens = sum(map(len, docs))
    n_layers = model.config.num_hidden_layers

    def plain():
        with torch.inference_mode():
            for d in docs:
                model.model(input_ids=torch.tensor([d], device=args.device), use_cache=False)

    runs = [("plain forward", plain)] + [
        (f"{m} scoring", lambda m=m: Scorer(model, m, batch_tokens=args.batch_tokens).score_documents(docs))
        for m in ("local", "block")]
    plain()  # warm-up
    if args.device.startswith("cuda"):
        # one untimed scoring of the first document: backend checks, kernel compilation and the q/k op's
        # one-time routing measurement (per length bucket) stay out of the numbers, as they do after a first run
        for m in ("local", "block"):
            Scorer(model, m, batch_tokens=args.batch_tokens).score_documents(docs[:1])
    timings = {name: timed(fn, args.device)[0] for name, fn in runs}
    base = timings["plain forward"]
    columns = ["run", "docs", "tokens/doc", "seconds", "tokens/s", "x plain", "s per doc"]
    rows = [[name, args.docs, args.tokens, t, n_tokens / t, t / base, t / args.docs] for name, t in timings.items()]
    if args.qk_layers:
        layers = attention_inputs(model, docs[0], args.qk_layers, args.device)
        implementations = {"torch": ops.qk_row_ablation, "sdpa": qk_row_ablation_sdpa, "materialized": materialized_qk}
        seconds = dict.fromkeys(implementations, 0.0)
        worst = dict.fromkeys(("torch", "sdpa"), 0.0)
        with torch.inference_mode():
            for *tensors, scaling in layers:
                n_rep = tensors[0].shape[1] // tensors[1].shape[1]
                results = {}
                for name, fn in implementations.items():
                    args_ = (*tensors, n_rep, scaling) if name == "materialized" else (*tensors, [0, args.tokens])
                    kw = {} if name == "materialized" else {"n_rep": n_rep, "scaling": scaling}
                    t, results[name] = timed(fn, args.device, *args_, **kw)
                    seconds[name] += t
                for name in worst:
                    for f, r in zip(results[name], results["materialized"]):
                        worst[name] = max(worst[name], ((f[0].cpu() - r).abs().max() / r.abs().max()).item())
        per_layer = {name: t / len(layers) for name, t in seconds.items()}
        labels = {"materialized": "q+k rows, materialized [L,L] per dim",
                  "sdpa": "q+k rows, fused attention per dim (sdpa)",
                  "torch": f"q+k rows, {resolved_backends()['qk_row_ablation']} backend"}
        for name, label in labels.items():
            t = per_layer[name]
            # per document: the measured seconds per layer times the model's layers
            rows.append([f"{label}, per layer", 1, args.tokens, t, args.tokens / t,
                         t / per_layer["materialized"], t * n_layers])
        speedup = per_layer["materialized"] / per_layer["torch"]
        print(f"q/k rows on {len(layers)} layer(s): the backend is {speedup:.1f}x "
              f"and sdpa {per_layer['materialized'] / per_layer['sdpa']:.1f}x faster than materialized; largest "
              f"relative disagreement with it {worst['torch']:.2g} (backend), {worst['sdpa']:.2g} (sdpa); 's per doc' "
              f"of these rows = seconds per layer x {n_layers} layers; their 'x plain' column is relative to "
              f"materialized")
    report("bench_score", columns, rows, {**environment(), "model": args.model})
    print(json.dumps({k: round(v, 3) for k, v in timings.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
