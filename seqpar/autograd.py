"""The backward pass: the adjoint recurrence at the solution, as an autograd Function.

With states h_t = f(h_{t-1}, u_t) and upstream gradients g_t = dL/dh_t, the
adjoint is the reverse-time linear recurrence (docs/design.md section 1)

    lambda_t = g_t + J_{t+1}^T lambda_{t+1},      lambda_{n-1} = g_{n-1} + v

where ``v`` is the adjoint arriving from the next rank (0 on the last rank).
It is solved by the same chunked scans as the forward pass, run on the
time-reversed sequence with transposed (exact) Jacobians.  Input, h0 and
parameter gradients then come from vector-Jacobian products of
``f(h_prev, project_inputs(x))`` with lambda, chunk by chunk.  Parameter
gradients are summed over the sequence group, so every rank holds the full
gradient; dL/dh0 is rank 0's and is broadcast to all ranks.
"""
from __future__ import annotations

import contextlib
import math
from typing import List

import torch
from torch.autograd.function import once_differentiable

from .comm import Communicator
from .newton import (CORRECTION_CAP_FRACTION, CORRECTION_FIRST, CORRECTION_MIN_CAP, NewtonOptions, auto_chunk,
                     correction_threshold, incoming_state, newton_solve, projected_inputs, shift)
from .validation import is_exact
from .scan import affine_scan, chunk_bounds, jacobian_product
from .structure import Structure


def _adjoint_jacobians(cell, st: Structure, h_prev, xp, s: int, e: int):
    """``J_{t+1}^T`` for t in [s, e) in time order (identity for t = n-1, which takes the
    adjoint arriving from the right): (e - s, *structure storage)."""
    n, B, D = h_prev.shape
    hi = min(e + 1, n)
    J = st.transpose(cell.jacobian(h_prev[s + 1:hi], xp[s + 1:hi], st))
    if e == n:
        J = torch.cat([J, st.identity((1, B), D, h_prev.dtype, h_prev.device)], 0)
    return J


def _reverse_scan(J, b, v, st: Structure, backend: str):
    """``x_t = J_t x_{t+1} + b_t`` from ``x_n = v``, on the kernels run in reverse or the reference."""
    if backend == "triton":
        from .backend import kernel_scan
        return kernel_scan(J.contiguous(), b.contiguous(), v, st, reverse=True).to(b.dtype)
    return affine_scan(J.flip(0), b.flip(0), v, st).flip(0)


def local_adjoint(cell, st: Structure, h_prev, xp, g, v, chunk: int, backend: str, product: bool = False):
    """lambda (n, B, D) of this shard from the incoming adjoint ``v`` (B, D), chunks from the end,
    J recomputed per chunk; with ``product`` also Psi = J_1^T ... J_{n-1}^T (v -> lambda_0)."""
    n = g.shape[0]
    lam = torch.empty_like(g)
    psi = None
    for s, e in reversed(chunk_bounds(n, chunk)):
        J = _adjoint_jacobians(cell, st, h_prev, xp, s, e)
        lam[s:e] = _reverse_scan(J, g[s:e], v, st, backend)
        v = lam[s]
        if product:
            m = jacobian_product(J.flip(0), st)
            psi = m if psi is None else st.matmul(m, psi)
    return lam, psi


def correct_adjoint(cell, st: Structure, h_prev, xp, g, lam, v, chunk: int, backend: str) -> None:
    """``lam`` was scanned with a zero incoming adjoint; add ``Psi_t v`` (Psi_t = J_{t+1}^T ... J_{n-1}^T)
    from the shard's end until it falls below rounding; past the cap, rescan from ``v``."""
    n = g.shape[0]
    tiny = correction_threshold(g.dtype) * max(1.0, float(v.abs().max()))
    if n == 0 or float(v.abs().max()) <= tiny:
        return
    cap = max(CORRECTION_MIN_CAP, n // CORRECTION_CAP_FRACTION)
    v_in = v
    e, L = n, CORRECTION_FIRST
    while e > 0:
        if n - e >= cap:
            lam.copy_(local_adjoint(cell, st, h_prev, xp, g, v_in, chunk, backend)[0])
            return
        s = max(0, e - L)
        J = _adjoint_jacobians(cell, st, h_prev, xp, s, e)
        if st.kind == "diag":
            corr = J.flip(0).cumprod(0).flip(0) * v
        else:
            corr = _reverse_scan(J, torch.zeros_like(g[s:e]), v, st, backend)
        lam[s:e] += corr
        v = corr[0]
        if float(v.abs().max()) <= tiny:
            return
        e, L = s, 2 * L


def adjoint_scan(cell, structure: Structure, h_prev, xp, g, comm: Communicator, chunk: int,
                 backend: str = "torch"):
    """lambda (n, B, D) on this rank's shard, the same shape as the forward iteration: scan from a
    zero incoming adjoint (with the shard's Jacobian product when sharded), one all-gather of the
    summaries (v -> J_0^T lambda_0), compose the ranks to the right (nearest last), correct."""
    n = g.shape[0]
    B, D = g.shape[1:]
    P, rank = comm.world_size, comm.rank
    st = structure
    zero = g.new_zeros(B, D)
    lam, psi = local_adjoint(cell, st, h_prev, xp, g, zero, chunk, backend, product=P > 1) if n else (g, None)
    if P == 1:
        return lam
    if n:  # the summary the rank to the left needs: v -> J_0^T lambda_0
        J0T = st.transpose(cell.jacobian(h_prev[:1], xp[:1], st))[0]
        A, c = st.matmul(J0T, psi), st.matvec(J0T, lam[0])
    else:
        A, c = st.identity((B,), D, g.dtype, g.device), zero
    nA = A.numel()
    gathered = comm.all_gather(torch.cat([A.reshape(-1), c.reshape(-1)]))
    gA = gathered[:, :nA].reshape(P, *A.shape)
    gc = gathered[:, nA:].reshape(P, B, D)
    order = list(range(P - 1, rank, -1))  # ranks to the right, nearest last
    v = incoming_state(gA[order], gc[order], zero, len(order), st)
    correct_adjoint(cell, st, h_prev, xp, g, lam, v, chunk, backend)
    return lam


ADJOINT_MIN_ITER = 200  # defect-correction cap of the quasi-Newton adjoint (at least)


def _jt_lambda(cell, h_prev, xp, lam, chunk: int):
    """``J_t^T lambda_t`` for every local t (exact, by one VJP of f per chunk): (n, B, D)."""
    out = torch.empty_like(lam)
    for s, e in chunk_bounds(lam.shape[0], chunk):
        with torch.enable_grad():
            hp = h_prev[s:e].detach().requires_grad_(True)
            (out[s:e],) = torch.autograd.grad(cell.step(hp, xp[s:e]), hp, lam[s:e])
    return out


def _from_right(comm: Communicator, first, n: int):
    """The first row of the nearest non-empty rank to the right (zeros on the last one)."""
    B, D = first.shape
    rows = comm.all_gather(torch.cat([first.reshape(-1), first.new_tensor([float(n > 0)])]))
    for q in range(comm.rank + 1, comm.world_size):
        if float(rows[q, -1]) > 0:
            return rows[q, :-1].reshape(B, D)
    return first.new_zeros(B, D)


def adjoint_solve(cell, opts: NewtonOptions, h_prev, xp, g, comm: Communicator):
    """lambda (n, B, D) and the number of refinement iterations.

    If the forward linearisation keeps the cell's whole Jacobian, one adjoint
    scan with the cell's exact structure is exact.  Otherwise (quasi-Newton,
    e.g. ``jacobian="diag"`` on a dense GRU) storing dense Jacobians would cost
    O(D^2) per step, so the adjoint system is solved by defect correction with
    the forward's structure: ``lambda += scan~(r)`` with the exact residual
    ``r = g + shift(J^T lambda) - lambda`` from one VJP of f per iteration.
    If that stalls, one exact-structure adjoint scan (chunked) finishes the job;
    the iteration count is then reported as -1.
    """
    n = g.shape[0]
    B, D = g.shape[1:]
    cdt = g.dtype
    exact = is_exact(opts.structure, cell.structure, D)
    st = cell.structure if exact else opts.structure
    chunk = opts.chunk_size or auto_chunk(st, B, D, cdt, device=g.device)
    lam = adjoint_scan(cell, st, h_prev, xp, g, comm, chunk, backend=opts.backend)
    if exact:
        return lam, 0
    vjp_chunk = _vjp_chunk(B, D, xp)
    prev = err = math.inf
    floor = 100 * torch.finfo(cdt).eps  # a stall this close to rounding is as exact as the dtype allows
    for it in range(1, max(opts.max_iter, ADJOINT_MIN_ITER) + 1):
        jtl = _jt_lambda(cell, h_prev, xp, lam, vjp_chunk) if n else g
        nxt = _from_right(comm, jtl[0] if n else g.new_zeros(B, D), n) if comm.world_size > 1 else g.new_zeros(B, D)
        r = g - lam
        if n:
            r[:-1] += jtl[1:]
            r[-1] += nxt
        err = (r.abs().amax() / lam.abs().amax().clamp_min(1.0)).reshape(1) if n else g.new_zeros(1)
        err = float(comm.all_gather(err).max()) if comm.world_size > 1 else float(err)
        if math.isnan(err):
            break
        if err <= opts.tol or (err <= floor and err > 0.5 * prev):  # tolerance, or the precision floor
            return lam, it - 1
        prev = err
        lam = lam + adjoint_scan(cell, st, h_prev, xp, r, comm, chunk, backend=opts.backend)
    # defect correction stalled (e.g. a strongly non-normal cell): the exact structure is slower but exact
    exact_chunk = opts.chunk_size or auto_chunk(cell.structure, B, D, cdt, device=g.device)
    lam = adjoint_scan(cell, cell.structure, h_prev, xp, g, comm, exact_chunk, backend=opts.backend)
    return lam, -1


def _vjp_chunk(B: int, D: int, xp: torch.Tensor) -> int:
    """Steps per VJP chunk: about 2^22 (CPU) or 2^24 (GPU: fewer, larger autograd graphs) state elements."""
    elems = (1 << 24) if xp.is_cuda else (1 << 22)
    return max(1, elems // max(1, B * max(D, xp.shape[-1] if xp.shape[0] else 1)))


def _vjp_chunks(cell, inputs, cdt, h_prev, lam, params: List[torch.nn.Parameter], need_x: bool, chunk: int):
    """Gradients of sum_t <lambda_t, f(h_prev_t, project(x_t))> w.r.t. x, h_prev[0], params."""
    n = lam.shape[0]
    dx = torch.zeros_like(inputs) if need_x else None
    dh_first = None
    dparams = [None] * len(params)
    for s, e in chunk_bounds(n, chunk):
        with torch.enable_grad():
            x = inputs[s:e].detach().to(cdt).requires_grad_(need_x)
            hp = h_prev[s:e].detach()
            first = None
            if s == 0:
                first = hp[:1].clone().requires_grad_(True)
                hp = torch.cat([first, hp[1:]], 0)
            out = cell.step(hp, cell.project_inputs(x).to(cdt))
            wrt = ([x] if need_x else []) + ([first] if first is not None else []) + list(params)
            grads = torch.autograd.grad(out, wrt, lam[s:e], allow_unused=True)
        k = 0
        if need_x:
            dx[s:e] = grads[0].to(dx.dtype)
            k = 1
        if first is not None:
            dh_first = grads[k][0]
            k += 1
        for i, gp in enumerate(grads[k:]):
            if gp is not None:
                dparams[i] = gp if dparams[i] is None else dparams[i] + gp
    return dx, dh_first, dparams


def _all_reduce_grads(dparams, params, comm: Communicator):
    """Sum parameter gradients over the sequence group in one flat collective."""
    if comm.world_size == 1 or not params:
        return dparams
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64 if p.dtype == torch.float64 else torch.float32)
                      for g, p in zip(dparams, params)])
    flat = comm.all_reduce_sum(flat)
    out, off = [], 0
    for p in params:
        k = p.numel()
        out.append(flat[off:off + k].reshape(p.shape).to(p.dtype))
        off += k
    return out


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call where ``t`` has it (a short solve's host time counts)."""
    return t if t.dtype == dtype else t.to(dtype)


class SolveFunction(torch.autograd.Function):
    """states = solve(cell, inputs, h0); backward by the adjoint scan.

    ``apply(cell, opts, comm, info_out, inputs, h0, initial_guess, *params)``;
    ``info_out`` is a list receiving the SolveInfo.
    """

    @staticmethod
    def forward(ctx, cell, opts: NewtonOptions, comm: Communicator, info_out: list, inputs, h0, initial_guess, *params):
        cdt = h0.dtype if h0.dtype == torch.float64 else torch.float32
        # newton_solve projects the inputs (inside its CUDA graphs where they apply); no autograd graph
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            states, info, boundary = newton_solve(cell, None, _as(h0, cdt), opts, comm, initial_guess,
                                                  inputs=_as(inputs, cdt))
        info_out.append(info)
        ctx.cell, ctx.opts, ctx.comm, ctx.cdt, ctx.info = cell, opts, comm, cdt, info
        ctx.save_for_backward(inputs, h0, states, boundary)
        return _as(states, inputs.dtype)

    @staticmethod
    @once_differentiable  # double backward (create_graph=True) raises instead of dropping second-order terms
    def backward(ctx, g_states):
        inputs, h0, states, boundary = ctx.saved_tensors
        cell, comm, cdt = ctx.cell, ctx.comm, ctx.cdt
        params = [p for p in cell.parameters() if p.requires_grad]
        n = states.shape[0]
        B, D = h0.shape
        g = g_states.to(cdt) if g_states is not None else states.new_zeros(states.shape)
        with torch.no_grad():
            xp = projected_inputs(cell, inputs, cdt)
            h_prev = shift(states, boundary) if n else states
            lam, iters = adjoint_solve(cell, ctx.opts, h_prev, xp, g, comm)
        ctx.info.backward_iterations = iters
        need_x = ctx.needs_input_grad[4]
        vjp_chunk = _vjp_chunk(B, D, xp)
        dx, dh_first, dparams = _vjp_chunks(cell, inputs, cdt, h_prev, lam, params, need_x, vjp_chunk)
        dparams = _all_reduce_grads(dparams, params, comm)
        dh0 = None
        if ctx.needs_input_grad[5]:
            dh0 = dh_first if dh_first is not None else h0.new_zeros(B, D, dtype=cdt)
            if comm.world_size > 1:  # h0 feeds the first non-empty shard; every rank gets its gradient
                lens = comm.all_gather(h0.new_tensor([float(n)])).reshape(-1).tolist()
                src = next((q for q, m in enumerate(lens) if m > 0), 0)
                dh0 = comm.broadcast(dh0.contiguous(), src=src)
            dh0 = dh0.to(h0.dtype)
        # map grads back to the params the Function was called with (those requiring grad)
        return (None, None, None, None, dx, dh0, None, *dparams)
