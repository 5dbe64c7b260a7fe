"""seqpar.kernels.linear (x W^T + b by tl.dot, 3xTF32 by default) against float64 torch.nn.functional.linear."""
import os

import pytest
import torch

import seqpar.kernels.linear as lin
from seqpar.cells import GRU
from seqpar.kernels.linear import fp32_linear, linear, tf32_split, uses_tensor_cores

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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


@pytest.mark.parametrize("M,K,N", [(130, 64, 193), (5, 65, 7), (64, 3, 1)])
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_both_kernels_at_their_edges(M, K, N, precision):
    """The whole-row kernel at K = ROWS_MAX_K with four column tiles (the last nearly empty) and at N = 1;
    the tiled kernel just past it (K = 65); into a row range of a larger tensor."""
    assert lin.ROWS_MAX_K == 64
    torch.manual_seed(M * K + N)
    x, w, b = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)
    big = torch.full((M + 2, N), 7.0)
    linear(x, w, b, out=big[1:M + 1], precision=precision)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(big[1:M + 1].double(), ref, rtol=1e-5, atol=1e-5)
    assert bool((big[0] == 7).all()) and bool((big[M + 1] == 7).all())


def _tf32(t):
    """What a tensor-core TF32 product reads of fp32 ``t``: its top 10 mantissa bits (the rest dropped)."""
    return (t.float().contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def test_tf32_split_parts_and_the_three_product_scheme():
    """tf32_split's parts are TF32 numbers summing to w within 2^-21; and the whole-row kernel's scheme --
    x split the same way, x_lo w_hi + x_hi w_lo + x_hi w_hi with every operand read as TF32 -- is within
    1e-6 (relative to sum |x w|) of float64, where one TF32 product is ~1e-3 off: in float64 here, so the
    scheme is checked as the tensor cores run it (the interpreter's dots are exact fp32)."""
    torch.manual_seed(3)
    w = torch.randn(192, 64) * torch.logspace(-3, 3, 64)
    hi, lo = tf32_split(w)
    assert torch.equal(_tf32(hi), hi) and torch.equal(_tf32(lo), lo)
    assert float(((hi.double() + lo.double() - w.double()).abs() / w.double().abs()).max()) < 2 ** -21
    x = torch.randn(500, 64)
    x_hi = tf32_split(x)[0]  # the kernel's _tf32_parts rounds the same way; its x_lo, unrounded, is read as _tf32
    x_lo = x - x_hi
    d = lambda t: _tf32(t).double()  # noqa: E731
    got = d(x_lo) @ d(hi).T + d(x_hi) @ d(lo).T + d(x_hi) @ d(hi).T
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    assert float(((got - exact).abs() / scale).max()) < 1e-6
    assert float(((d(x) @ d(w).T - exact).abs() / scale).max()) > 1e-4  # one TF32 product: far off


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


@pytest.mark.parametrize("shape", [(7, 3, 5), (1, 1, 1), (130, 2, 64)])
def test_fp32_linear_kernel_branch_matches_float64(monkeypatch, shape):
    """With the tensor-core branch taken (forced here: the CPU never takes it), batched non-contiguous
    inputs give F.linear's shape and float64's values."""
    monkeypatch.setattr(lin, "uses_tensor_cores", lambda *a: True)
    torch.manual_seed(sum(shape))
    x = torch.randn(shape[1], shape[0], shape[2]).transpose(0, 1)  # (T, B, K), not contiguous
    w, b = torch.randn(3 * shape[2] + 1, shape[2]), torch.randn(3 * shape[2] + 1)
    got = fp32_linear(x, w, b)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_fp32_linear_takes_cuBLAS_where_the_kernel_does_not_apply(monkeypatch):
    """CPU tensors, any size: F.linear itself (bit for bit); the kernel is never launched."""
    monkeypatch.setattr(lin, "FP32_LINEAR_MIN_ROWS", 1)
    monkeypatch.setattr(lin, "linear", lambda *a, **k: pytest.fail("the kernel ran on CPU tensors"))
    x, w, b = torch.randn(5, 4, 6), torch.randn(9, 6), torch.randn(9)
    assert not uses_tensor_cores(x, w, b)
    assert torch.equal(fp32_linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert torch.equal(fp32_linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_gpu_fp32_linear_dispatch_and_accuracy(monkeypatch):
    """On CUDA: the kernel for fp32 without an autograd graph at >= FP32_LINEAR_MIN_ROWS rows (float64's
    values, and closer to them than an fp32 GEMM need be), cuBLAS where grad is recorded, for fewer rows,
    other dtypes or with TF32 allowed; GRU.project_inputs follows the same rule."""
    torch.manual_seed(0)
    rows = lin.FP32_LINEAR_MIN_ROWS + 3
    x = torch.randn(rows // 3 + 1, 3, 64, device="cuda")
    w = torch.randn(192, 64, device="cuda", requires_grad=True)
    b = torch.randn(192, device="cuda")
    assert not uses_tensor_cores(x, w, b)  # grad would be recorded for w
    assert not uses_tensor_cores(x[:10], w.detach(), b) and not uses_tensor_cores(x.double(), w.double().detach())
    wide = torch.randn(192, 65, device="cuda")
    assert not uses_tensor_cores(torch.randn(rows, 65, device="cuda"), wide)  # K past the whole-row kernel
    with torch.no_grad():
        assert uses_tensor_cores(x, w, b)
        got = fp32_linear(x, w, b)
        ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-5)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
        assert not uses_tensor_cores(x, w, b)
        monkeypatch.undo()
        m = torch.nn.GRU(64, 64)
        cell = GRU.from_torch(m).cuda()
        xp = cell.project_inputs(x)
        ref = torch.nn.functional.linear(x.double(), cell.weight_ih.double(), cell.bias_ih.double())
        torch.testing.assert_close(xp.double(), ref, rtol=1e-5, atol=2e-5)
    y = fp32_linear(x, w, b)  # grad recorded: F.linear, differentiable
    y.sum().backward()
    assert w.grad is not None
