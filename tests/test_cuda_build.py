"""The nvcc build's resource report, read from the built extension without a GPU (cuobjdump): no kernel
spills registers, shared memory fits every target it is built for, and the ablated attention computes its
logit with explicitly rounded operations (no FFMA contraction in the perturbed pass only)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cusprun_kernels.cuda_ext import extension
from cusprun_kernels.devices import SHARED_MEMORY_PER_BLOCK


def _cuobjdump() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        bundled = Path(get_ptxas(80).path).with_name("cuobjdump")  # Triton's wheel ships it beside ptxas
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


MODULE = extension()[0]
TOOL = _cuobjdump()
pytestmark = pytest.mark.skipif(MODULE is None or TOOL is None,
                                reason=f"needs the built extension ({extension()[1]}) and cuobjdump")
# template argument kDimTiles -> the largest head_dim of that instantiation
HEAD_DIM_OF_TILES = {8: 64, 16: 128, 32: 256}


def _resources() -> list[tuple[str, str, dict[str, int]]]:
    """[(arch, kernel, {REG, STACK, SHARED, LOCAL, ...})] of every kernel image in the module."""
    out = subprocess.run([TOOL, "--dump-resource-usage", MODULE.__file__], capture_output=True, text=True,
                         check=True).stdout
    rows, arch = [], None
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"arch = (sm_\w+)", line.strip()):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            rows.append((arch, m.group(1), {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d\])?):(\d+)", lines[i + 1])}))
    return rows


def _limit(arch: str) -> int:
    major_minor = re.match(r"sm_(\d+)(\d)", arch)
    return SHARED_MEMORY_PER_BLOCK[(int(major_minor.group(1)), int(major_minor.group(2)))]


def test_no_kernel_spills_and_shared_memory_fits_each_target():
    rows = _resources()
    assert {arch for arch, _, _ in rows} == {"sm_80", "sm_90a"}
    assert len(rows) == 2 * 12  # per arch: 6 attention instantiations, projection and segment_sum_sq x 3 dtypes
    for arch, kernel, res in rows:
        assert res["STACK"] == 0 and res["LOCAL"] == 0, f"{arch} {kernel} spills: {res}"
        dynamic = 0
        if m := re.search(r"ablated_attention_kernelILb[01]ELi(\d+)E", kernel):
            dynamic = MODULE.ablated_attention_shared_bytes(HEAD_DIM_OF_TILES[int(m.group(1))])
        assert res["SHARED"] + dynamic <= _limit(arch), f"{arch} {kernel}: {res['SHARED']} + {dynamic} B"


def test_head_dim_256_exceeds_sm86_shared_memory_and_is_refused_before_launch():
    """The sm_80 image also runs on sm_86 / sm_89, whose blocks get 101,376 B: head_dim ≤ 128 fits, 256
    does not, so the launcher checks the device's limit and raises (the backend check then skips it)."""
    assert MODULE.ablated_attention_shared_bytes(128) <= SHARED_MEMORY_PER_BLOCK[(8, 6)]
    assert MODULE.ablated_attention_shared_bytes(256) > SHARED_MEMORY_PER_BLOCK[(8, 6)]
    source = (Path(__file__).resolve().parents[1] / "csrc" / "ablated_attention.cu").read_text()
    assert "cudaDevAttrMaxSharedMemoryPerBlockOptin" in source


def test_attention_logit_uses_rounded_operations():
    ptx = subprocess.run([TOOL, "-ptx", MODULE.__file__], capture_output=True, text=True, check=True).stdout
    bodies = re.findall(r"\.entry (\S*ablated_attention_kernelILb([01])ELi(\d+)E\S*)\((.*?)\n}\n", ptx, re.S)
    assert len(bodies) == 6
    for name, perturb, _, body in bodies:
        # every score element of a 16 x 32 key tile (4 n-tiles x 4 per lane) is scaled with mul.rn
        assert body.count("mul.rn.f32") >= 16, name
        if perturb == "1":  # the perturbation and the base subtraction are rounded too
            assert body.count("sub.rn.f32") >= 16 and body.count("mul.rn.f32") >= 48, name
