"""Kernel benchmarks on a CUDA GPU: torch reference vs Triton, at Llama-3-8B and -70B shapes, bfloat16.

    python benchmarks/bench_kernels.py [--lengths 512 2048] [--models 8b 70b] [--skip-torch-qk]

Medians from ``triton.testing.do_bench``. For each op it prints achieved TFLOP/s and GB/s against the
FLOP and byte floors counted here, and appends rows to benchmarks/results/bench_kernels.csv naming
the GPU, versions and commit.

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

SHAPES = {  # hidden, heads, kv heads, head_dim, intermediate
    "8b": (4096, 32, 8, 128, 14336),
    "70b": (8192, 64, 8, 128, 28672),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--skip-torch-qk", action="store_true", help="skip the slow torch reference of the q/k op")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py measures GPU kernels: no CUDA device is available here")
    import triton.testing

    from cusprun_kernels.projection_energy import projection_energies_torch, projection_energies_triton
    from cusprun_kernels.qk_ablation import qk_row_ablation_torch, qk_row_ablation_triton

    dev, bf16 = "cuda", torch.bfloat16
    rows = []
    for name in args.models:
        hidden, heads, kv, hd, inter = SHAPES[name]
        for L in args.lengths:
            off = torch.tensor([0, L], device=dev)
            for proj, (n_in, n_out) in {"q_proj": (hidden, heads * hd), "gate_proj": (hidden, inter),
                                        "down_proj": (inter, hidden)}.items():
                x = torch.randn(L, n_in, device=dev, dtype=bf16)
                w = torch.randn(n_out, n_in, device=dev, dtype=bf16) / n_in**0.5
                flops, nbytes = 2 * L * n_in * n_out, 2 * (L * n_in + n_in * n_out + L * n_out)
                for impl, fn in (("matmul only", partial(torch.matmul, x, w.T)),
                                 ("torch", partial(projection_energies_torch, x, w, None, off)),
                                 ("triton", partial(projection_energies_triton, x, w, None, off))):
                    ms = triton.testing.do_bench(fn)
                    rows.append([name, L, f"projection {proj}", impl, ms, flops / ms / 1e9, nbytes / ms / 1e6])
            q = torch.randn(L, heads, hd, device=dev, dtype=bf16)
            k, v = torch.randn(L, kv, hd, device=dev, dtype=bf16), torch.randn(L, kv, hd, device=dev, dtype=bf16)
            ang = torch.rand(L, hd // 2, device=dev)
            cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
            w_o = torch.randn(hidden, heads * hd, device=dev, dtype=bf16) / (heads * hd) ** 0.5
            qk_args = (q, k, v, cos, sin, w_o, off)
            flops = 4 * heads * hd * hd * L * L
            nbytes = 2 * L * hd * (heads + 2 * kv) + 4 * 2 * heads * hd * L * hd
            impls = [("triton", partial(qk_row_ablation_triton, *qk_args, n_rep=heads // kv))]
            if not args.skip_torch_qk:
                impls.insert(0, ("torch", partial(qk_row_ablation_torch, *qk_args, n_rep=heads // kv)))
            for impl, fn in impls:
                ms = triton.testing.do_bench(fn, warmup=1, rep=1)
                rows.append([name, L, "q/k-row ablation", impl, ms, flops / ms / 1e9, nbytes / ms / 1e6])
    report("bench_kernels", ["model", "L", "op", "impl", "ms", "TFLOP/s", "GB/s"], rows, environment())


if __name__ == "__main__":
    main()
