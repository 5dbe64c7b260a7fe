import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if not torch.cuda.is_available():  # no GPU: the Triton kernels run in the interpreter (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def dtype_tol(dtype, T):
    """eps(dtype) * sqrt(T) scaled: the accuracy a converged solve must reach (docs/design.md)."""
    eps = torch.finfo(dtype).eps
    return 50 * eps * max(1.0, T) ** 0.5
