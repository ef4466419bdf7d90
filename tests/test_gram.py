"""The Gram op (cusprun_kernels.gram): torch and Triton against a float64 reference, odd shapes, every dtype."""

import pytest
import torch

from cusprun_kernels.gram import gram_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative to the reference's largest magnitude, by input dtype (float32 products and accumulation)
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def reference(x):
    x = x.double()
    return x.T @ x


def rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, n", [(1, 5), (37, 19), (130, 70)])
def test_gram_torch(tokens, n, dtype):
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens + n)).to(DEVICE, dtype)
    got = gram_torch(x)
    assert got.dtype == torch.float32 and got.shape == (n, n)
    assert rel_err(got, reference(x)) <= TOL[dtype]
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("tokens, n", [(1, 5), (37, 19), (70, 40)])  # n and T not multiples of the tiles
def test_gram_triton_matches_the_reference(tokens, n):
    pytest.importorskip("triton")
    from cusprun_kernels.gram import gram_triton

    x = torch.randn(tokens, 2 * n, generator=torch.Generator().manual_seed(n), device="cpu").to(DEVICE)[:, ::2]
    got = gram_triton(x, block_n=16, block_t=16)  # a strided view: the kernel reads through strides
    assert not got.isnan().any()  # poisoned before the launch: every element was written
    assert rel_err(got, reference(x)) <= 1e-5  # 3xTF32 on a GPU; the interpreter computes in float32


def test_gram_rejects_a_non_matrix():
    with pytest.raises(ValueError, match=r"gram: x must be \[T, n\]"):
        gram_torch(torch.zeros(2, 3, 4))
