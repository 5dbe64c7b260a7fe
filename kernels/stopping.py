"""Newton's stopping rule on the device: one iteration's decision without a host read.

A short solve replayed from CUDA graphs (:mod:`seqpar.graphs`) queues several iterations at once;
each is followed by :func:`record`, which applies the rule of ``seqpar.newton._Stopping.record``
(the reference) to the residual the pass just wrote and, once it says stop, sets a flag that turns
the later passes of the queue into no-ops (the pass kernels read it: ``stop`` of
:func:`seqpar.kernels.pipelined_diag_gru.pipelined_step` and the dense pipelined kernel).  The host
reads the state once per queue and replays the decisions through ``_Stopping.record`` (callbacks,
the deferred argument check), which must stop at the same iterate.  :func:`take_final` copies the last
recorded iterate out of the loop's two iterate buffers once the state says stopped (a no-op before),
so that the result's copy is queued behind the passes instead of after the host's read.

State: one float64 tensor (``STATE_SIZE + HISTORY``,), so that the comparisons are the reference's
(a float32 residual against a Python float tolerance, in double precision):

====  ===========================================================
0     stopped (0 / 1): later passes and records are no-ops
1     k: the index of the next iterate to record
2     best residual so far (``inf`` at the start)
3     iterations since the best residual last halved
4     converged (0 / 1)
5-7   tol, max_iter, patience
8..   the residual of iterate k at ``8 + k % HISTORY``
====  ===========================================================
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

STATE_SIZE = 8
HISTORY = 64  # residuals kept (circular): the host reads at least once per HISTORY queued iterations
STOPPED, ITER, BEST, SINCE, CONVERGED, TOL, MAX_ITER, PATIENCE = range(STATE_SIZE)


@triton.jit
def _record_kernel(Res, n, State, HIST: tl.constexpr, BLOCK: tl.constexpr):
    """One program: record the residual of iterate ``State[1]``, the largest of ``Res[0:n]`` (NaN if any is),
    and decide (see the module)."""
    record_partials(Res, n, State, HIST, BLOCK)


@triton.jit
def record_partials(Res, n, State, HIST: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`record` inside a kernel (one program's threads): the residual is the largest of ``Res[0:n]``.
    ``Res`` is read past L1 (``.cg``): a pass's last program reads what its other programs wrote."""
    stopped = tl.load(State + 0)
    if stopped == 0:
        k = tl.load(State + 1)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        nan = tl.zeros([BLOCK], tl.int32)
        for s in range(0, n, BLOCK):
            v = tl.load(Res + s + offs, mask=s + offs < n, other=0.0, cache_modifier=".cg")
            acc = tl.maximum(acc, tl.where(v == v, v, 0.0))
            nan = tl.maximum(nan, tl.where(v == v, 0, 1))
        res = tl.where(tl.max(nan, 0) > 0, float("nan"), tl.max(acc, 0)).to(tl.float64)  # NaN as torch.amax
        tl.store(State + 8 + (k.to(tl.int32) % HIST), res)
        best = tl.load(State + 2)
        since = tl.load(State + 3)
        conv = res <= tl.load(State + 5)
        finite = tl.abs(res) < float("inf")  # False for NaN
        improved = res < 0.5 * best
        best = tl.where(improved, res, best)
        since = tl.where(improved, 0.0, since + 1.0)
        stop = conv | (finite == 0) | (k >= tl.load(State + 6)) | (since >= tl.load(State + 7))
        tl.store(State + 2, best)
        tl.store(State + 3, since)
        tl.store(State + 4, tl.where(conv, 1.0, 0.0).to(tl.float64))
        tl.store(State + 1, k + 1.0)
        tl.store(State + 0, tl.where(stop, 1.0, 0.0).to(tl.float64))


@triton.jit
def _take_final_kernel(State, H0, H1, Out, n, ZERO: tl.constexpr, BLOCK: tl.constexpr):
    """Once ``State`` says stopped: ``Out`` = the last recorded iterate (iterate k lives in ``H0`` for even k,
    ``H1`` for odd), then (ZERO) ``H0`` = 0.  Else nothing."""
    if tl.load(State + 0) != 0:
        k = tl.load(State + 1).to(tl.int64) - 1
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        if k % 2 == 1:
            v = tl.load(H1 + offs, mask=m)
        else:
            v = tl.load(H0 + offs, mask=m)
        tl.store(Out + offs, v, mask=m)
        if ZERO:
            tl.store(H0 + offs, tl.zeros_like(v), mask=m)


TAKE_BLOCK = 4096


def take_final(state: torch.Tensor, h_even: torch.Tensor, h_odd: torch.Tensor, out: torch.Tensor,
               zero_even: bool) -> None:
    """Queue: if ``state`` says stopped, copy the last recorded iterate (number ``state[ITER] - 1``; even ones
    in ``h_even``, odd ones in ``h_odd``) into ``out`` and, with ``zero_even``, zero ``h_even`` afterwards (the
    next solve's initial iterate, without a launch of its own); else do nothing.  All three tensors contiguous,
    of one shape and dtype."""
    if not all(t.is_contiguous() and t.shape == out.shape and t.dtype == out.dtype for t in (h_even, h_odd, out)):
        raise ValueError("h_even, h_odd and out must be contiguous tensors of one shape and dtype")
    n = out.numel()
    if n:
        _take_final_kernel[(triton.cdiv(n, TAKE_BLOCK),)](state, h_even, h_odd, out, n, ZERO=zero_even,
                                                          BLOCK=TAKE_BLOCK, num_warps=8)


def take_final_reference(state: torch.Tensor, h_even, h_odd, out, zero_even: bool) -> None:
    """What :func:`take_final` does, in torch."""
    if float(state[STOPPED]) != 0:
        k = int(state[ITER]) - 1
        out.copy_(h_odd if k % 2 else h_even)
        if zero_even:
            h_even.zero_()


def new_state(device, tol: float, max_iter: int, patience: int) -> torch.Tensor:
    """A fresh state (nothing recorded) for the stopping options."""
    s = torch.zeros(STATE_SIZE + HISTORY, dtype=torch.float64, device=device)
    reset(s, tol, max_iter, patience)
    return s


def initial_values(tol: float, max_iter: int, patience: int) -> torch.Tensor:
    """The state's first ``STATE_SIZE`` entries before any record (CPU float64)."""
    return torch.tensor([0.0, 0.0, math.inf, 0.0, 0.0, float(tol), float(max_iter), float(patience)],
                        dtype=torch.float64)


def reset(state: torch.Tensor, tol: float, max_iter: int, patience: int) -> None:
    """Start ``state`` over (a host-to-device copy of ``STATE_SIZE`` values)."""
    state[:STATE_SIZE].copy_(initial_values(tol, max_iter, patience))


RECORD_BLOCK = 1024


def record(residual: torch.Tensor, state: torch.Tensor) -> None:
    """Queue the record into ``state`` of the next iterate's residual: the largest value (NaN if any is, as
    ``amax``) of ``residual``, a contiguous float32 tensor (one value, or a pass's per-program partials)."""
    if not residual.is_contiguous() or residual.dtype != torch.float32:
        raise ValueError("residual must be a contiguous float32 tensor")
    _record_kernel[(1,)](residual, residual.numel(), state, HIST=HISTORY, BLOCK=RECORD_BLOCK, num_warps=4)


def recorded(state_values, since: int) -> list:
    """The residuals of iterates ``since .. k - 1`` from a host copy of the state (a list)."""
    k = int(state_values[ITER])
    return [state_values[STATE_SIZE + j % HISTORY] for j in range(since, k)]


def record_reference(state: torch.Tensor, res: float) -> None:
    """What :func:`record` does, in Python on a CPU state (``seqpar.newton._Stopping.record``'s rule)."""
    if state[STOPPED] != 0:
        return
    k = float(state[ITER])
    state[STATE_SIZE + int(k) % HISTORY] = res
    conv = res <= float(state[TOL])
    improved = res < 0.5 * float(state[BEST])
    if improved:
        state[BEST] = res
    state[SINCE] = 0.0 if improved else float(state[SINCE]) + 1.0
    stop = conv or not math.isfinite(res) or k >= float(state[MAX_ITER]) or float(state[SINCE]) >= float(state[PATIENCE])
    state[CONVERGED] = 1.0 if conv else 0.0
    state[ITER] = k + 1.0
    state[STOPPED] = 1.0 if stop else 0.0
