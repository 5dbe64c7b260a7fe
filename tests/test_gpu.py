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
