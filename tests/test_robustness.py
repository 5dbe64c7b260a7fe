"""Non-convergence never yields wrong states marked converged; bad input gets clear errors."""
import math

import pytest
import torch

import seqpar
from seqpar.newton import step_residuals, shift
from conftest import rel_err


def logistic_cell(r=3.9):
    return seqpar.FunctionCell(lambda h, u: r * h * (1 - h) + u, 1, structure="diag")


def recurrence_residual(cell, states, h0, u):
    with torch.no_grad():
        return step_residuals(states, cell.step(shift(states, h0), u)).max().item()


def test_chaotic_logistic_map_plain_newton_fails_fallback_is_exact():
    cell = logistic_cell()
    T = 1500
    u = torch.zeros(T, 1, 1, dtype=torch.float64)
    h0 = torch.full((1, 1), 0.3, dtype=torch.float64)
    plain, info_plain = seqpar.solve(cell, u, h0, fallback="none", return_info=True)
    assert not info_plain.converged and not info_plain.newton_converged
    assert info_plain.first_unconverged is not None and info_plain.first_unconverged < T

    out, info = seqpar.solve(cell, u, h0, return_info=True)
    assert info.converged and not info.newton_converged
    assert info.fallback == "windowed-newton" and info.fallback_steps > 0
    # every step satisfies the recurrence (chaos amplifies rounding, so this, not a
    # trajectory comparison, is the meaningful check over the whole horizon) ...
    assert recurrence_residual(cell, out, h0, u) <= 1e-12
    # ... and it equals step-by-step evaluation while rounding has not yet been amplified
    ref = seqpar.solve(cell, u, h0, method="sequential")
    assert (out[:30] - ref[:30]).abs().max() < 1e-9
    assert torch.all((out >= 0) & (out <= 1))


def test_fallback_raise_reports_the_failure():
    cell = logistic_cell()
    u = torch.zeros(500, 1, 1, dtype=torch.float64)
    with pytest.raises(seqpar.NotConvergedError, match="did not converge") as exc:
        seqpar.solve(cell, u, torch.full((1, 1), 0.3, dtype=torch.float64), fallback="raise")
    assert exc.value.info is not None and not exc.value.info.converged


def test_max_iter_reached_is_not_reported_converged():
    cell = seqpar.GRU(3, 6).double()
    x = torch.randn(300, 2, 3, dtype=torch.float64)
    out, info = seqpar.solve(cell, x, max_iter=1, fallback="none", return_info=True)
    assert not info.converged and info.iterations == 1
    out2, info2 = seqpar.solve(cell, x, max_iter=1, return_info=True)
    ref = seqpar.solve(cell, x, method="sequential")
    assert info2.converged and info2.fallback and rel_err(out2, ref) < 1e-10
    # after one Newton step the converged prefix is at least one step long
    assert info2.first_unconverged >= 1


def test_expanding_elman_overflows_honestly():
    """A strongly expanding cell overflows even step by step: never 'converged' with inf/NaN."""
    cell = seqpar.Elman(2, 4, nonlinearity="relu").double()
    with torch.no_grad():
        cell.weight_hh.copy_(torch.eye(4) * 50)
    x = torch.rand(400, 1, 2, dtype=torch.float64)
    out, info = seqpar.solve(cell, x, return_info=True)
    assert not info.converged
    assert not bool(torch.isfinite(out).all())


def test_unstable_elman_fallback_matches_sequential():
    """A moderately expanding tanh Elman: plain Newton struggles, the result is still exact."""
    torch.manual_seed(3)
    cell = seqpar.Elman(2, 8).double()
    with torch.no_grad():
        cell.weight_hh.copy_(torch.randn(8, 8) * 1.5)
    x = torch.randn(800, 1, 2, dtype=torch.float64)
    h0 = torch.zeros(1, 8, dtype=torch.float64)
    out, info = seqpar.solve(cell, x, h0, return_info=True, max_iter=8)
    assert info.converged
    assert recurrence_residual(cell, out, h0, cell.project_inputs(x)) <= 1e-12


# ----------------------------------------------------------------- bad input
def good():
    cell = seqpar.GRU(3, 4)
    return cell, torch.randn(10, 2, 3), torch.zeros(2, 4)


@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda c, x, h: (c, x[0], h), ValueError, "inputs must be 3-D"),
    (lambda c, x, h: (c, x[:, :, :2], h), ValueError, "D_in=2.*input_size=3"),
    (lambda c, x, h: (c, x, h[:1]), ValueError, r"h0 must have shape \(B, D\) = \(2, 4\)"),
    (lambda c, x, h: (c, x, h[0]), ValueError, "h0 must be 2-D"),
    (lambda c, x, h: (c, x.double(), h.double()), TypeError, "cell parameter 'weight_ih' is torch.float32"),
    (lambda c, x, h: (c, x, h.double()), TypeError, "h0 is torch.float64"),
    (lambda c, x, h: (c, x[:0], h), ValueError, "T=0"),
    (lambda c, x, h: (c, x.int(), h), TypeError, "inputs must be a floating tensor"),
    (lambda c, x, h: (lambda a, b: a, x, h), TypeError, "cell must be a seqpar.cells.Cell"),
    (lambda c, x, h: (c, x.numpy(), h), TypeError, "inputs must be a torch.Tensor"),
])
def test_clear_errors(mutate, exc, pattern):
    with pytest.raises(exc, match=pattern):
        seqpar.solve(*mutate(*good()))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_inf_inputs_and_h0(bad):
    cell, x, h = good()
    x[3, 1, 0] = bad
    with pytest.raises(ValueError, match="inputs contains NaN or Inf"):
        seqpar.solve(cell, x, h)
    cell, x, h = good()
    h[1, 2] = bad
    with pytest.raises(ValueError, match="h0 contains NaN or Inf"):
        seqpar.solve(cell, x, h)


def test_option_errors():
    cell, x, h = good()
    with pytest.raises(ValueError, match="jacobian must be"):
        seqpar.solve(cell, x, h, jacobian="tridiagonal")
    with pytest.raises(ValueError, match="jacobian='block:3'.*does not divide"):
        seqpar.solve(cell, x, h, jacobian="block:3")
    with pytest.raises(ValueError, match="method must be"):
        seqpar.solve(cell, x, h, method="jacobi")
    with pytest.raises(ValueError, match="fallback must be"):
        seqpar.solve(cell, x, h, fallback="retry")
    with pytest.raises(ValueError, match="tol must be > 0"):
        seqpar.solve(cell, x, h, tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be"):
        seqpar.solve(cell, x, h, max_iter=-1)
    with pytest.raises(ValueError, match="initial_guess must have shape"):
        seqpar.solve(cell, x, h, initial_guess=torch.zeros(9, 2, 4))


@pytest.mark.gpu
def test_device_mismatch_gpu():  # runs on the GPU machine: pytest -m gpu
    cell, x, h = good()
    with pytest.raises(ValueError, match="device mismatch"):
        seqpar.solve(cell.cuda(), x, h)


def test_device_mismatch_meta():
    """Device checks name the argument (a 'meta' tensor stands in for another device)."""
    cell, x, h = good()
    with pytest.raises(ValueError, match="device mismatch: inputs on cpu, h0 on meta"):
        seqpar.solve(cell, x, torch.zeros(2, 4, device="meta"))
    with pytest.raises(ValueError, match="device mismatch: inputs on meta, cell parameter"):
        seqpar.solve(cell, torch.zeros(10, 2, 3, device="meta"))
