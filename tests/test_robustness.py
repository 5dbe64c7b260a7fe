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


@pytest.mark.parametrize("where", ["inputs", "h0", "initial_guess"])
@pytest.mark.parametrize("backend,pipelined", [("torch", False), ("triton", False), ("triton", True)])
def test_deferred_finiteness_check_raises_before_any_residual_is_used(where, backend, pipelined, monkeypatch):
    """One rank, Newton, a built-in cell: the NaN / Inf check of the tensors waits for the first residual
    (no sync of its own), yet the solve still raises the error naming the argument, before the callback sees
    a residual and before any fallback runs; on both Newton loops and for batch-first inputs."""
    import seqpar.newton as newton

    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0 if pipelined else 2**62)
    torch.manual_seed(0)
    cell = seqpar.DiagGRU(3, 4)
    x, h0, guess = torch.randn(2, 50, 3), torch.zeros(2, 4), torch.zeros(2, 50, 4)
    {"inputs": x, "h0": h0, "initial_guess": guess}[where].view(-1)[7] = math.nan
    seen = []
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        seqpar.solve(cell, x, h0, initial_guess=guess, batch_first=True, backend=backend, fallback="sequential",
                     callback=lambda it, r: seen.append(r))
    assert seen == []


def test_finiteness_is_checked_before_the_solve_for_user_cells():
    """A user function cell keeps the check before the solve (its first steps are probed with the inputs)."""
    cell = seqpar.FunctionCell(lambda h, u: torch.tanh(h + u), 2, structure="diag")
    x = torch.randn(20, 1, 2)
    x[5, 0, 1] = math.inf
    with pytest.raises(ValueError, match="inputs contains NaN or Inf"):
        seqpar.solve(cell, x, callback=lambda it, r: pytest.fail("no iteration may run"))


@pytest.mark.parametrize("defer", [False, True])
def test_finiteness_check_is_exact_where_a_sum_of_finite_values_overflows(defer):
    """The check reduces each tensor to its sum (one launch) and only then looks closer: finite values whose
    sum overflows (to Inf, or to NaN through Inf - Inf) pass; a NaN or Inf is still named, with several
    tensors of different dtypes checked together."""
    from seqpar.validation import check_all_finite

    def check(*named):
        pending = check_all_finite(*named, defer=defer)
        if defer and pending is not None:
            pending()

    big = torch.full((5, 3, 2), 3e38)                           # sum: Inf
    mixed = torch.tensor([3e38, 3e38, -3e38, -3e38] * 4)       # partial sums Inf and -Inf
    big16 = torch.full((8,), 3e38, dtype=torch.bfloat16)
    check(("inputs", big), ("h0", mixed), ("initial_guess", big16))
    check(("inputs", big))
    for bad in (math.nan, math.inf, -math.inf):
        h = torch.zeros(4, dtype=torch.float64)
        h[2] = bad
        with pytest.raises(ValueError, match="^h0 contains NaN or Inf"):
            check(("inputs", big), ("h0", h), ("initial_guess", big16))
    assert check_all_finite(("inputs", None), ("h0", torch.zeros(0)), defer=defer) is None


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


# ------------------------------------------------- issue #9: parameters of user functions
def _captured_problem():
    g = torch.Generator().manual_seed(0)
    W = (0.5 * torch.randn(4, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    x = torch.randn(30, 2, 4, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 4, generator=g, dtype=torch.float64)
    return W, x, h0


def test_captured_tensor_requiring_grad_is_refused_by_name():
    W, x, h0 = _captured_problem()
    cell = seqpar.FunctionCell(lambda h, u: torch.tanh(h @ W.T + u), 4)
    with pytest.raises(ValueError, match=r"'W'.*params=\[\.\.\.\]"):
        seqpar.solve(cell, x, h0)
    with torch.no_grad():  # no gradient wanted: nothing is lost
        seqpar.solve(cell, x, h0)

    def fn_default(h, u, scale=W):
        return torch.tanh(h @ scale.T + u)
    with pytest.raises(ValueError, match="'scale'"):
        seqpar.solve(seqpar.FunctionCell(fn_default, 4), x, h0)
    with pytest.raises(ValueError, match=r"'lin\.weight'"):
        lin = torch.nn.Linear(4, 4).double()
        seqpar.solve(seqpar.ODECell(lambda y, u: lin(y) + u, 4, dt=0.1), x, h0)


_GLOBAL_W = (0.3 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_(True)


def _uses_global(h, u):
    return torch.tanh(h @ _GLOBAL_W.T + u)


def test_captured_global_and_bound_method_self():
    _, x, h0 = _captured_problem()
    with pytest.raises(ValueError, match="_GLOBAL_W"):
        seqpar.solve(seqpar.FunctionCell(_uses_global, 4), x, h0)

    class Holder:
        def __init__(self):
            self.A = (0.3 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_(True)

        def f(self, h, u):
            return torch.tanh(h @ self.A.T + u)
    with pytest.raises(ValueError, match=r"self\.A"):
        seqpar.solve(seqpar.FunctionCell(Holder().f, 4), x, h0)


@pytest.mark.parametrize("kind", ["function", "ode"])
def test_params_argument_gradient_equals_sequential(kind):
    W, x, h0 = _captured_problem()
    if kind == "function":
        cell = seqpar.FunctionCell(lambda h, u: torch.tanh(h @ W.T + u), 4, params=[W])
    else:
        cell = seqpar.ODECell(lambda y, u: torch.tanh(y @ W.T + u) - y, 4, dt=0.1, method="rk4", params=[W])
    assert any(p is W for p in cell.parameters())
    wts = torch.randn(30, 2, 4, dtype=torch.float64)
    ref = torch.autograd.grad((seqpar.solve(cell, x, h0, method="sequential") * wts).sum(), W)[0]
    out = seqpar.solve(cell, x, h0)
    (out * wts).sum().backward()
    assert W.grad is not None and rel_err(W.grad, ref) < 1e-10


def test_module_and_bound_method_parameters_get_gradients():
    _, x, h0 = _captured_problem()
    lin = torch.nn.Linear(4, 4).double()
    for fn in (lin, lin.forward):
        cell = seqpar.FunctionCell(lambda h, u, f=fn: torch.tanh(f(h) + u), 4) if fn is lin.forward else \
            seqpar.ODECell(fn if False else (lambda y, u: lin(y) - y + u), 4, dt=0.1, params=lin.parameters())
        lin.zero_grad()
        ref = torch.autograd.grad(seqpar.solve(cell, x, h0, method="sequential").sum(), list(lin.parameters()))
        seqpar.solve(cell, x, h0).sum().backward()
        for p, r in zip(lin.parameters(), ref):
            assert p.grad is not None and rel_err(p.grad, r) < 1e-10
    # an nn.Module fn is a submodule: its parameters are the cell's
    net = torch.nn.Linear(8, 4).double()
    cell = seqpar.FunctionCell(lambda h, u: torch.tanh(net(torch.cat([h, u], -1))), 4)
    mcell = seqpar.ODECell(_CatNet(net), 4, dt=0.1)
    assert {id(p) for p in mcell.parameters()} == {id(p) for p in net.parameters()}
    seqpar.solve(mcell, x, h0).sum().backward()
    assert net.weight.grad is not None
    with pytest.raises(ValueError, match=r"'net\.weight'"):
        seqpar.solve(cell, x, h0)


class _CatNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, y, u):
        return torch.tanh(self.net(torch.cat([y, u], -1))) - y


# ------------------------------------------------------ wrongly declared structure=
def test_wrong_declared_structure_is_refused_with_a_suggestion():
    W, x, h0 = _captured_problem()
    Wd = W.detach()
    dense = lambda h, u: torch.tanh(h @ Wd.T + u)  # noqa: E731
    with pytest.raises(ValueError, match="structure='diag'.*Declare structure='dense'"):
        seqpar.solve(seqpar.FunctionCell(dense, 4, structure="diag"), x, h0)
    blocky = seqpar.structure.Structure("block", 2)
    Wb = blocky.to_dense(blocky.from_dense(Wd), 4)
    fb = lambda h, u: torch.tanh(h @ Wb.T + u)  # noqa: E731
    with pytest.raises(ValueError, match="Declare structure='block:2'"):
        seqpar.solve(seqpar.FunctionCell(fb, 4, structure="diag"), x, h0)
    Wf = Wd.float()
    with pytest.raises(ValueError, match="structure='diag'"):
        seqpar.solve(seqpar.ODECell(lambda y, u: torch.tanh(y @ Wf.T + u) - y, 4, dt=0.1, structure="diag"),
                     x.float(), h0.float())
    # correct declarations pass (float32 and float64)
    seqpar.solve(seqpar.FunctionCell(fb, 4, structure="block:2"), x, h0)
    a = torch.rand(4, dtype=torch.float32)
    seqpar.solve(seqpar.FunctionCell(lambda h, u: torch.tanh(a * h + u), 4, structure="diag"), x.float(), h0.float())


# ------------------------------------------------------------------- float16
def test_float16_is_refused():
    cell, x, h = good()
    with pytest.raises(ValueError, match="inputs is torch.float16.*float64, float32 or bfloat16"):
        seqpar.solve(cell.half(), x.half(), h.half())
    with pytest.raises(ValueError, match="h0 is torch.float16"):
        seqpar.solve(cell.bfloat16(), x.bfloat16(), h.half())


# ------------------------------------------------------------ validation gaps
@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(tol=math.inf), ValueError, "tol must be"),
    (dict(tol=math.nan), ValueError, "tol must be"),
    (dict(tol="1e-6"), TypeError, "tol must be"),
    (dict(tol=1e6), ValueError, "tol must be"),
    (dict(tol=True), TypeError, "tol must be"),
    (dict(callback=3), TypeError, "callback must be callable"),
    (dict(max_iter=True), ValueError, "max_iter must be"),
    (dict(chunk_size=True), ValueError, "chunk_size must be"),
])
def test_option_validation_gaps(kw, exc, pattern):
    cell, x, h = good()
    with pytest.raises(exc, match=pattern):
        seqpar.solve(cell, x, h, **kw)


@pytest.mark.parametrize("hidden,exc", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError),
                                        ("4", TypeError)])
def test_ode_and_function_cell_hidden_size(hidden, exc):
    with pytest.raises(exc, match="hidden_size"):
        seqpar.ODECell(lambda y, u: -y, hidden, dt=0.1)
    with pytest.raises(exc, match="hidden_size"):
        seqpar.FunctionCell(lambda y, u: -y, hidden)


@pytest.mark.parametrize("dt", [math.nan, math.inf, 0.0, -0.1, "0.1", True, 1j])
def test_ode_cell_dt(dt):
    with pytest.raises((ValueError, TypeError), match="dt must be a finite positive real number"):
        seqpar.ODECell(lambda y, u: -y, 2, dt=dt)


@pytest.mark.parametrize("method", ["newton", "sequential"])
def test_function_output_of_wrong_size_or_dtype(method):
    x = torch.randn(10, 2, 4, dtype=torch.float64)
    cell = seqpar.FunctionCell(lambda h, u: torch.tanh(h + u).sum(-1, keepdim=True), 4)
    with pytest.raises(ValueError, match=r"returned shape \(2, 1\).*D=4"):
        seqpar.solve(cell, x, method=method)
    cell = seqpar.FunctionCell(lambda h, u: torch.tanh(h + u).float(), 4)
    with pytest.raises(TypeError, match="returned torch.float32 for a state in torch.float64"):
        seqpar.solve(cell, x, method=method)


def test_cell_finiteness_is_rechecked_after_an_in_place_change():
    """The check is remembered per tensor version: an unchanged cell is not re-synced, but any in-place
    change (optimizer step, assignment under no_grad, copy_) is seen on the next solve."""
    cell, x, h = good()
    seqpar.solve(cell, x, h)
    seqpar.solve(cell, x, h)  # cached: same tensors, same versions
    with torch.no_grad():
        cell.weight_hh.mul_(1.0)
        cell.weight_hh[0, 0] = math.nan
    with pytest.raises(ValueError, match="cell parameter 'weight_hh' contains NaN or Inf"):
        seqpar.solve(cell, x, h)
    with torch.no_grad():
        cell.weight_hh[0, 0] = 0.1
    seqpar.solve(cell, x, h)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_inf_in_cell_parameters(bad):
    cell, x, h = good()
    with torch.no_grad():
        cell.weight_hh[1, 2] = bad
    with pytest.raises(ValueError, match="cell parameter 'weight_hh' contains NaN or Inf"):
        seqpar.solve(cell, x, h)
    cell, x, h = good()
    cell.register_buffer("scale", torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="cell buffer 'scale' contains NaN or Inf"):
        seqpar.solve(cell, x, h)


def test_cell_tensors_lists_what_named_parameters_lists():
    """validation.cell_tensors (the one walk of a solve) lists the tensors torch's walks list: its shortcut
    for cells without submodules must agree with named_parameters / named_buffers, overrides included."""
    from seqpar.validation import cell_tensors

    W = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    shared = seqpar.cells.GRU(2, 3)
    shared.register_parameter("alias", shared.weight_hh)  # the same tensor under two names: listed once
    shared.register_buffer("scale", torch.ones(3))
    shared.register_buffer("count", torch.zeros(1, dtype=torch.long))  # not floating: not listed
    shared.register_parameter("gone", None)
    cells = [seqpar.cells.GRU(2, 3), seqpar.cells.DiagGRU(3, 3), shared,
             seqpar.FunctionCell(lambda h, u: torch.tanh(h @ W.T + u), 4, params=[W]),
             seqpar.ODECell(_CatNet(torch.nn.Linear(8, 4).double()), 4, dt=0.1)]
    for cell in cells:
        params, buffers = cell_tensors(cell)
        assert [(n, id(p)) for n, p in params] == [(n, id(p)) for n, p in cell.named_parameters()]
        assert [(n, id(b)) for n, b in buffers] == [(n, id(b)) for n, b in cell.named_buffers()
                                                   if b.is_floating_point()]
    assert any(p is W for _, p in cell_tensors(cells[3])[0])
    assert [n for n, _ in cell_tensors(shared)[1]] == ["scale"]
