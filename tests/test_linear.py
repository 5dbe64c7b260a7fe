"""seqpar.kernels.linear (x W^T + b by tl.dot, 3xTF32 by default) against float64 torch.nn.functional.linear."""
import pytest
import torch

from seqpar.kernels.linear import linear


@pytest.mark.parametrize("M,K,N", [(1, 1, 3), (37, 5, 15), (300, 17, 51), (129, 64, 192)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_float64(M, K, N, bias):
    torch.manual_seed(M + K + N)
    x, w = torch.randn(M, K), torch.randn(N, K) / K ** 0.5
    b = torch.randn(N) if bias else None
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    got = linear(x, w, b)
    assert got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision,tiles", [("ieee", (16, 16, 16, 1)), ("tf32x3", (32, 64, 16, 2))])
def test_linear_into_a_view_with_other_tiles(precision, tiles):
    """``out`` a row range of a larger tensor (as the quasi-Newton GRU writes h_prev W^T into rows 1..):
    the rows outside it are untouched; tiles that do not divide M, N or K."""
    torch.manual_seed(1)
    x, w, b = torch.randn(45, 20), torch.randn(33, 20), torch.randn(33)
    big = torch.full((47, 33), 7.0)
    linear(x, w, b, out=big[1:46], precision=precision, tiles=tiles)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(big[1:46].double(), ref, rtol=1e-5, atol=1e-5)
    assert bool((big[0] == 7).all()) and bool((big[46] == 7).all())


def test_linear_empty_and_bad_arguments():
    assert linear(torch.zeros(0, 4), torch.zeros(3, 4)).shape == (0, 3)
    with pytest.raises(ValueError, match="precision"):
        linear(torch.zeros(2, 4), torch.zeros(3, 4), precision="fp8")
    with pytest.raises(ValueError, match="share K"):
        linear(torch.zeros(2, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="bias"):
        linear(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="out"):
        linear(torch.zeros(2, 4), torch.zeros(3, 4), out=torch.zeros(3, 2))
