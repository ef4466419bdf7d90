"""Launch configurations of the Triton kernels, chosen per GPU by its shared memory and the head_dim.

Each table lists configurations from the one with the largest tiles down; a launcher takes the first
whose shared-memory budget fits the device's per-block limit. Budgets are upper bounds of the shared
memory Triton allocates for that configuration, and every configuration a launcher can choose on
sm_80, sm_86 and sm_90 was compiled ahead of time without spilling registers
(``python -m cusprun_kernels.triton_aot``, run by ``tests/test_triton_aot.py``, fails when an
allocation exceeds its budget or the target's limit, or the kernel spills — e.g. after a Triton upgrade).

Precision of the attention (its inputs are always float32): ``tf32x3`` — tensor cores, each operand
split into TF32 high and low parts and three products taken, ≈ float32 accuracy — up to head_dim 128;
``ieee`` (float32 FMA on CUDA cores) above, where 3×TF32 does not fit in registers without spilling.
The exact ablation needs float32 accuracy: a delta is a small difference of two softmax outputs, and
plain TF32 (10 mantissa bits) would swamp it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FALLBACK_SHARED = 49_152  # every CUDA GPU since Kepler gives a block this much without opting in


@dataclass(frozen=True)
class AttentionConfig:
    head_dim_padded: int  # HDP: head_dim rounded up to a power of two (tl.arange needs one), at least 16
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    precision: str
    budget: int  # bytes of shared memory, an upper bound of Triton's allocation (checked ahead of time)
    # compute capabilities this entry is chosen for, because it measured fastest on a GPU of one of them
    # (not necessarily on every GPU of that capability: sm_90 was tuned on an H200, an H100 gets it too); () =
    # every GPU
    capabilities: tuple[tuple[int, int], ...] = ()
    # register spills ptxas may report for those capabilities: the spills of the configuration that was timed
    # faster than every spill-free one (as compiled ahead of time by this repository's Triton)
    spill_budget: int = 0

    def shared_bytes(self) -> int:
        return self.budget

    def describe(self) -> str:
        return (f"BM={self.block_m} BN={self.block_n} warps={self.num_warps} stages={self.num_stages} "
                f"{self.precision}")


@dataclass(frozen=True)
class ProjectionConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    budget: int

    def shared_bytes(self) -> int:
        return self.budget

    def describe(self) -> str:
        return (f"BM={self.block_m} BN={self.block_n} BK={self.block_k} warps={self.num_warps} "
                f"stages={self.num_stages}")


# Measured with Triton 3.9 for sm_80, sm_86 and sm_90: with 3×TF32, 64×64 tiles need 255 registers and spill
# kilobytes per thread at head_dim 128 (ptxas even falls back to 32 registers), and 32×16 tiles at head_dim
# 128 still spill on sm_86 and sm_90; the entries for every GPU hold the largest tiles that compile without
# spills on all three. Shared memory is far below every limit at these sizes; the budgets still guard a
# smaller GPU.
# sm_90 entries: measured on an NVIDIA H200 by benchmarks/tune_qk_attention.py (results and logs in
# benchmarks/results/tune_qk_attention-NVIDIA-H200/, Triton 3.6 there): of the configurations spilling at
# most 1 KB on sm_90 (compiled ahead of time with Triton 3.9), all 60 at head_dim 128 and the 29 spilling
# least of 117 at 64 (the time budget cut the rest) were timed at 1024 tokens, the fastest few again at 512
# and 2048, and the entry is the one with the least time summed over the three. At head_dim 128 it spills
# 732 B per thread and still runs 1.35 / 1.74 / 1.89x faster than the spill-free entry below it at 512 /
# 1024 / 2048 tokens (6.65 / 13.5 / 42.7 against 8.99 / 23.5 / 80.7 ms; the fastest spill-free one timed
# took 17.4 ms at 1024); at 64, 0.97 / 1.43 / 1.51x. Other GPUs keep the spill-free entries until measured.
ATTENTION_CONFIGS = {
    64: [AttentionConfig(64, 16, 64, 4, 1, "tf32x3", 24_576, capabilities=((9, 0),)),
         AttentionConfig(64, 32, 16, 4, 2, "tf32x3", 32_768)],
    128: [AttentionConfig(128, 32, 32, 4, 2, "tf32x3", 73_984, capabilities=((9, 0),), spill_budget=732),
          AttentionConfig(128, 16, 16, 4, 2, "tf32x3", 36_864)],
    256: [AttentionConfig(256, 16, 16, 4, 2, "ieee", 53_248)],
}
# Launch configurations that compile but fault on a GPU: (head_dim_padded, block_m, block_n, num_warps,
# precision) -> (capability majors, why). BM 64, BN 16 and 8 warps at head_dim 128 with 3xTF32 faulted with an
# illegal memory access at every stage count on an NVIDIA H200 (Triton 3.6.0), and compute-sanitizer memcheck
# placed it in the kernel's P.V product: shared-memory reads of the tensor-core operands far past the 80 KiB the
# kernel allocates (benchmarks/results/gpu_check-NVIDIA-H200/third-session/). A compiler defect, consistent with
# the Hopper wgmma faults reported against Triton >= 3.6 (triton-lang/triton#10573, #11366); no table entry
# uses it, and the launcher refuses it where it faulted, so a tuning run or a caller's config cannot lose the
# CUDA context to it.
KNOWN_FAULTS = {
    (128, 64, 16, 8, "tf32x3"): ((9,), "illegal shared-memory reads in the P.V product (sm_90, Triton 3.6.0)"),
}


def known_fault(cfg: AttentionConfig, capability: tuple[int, int]) -> str | None:
    """Why ``cfg`` must not be launched on a GPU of ``capability`` (None: no fault known)."""
    entry = KNOWN_FAULTS.get((cfg.head_dim_padded, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.precision))
    return entry[1] if entry and capability[0] in entry[0] else None


# keyed by the element size of x and W (4: float32 through 3×TF32; 2: float16 / bfloat16)
PROJECTION_CONFIGS = {
    4: [ProjectionConfig(64, 64, 32, 8, 3, 53_248), ProjectionConfig(64, 32, 32, 4, 3, 36_864)],
    2: [ProjectionConfig(64, 64, 32, 4, 3, 12_288), ProjectionConfig(64, 64, 32, 4, 2, 8_192)],
}


def head_dim_padded(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def attention_config(head_dim: int, shared_limit: int, capability: tuple[int, int]) -> AttentionConfig:
    """The configuration of the ablated-attention kernel for ``head_dim`` on a GPU of compute ``capability``
    whose blocks may use ``shared_limit`` bytes of shared memory (ValueError above head_dim 256, the largest
    table). Entries tuned for other capabilities are passed over."""
    hdp = head_dim_padded(head_dim)
    table = next((ATTENTION_CONFIGS[k] for k in sorted(ATTENTION_CONFIGS) if hdp <= k), None)
    if table is None:
        raise ValueError(f"qk_row_ablation (triton): head_dim {head_dim} is above the largest supported, "
                         f"{max(ATTENTION_CONFIGS)}")
    cfg = next((c for c in table if c.budget <= shared_limit
                and (not c.capabilities or capability in c.capabilities)), None)
    if cfg is None:
        raise ValueError(f"qk_row_ablation (triton): every configuration for head_dim {head_dim} needs more than "
                         f"the {shared_limit} B of shared memory this GPU gives a block")
    return replace(cfg, head_dim_padded=hdp)


def projection_config(element_size: int, shared_limit: int) -> ProjectionConfig:
    table = PROJECTION_CONFIGS[4 if element_size >= 4 else 2]
    cfg = next((c for c in table if c.budget <= shared_limit), None)
    if cfg is None:
        raise ValueError(f"projection_energies (triton): every configuration needs more than the {shared_limit} B "
                         f"of shared memory this GPU gives a block")
    return cfg


def target_of(device: torch.device) -> tuple[tuple[int, int], int]:
    """(compute capability, per-block shared memory, opt-in limit) of ``device``; the interpreter's CPU is
    taken for an sm_80 (A100), so the CPU tests run the configurations an A100 would."""
    if device.type != "cuda":
        return (8, 0), 166_912
    from .devices import device_info

    info = device_info(device)
    return info.capability, info.shared_memory


def shared_memory_of(device: torch.device) -> int:
    return target_of(device)[1]


def attention_config_for(head_dim: int, device: torch.device) -> AttentionConfig:
    """The configuration the Triton q/k launcher uses for ``head_dim`` on ``device``."""
    capability, shared = target_of(device)
    return attention_config(head_dim, shared, capability)
