"""Ahead-of-time compiles of the Triton kernels for GPU targets, without a GPU.

    python -m cusprun_kernels.triton_aot [--targets 80 86 90] [--head-dims 64 128 256] [--json]

Every Triton kernel is compiled (``triton.compile`` with a ``GPUTarget``: TTIR → PTX → cubin through
Triton's bundled ptxas) at the configuration its launcher would choose on that target
(:mod:`cusprun_kernels.triton_configs`), and checked: the shared memory Triton allocates must fit the
target's per-block limit, and the cubin must not spill registers (``ptxas -v`` on the PTX) beyond what the
configuration's table allows where it was measured faster with the spills. Exit code 1
when any check fails. This needs triton, not a GPU, and must run without ``TRITON_INTERPRET=1`` (the
interpreter replaces ``@triton.jit`` functions with objects the compiler cannot take).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from .devices import SHARED_MEMORY_PER_BLOCK

TARGETS = (80, 86, 90)
HEAD_DIMS = (64, 128, 256)
PROJECTION_DTYPES = ("fp32", "bf16")


@dataclass
class CompileReport:
    kernel: str
    target: int
    config: str
    shared: int  # bytes Triton allocates
    shared_limit: int
    registers: int
    spill_bytes: int  # spill stores + spill loads reported by ptxas
    estimate: int  # the launcher's upper bound of ``shared`` (triton_configs), which chose the config
    # ex2.approx not preceded by libdevice expf's range reduction (one fma.rm each): a bare tl.exp
    approximate_exps: int = 0
    spill_budget: int = 0  # spills the configuration table allows, where they measured faster on that target

    @property
    def problems(self) -> list[str]:
        out = []
        if self.shared > self.shared_limit:
            out.append(f"shared memory {self.shared} B > sm_{self.target} limit {self.shared_limit} B")
        if self.shared > self.estimate:
            out.append(f"shared memory {self.shared} B > the launcher's estimate {self.estimate} B")
        if self.spill_bytes > self.spill_budget:
            allowed = f" (its table allows {self.spill_budget} B)" if self.spill_budget else ""
            out.append(f"{self.spill_bytes} B of register spills ({self.registers} registers){allowed}")
        if self.approximate_exps:
            out.append(f"{self.approximate_exps} exp through bare ex2.approx (tl.exp, not libdevice's expf)")
        return out


def shared_limit(target: int) -> int:
    return SHARED_MEMORY_PER_BLOCK[divmod(target, 10)]


def _ptxas_usage(ptx: str, target: int) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` on the PTX Triton generated."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([get_ptxas(target).path, "-v", f"--gpu-name={arch}", path, "-o",
                              os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def _compile(fn, signature: dict, constants: dict, target: int, num_warps: int, num_stages: int,
             enable_fp_fusion: bool):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {**signature, **{name: "constexpr" for name in constants}}
    src = ASTSource(fn, types, constants)
    return triton.compile(src, target=GPUTarget("cuda", target, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=enable_fp_fusion))


def compile_attention(target: int, head_dim: int, cfg=None) -> CompileReport:
    """``cfg``: an ``AttentionConfig`` to compile instead of the one the launcher would choose."""
    from .qk_ablation import _ablated_attention_kernel
    from .triton_configs import attention_config

    limit = shared_limit(target)
    cfg = cfg or attention_config(head_dim, limit, divmod(target, 10))
    ptr = "*fp32"
    signature = {**{n: ptr for n in ("qr_ptr", "kr_ptr", "v_ptr", "r1_ptr", "r2_ptr", "c1_ptr", "c2_ptr",
                                     "base_ptr", "out_ptr")},
                 **{n: "*i32" for n in ("tile_start_ptr", "tile_end_ptr", "tile_key_lo_ptr")},
                 **{n: "i32" for n in ("T", "NH", "NKV", "HD", "N_REP", "CHUNK")}, "scale": "fp32", "window": "i32"}
    # the perturbed, windowed variant holds the most live values; the others are subsets of its code
    constants = dict(PERTURB=True, WINDOWED=True, PRECISION=cfg.precision, PRECISE_EXP=True, BM=cfg.block_m,
                     BN=cfg.block_n, HDP=cfg.head_dim_padded)
    kernel = _compile(_ablated_attention_kernel, signature, constants, target, cfg.num_warps, cfg.num_stages,
                      enable_fp_fusion=False)
    ptx = kernel.asm["ptx"]
    regs, spills = _ptxas_usage(ptx, target)
    bare_exps = max(0, ptx.count("ex2.approx") - ptx.count("fma.rm."))
    return CompileReport(f"qk_ablation attention head_dim={head_dim}", target, cfg.describe(),
                         kernel.metadata.shared, limit, regs, spills, cfg.shared_bytes(), bare_exps, cfg.spill_budget)


def compile_projection(target: int, dtype: str) -> CompileReport:
    from .projection_energy import _projection_energy_kernel
    from .triton_configs import projection_config

    limit = shared_limit(target)
    cfg = projection_config(4 if dtype == "fp32" else 2, limit)
    signature = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
                 "row_part_ptr": "*fp32", "col_part_ptr": "*fp32", "tile_start_ptr": "*i32", "tile_end_ptr": "*i32",
                 **{n: "i64" for n in ("N", "K", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_ym",
                                       "stride_yn")}}
    constants = dict(HAS_BIAS=True, PRECISION="tf32x3" if dtype == "fp32" else "tf32", BM=cfg.block_m,
                     BN=cfg.block_n, BK=cfg.block_k)
    kernel = _compile(_projection_energy_kernel, signature, constants, target, cfg.num_warps, cfg.num_stages,
                      enable_fp_fusion=True)
    regs, spills = _ptxas_usage(kernel.asm["ptx"], target)
    return CompileReport(f"projection_energies {dtype}", target, cfg.describe(), kernel.metadata.shared, limit, regs,
                         spills, cfg.shared_bytes())


def compile_gram(target: int, dtype: str) -> CompileReport:
    from .gram import GRAM_BLOCK_N, GRAM_BLOCK_T, GRAM_STAGES, GRAM_WARPS, _gram_kernel

    limit = shared_limit(target)
    signature = {"x_ptr": f"*{dtype}", "out_ptr": "*fp32", **{n: "i64" for n in ("T", "N", "stride_t", "stride_n")}}
    constants = dict(PRECISION="tf32x3", BN=GRAM_BLOCK_N, BT=GRAM_BLOCK_T)
    kernel = _compile(_gram_kernel, signature, constants, target, GRAM_WARPS, GRAM_STAGES, enable_fp_fusion=True)
    regs, spills = _ptxas_usage(kernel.asm["ptx"], target)
    # two [BT, BN] float32 operand tiles per pipeline stage
    estimate = GRAM_STAGES * 2 * GRAM_BLOCK_T * GRAM_BLOCK_N * 4
    config = f"BN={GRAM_BLOCK_N} BT={GRAM_BLOCK_T} warps={GRAM_WARPS} stages={GRAM_STAGES}"
    return CompileReport(f"gram {dtype}", target, config, kernel.metadata.shared, limit, regs, spills, estimate)


def compile_all(targets=TARGETS, head_dims=HEAD_DIMS) -> list[CompileReport]:
    reports = []
    for target in targets:
        reports += [compile_attention(target, hd) for hd in head_dims]
        reports += [compile_projection(target, dtype) for dtype in PROJECTION_DTYPES]
        reports += [compile_gram(target, dtype) for dtype in PROJECTION_DTYPES]
    return reports


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, nargs="+", default=list(TARGETS))
    ap.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    ap.add_argument("--json", action="store_true", help="one JSON list on stdout instead of a table")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("triton_aot: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)", file=sys.stderr)
        return 2
    reports = compile_all(args.targets, args.head_dims)
    if args.json:
        print(json.dumps([{**asdict(r), "problems": r.problems} for r in reports]))
    else:
        for r in reports:
            verdict = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
            print(f"sm_{r.target} {r.kernel:<38} {r.config:<34} shared {r.shared:>6}/{r.shared_limit} B "
                  f"regs {r.registers:>3} spills {r.spill_bytes} B  {verdict}")
    return 1 if any(r.problems for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
