"""Newton's iteration over the whole (sharded) sequence, with exact fallback.

One iteration on a rank holding steps [0, n) of its shard (DESIGN.md section 2-3):

1. ``h_prev = [boundary, h[:-1]]`` where ``boundary`` is h0 on rank 0 and the
   previous rank's last state (the incoming state of the last scan) elsewhere;
2. ``fval = f(h_prev, xp)``; the residual ``F = h - fval`` (max-norm of each
   step relative to ``max(1, |fval_t|_max)``) measures the current iterate;
3. with more than one rank: pass 1 reduces the shard's linearised steps to
   one summary map; one all-gather carries summaries and residuals; each rank
   composes the summaries of the ranks before it with h0: its new boundary;
4. if the global residual is below ``tol`` the iterate is the answer;
5. otherwise pass 2 scans the shard from the boundary: the next iterate.
   ``J`` and ``b`` are recomputed per chunk in both passes, never stored
   for the whole shard.

If Newton stalls, diverges or hits ``max_iter``, the prefix whose residual is
below tolerance is kept (it satisfies the recurrence) and the remaining tail
is evaluated step by step, in rank order: exact.  Or, as the caller asks,
``converged=False`` is returned or :class:`NotConvergedError` raised.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from .comm import Communicator
from .errors import NotConvergedError
from .scan import chunked_reduce, chunked_scan
from .structure import Structure

FALLBACKS = ("sequential", "raise", "none")
JACOBIAN_MEMORY_BUDGET = 256 * 2**20  # bytes of Jacobians alive per chunk (with scan temporaries)


@dataclass
class SolveInfo:
    """What a solve did.  Residuals: ``max_t |h_t - f(h_{t-1}, u_t)|_max / max(1, |f(...)|_max)``."""

    converged: bool
    iterations: int
    residual: float
    residuals: List[float] = field(default_factory=list)
    newton_converged: bool = False
    fallback: Optional[str] = None
    fallback_steps: int = 0
    first_unconverged: Optional[int] = None
    jacobian: str = ""
    method: str = "newton"
    tol: float = 0.0
    seq_len: int = 0          # T of the whole sequence (all shards)
    world_size: int = 1
    wall_time_s: float = 0.0
    backward_iterations: Optional[int] = None  # set by the backward pass (defect-correction iterations)

    def summary(self) -> str:
        s = (f"converged={self.converged} iterations={self.iterations} residual={self.residual:.3e} "
             f"jacobian={self.jacobian} T={self.seq_len} ranks={self.world_size} time={self.wall_time_s:.3f}s")
        if self.fallback:
            s += f" fallback={self.fallback}({self.fallback_steps} steps from t={self.first_unconverged})"
        return s


@dataclass
class NewtonOptions:
    structure: Structure
    tol: float
    max_iter: int
    fallback: str = "sequential"
    chunk_size: Optional[int] = None
    callback: Optional[Callable[[int, float], None]] = None
    patience: int = 10          # iterations without halving the best residual before giving up
    floor: float = 0.0          # residual accepted once progress stalls (precision floor)
    backend: str = "torch"      # resolved backend: "torch" (reference scans) or "triton" (seqpar.kernels)


def default_tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 4e-6


def precision_floor(dtype: torch.dtype) -> float:
    return 100 * torch.finfo(dtype).eps


def auto_chunk(structure: Structure, B: int, D: int, dtype: torch.dtype, budget: int = JACOBIAN_MEMORY_BUDGET) -> int:
    per_step = math.prod(structure.jac_shape((B,), D)) + 2 * B * D
    itemsize = torch.finfo(dtype).bits // 8
    return max(1, budget // (4 * per_step * itemsize))


def shift(h: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """``h_prev``: states shifted one step later, ``boundary`` first.  (n, B, D)."""
    return torch.cat([boundary.unsqueeze(0), h[:-1]], 0)


def sequential_states(cell, xp: torch.Tensor, h_in: torch.Tensor, out: Optional[torch.Tensor] = None):
    """Step-by-step evaluation (no autograd graph needed): states (n, B, D)."""
    n = xp.shape[0]
    out = xp.new_empty(n, *h_in.shape, dtype=h_in.dtype) if out is None else out
    h = h_in
    for t in range(n):
        h = cell.step(h, xp[t])
        out[t] = h
    return out


class _Linearisation:
    """(J, b) of the Newton step around the current iterate, recomputed per chunk."""

    def __init__(self, cell, structure: Structure, h_prev, xp, fval):
        self.cell, self.structure, self.h_prev, self.xp, self.fval = cell, structure, h_prev, xp, fval

    def __call__(self, s: int, e: int):
        hp = self.h_prev[s:e]
        J = self.cell.jacobian(hp, self.xp[s:e], self.structure)
        return J, self.fval[s:e] - self.structure.matvec(J, hp)


def incoming_state(gathered_A, gathered_c, h0, rank: int, structure: Structure):
    """Compose the summaries of ranks 0..rank-1 with h0: this rank's boundary."""
    h = h0
    for q in range(rank):
        h = structure.matvec(gathered_A[q], h) + gathered_c[q]
    return h


def _identity_summary(structure, B, D, like):
    return structure.identity((B,), D, like.dtype, like.device), like.new_zeros(B, D)


def newton_solve(cell, xp: torch.Tensor, h0: torch.Tensor, opts: NewtonOptions, comm: Communicator,
                 initial_guess: Optional[torch.Tensor] = None):
    """Solve the recurrence on this rank's shard.

    ``xp`` (n, B, P) projected inputs of the shard, ``h0`` (B, D) the global
    initial state (same on every rank).  Returns ``(states (n, B, D), info,
    boundary (B, D))`` where ``boundary`` is the state before the shard's first
    step (h0 on rank 0).
    """
    t_start = time.perf_counter()
    n = xp.shape[0]
    B, D = h0.shape
    st = opts.structure
    P, rank = comm.world_size, comm.rank
    chunk = opts.chunk_size or auto_chunk(st, B, D, h0.dtype)
    h = (initial_guess.to(h0.dtype).clone() if initial_guess is not None
         else h0.new_zeros(n, B, D))
    from .backend import fused_stepper, scan_function
    scan = scan_function(opts.backend)
    fused = fused_stepper(cell, st, xp, opts.backend, P) if n else None  # one pass: f, J, residual, scan

    if P > 1:  # boundary = previous rank's last state of the initial iterate
        last = h[-1] if n else h0
        lasts = comm.all_gather(torch.cat([last.reshape(-1), h0.new_tensor([float(n)])]))
        boundary = boundary_from_lasts(lasts, h0, rank, B, D)
        total_len = int(lasts[:, -1].sum())
    else:
        boundary = h0
        total_len = n

    residuals: List[float] = []
    best = math.inf
    since_best = 0
    converged = False
    err_t = h0.new_zeros(n)
    thr = math.inf
    it = 0
    while True:
        if fused is not None:
            h_next, stats = fused(h, boundary)
            local = stats[:1]
        else:
            h_prev = shift(h, boundary) if n else h
            fval = cell.step(h_prev, xp) if n else h
            err_t = step_residuals(h, fval) if n else h0.new_zeros(0)
            local = err_t.max().reshape(1) if n else h0.new_zeros(1)
            lin = _Linearisation(cell, st, h_prev, xp, fval)
        if P > 1:
            A, c = chunked_reduce(lin, n, st, chunk) if n else _identity_summary(st, B, D, h0)
            gathered = comm.all_gather(torch.cat([A.reshape(-1), c.reshape(-1), local]))
            all_res = gathered[:, -1]
        else:
            all_res = local
        res = math.nan if bool(torch.isnan(all_res).any()) else float(all_res.max())
        thr = opts.tol
        residuals.append(res)
        if opts.callback is not None:
            opts.callback(it, res)
        if res <= opts.tol:
            converged = True
            break
        prev = residuals[-2] if len(residuals) > 1 else math.inf
        if res <= opts.floor and res > 0.5 * prev:
            converged = True  # stalled at the precision floor: as exact as sequential evaluation
            thr = max(thr, opts.floor)
            break
        if not math.isfinite(res):
            break
        if res < 0.5 * best:
            best, since_best = res, 0
        else:
            since_best += 1
        if it >= opts.max_iter or since_best >= opts.patience:
            break
        if P > 1:
            nA = math.prod(st.jac_shape((B,), D))
            gA = gathered[:, :nA].reshape(P, *st.jac_shape((B,), D))
            gc = gathered[:, nA:nA + B * D].reshape(P, B, D)
            boundary = incoming_state(gA, gc, h0, rank, st)
        if fused is not None:
            h = h_next
        else:
            h = chunked_scan(lin, n, boundary, st, chunk, scan=scan) if n else h
        it += 1

    info = SolveInfo(converged=converged, iterations=it, residual=residuals[-1], residuals=residuals,
                     newton_converged=converged, jacobian=st.describe(), tol=opts.tol, world_size=P,
                     seq_len=total_len)
    if not converged:
        if fused is not None:  # per-step residuals of the final iterate (the fused pass keeps only the max)
            err_t = step_residuals(h, cell.step(shift(h, boundary), xp))
        h, boundary = _handle_non_convergence(cell, xp, h0, h, boundary, err_t, thr, opts, comm, info)
    info.wall_time_s = time.perf_counter() - t_start
    return h, info, boundary


def step_residuals(h: torch.Tensor, fval: torch.Tensor) -> torch.Tensor:
    """Relative residual of each step: ``max_{b,i} |h_t - f_t| / max(1, max_{b,i} |f_t|)``, shape (n,).

    NaN/Inf anywhere in a step makes its residual NaN or Inf (never "converged").
    """
    err = (h - fval).abs().amax(dim=(1, 2))
    return err / fval.abs().amax(dim=(1, 2)).clamp_min(1.0)


def repair_tail(cell, xp: torch.Tensor, h_in: torch.Tensor, opts: NewtonOptions, out: torch.Tensor,
                window: int = 256, min_window: int = 8, max_sequential_run: int = 4096) -> None:
    """Exact evaluation of ``n`` steps from ``h_in`` into ``out`` (n, B, D) by Newton on windows.

    Newton is run on a window of the remaining steps; a converged window is
    accepted whole and the next one doubles, a failed one keeps its converged
    prefix (exact: it satisfies the recurrence to tol) and the next one shrinks.
    Once windows shrink to ``min_window`` the steps are evaluated one by one, in
    runs that double each time Newton fails again (up to ``max_sequential_run``)
    and reset when it succeeds: on a chaotic system, where no window converges,
    the cost approaches plain sequential evaluation instead of paying a failed
    Newton attempt every few steps.  Progress is guaranteed; exact throughout.
    """
    from .comm import SINGLE

    n = xp.shape[0]
    inner = NewtonOptions(structure=opts.structure, tol=opts.tol, max_iter=opts.max_iter, fallback="none",
                          chunk_size=opts.chunk_size, patience=min(opts.patience, 5), floor=opts.floor,
                          backend=opts.backend)
    s, h = 0, h_in
    W = window
    seq_run = min_window
    while s < n:
        if W <= min_window:
            e = min(n, s + seq_run)
            sequential_states(cell, xp[s:e], h, out=out[s:e])
            seq_run = min(max_sequential_run, 2 * seq_run)
            W = 2 * min_window
        else:
            e = min(n, s + W)
            states, info, _ = newton_solve(cell, xp[s:e], h, inner, SINGLE)
            if info.converged:
                out[s:e] = states
                W *= 2
                seq_run = min_window
            else:
                e = s + (info.first_unconverged or 0)
                out[s:e] = states[:e - s]
                W = max(1, W // 4)
        if e > s:
            h = out[e - 1]
        s = e


def boundary_from_lasts(lasts, h0, rank, B, D):
    """Boundary of ``rank`` from gathered (last state, shard length) rows; empty shards pass through."""
    boundary = h0
    for q in range(rank):
        if float(lasts[q, -1]) > 0:
            boundary = lasts[q, :-1].reshape(B, D)
    return boundary


def _handle_non_convergence(cell, xp, h0, h, boundary, err_t, thr, opts, comm, info):
    """Keep the converged prefix, then evaluate the tail sequentially in rank order (exact)."""
    n = xp.shape[0]
    B, D = h0.shape
    P, rank = comm.world_size, comm.rank
    bad = ~(err_t <= thr)  # NaN counts as unconverged
    t0 = int(bad.nonzero()[0]) if bool(bad.any()) else n
    rows = comm.all_gather(h0.new_tensor([float(t0), float(n)]))
    t0s, lens = [int(v) for v in rows[:, 0].tolist()], [int(v) for v in rows[:, 1].tolist()]
    offsets = [sum(lens[:q]) for q in range(P)]
    first_bad = next((q for q in range(P) if t0s[q] < lens[q]), None)
    info.first_unconverged = None if first_bad is None else offsets[first_bad] + t0s[first_bad]
    if opts.fallback == "none":
        return h, boundary
    if opts.fallback == "raise":
        raise NotConvergedError(
            f"Newton did not converge: residual {info.residual:.3e} > tol {opts.tol:.3e} after "
            f"{info.iterations} iterations; converged prefix ends at t={info.first_unconverged}", info)
    info.fallback = "windowed-newton"
    steps = 0
    start = first_bad if first_bad is not None else P
    for q in range(start, P):
        if q == rank:
            begin = t0 if q == start else 0
            h_in = boundary if begin == 0 else h[begin - 1]
            if begin < n:
                h = h.clone()
                repair_tail(cell, xp[begin:], h_in, opts, out=h[begin:])
            steps = n - begin
        if q + 1 < P:
            last = h[-1] if n else boundary
            last = comm.broadcast(last.contiguous(), src=q)
            if rank == q + 1:
                boundary = last
    total = comm.all_reduce_sum(h0.new_tensor([float(steps)]))
    info.fallback_steps = int(total.item())
    # the repaired states are re-checked, not assumed: converged only if every step satisfies the recurrence
    final = step_residuals(h, cell.step(shift(h, boundary), xp)).max().reshape(1) if n else h0.new_zeros(1)
    final = comm.all_gather(final).reshape(-1)
    info.residual = math.nan if bool(torch.isnan(final).any()) else float(final.max())
    info.converged = info.residual <= max(opts.tol, opts.floor)
    return h, boundary
