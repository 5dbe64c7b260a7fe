"""``seqpar.odeint``: fixed-grid neural-ODE integration, parallel along time.

Drop-in for ``torchdiffeq.odeint(func, y0, t, method="rk4"|"euler"|"midpoint")``
on a fixed grid (the grid is ``t`` itself): the trajectory is the solution of
the recurrence ``y_k = step(y_{k-1}, t_{k-1}, t_k)`` (one explicit Runge-Kutta
step per grid interval), which :func:`seqpar.solve` evaluates by Newton's
method over all steps at once, with the adjoint scan as the backward pass.

Conventions (see :func:`odeint`):

* ``func(t, y)`` is called *batched*: ``y`` is ``(..., D)`` with leading dims
  covering many time steps and batch rows at once, and ``t`` is ``(..., 1)``,
  each row's time (broadcastable against ``y``).  torchdiffeq passes a 0-d
  ``t`` and ``y`` of ``y0``'s shape; a func that acts row-wise on the last
  dim and uses ``t`` in broadcasting arithmetic works unchanged in both.
* Internally step 0 is a zero-length step ``t_0 -> t_0`` (the identity), so
  the solve's states are exactly the ``len(t)`` trajectory points and the
  gradient of ``out[0]`` reaches ``y0`` through the same adjoint as the rest
  (this makes the sharded case uniform: see ``group``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .cells import Cell
from .distributed import get_communicator
from .problems import shard_range
from .solver import solve
from .structure import DENSE

METHODS = ("rk4", "euler", "midpoint")
# Default float32 Newton tolerance: 5e-5 per step (relative to max(1, |y|)).  An ODE step has J ~ I, so a
# float32 scan over a long grid composes ~1e5 near-identity maps and its rounding leaves each step
# inconsistent with its neighbour by ~1e-5 (a neural ODE on a 100k-step rk4 grid stalls at 3.1e-5): a
# tighter default would never be reached and every solve would fall back to step-by-step repair.
# converged still means residual <= tol.  Per-step residuals add up along a trajectory: for accurate
# long float32 trajectories pass float64 (or tol >= 1e-6 on short grids).
FLOAT32_TOL = 5e-5
# torchdiffeq methods that have no meaning on a fixed grid solved as one recurrence
_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "scipy_solver")
_MULTISTEP = ("explicit_adams", "implicit_adams", "fixed_adams")
_TORCHDIFFEQ_ONLY_KW = ("event_fn", "adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options")


class ODEStepCell(Cell):
    """One fixed explicit Runge-Kutta step of ``dy/dt = func(t, y)`` as a seqpar cell.

    Input per step (``input_size=2``): ``[t0, dt]`` (time at the start of the
    step, signed step length); ``project_inputs`` is the identity.  Steps
    follow torchdiffeq's fixed-grid solvers: ``euler``, ``midpoint`` and
    ``rk4`` = the 3/8 rule (torchdiffeq's ``rk4_alt_step_func``).

    The tensors that receive gradients are ``grad_tensors``: ``func``'s
    parameters when ``func`` is an ``nn.Module`` (default), or the given
    ``adjoint_params`` (any tensors ``func`` uses, not only leaves).
    ``named_parameters`` yields exactly those, which is how :func:`seqpar.solve`
    and its adjoint find them.  ``func`` is kept out of the module tree so that
    nothing else is picked up.
    """

    input_size = 2
    structure = DENSE

    def __init__(self, func: Callable, state_size: int, method: str = "rk4",
                 grad_tensors: Optional[Sequence[torch.Tensor]] = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        if not callable(func):
            raise TypeError(f"func must be callable; got {type(func).__name__}")
        object.__setattr__(self, "func", func)  # not a submodule: parameters come from grad_tensors
        self.method = method
        self.hidden_size = int(state_size)
        if grad_tensors is None:
            named = [(f"func.{k}", p) for k, p in func.named_parameters()] if isinstance(func, nn.Module) else []
        else:
            named = [(f"adjoint_params[{i}]", p) for i, p in enumerate(grad_tensors)]
        seen, self._grad_named = set(), []
        for k, p in named:
            if id(p) not in seen:
                seen.add(id(p))
                self._grad_named.append((k, p))

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for k, p in self._grad_named:
            yield (prefix + "." + k if prefix else k), p

    def step(self, h_prev, xp):
        f = self.func
        xp = xp.to(h_prev.dtype)
        t0, dt = xp[..., 0:1], xp[..., 1:2]
        if self.method == "euler":
            return h_prev + dt * f(t0, h_prev)
        if self.method == "midpoint":
            half = 0.5 * dt
            k1 = f(t0, h_prev)
            return h_prev + dt * f(t0 + half, h_prev + k1 * half)
        third = 1.0 / 3.0
        k1 = f(t0, h_prev)
        k2 = f(t0 + dt * third, h_prev + dt * k1 * third)
        k3 = f(t0 + dt * (2.0 / 3.0), h_prev + dt * (k2 - k1 * third))
        k4 = f(t0 + dt, h_prev + dt * (k1 - k2 + k3))
        return h_prev + (k1 + 3 * (k2 + k3) + k4) * dt * 0.125

    def extra_repr(self) -> str:
        return f"method={self.method}, state_size={self.hidden_size}, grad_tensors={len(self._grad_named)}"


def trajectory_shard(n_points: int, group=None):
    """``(start, stop)``: the trajectory points ``out[start:stop]`` (times ``t[start:stop]``)
    that this rank of ``group`` gets from :func:`odeint` for a grid of ``n_points`` times."""
    comm = get_communicator(group)
    start, length = shard_range(int(n_points), comm.world_size, comm.rank)
    return start, start + length


def _check_args(func, y0, t, method, rtol, atol, options, unknown):
    for k in unknown:
        if k in _TORCHDIFFEQ_ONLY_KW:
            raise ValueError(f"odeint: {k}= (a torchdiffeq option) is not supported by seqpar.odeint "
                             "(fixed grids, adjoint from seqpar.solve); remove it")
    if unknown:
        raise TypeError(f"odeint() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    if rtol is not None or atol is not None:
        name = "rtol" if rtol is not None else "atol"
        raise ValueError(f"odeint: {name}= is an adaptive-step tolerance and has no meaning on seqpar's fixed grid "
                         f"(the steps are the intervals of t); leave {name}=None (the Newton tolerance is tol=)")
    if options not in (None, {}):
        keys = sorted(options) if isinstance(options, dict) else options
        raise ValueError(f"odeint: options={keys!r} is not supported (only None or {{}}); the integration grid "
                         "is t itself: for a step size h pass a finer t, e.g. torch.arange(t0, t1 + h/2, h)")
    if method not in METHODS:
        if method is None or method in _ADAPTIVE:
            what = "torchdiffeq's default dopri5" if method is None else repr(method)
            raise ValueError(f"odeint: method={method!r} ({what}) is an adaptive-step method; seqpar.odeint "
                             f"integrates on the fixed grid t with one of {METHODS}")
        if method in _MULTISTEP:
            raise ValueError(f"odeint: method={method!r} is a multistep method (not a one-step recurrence); "
                             f"use one of {METHODS}")
        raise ValueError(f"odeint: method must be one of {METHODS}; got {method!r}")
    if not callable(func):
        raise TypeError(f"odeint: func must be callable func(t, y); got {type(func).__name__}")
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"odeint: y0 must be a torch.Tensor of shape (*batch, D) (tuples of tensors are not "
                        f"supported); got {type(y0).__name__}")
    if not y0.is_floating_point():
        raise TypeError(f"odeint: y0 must be a floating tensor; got {y0.dtype}")
    if y0.dim() < 1:
        raise ValueError("odeint: y0 must have shape (*batch, D) with at least one dim; got a 0-d tensor "
                         "(use y0.reshape(1))")
    if y0.numel() == 0:
        raise ValueError(f"odeint: y0 has no elements (shape {tuple(y0.shape)})")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"odeint: t must be a 1-D torch.Tensor of times; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"odeint: t must be a floating tensor; got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"odeint: t must be 1-D (the times); got shape {tuple(t.shape)}")
    if t.numel() < 1:
        raise ValueError("odeint: t must hold at least one time (t[0] is the time of y0); got an empty tensor")
    td = t.detach()
    if not bool(torch.isfinite(td).all()):
        raise ValueError("odeint: t contains NaN or Inf")
    if td.numel() > 1:
        inc = td[1:] > td[:-1]
        dec = td[1:] < td[:-1]
        if not (bool(inc.all()) or bool(dec.all())):
            raise ValueError("odeint: t must be strictly increasing or strictly decreasing")


def odeint(func: Callable, y0: torch.Tensor, t: torch.Tensor, *, method: str = "rk4", group=None,
           tol: Optional[float] = None, max_iter: Optional[int] = None, fallback: str = "sequential",
           return_info: bool = False, backend: str = "auto", jacobian="dense", rtol=None, atol=None,
           options=None, adjoint_params: Optional[Sequence[torch.Tensor]] = None, **unknown):
    """Integrate ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` on the fixed grid ``t``, in parallel over time.

    Same result as ``torchdiffeq.odeint(func, y0, t, method=method)`` for the
    fixed-grid methods ``"rk4"`` (torchdiffeq's 3/8-rule RK4), ``"euler"`` and
    ``"midpoint"``: one step per interval of ``t`` (non-uniform spacing and
    decreasing ``t`` allowed).

    Args:
        func: ``func(t, y) -> dy/dt``, an ``nn.Module`` or any callable.  Called
            batched: ``y`` is ``(..., D)`` with any leading dims (many steps and
            batch rows at once), ``t`` is ``(..., 1)`` (each row's time).  It must
            act row-wise on the last dim and be traceable by ``torch.func``
            (``vmap``/``jvp``: no ``.item()``, no data-dependent Python branches).
        y0: ``(*batch, D)`` initial state (``(D,)`` allowed).
        t: 1-D strictly increasing or decreasing times; ``t[0]`` is the time of y0.
        method: ``"rk4"`` (default), ``"euler"`` or ``"midpoint"``.
        group: sequence group (as in :func:`seqpar.solve`).  Every rank passes the
            *same full* ``t`` and ``y0``; the ``len(t)`` trajectory points are split
            into contiguous near-equal pieces and each rank gets its piece
            ``out[start:stop]`` (see :func:`trajectory_shard`); concatenated in rank
            order they are the whole trajectory.  Gradients: parameters and ``y0``
            get the full gradient on every rank (summed/broadcast over the group);
            a gradient w.r.t. ``t`` holds only this rank's piece's contribution.
        tol: Newton tolerance on the per-step residual (see :func:`seqpar.solve`); default
            1e-12 for float64 and 5e-5 for float32/bfloat16 (what float32 scans over long grids of
            near-identity steps reach); per-step residuals add up along a trajectory, so use
            float64 (or a tighter tol, >= 1e-6, on short grids) when accuracy matters.
        max_iter, fallback, return_info, backend: as in :func:`seqpar.solve`
            (``return_info=True`` returns ``(out, SolveInfo)``).
        jacobian: Newton's linearisation of one RK step: ``"dense"`` (default; exact
            Newton, D x D per step) or ``"diag"`` / ``"block:k"`` (quasi-Newton: cheaper
            iterations, more of them).  ``"auto"`` means ``"dense"``.
        adjoint_params: the tensors that get gradients (as in
            ``torchdiffeq.odeint_adjoint``); default: ``func.parameters()`` if func is
            an ``nn.Module`` (or a bound method of one).  Any other callable needs
            ``adjoint_params`` (``()`` if none) when y0 or t requires grad:
            tensors that ``func`` uses but are not listed get no gradient.
        rtol, atol, options: torchdiffeq's adaptive-step arguments; anything but
            None (or ``options={}``) raises ``ValueError``.  So do adaptive and
            multistep methods and torchdiffeq-only keywords (``event_fn``, ...).

    Returns:
        ``(len(t), *y0.shape)`` with ``out[0] = y0`` (under ``group``: this rank's
        ``(stop - start, *y0.shape)`` piece), and the SolveInfo if ``return_info``.
    """
    comm = get_communicator(group)
    error = None
    try:
        _check_args(func, y0, t, method, rtol, atol, options, unknown)
        if adjoint_params is not None:
            adjoint_params = tuple(adjoint_params)
            for i, p in enumerate(adjoint_params):
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"odeint: adjoint_params[{i}] must be a torch.Tensor; got {type(p).__name__}")
        if adjoint_params is None and not isinstance(func, nn.Module):
            owner = getattr(func, "__self__", None)  # a bound method of a module: that module's parameters
            if isinstance(owner, nn.Module):
                adjoint_params = tuple(owner.parameters())
            elif torch.is_grad_enabled() and (y0.requires_grad or t.requires_grad):
                raise ValueError("odeint: func is not an nn.Module, so seqpar cannot find the tensors it uses; pass "
                                 "adjoint_params=(tensors that need gradients) (adjoint_params=() if none) "
                                 "-- the same rule as torchdiffeq.odeint_adjoint")
        if jacobian == "auto":
            jacobian = "dense"
        if tol is None and y0.dtype != torch.float64:
            tol = FLOAT32_TOL
        cell = ODEStepCell(func, y0.shape[-1], method, adjoint_params)
        t = t.to(y0.device)
        _check_func(func, y0, t)
    except Exception as e:  # noqa: BLE001 - raised on this rank, reported to the others
        error = e
    if comm.world_size > 1:
        comm.agree(error)
    elif error is not None:
        raise error

    batch_shape, D = tuple(y0.shape[:-1]), y0.shape[-1]
    B = math.prod(batch_shape)
    h0 = y0.reshape(B, D)
    N = t.shape[0]
    start, length = shard_range(N, comm.world_size, comm.rank)
    # state k = trajectory point k; step k goes from t[k-1] to t[k], step 0 from t[0] to t[0] (the identity)
    lo = max(start - 1, 0)
    tp = t[lo:start + length]
    t_prev = torch.cat([tp[:1], tp[:-1]]) if start == 0 else tp[:-1]
    t_here = tp if start == 0 else tp[1:]
    inputs = torch.stack([t_prev, t_here - t_prev], -1).to(y0.dtype)  # dt in t's dtype, then cast
    inputs = inputs[:, None, :].expand(length, B, 2)
    res = solve(cell, inputs, h0, jacobian=jacobian, tol=tol, max_iter=max_iter, fallback=fallback,
                return_info=return_info, group=group, backend=backend)
    states, info = res if return_info else (res, None)
    out = states.reshape(length, *batch_shape, D)
    return (out, info) if return_info else out


def _check_func(func, y0, t):
    """One call of func on one row: a clear error if it does not map (t (..., 1), y (..., D)) -> (..., D)."""
    with torch.no_grad():
        y = y0.detach().reshape(-1, y0.shape[-1])[:1]
        tt = t.detach()[:1].reshape(1, 1).to(y0.dtype)
        try:
            f = func(tt, y)
        except Exception as e:  # noqa: BLE001
            msg = (f"odeint: func(t, y) failed on t of shape {tuple(tt.shape)} and y of shape {tuple(y.shape)} "
                   f"(seqpar calls func batched: y (..., D), t (..., 1)): {type(e).__name__}: {e}")
            try:
                err = type(e)(msg)
            except Exception:  # noqa: BLE001 - exception types with other constructors
                err = RuntimeError(msg)
            raise err from e
    if not isinstance(f, torch.Tensor) or f.shape != y.shape:
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"odeint: func(t, y) must return dy/dt shaped like y; y has shape {tuple(y.shape)}, "
                         f"func returned {got}")


odeint.trajectory_shard = trajectory_shard  # also reachable as seqpar.odeint.trajectory_shard

__all__ = ["odeint", "trajectory_shard", "ODEStepCell", "METHODS"]
