"""The adjoint backward pass against autograd through the sequential loop, and gradcheck."""
import pytest
import torch

import seqpar

CELLS = [seqpar.Elman, seqpar.GRU, seqpar.LSTM, seqpar.DiagGRU, seqpar.DiagLSTM]


def grads(fn, cell, x, h0, w):
    out = fn()
    return torch.autograd.grad((out * w).sum(), [x, h0, *cell.parameters()])


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", ["auto", "diag", "dense"])
@pytest.mark.parametrize("T,B", [(1, 1), (9, 3), (257, 2)])
def test_gradients_match_sequential_autograd(cls, mode, T, B):
    cell = cls(3, 4).double()
    x = torch.randn(T, B, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, cell.state_size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(T, B, cell.state_size, dtype=torch.float64)
    ref = grads(lambda: seqpar.solve(cell, x, h0, method="sequential"), cell, x, h0, w)
    got = grads(lambda: seqpar.solve(cell, x, h0, jacobian=mode, chunk_size=50), cell, x, h0, w)
    for name, a, b in zip(["inputs", "h0"] + [n for n, _ in cell.named_parameters()], ref, got):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-9), name


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_gradcheck(cls):
    cell = cls(2, 2).double()
    x = torch.randn(6, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, cell.state_size, dtype=torch.float64, requires_grad=True)
    params = list(cell.parameters())
    assert torch.autograd.gradcheck(lambda x, h0, *p: seqpar.solve(cell, x, h0), (x, h0, *params))


@pytest.mark.parametrize("structure", ["diag", "block:2", "dense"])
def test_gradcheck_function_cell_structures(structure):
    D = 4
    lin = torch.nn.Linear(D, D).double()
    st = seqpar.structure.parse_structure(structure)
    mask = st.to_dense(st.from_dense(torch.ones(D, D, dtype=torch.float64)), D)

    def fn(h, u):
        return torch.tanh(h @ (lin.weight * mask).T + u) + lin.bias

    mod = torch.nn.Module()
    mod.lin = lin
    cell = seqpar.FunctionCell(fn, D, structure=structure)
    cell.params_holder = mod  # registers lin's parameters with the cell
    x = torch.randn(7, 2, D, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h0, *p: seqpar.solve(cell, x, h0), (x, h0, *lin.parameters()))


def test_neural_ode_parameter_gradient():
    g = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    cell = seqpar.ODECell(lambda y, u: g(torch.cat([y, u], -1)), 2, dt=0.05, method="rk4")
    cell.g_module = g
    u = torch.randn(200, 2, 1, dtype=torch.float64)
    h0 = torch.randn(2, 2, dtype=torch.float64)
    ref = torch.autograd.grad(seqpar.solve(cell, u, h0, method="sequential").square().sum(), list(g.parameters()))
    got = torch.autograd.grad(seqpar.solve(cell, u, h0).square().sum(), list(g.parameters()))
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-9)


def test_no_grad_needed_returns_plain_tensor():
    cell = seqpar.GRU(3, 4).double().requires_grad_(False)
    out = seqpar.solve(cell, torch.randn(5, 1, 3, dtype=torch.float64))
    assert not out.requires_grad


def test_float32_gradients_long_sequence():
    T = 3000
    cell = seqpar.DiagGRU(3, 8)
    x = torch.randn(T, 2, 3, requires_grad=True)
    w = torch.randn(T, 2, 8)
    ref = torch.autograd.grad((seqpar.solve(cell, x, method="sequential") * w).sum(), [x, *cell.parameters()])
    got = torch.autograd.grad((seqpar.solve(cell, x) * w).sum(), [x, *cell.parameters()])
    for a, b in zip(ref, got):
        scale = a.abs().max().clamp_min(1.0)
        assert ((a - b).abs().max() / scale) < 1e-4


def test_quasi_newton_backward_reports_defect_correction_and_survives_small_max_iter():
    """Forward capped at 2 quasi-Newton iterations (finished by the exact fallback): the
    backward still converges (its own iteration cap) and matches autograd."""
    cell = seqpar.GRU(3, 6).double()
    x = torch.randn(300, 2, 3, dtype=torch.float64, requires_grad=True)
    h, info = seqpar.solve(cell, x, jacobian="diag", max_iter=2, return_info=True)
    g = torch.autograd.grad(h.square().sum(), x)[0]
    ref = torch.autograd.grad(seqpar.solve(cell, x, method="sequential").square().sum(), x)[0]
    assert info.converged and info.backward_iterations > 2
    assert torch.allclose(g, ref, atol=1e-10)
