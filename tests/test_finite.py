"""kernels/finite.py: NaN / Inf counts on the device against torch.isfinite."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

from seqpar.kernels import finite  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cases(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9001, generator=g)  # not a multiple of the block; several programs
    x[[0, 4095, 4096, 9000]] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
    big = torch.full((5, 3), 3e38)  # finite values whose sum overflows: no count
    y = torch.randn(7, 2, 3, generator=g).to(torch.bfloat16)
    y[6, 1, 2] = float("nan")
    t = torch.randn(3, 11, 4, generator=g)
    t[2, 10, 0] = float("inf")
    return [x.to(device), big.to(device), y.to(device), t.to(device).transpose(0, 1),  # a permuted layout
            torch.zeros(1, device=device), torch.tensor([float("nan")], device=device),
            torch.empty(0, 4, device=device)]


def _check(device):
    out = torch.zeros(3, dtype=torch.float64, device=device)
    total = 0
    for x in _cases(device):
        before = float(out[1])
        finite.count_nonfinite(x, out[1:])
        want = finite.count_nonfinite_reference(x)
        assert float(out[1]) - before == want
        total += want
    assert float(out[0]) == 0 and float(out[2]) == 0 and float(out[1]) == total == 7


@pytest.mark.skipif(not INTERPRET, reason="interpreted kernels (TRITON_INTERPRET=1)")
def test_counts_equal_isfinite_cpu():
    _check("cpu")


def test_gapped_layouts_and_bad_slots_are_refused():
    x = torch.randn(6, 4)[:, ::2]  # strided: gaps between its elements
    assert finite.dense_flat(x) is None
    with pytest.raises(ValueError, match="contiguous"):
        finite.count_nonfinite(x, torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        finite.count_nonfinite(torch.zeros(3), torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_counts_equal_isfinite_gpu():
    _check("cuda")
