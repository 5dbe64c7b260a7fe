"""Built-in cells: steps equal torch.nn's, analytic Jacobians equal autodiff."""
import pytest
import torch
from torch import nn

import seqpar
from seqpar.cells import generic_jacobian
from seqpar.structure import Structure

ALL_CELLS = [seqpar.Elman, seqpar.GRU, seqpar.LSTM, seqpar.DiagGRU, seqpar.DiagLSTM]
WANTS = [Structure("dense"), Structure("diag"), Structure("block", 2)]


def make(cls, I=3, H=4, **kw):
    return cls(I, H, **kw).double()


@pytest.mark.parametrize("cls", ALL_CELLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("want", WANTS, ids=lambda s: s.describe())
def test_analytic_jacobian_matches_autodiff(cls, want):
    cell = make(cls)
    B, D = 5, cell.state_size
    h = torch.randn(7, B, D, dtype=torch.float64)
    xp = cell.project_inputs(torch.randn(7, B, 3, dtype=torch.float64))
    with torch.no_grad():
        ref = generic_jacobian(cell.step, h, xp, Structure("dense"), want)
        got = cell.jacobian(h, xp, want)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize("cls", ALL_CELLS, ids=lambda c: c.__name__)
def test_declared_structure_is_exact(cls):
    """The exact Jacobian has no entries outside the declared structure."""
    cell = make(cls)
    D = cell.state_size
    h = torch.randn(4, D, dtype=torch.float64)
    xp = cell.project_inputs(torch.randn(4, 3, dtype=torch.float64))
    with torch.no_grad():
        dense = generic_jacobian(cell.step, h, xp, Structure("dense"), Structure("dense")).squeeze(-3)
        st = cell.structure
        kept = st.to_dense(st.from_dense(dense), D)
    assert torch.allclose(kept, dense, atol=1e-14)


@pytest.mark.parametrize("exact", [Structure("diag"), Structure("block", 2), Structure("dense")],
                         ids=lambda s: s.describe())
def test_generic_jacobian_probing(exact):
    """Probing only the declared columns reconstructs the Jacobian of a matching function."""
    D = 6
    W = torch.randn(D, D, dtype=torch.float64)
    Wm = exact.to_dense(exact.from_dense(W), D)
    fn = lambda h, u: torch.tanh(h @ Wm.T + u)  # noqa: E731
    h = torch.randn(3, D, dtype=torch.float64)
    u = torch.randn(3, D, dtype=torch.float64)
    got = exact.to_dense(generic_jacobian(fn, h, u, exact, exact), D)
    ref = (1 - fn(h, u) ** 2)[..., None] * Wm
    assert torch.allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize("tcls,scls,kw", [
    (nn.GRUCell, seqpar.GRU, {}), (nn.LSTMCell, seqpar.LSTM, {}),
    (nn.RNNCell, seqpar.Elman, {}), (nn.RNNCell, seqpar.Elman, {"nonlinearity": "relu"}),
])
@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_cell_steps_match(tcls, scls, kw, bias):
    m = tcls(3, 5, bias=bias, **kw).double()
    cell = scls.from_torch(m)
    x = torch.randn(4, 3, dtype=torch.float64)
    h = torch.randn(4, 5, dtype=torch.float64)
    if tcls is nn.LSTMCell:
        c = torch.randn(4, 5, dtype=torch.float64)
        h2, c2 = m(x, (h, c))
        out = cell(torch.cat([h, c], -1), x)
        assert torch.allclose(out, torch.cat([h2, c2], -1), atol=1e-14)
    else:
        assert torch.allclose(cell(h, x), m(x, h), atol=1e-14)


def test_from_torch_module_layer0_and_errors():
    m = nn.GRU(3, 5, num_layers=2).double()
    cell = seqpar.GRU.from_torch(m)
    assert torch.equal(cell.weight_hh, m.weight_hh_l0)
    with pytest.raises(ValueError, match="bidirectional"):
        seqpar.GRU.from_torch(nn.GRU(3, 5, bidirectional=True))
    with pytest.raises(ValueError, match="weight_hh"):
        seqpar.GRU.from_torch(nn.LSTM(3, 5))
    with pytest.raises(TypeError, match="from_torch"):
        seqpar.LSTM.from_torch(nn.Linear(3, 5))


def test_from_torch_picks_a_layer():
    m = nn.LSTM(3, 5, num_layers=3).double()
    for layer in range(3):
        cell = seqpar.LSTM.from_torch(m, layer=layer)
        assert torch.equal(cell.weight_hh, getattr(m, f"weight_hh_l{layer}"))
        assert torch.equal(cell.bias_ih, getattr(m, f"bias_ih_l{layer}"))
        assert cell.input_size == (3 if layer == 0 else 5)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=f"layer={bad} is out of range .*num_layers=3"):
            seqpar.LSTM.from_torch(m, layer=bad)
    with pytest.raises(ValueError, match="one layer"):
        seqpar.GRU.from_torch(nn.GRUCell(3, 5), layer=1)
    with pytest.raises(TypeError, match="layer must be an int"):
        seqpar.GRU.from_torch(nn.GRU(3, 5), layer="1")


def test_reprs_show_solver_settings():
    import seqpar.nn as snn

    assert "jacobian='diag'" in repr(snn.GRU(3, 4, jacobian="diag"))
    assert "tol=1e-05" in repr(snn.GRU(3, 4, tol=1e-5))
    for cls in (snn.RNN, snn.GRU, snn.LSTM, snn.DiagGRU, snn.DiagLSTM):
        assert "jacobian='auto'" in repr(cls(3, 4)), cls
        for word in ("jacobian", "tol", "sequence_group", "last_info"):
            assert word in cls.__doc__, (cls, word)
    r = repr(seqpar.ODECell(lambda y, u: -y, 2, dt=0.01, method="rk4"))
    assert "dt=0.01" in r and "method='rk4'" in r


def test_cell_constructor_errors():
    with pytest.raises(ValueError, match="nonlinearity"):
        seqpar.Elman(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="hidden_size"):
        seqpar.GRU(3, 0)
    with pytest.raises(ValueError, match="method"):
        seqpar.ODECell(lambda y, u: -y, 2, dt=0.1, method="midpoint")
    with pytest.raises(ValueError, match="dt"):
        seqpar.ODECell(lambda y, u: -y, 2, dt=-1.0)
    with pytest.raises(TypeError, match="fn"):
        seqpar.FunctionCell(3, 2)
    with pytest.raises(ValueError, match="block size"):
        seqpar.FunctionCell(lambda h, u: h, 5, structure="block:2")
