"""Kernel benchmarks on a CUDA GPU: torch reference, Triton and CUDA C++ side by side, at Llama-3-8B and
-70B shapes, bfloat16.

    python benchmarks/bench_kernels.py [--lengths 512 2048] [--models 8b 70b] [--skip-torch-qk]
                                       [--qk-kv-groups N]

The q/k-row ablation's "torch" column is the torch backend (shared logits, a Python loop of batched
matmuls), its "sdpa" column ``qk_row_ablation_sdpa`` (one fused-attention pass per removed row, what a
user would pick instead). It is timed with CUDA events (one warm-up, then
the best of ``--qk-reps`` calls): a whole layer at L = 2048 is ~10¹⁶ FLOPs, so ``--qk-kv-groups N`` scores
only the first N k/v groups (and their query heads); FLOPs and bytes are counted for what runs, so the
TFLOP/s are those of the full layer.

Medians from ``triton.testing.do_bench``, one row per op and shape with a column per backend (the
CUDA columns are "-" where the extension is not built), each backend's speed-up over torch measured in
the same run, and the best backend's TFLOP/s and GB/s against the FLOP and byte floors counted here.
The projection op has two CUDA columns: "cuda" is cuBLAS plus the segmented reductions, "cuda fused"
the one-pass tensor-core kernel; the CUDA backend uses whichever measures faster on the GPU at hand
(cusprun_kernels/cuda_tuning.py), and these columns show both.
Rows are appended to benchmarks/results/bench_kernels.csv naming the GPU, versions and commit.

Floors: projection + energies: 2·T·in·out FLOPs, (T·in + in·out + T·out)·2 bytes (bf16). q/k-row
ablation of one layer: each of the heads·hd q rows and kv_heads·hd k rows (times the query heads of
their group) is one attention pass over the causal band, ≈ 2·L²·hd FLOPs (QKᵀ and PV, half of L²
each), so 4·heads·hd²·L² in all; bytes: q, k, v once and ΔO written once per pass (float32).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, report  # noqa: E402

from cusprun.core.errors import CusprunError, OneLineArgumentParser, run_cli  # noqa: E402

COMPILED = ("sdpa", "triton", "cuda", "cuda fused")
SHAPES = {  # hidden, heads, kv heads, head_dim, intermediate
    "8b": (4096, 32, 8, 128, 14336),
    "70b": (8192, 64, 8, 128, 28672),
}


def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--skip-torch-qk", action="store_true", help="skip the slow torch reference of the q/k op")
    ap.add_argument("--qk-kv-groups", type=int, default=None,
                    help="q/k ablation: score only the first N k/v groups (default: the whole layer)")
    ap.add_argument("--qk-reps", type=int, default=1, help="timed calls of the q/k ablation (best is kept)")
    args = ap.parse_args(argv)
    if min(args.lengths) < 1 or args.qk_reps < 1 or (args.qk_kv_groups is not None and args.qk_kv_groups < 1):
        raise CusprunError("--lengths, --qk-reps and --qk-kv-groups must be 1 or more")
    if not torch.cuda.is_available():
        raise CusprunError("bench_kernels.py measures GPU kernels: no CUDA device is available here")
    import triton.testing

    from cusprun_kernels import qk_ablation
    from cusprun_kernels.cuda_ext import extension
    from cusprun_kernels.cuda_tuning import cuda_event_ms
    from cusprun_kernels.projection_energy import (
        projection_energies_cublas,
        projection_energies_fused,
        projection_energies_torch,
        projection_energies_triton,
    )
    from cusprun_kernels.qk_ablation import qk_row_ablation_cuda, qk_row_ablation_torch, qk_row_ablation_triton

    sdpa = qk_ablation.qk_row_ablation_sdpa
    cuda_built = extension()[0] is not None
    if not cuda_built:
        print(f"CUDA column empty: {extension()[1]}", file=sys.stderr)
    dev, bf16 = "cuda", torch.bfloat16
    rows = []
    columns = ["model", "L", "op", "torch ms", *(f"{i} ms" for i in COMPILED), *(f"{i} vs torch" for i in COMPILED),
               "triton vs sdpa", "cuda vs sdpa", "best TFLOP/s", "best GB/s"]

    def best_of(fn, reps):
        fn()  # warm-up: compiles, tunes, checks
        return min(cuda_event_ms(fn) for _ in range(reps))

    def measure(label, impls, flops, nbytes, timer=triton.testing.do_bench):
        ms = {impl: timer(fn) for impl, fn in impls.items() if fn is not None}
        best = min(ms.values())
        cells = [f"{ms[i]:.3f}" if i in ms else "-" for i in ("torch", *COMPILED)]
        ratios = [f"{ms['torch'] / ms[i]:.2f}x" if "torch" in ms and i in ms else "-" for i in COMPILED]
        # the custom kernels against the fused-attention reformulation (issue 17: target >= 1.5x)
        vs_sdpa = [f"{ms['sdpa'] / ms[i]:.2f}x" if "sdpa" in ms and i in ms else "-" for i in ("triton", "cuda")]
        rows.append([name, L, label, *cells, *ratios, *vs_sdpa, flops / best / 1e9, nbytes / best / 1e6])
    for name in args.models:
        for L in args.lengths:
            hidden, heads, kv, hd, inter = SHAPES[name]
            off = torch.tensor([0, L], device=dev)
            for proj, (n_in, n_out) in {"q_proj": (hidden, heads * hd), "gate_proj": (hidden, inter),
                                        "down_proj": (inter, hidden)}.items():
                x = torch.randn(L, n_in, device=dev, dtype=bf16)
                w = torch.randn(n_out, n_in, device=dev, dtype=bf16) / n_in**0.5
                flops, nbytes = 2 * L * n_in * n_out, 2 * (L * n_in + n_in * n_out + L * n_out)
                measure(f"matmul only {proj}", {"torch": partial(torch.matmul, x, w.T)}, flops, nbytes)
                measure(f"projection {proj}", {
                    "torch": partial(projection_energies_torch, x, w, None, off),
                    "triton": partial(projection_energies_triton, x, w, None, off),
                    "cuda": partial(projection_energies_cublas, x, w, None, off) if cuda_built else None,
                    "cuda fused": partial(projection_energies_fused, x, w, None, off) if cuda_built else None,
                }, flops, nbytes)
            groups = min(kv, args.qk_kv_groups or kv)
            heads, kv = heads // kv * groups, groups  # the k/v groups scored (and their query heads)
            q = torch.randn(L, heads, hd, device=dev, dtype=bf16)
            k, v = torch.randn(L, kv, hd, device=dev, dtype=bf16), torch.randn(L, kv, hd, device=dev, dtype=bf16)
            ang = torch.rand(L, hd // 2, device=dev)
            cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
            w_o = torch.randn(hidden, heads * hd, device=dev, dtype=bf16) / (heads * hd) ** 0.5
            qk_args = (q, k, v, cos, sin, w_o, off)
            flops = 4 * heads * hd * hd * L * L
            nbytes = 2 * L * hd * (heads + 2 * kv) + 4 * 2 * heads * hd * L * hd
            measure(f"q/k-row ablation ({heads} heads)", {
                "torch": None if args.skip_torch_qk else partial(qk_row_ablation_torch, *qk_args, n_rep=heads // kv),
                "sdpa": partial(sdpa, *qk_args, n_rep=heads // kv),
                "triton": partial(qk_row_ablation_triton, *qk_args, n_rep=heads // kv),
                "cuda": partial(qk_row_ablation_cuda, *qk_args, n_rep=heads // kv) if cuda_built else None,
            }, flops, nbytes, timer=partial(best_of, reps=args.qk_reps))
            # one table per shape, appended as it is measured: a run cut short keeps what it measured
            report("bench_kernels", columns, rows, environment())
            rows.clear()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
