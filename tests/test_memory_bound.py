"""The q/k ablation never materializes [heads, head_dim, L, L]: peak memory stays O(L²·heads)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import resource, torch
    from cusprun_kernels.qk_ablation import qk_row_ablation_torch
    L, heads, kv, hd = 1024, 3, 1, 64
    torch.manual_seed(0)
    q, k, v = torch.randn(L, heads, hd), torch.randn(L, kv, hd), torch.randn(L, kv, hd)
    cos, sin = torch.randn(L, hd), torch.randn(L, hd)
    w_o = torch.randn(96, heads * hd)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    qk_row_ablation_torch(q, k, v, cos, sin, w_o, torch.tensor([0, L]), n_rep=3, chunk_bytes=64 * 2**20)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
""")


def test_qk_ablation_peak_memory_is_bounded():
    full = 3 * 64 * 1024 * 1024 * 4 / 2**20  # MiB of one [heads, hd, L, L] float32 tensor: 768
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    extra_mib = float(res.stdout.strip())
    assert extra_mib < full / 3, f"peak grew by {extra_mib:.0f} MiB; a materialized tensor is {full:.0f} MiB"
