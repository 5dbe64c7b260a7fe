"""End-to-end checks on a CUDA GPU (run on the GPU machine: ``pytest -m gpu``; deselected in CI).

Layers and solves on the Triton backend against the same computation in float64 step by step,
forward and backward, plus torch.nn / cuDNN compatibility on the GPU.
"""
import pytest
import torch

import seqpar
import seqpar.nn as snn

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _grads(layer, x):
    out, _ = layer(x)
    w = torch.randn_like(out)
    return out.detach(), torch.autograd.grad((out * w).sum(), [x, *layer.parameters()]), w


@pytest.mark.parametrize("make,jac", [(lambda: snn.DiagGRU(8, 64, num_layers=2), "auto"),
                                      (lambda: snn.DiagLSTM(8, 32), "auto"),
                                      (lambda: snn.GRU(8, 48), "diag"),
                                      (lambda: snn.LSTM(8, 16), "dense")])
def test_layers_forward_backward_match_float64_sequential(make, jac):
    torch.manual_seed(0)
    fast = make().to(DEV)
    fast.solve_kwargs["jacobian"] = jac
    ref = make().to(DEV).double()
    ref.load_state_dict(fast.state_dict())
    ref.solve_kwargs["method"] = "sequential"
    x = torch.randn(4, 5000, 8, device=DEV) if fast.batch_first else torch.randn(5000, 4, 8, device=DEV)
    x.requires_grad_(True)
    out, g, w = _grads(fast, x)
    assert all(i.converged for i in fast.last_info)
    xr = x.detach().double().requires_grad_(True)
    out_r, _ = ref(xr)
    g_r = torch.autograd.grad((out_r * w.double()).sum(), [xr, *ref.parameters()])
    assert (out.double() - out_r).abs().max() < 1e-4
    for a, b in zip(g, g_r):
        scale = b.abs().max().clamp_min(1.0)
        assert ((a.double() - b).abs().max() / scale) < 1e-3


def test_nn_gru_matches_cudnn():
    """Against cuDNN in float64 (cuDNN's float32 RNN may use TF32 on Hopper: not a reference)."""
    torch.manual_seed(0)
    ref = torch.nn.GRU(8, 64, num_layers=2).to(DEV)
    mine = snn.GRU(8, 64, num_layers=2).to(DEV)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(20000, 2, 8, device=DEV)
    with torch.no_grad():
        o1, h1 = ref.double()(x.double())
        o2, h2 = mine(x)
    assert (o1 - o2.double()).abs().max() < 1e-4 and (h1 - h2.double()).abs().max() < 1e-4


def test_bfloat16_on_triton():
    torch.manual_seed(0)
    cell = seqpar.DiagGRU(8, 128).to(DEV)
    x = torch.randn(100_000, 2, 8, device=DEV).to(torch.bfloat16)
    out, info = seqpar.solve(cell, x, return_info=True)
    assert out.dtype == torch.bfloat16 and info.converged
    ref = seqpar.solve(cell.double(), x.double(), method="sequential")
    assert (out.double() - ref).abs().max() < 2 * torch.finfo(torch.bfloat16).eps * 4


def test_chaotic_fallback_on_gpu():
    cell = seqpar.FunctionCell(lambda h, u: 3.9 * h * (1 - h) + u, 1, structure="diag")
    u = torch.zeros(3000, 1, 1, device=DEV, dtype=torch.float64)
    h0 = torch.full((1, 1), 0.3, device=DEV, dtype=torch.float64)
    out, info = seqpar.solve(cell, u, h0, return_info=True)
    assert info.converged and not info.newton_converged and info.fallback
    ref = seqpar.solve(cell, u, h0, method="sequential")
    assert (out[:30] - ref[:30]).abs().max() < 1e-9


@pytest.mark.parametrize("D,B", [(9, 3), (16, 16), (40, 2)])
def test_gru_quasi_dot_matches_gemm_and_float64(D, B):
    """Quasi-Newton dense GRU with W_hh h_prev by tl.dot (3xTF32) inside the kernel: one iteration equals
    the GEMM variant, and a whole solve (D=9, 16: the default dispatch) converges to the float64
    sequential states with a float64 residual within the tolerance it reported."""
    import copy

    from seqpar.kernels import fused_diag_gru as k

    torch.manual_seed(D)
    m = torch.nn.GRU(D, D).to(DEV)
    cell = seqpar.cells.GRU.from_torch(m)
    T = 100_003
    x = torch.randn(T, B, D, device=DEV)
    with torch.no_grad():
        xp = cell.project_inputs(x)
        h, bnd, start = torch.tanh(torch.randn(T, B, D, device=DEV)), torch.randn(B, D, device=DEV), \
            torch.randn(B, D, device=DEV)
        ref = k.fused_gru_quasi_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, recurrent="gemm", start=start,
                                     want_summary=True)
        got = k.fused_gru_quasi_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, recurrent="dot", start=start,
                                     want_summary=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
        zero = torch.zeros_like(h)  # the first pass without an initial guess: no GEMM
        got = k.fused_gru_quasi_step(zero, xp, cell.weight_hh, cell.bias_hh, bnd, start=start, want_summary=True,
                                     zero_iterate=True)
        ref = k.fused_gru_quasi_step(zero, xp, cell.weight_hh, cell.bias_hh, bnd, recurrent="gemm", start=start,
                                     want_summary=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
        out, info = seqpar.solve(cell, x, jacobian="diag", return_info=True, fallback="none")
        assert info.converged
        c64 = seqpar.cells.GRU.from_torch(copy.deepcopy(m).double())
        seq = seqpar.solve(c64, x.double(), method="sequential")
        assert float((out.double() - seq).abs().max()) < 1e-4
        hp = torch.cat([torch.zeros(1, B, D, dtype=torch.float64, device=DEV), out.double()[:-1]], 0)
        f = c64.step(hp, c64.project_inputs(x.double()))
        assert float(((out.double() - f).abs() / f.abs().clamp_min(1)).max()) <= info.tol * 1.05
