"""seqpar.odeint against torchdiffeq.odeint (fixed grids, backprop through its solver), float64.

Trajectories and gradients (y0, the MLP's parameters, extra adjoint_params, t)
must agree to 1e-9 (relative to max(1, |ref|)); errors for torchdiffeq
arguments without a meaning here; the sharded solve on 2 gloo ranks.
"""
import pytest
import torch
from torch import nn

import torchdiffeq  # test dependency (pip install torchdiffeq)

import seqpar
from conftest import rel_err
from dist_helpers import run_ranks
from seqpar.odeint import trajectory_shard

D, HIDDEN, STEPS = 3, 16, 200
TOL = 1e-9


class Field(nn.Module):
    """Time-dependent MLP vector field: net(y) - 0.3 sin(t) y + 0.1 t."""

    def __init__(self, d=D, hidden=HIDDEN, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d)).double()
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, t, y):
        return self.net(y) - 0.3 * torch.sin(t) * y + 0.1 * t


def _grid(n=STEPS + 1, seed=1, decreasing=False):
    """Non-uniform grid: spacings in [0.005, 0.025)."""
    g = torch.Generator().manual_seed(seed)
    t = 0.2 + torch.cumsum(0.005 + 0.02 * torch.rand(n, generator=g, dtype=torch.float64), 0)
    return t.flip(0) if decreasing else t


def _run(fn, func, y0, t, w, tensors):
    """out, and the gradients of sum(out * w) w.r.t. y0 and ``tensors``."""
    y0 = y0.clone().requires_grad_(True)
    out = fn(func, y0, t)
    wrt = [y0, *tensors]
    grads = torch.autograd.grad((out * w).sum(), wrt, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if gx is None else gx for x, gx in zip(wrt, grads)]


def _assert_close(a, b, what, tol=TOL):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"


CASES = [(m, s) for m in ("rk4", "euler") for s in ((D,), (4, D), (2, 3, D))] + [("midpoint", (4, D))]


@pytest.mark.parametrize("method,shape", CASES)
def test_matches_torchdiffeq(method, shape):
    func = Field()
    g = torch.Generator().manual_seed(2)
    y0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    t = _grid()
    w = torch.randn(len(t), *shape, generator=g, dtype=torch.float64)
    params = list(func.parameters())
    out, grads = _run(lambda f, y, tt: seqpar.odeint(f, y, tt, method=method), func, y0, t, w, params)
    ref, ref_grads = _run(lambda f, y, tt: torchdiffeq.odeint(f, y, tt, method=method), func, y0, t, w, params)
    assert out.shape == (len(t), *shape)
    assert torch.equal(out[0], y0)
    _assert_close(out, ref, "trajectory")
    _assert_close(grads[0], ref_grads[0], "dL/dy0")
    for (name, _), gs, gr in zip(func.named_parameters(), grads[1:], ref_grads[1:]):
        _assert_close(gs, gr, f"dL/d{name}")
    # the gradients are not trivially zero (the comparison means something)
    assert all(gr.abs().max() > 1e-3 for gr in ref_grads)


def test_decreasing_grid_closure_func_adjoint_params_and_t_grad():
    """A plain function closing over a leaf and a non-leaf tensor, t decreasing, gradient w.r.t. t too."""
    A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, -0.4], dtype=torch.float64, requires_grad=True)
    t = _grid(decreasing=True).requires_grad_(True)
    y0 = torch.tensor([[1.0, 0.0], [0.3, -0.7]], dtype=torch.float64)
    w = torch.randn(len(t), 2, 2, dtype=torch.float64)

    def run(which):
        b2 = 2 * b  # non-leaf: its gradient must reach b
        f = lambda tt, y: torch.tanh(y @ A.T) + b2 * torch.cos(tt)  # noqa: E731
        if which == "seqpar":
            return _run(lambda f_, y, tt: seqpar.odeint(f_, y, tt, adjoint_params=(A, b2)), f, y0, t, w, [A, b, t])
        return _run(lambda f_, y, tt: torchdiffeq.odeint(f_, y, tt, method="rk4"), f, y0, t, w, [A, b, t])

    out, grads = run("seqpar")
    ref, ref_grads = run("torchdiffeq")
    _assert_close(out, ref, "trajectory")
    for name, gs, gr in zip(["y0", "A", "b", "t"], grads, ref_grads):
        _assert_close(gs, gr, f"dL/d{name}")


def test_bound_method_of_module_gets_its_parameters():
    func = Field()
    y0 = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    t = _grid(51)
    out = seqpar.odeint(func.forward, y0, t)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in func.parameters())


def test_quasi_newton_diag_jacobian():
    func = Field()
    y0 = torch.randn(4, D, dtype=torch.float64)
    t = _grid()
    w = torch.randn(len(t), 4, D, dtype=torch.float64)
    params = list(func.parameters())
    (out, grads), info = _run_with_info(func, y0, t, w, params, jacobian="diag")
    ref, ref_grads = _run(lambda f, y, tt: torchdiffeq.odeint(f, y, tt, method="rk4"), func, y0, t, w, params)
    assert info.converged and info.jacobian == "diag"
    _assert_close(out, ref, "trajectory (diag)", tol=1e-8)
    for gs, gr in zip(grads, ref_grads):
        _assert_close(gs, gr, "gradient (diag)", tol=1e-7)


def _run_with_info(func, y0, t, w, params, **kw):
    box = {}

    def fn(f, y, tt):
        out, box["info"] = seqpar.odeint(f, y, tt, return_info=True, **kw)
        return out

    return _run(fn, func, y0, t, w, params), box["info"]


def test_short_grids_and_float32():
    func = Field()
    y0 = torch.randn(2, D, dtype=torch.float64)
    one = seqpar.odeint(func, y0, torch.tensor([0.5], dtype=torch.float64))
    assert one.shape == (1, 2, D) and torch.equal(one[0], y0)
    t2 = torch.tensor([0.0, 0.1], dtype=torch.float64)
    _assert_close(seqpar.odeint(func, y0, t2), torchdiffeq.odeint(func, y0, t2, method="rk4"), "2 points")


def test_float32_as_accurate_as_torchdiffeq_float32():
    """1000 small rk4 steps of a damped MLP field in float32 with tol=1e-6 (the documented setting for accurate
    float32 trajectories): seqpar is about as far from the float64 solution as torchdiffeq's float32 run (a few
    1e-6).  With the default tol (5e-5) the per-step residuals add up to ~1e-3 here: bounded, and reported."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 4))
    f32 = lambda tt, y: net(y) - 0.5 * y  # noqa: E731
    y0 = torch.randn(4, 4)
    t = torch.arange(1001, dtype=torch.float64) * 1e-3
    with torch.no_grad():
        out = seqpar.odeint(f32, y0, t, tol=1e-6)
        loose, info = seqpar.odeint(f32, y0, t, return_info=True)
        ref = torchdiffeq.odeint(f32, y0, t, method="rk4")
        net64 = net.double()
        ref64 = torchdiffeq.odeint(lambda tt, y: net64(y) - 0.5 * y, y0.double(), t, method="rk4")
    assert out.dtype == torch.float32
    assert info.converged and info.residual <= 5e-5 and rel_err(loose, ref64) < 5e-3
    # within a few times torchdiffeq's own float32 error (per-step residual <= 1e-6 over 1000 steps)
    assert rel_err(out, ref64) < max(3 * rel_err(ref, ref64), 2e-5)
    assert rel_err(out, ref) < 3e-5


def _ok(tt, y):
    return -y


@pytest.mark.parametrize("kwargs,match", [
    (dict(rtol=1e-7), "rtol"),
    (dict(atol=1e-9), "atol"),
    (dict(options={"step_size": 0.1}), "options"),
    (dict(method="dopri5"), "adaptive"),
    (dict(method=None), "adaptive"),
    (dict(method="explicit_adams"), "multistep"),
    (dict(method="rk45"), "method must be one of"),
    (dict(event_fn=lambda t, y: y.sum()), "event_fn"),
    (dict(adjoint_rtol=1e-3), "adjoint_rtol"),
    (dict(jacobian="nonsense"), "jacobian"),
])
def test_unsupported_arguments_raise_value_error(kwargs, match):
    y0 = torch.ones(2, dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        seqpar.odeint(_ok, y0, t, **kwargs)


def test_bad_t_y0_func_raise():
    y0 = torch.ones(2, dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="1-D"):
        seqpar.odeint(_ok, y0, t.reshape(5, 1))
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        seqpar.odeint(_ok, y0, torch.tensor([0.0, 0.2, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        seqpar.odeint(_ok, y0, torch.tensor([0.0, 0.2, 0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one time"):
        seqpar.odeint(_ok, y0, torch.zeros(0, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        seqpar.odeint(_ok, y0, torch.tensor([0.0, float("nan")], dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        seqpar.odeint(_ok, y0, torch.arange(5))
    with pytest.raises(TypeError, match="1-D torch.Tensor"):
        seqpar.odeint(_ok, y0, [0.0, 1.0])
    with pytest.raises(ValueError, match="0-d"):
        seqpar.odeint(_ok, torch.tensor(1.0, dtype=torch.float64), t)
    with pytest.raises(TypeError, match="tuples"):
        seqpar.odeint(_ok, (y0, y0), t)
    with pytest.raises(ValueError, match="shaped like y"):
        seqpar.odeint(lambda tt, y: y.sum(-1), y0, t)
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepsize'"):
        seqpar.odeint(_ok, y0, t, stepsize=0.1)
    # a plain function with y0 requiring grad: the tensors it uses are unknown -> adjoint_params required
    with pytest.raises(ValueError, match="adjoint_params"):
        seqpar.odeint(_ok, y0.clone().requires_grad_(True), t)
    out = seqpar.odeint(_ok, y0.clone().requires_grad_(True), t, adjoint_params=(), options={})
    out.sum().backward()  # fine once declared


def _sharded(rank, world_size, group):
    torch.manual_seed(0)
    res = {}
    for n_points in (STEPS + 1, 1):
        func = Field()
        g = torch.Generator().manual_seed(2)
        y0 = torch.randn(3, D, generator=g, dtype=torch.float64).requires_grad_(True)
        t = _grid(n_points)
        w = torch.randn(n_points, 3, D, generator=g, dtype=torch.float64)
        start, stop = trajectory_shard(n_points, group)
        out, info = seqpar.odeint(func, y0, t, group=group, return_info=True)
        (out * w[start:stop]).sum().backward()
        res[n_points] = dict(out=out.detach(), start=start, stop=stop, dy0=y0.grad.clone(),
                             dparams=[torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                      for p in func.parameters()], converged=info.converged)
    return res


def test_sharded_two_ranks_equal_single_process():
    results = run_ranks(_sharded, 2)
    for n_points in (STEPS + 1, 1):
        func = Field()
        g = torch.Generator().manual_seed(2)
        y0 = torch.randn(3, D, generator=g, dtype=torch.float64)
        t = _grid(n_points)
        w = torch.randn(n_points, 3, D, generator=g, dtype=torch.float64)
        params = list(func.parameters())
        ref, ref_grads = _run(lambda f, y, tt: torchdiffeq.odeint(f, y, tt, method="rk4"), func, y0, t, w, params)
        pieces = [results[r][n_points] for r in range(2)]
        assert [(p["start"], p["stop"]) for p in pieces] == [trajectory_shard_ref(n_points, r) for r in range(2)]
        _assert_close(torch.cat([p["out"] for p in pieces]), ref, f"sharded trajectory ({n_points} points)")
        for r, p in enumerate(pieces):
            assert p["converged"]
            _assert_close(p["dy0"], ref_grads[0], f"rank {r} dL/dy0 ({n_points} points)")
            for gs, gr in zip(p["dparams"], ref_grads[1:]):
                _assert_close(gs, gr, f"rank {r} parameter gradient ({n_points} points)")


def trajectory_shard_ref(n, r, P=2):
    base, extra = divmod(n, P)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)
