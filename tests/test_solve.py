"""seqpar.solve against step-by-step evaluation: every cell, every Jacobian mode, dtypes, shapes."""
import math

import pytest
import torch
from torch import nn

import seqpar
from conftest import dtype_tol, rel_err

CELLS = [seqpar.Elman, seqpar.GRU, seqpar.LSTM, seqpar.DiagGRU, seqpar.DiagLSTM]
MODES = ["auto", "dense", "diag", "block", "block:4"]


def problem(cls, T, B, I=3, H=4, dtype=torch.float64):
    cell = cls(I, H).to(dtype)
    x = torch.randn(T, B, I, dtype=dtype)
    h0 = torch.randn(B, cell.state_size, dtype=dtype) * 0.5
    return cell, x, h0


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,B", [(1, 1), (7, 3), (301, 2)])
def test_every_mode_matches_sequential(cls, mode, T, B):
    cell, x, h0 = problem(cls, T, B)
    ref = seqpar.solve(cell, x, h0, method="sequential")
    out, info = seqpar.solve(cell, x, h0, jacobian=mode, return_info=True, chunk_size=64)
    assert info.converged and info.newton_converged and info.fallback is None
    assert rel_err(out, ref) < 1e-10
    assert info.iterations <= T  # Newton never needs more than T steps


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_float32_dtype_scaled_tolerance(cls):
    T = 5000
    cell, x, h0 = problem(cls, T, 2, H=8, dtype=torch.float32)
    ref = seqpar.solve(cell.double(), x.double(), h0.double(), method="sequential")
    cell.float()
    out, info = seqpar.solve(cell, x, h0, return_info=True)
    assert out.dtype == torch.float32 and info.converged
    assert rel_err(out, ref) < dtype_tol(torch.float32, T)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_storage_float32_accumulation(param_dtype):
    T = 2000
    cell = seqpar.GRU(3, 8).to(param_dtype)
    x = torch.randn(T, 2, 3).to(torch.bfloat16)
    out, info = seqpar.solve(cell, x, return_info=True)
    assert out.dtype == torch.bfloat16 and info.converged
    # reference: the same (bf16-rounded) inputs and weights, evaluated in float64
    ref = seqpar.solve(cell.double(), x.double(), method="sequential")
    assert rel_err(out, ref) < 2 * torch.finfo(torch.bfloat16).eps


def test_non_contiguous_inputs_and_h0():
    cell, x, h0 = problem(seqpar.GRU, 50, 3)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not xt.is_contiguous()
    h0t = h0.t().contiguous().t()
    ref = seqpar.solve(cell, x, h0, method="sequential")
    assert rel_err(seqpar.solve(cell, xt, h0t), ref) < 1e-10


def test_initial_guess_warm_start_converges_immediately():
    cell, x, h0 = problem(seqpar.GRU, 400, 2)
    ref, info0 = seqpar.solve(cell, x, h0, return_info=True)
    out, info = seqpar.solve(cell, x, h0, initial_guess=ref, return_info=True)
    assert info.iterations == 0 and info.converged
    assert rel_err(out, ref) < 1e-12
    noisy = ref + 1e-3 * torch.randn_like(ref)
    out2, info2 = seqpar.solve(cell, x, h0, initial_guess=noisy, return_info=True)
    assert info2.iterations < info0.iterations and rel_err(out2, ref) < 1e-10


def test_residual_history_and_callback():
    cell, x, h0 = problem(seqpar.DiagGRU, 200, 1)
    seen = []
    out, info = seqpar.solve(cell, x, h0, return_info=True, callback=lambda it, r: seen.append((it, r)))
    assert [r for _, r in seen] == info.residuals
    assert len(info.residuals) == info.iterations + 1
    assert info.residual <= info.tol
    assert "converged=True" in info.summary()


@pytest.mark.parametrize("structure", ["diag", "dense", "block:2"])
def test_function_cell(structure):
    D = 4
    if structure == "diag":
        a = torch.rand(D, dtype=torch.float64)
        fn = lambda h, u: torch.tanh(a * h + u)  # noqa: E731
    else:
        st = seqpar.structure.parse_structure(structure)
        W = st.to_dense(st.from_dense(torch.randn(D, D, dtype=torch.float64) / 2), D)
        fn = lambda h, u: torch.tanh(h @ W.T + u)  # noqa: E731
    cell = seqpar.FunctionCell(fn, D, structure=structure)
    x = torch.randn(120, 2, D, dtype=torch.float64)
    ref = seqpar.solve(cell, x, method="sequential")
    for mode in ("auto", "dense", "diag"):
        out, info = seqpar.solve(cell, x, jacobian=mode, return_info=True)
        assert info.newton_converged and rel_err(out, ref) < 1e-10


class VanDerPol(nn.Module):
    def __init__(self):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, y, u):
        x, v = y[..., :1], y[..., 1:]
        return torch.cat([v, self.mu * (1 - x * x) * v - x + u], -1)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_ode_cell_neural_ode(method):
    g = VanDerPol()
    cell = seqpar.ODECell(g, 2, dt=0.01, method=method)
    T = 3000
    u = 0.1 * torch.randn(T, 1, 1, dtype=torch.float64)
    h0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    ref = seqpar.solve(cell, u, h0, method="sequential")
    out, info = seqpar.solve(cell, u, h0, return_info=True)
    assert info.converged and rel_err(out, ref) < 1e-9
    # the solution is a van der Pol oscillation, not a trivial decay
    assert ref[:, 0, 0].max() > 1.5 and ref[:, 0, 0].min() < -1.5


def test_rk4_is_fourth_order_on_linear_ode():
    lam = -0.7
    cell = seqpar.ODECell(lambda y, u: lam * y, 1, dt=0.1, method="rk4")
    u = torch.zeros(50, 1, 1, dtype=torch.float64)
    out = seqpar.solve(cell, u, torch.ones(1, 1, dtype=torch.float64))
    exact = math.exp(lam * 0.1 * 50)
    assert abs(out[-1, 0, 0].item() - exact) < 1e-6


def test_dense_chunking_bounds_jacobian_memory():
    """The dense path asks the cell for Jacobians one chunk at a time."""
    cell, x, h0 = problem(seqpar.GRU, 500, 2)
    sizes = []
    orig = cell.jacobian

    def spy(h_prev, xp, st):
        sizes.append(h_prev.shape[0])
        return orig(h_prev, xp, st)

    cell.jacobian = spy
    ref = seqpar.solve(cell, x, h0, method="sequential")
    out = seqpar.solve(cell, x, h0, jacobian="dense", chunk_size=37)
    assert max(sizes) <= 37
    assert rel_err(out, ref) < 1e-10
