"""Tune the Triton q/k-row ablation kernel on a CUDA GPU: every candidate launch configuration timed on the
whole op, checked against PyTorch's fused attention (``qk_row_ablation_sdpa``), side by side in one run.

    python benchmarks/tune_qk_attention.py [--head-dims 128 64] [--lengths 1024 2048]
                                           [--candidates benchmarks/results/tune_qk_attention_aot.json]
                                           [--max-spill 0] [--top 6] [--budget-s 300] [--out DIR]

Candidates: the ahead-of-time resource report (``--aot`` writes it, without a GPU: registers, spills and
shared memory of each configuration compiled for sm_90, so on another GPU the spill filter reads sm_90's
numbers), filtered to at most ``--max-spill`` spilled bytes (``--configs`` names candidates whatever they
spill), plus the configuration the launcher chooses today (``current``), in order of spilled bytes.
Every candidate is timed at the first length (one k/v group of Llama-3 geometry for head_dim 128, of
SmolLM2's for 64: the per-head cost is what a configuration changes); the ``--top`` fastest, the current
one and sdpa are timed again at every length.

Each timing is the best of 3 calls after a warm-up (CUDA events, inputs drawn at random, never zeros); a
candidate whose scores differ from sdpa's by more than 1e-4 relative (the float32 tolerance of the
tests) is marked ``WRONG`` and never chosen. The time budget stops the first phase early, keeping what
it measured. With ``--out``, every result is written there as it comes and a rerun with the same
``--out`` goes on where the last stopped. A launch that faults loses the process's CUDA context: the
script records the fault and, with ``--out``, starts itself again to go on after that configuration
(without, it exits with code 1).
The table is appended to benchmarks/results/tune_qk_attention.csv naming the GPU, versions and commit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, report  # noqa: E402

from cusprun.core.errors import CusprunError, OneLineArgumentParser, run_cli  # noqa: E402

GEOMETRY = {128: (4, 1), 64: (3, 1)}  # head_dim: (query heads, k/v heads) of one k/v group
AOT_FILE = RESULTS / "tune_qk_attention_aot.json"
TOLERANCE = 1e-4


def aot_candidates(head_dims, target=90) -> list[dict]:
    """Compile every configuration of the grid for ``target`` and report its resources (no GPU needed)."""
    from cusprun_kernels.triton_aot import compile_attention
    from cusprun_kernels.triton_configs import AttentionConfig, head_dim_padded

    out = []
    for hd in head_dims:
        for precision, bm, bn, warps, stages in itertools.product(("tf32x3", "ieee"), (16, 32, 64, 128),
                                                                   (16, 32, 64), (2, 4, 8), (1, 2, 3)):
            if bm * bn > 64 * 64:
                continue
            cfg = AttentionConfig(head_dim_padded(hd), bm, bn, warps, stages, precision, 0)
            row = dict(head_dim=hd, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, precision=precision)
            try:
                r = compile_attention(target, hd, cfg)
                row.update(registers=r.registers, spill_bytes=r.spill_bytes, shared=r.shared,
                           shared_limit=r.shared_limit)
            except Exception as exc:  # noqa: BLE001 - a configuration the compiler refuses is a result
                row.update(error=f"{type(exc).__name__}: {str(exc)[:160]}")
            print(row, flush=True)
            out.append(row)
    return out


def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aot", action="store_true", help=f"write the resource report to {AOT_FILE} and stop")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64], choices=sorted(GEOMETRY))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--candidates", type=Path, default=AOT_FILE)
    ap.add_argument("--max-spill", type=int, default=0, help="skip candidates spilling more bytes than this")
    ap.add_argument("--configs", nargs="+", default=None, metavar="DESCRIPTION",
                    help='time only these candidates, named as the table names them ("BM=32 BN=32 warps=4 ...")')
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--budget-s", type=float, default=300.0, help="time budget of the first phase")
    ap.add_argument("--out", type=Path, default=None,
                    help="write every result here as it comes (tune_qk_attention.json); a rerun resumes from it")
    args = ap.parse_args(argv)
    if args.aot:
        AOT_FILE.write_text(json.dumps(aot_candidates(args.head_dims), indent=0))
        return 0
    if not torch.cuda.is_available():
        raise CusprunError("tune_qk_attention.py times GPU kernels: no CUDA device is available here "
                           "(--aot needs none)")
    from cusprun_kernels.cuda_tuning import cuda_event_ms
    from cusprun_kernels.qk_ablation import qk_row_ablation_sdpa, qk_row_ablation_triton
    from cusprun_kernels.triton_configs import AttentionConfig, attention_config, target_of

    dev = torch.device("cuda")
    capability, shared = target_of(dev)
    listed = json.loads(args.candidates.read_text()) if args.candidates.exists() else []
    done = args.out / "tune_qk_attention.json" if args.out else None
    results = json.loads(done.read_text()) if done and done.exists() else []
    if done:
        args.out.mkdir(parents=True, exist_ok=True)

    def inputs(hd, L, seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        nh, nkv = GEOMETRY[hd]
        q, k, v = (torch.randn(L, n, hd, generator=g).to(dev, torch.bfloat16) for n in (nh, nkv, nkv))
        ang = torch.rand(L, hd // 2, generator=g).to(dev)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        w_o = (torch.randn(nh * hd, nh * hd, generator=g) / (nh * hd) ** 0.5).to(dev, torch.bfloat16)
        return (q, k, v, cos, sin, w_o, torch.tensor([0, L], device=dev)), nh // nkv

    def relerr(got, ref):
        return max(((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(got, ref))

    def save():
        if done:
            tmp = done.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(results, indent=0))
            tmp.replace(done)

    def measure(name, cfg, qk, n_rep, hd, L, ref):
        if any((r["head_dim"], r["L"], r["config"]) == (hd, L, name) for r in results):
            return  # measured by an earlier run of this --out
        def fn():
            if cfg is None:
                return qk_row_ablation_sdpa(*qk, n_rep=n_rep)
            return qk_row_ablation_triton(*qk, n_rep=n_rep, config=cfg)
        row = dict(head_dim=hd, L=L, config=name)
        try:
            out = fn()
            torch.cuda.synchronize()
            err = relerr(out, ref)
            row.update(ms=cuda_event_ms(fn), rel_err_vs_sdpa=err, ok=err <= TOLERANCE)
        except Exception as exc:  # noqa: BLE001 - a launch that fails is a result
            row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", ok=False)
        results.append(row)
        save()
        print(row, flush=True)
        if "error" in row and "CUDA" in row["error"]:
            # a fault poisons the CUDA context: every later launch of this process would fail too
            print(f"CUDA context lost at {name} (head_dim {hd}, L {L})", flush=True)
            if not done:
                raise SystemExit(1)
            # go on in a fresh process, which resumes from --out after this configuration
            os.execv(sys.executable, [sys.executable, *sys.argv])

    for hd in args.head_dims:
        current = attention_config(hd, shared, capability)
        configs = {"current " + current.describe(): current}
        for c in sorted(listed, key=lambda c: c.get("spill_bytes", 0)):  # a budget cut drops the most spilling
            if c["head_dim"] != hd or "error" in c or c["shared"] > shared:
                continue
            if args.configs is None and c["spill_bytes"] > args.max_spill:  # named ones are timed whatever they spill
                continue
            cfg = AttentionConfig(current.head_dim_padded, c["block_m"], c["block_n"], c["num_warps"],
                                  c["num_stages"], c["precision"], c["shared"])
            if cfg.describe() != current.describe() and (args.configs is None or cfg.describe() in args.configs):
                configs.setdefault(cfg.describe(), cfg)
        L0 = args.lengths[0]
        qk, n_rep = inputs(hd, L0, 0)
        ref = qk_row_ablation_sdpa(*qk, n_rep=n_rep)
        measure("sdpa", None, qk, n_rep, hd, L0, ref)
        start = time.monotonic()
        for name, cfg in configs.items():
            if time.monotonic() - start > args.budget_s:
                print(f"time budget spent: {name} and later candidates not timed", flush=True)
                break
            measure(name, cfg, qk, n_rep, hd, L0, ref)
        timed = sorted((r for r in results if r["head_dim"] == hd and r["L"] == L0 and r["ok"]
                        and r["config"] in configs), key=lambda r: r["ms"])
        finalists = {r["config"] for r in timed[:args.top]} | {n for n in configs if n.startswith("current")}
        for L in args.lengths[1:]:
            qk, n_rep = inputs(hd, L, 1)
            ref = qk_row_ablation_sdpa(*qk, n_rep=n_rep)
            measure("sdpa", None, qk, n_rep, hd, L, ref)
            for name in sorted(finalists):
                measure(name, configs[name], qk, n_rep, hd, L, ref)

    columns = ["head_dim", "L", "config", "ms", "vs sdpa", "rel err vs sdpa", "ok"]
    sdpa_ms = {(r["head_dim"], r["L"]): r["ms"] for r in results if r["config"] == "sdpa" and "ms" in r}
    rows = [[r["head_dim"], r["L"], r["config"], r["ms"],
             f"{sdpa_ms[(r['head_dim'], r['L'])] / r['ms']:.2f}x" if (r["head_dim"], r["L"]) in sdpa_ms else "-",
             r["rel_err_vs_sdpa"], "ok" if r["ok"] else "WRONG"] if "ms" in r else
            [r["head_dim"], r["L"], r["config"], "-", "-", "-", "FAILED: " + r["error"]]
            for r in sorted(results, key=lambda r: (r["head_dim"], r["L"], r.get("ms", float("inf"))))]
    report("tune_qk_attention", columns, rows, environment())


if __name__ == "__main__":
    sys.exit(run_cli(main))
