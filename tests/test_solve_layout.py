"""seqpar.solve(batch_first=...) and the layout named in shape errors; lazy seqpar.nn / seqpar.distributed."""
import subprocess
import sys

import pytest
import torch

import seqpar


@pytest.mark.parametrize("method", ["newton", "sequential"])
def test_batch_first_matches_time_major(method):
    cell = seqpar.GRU(3, 5)
    x = torch.randn(40, 2, 3, dtype=torch.float64)  # (T, B, D_in)
    guess = torch.randn(40, 2, 5, dtype=torch.float64) * 0.1
    cell = cell.double()
    ref = seqpar.solve(cell, x, initial_guess=guess if method == "newton" else None, method=method)
    out = seqpar.solve(cell, x.transpose(0, 1).contiguous(), batch_first=True, method=method,
                       initial_guess=guess.transpose(0, 1).contiguous() if method == "newton" else None)
    assert out.shape == (2, 40, 5)
    torch.testing.assert_close(out, ref.transpose(0, 1), rtol=0, atol=1e-10)


def test_batch_first_gradients():
    cell = seqpar.DiagGRU(3, 4).double()
    x = torch.randn(2, 30, 3, dtype=torch.float64, requires_grad=True)
    seqpar.solve(cell, x, batch_first=True).square().sum().backward()
    g = x.grad.clone()
    x2 = x.detach().transpose(0, 1).clone().requires_grad_(True)
    seqpar.solve(cell, x2).square().sum().backward()
    torch.testing.assert_close(g, x2.grad.transpose(0, 1))


def test_shape_errors_name_the_layout():
    cell = seqpar.GRU(3, 5)
    with pytest.raises(ValueError, match=r"time-major.*batch_first=True"):
        seqpar.solve(cell, torch.randn(40, 3))
    # (B, T, D_in) data passed without batch_first: D_in is fine here, h0's batch is not
    with pytest.raises(ValueError, match=r"read as \(T, B, D_in\) \(time-major"):
        seqpar.solve(cell, torch.randn(2, 40, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"initial_guess must have shape \(B, T, D\) = \(2, 40, 5\)"):
        seqpar.solve(cell, torch.randn(2, 40, 3), batch_first=True, initial_guess=torch.zeros(40, 2, 5))
    with pytest.raises(TypeError, match="batch_first must be True or False"):
        seqpar.solve(cell, torch.randn(4, 2, 3), batch_first="yes")


def test_plain_import_gives_nn_and_distributed():
    code = ("import seqpar\n"
            "assert seqpar.nn.DiagGRU and seqpar.distributed.init_from_env\n"
            "import importlib\n"
            "for name in ('seqpar.benchmarks', 'seqpar.tests', 'seqpar.launch'):\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ImportError:\n"
            "        continue\n"
            "    raise SystemExit(name + ' is importable')\n"
            "import seqpar.kernels, os\n"
            "assert os.path.dirname(os.path.dirname(seqpar.kernels.__file__)) == "
            "os.path.dirname(os.path.dirname(seqpar.__file__)) or 'site-packages' in seqpar.kernels.__file__\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        seqpar.nope
