"""What happens when Newton does not converge: keep the converged prefix, repair the tail exactly.

The steps whose residual is within ``tol`` satisfy the recurrence, so the
prefix up to the first unconverged step (over the whole sharded sequence) is
kept.  The tail is then evaluated exactly by :func:`repair_tail`, rank after
rank; the ranks waiting for an earlier rank's repair exchange heartbeats with
it (one tiny all-gather about every ``HEARTBEAT_S`` seconds), so a collective
timeout only fires on a rank that really hangs, not on a slow repair.
Finally the repaired states are re-checked: ``converged`` is set only if
every step satisfies the recurrence to ``tol``.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from .comm import SINGLE, Communicator
from .errors import NotConvergedError
from .shards import ShardLayout

HEARTBEAT_S = 1.0          # a repairing rank reports progress at least this often (between windows)
COST_FACTOR = 1.0          # repair time budget: this many times sequential evaluation of the steps done


def repair_tail(cell, xp: torch.Tensor, h_in: torch.Tensor, opts, out: torch.Tensor,
                heartbeat: Optional[Callable[[], None]] = None, window: int = 256,
                min_run: int = 8, max_run: int = 4096, clock: Callable[[], float] = time.perf_counter) -> None:
    """Exact evaluation of ``n`` steps from ``h_in`` into ``out`` (n, B, D), bounded in cost.

    Newton is tried on windows (a converged window is accepted whole and the
    next one doubles; a failed one keeps its converged prefix and the next one
    shrinks) only while the time spent stays within ``COST_FACTOR`` times what
    step-by-step evaluation of the steps done so far costs (its rate measured
    on the way); otherwise the steps are evaluated one by one, in runs that
    double while over budget.  So a chaotic or expanding system costs about
    ``COST_FACTOR`` times sequential evaluation (plus one window attempt), a
    system where Newton works on windows costs less.  Exact throughout.
    ``clock`` measures cost (wall time by default; tests pass a count of step evaluations).
    """
    from .newton import NewtonOptions, newton_solve, sequential_states

    n = xp.shape[0]
    inner = NewtonOptions(structure=opts.structure, tol=opts.tol, max_iter=opts.max_iter, fallback="none",
                          chunk_size=opts.chunk_size, patience=3, backend=opts.backend)
    s, h, W, run = 0, h_in, window, min_run
    seq_steps, seq_time, spent = 0, 0.0, 0.0
    last_beat = time.monotonic()
    while s < n:
        if heartbeat is not None and time.monotonic() - last_beat >= HEARTBEAT_S:
            heartbeat()
            last_beat = time.monotonic()
        t = clock()
        rate = seq_time / seq_steps if seq_steps else None
        within_budget = rate is not None and spent <= COST_FACTOR * rate * s
        if not within_budget:  # measure the sequential rate first, then pay back failed attempts
            e = min(n, s + run)
            sequential_states(cell, xp[s:e], h, out=out[s:e])
            dt = clock() - t
            seq_steps, seq_time = seq_steps + (e - s), seq_time + dt
            run = min(max_run, 2 * run)
        else:
            e = min(n, s + W)
            states, info, _ = newton_solve(cell, xp[s:e], h, inner, SINGLE)
            if info.converged:
                out[s:e] = states
                W *= 2
                run = min_run
            else:
                e = s + (info.first_unconverged or 0)
                out[s:e] = states[:e - s]
                W = max(min_run, W // 4)
        spent += clock() - t
        if e > s:
            h = out[e - 1]
        s = e


def _heartbeats(comm: Communicator, device):
    """(beat, done, wait_for): the heartbeat protocol.  Every call is one all-gather of one
    int64 per rank, so the ranks' calls pair up: the repairing rank beats 0 while it works and
    1 when done; the waiting ranks beat 0 until they see the 1."""
    def gather(flag: int):
        return comm.all_gather(torch.tensor([flag], dtype=torch.int64, device=device)).reshape(-1)

    def wait_for(q: int):
        while int(gather(0)[q]) == 0:
            pass

    return (lambda: gather(0)), (lambda: gather(1)), wait_for


def handle_non_convergence(cell, xp, h0, h, boundary, opts, comm: Communicator, layout: ShardLayout, info):
    """Keep the converged prefix, then evaluate the tail exactly in rank order; re-check everything."""
    from .newton import shift, step_residuals

    n = xp.shape[0]
    P, rank = comm.world_size, comm.rank
    err_t = step_residuals(h, cell.step(shift(h, boundary), xp)) if n else h0.new_zeros(0)
    bad = ~(err_t <= opts.tol)  # NaN counts as unconverged
    t0 = int(bad.nonzero()[0]) if bool(bad.any()) else n
    t0s = [t0] if P == 1 else [int(v) for v in comm.all_gather(
        torch.tensor([t0], dtype=torch.int64, device=h0.device)).reshape(-1).tolist()]
    first_bad = next((q for q in range(P) if t0s[q] < layout.lengths[q]), None)
    info.first_unconverged = None if first_bad is None else layout.offset_of(first_bad) + t0s[first_bad]
    if opts.fallback == "none":
        return h, boundary
    if opts.fallback == "raise":
        raise NotConvergedError(
            f"Newton did not converge: residual {info.residual:.3e} > tol {opts.tol:.3e} after "
            f"{info.iterations} iterations; converged prefix ends at t={info.first_unconverged}", info)
    info.fallback = "windowed-newton"
    steps = 0
    start = first_bad if first_bad is not None else P
    beat, done, wait_for = _heartbeats(comm, h0.device)
    for q in range(start, P):
        if q == rank:
            begin = t0 if q == start else 0
            h_in = boundary if begin == 0 else h[begin - 1]
            if begin < n:
                h = h.clone()
                repair_tail(cell, xp[begin:], h_in, opts, out=h[begin:], heartbeat=beat if P > 1 else None)
            steps = n - begin
            if P > 1:
                done()
        elif P > 1:
            wait_for(q)
        if q + 1 < P:
            last = h[-1] if n else boundary
            last = comm.broadcast(last.contiguous(), src=q)
            if rank == q + 1:
                boundary = last
    info.fallback_steps = steps if P == 1 else int(comm.all_reduce_sum(
        torch.tensor([steps], dtype=torch.int64, device=h0.device)).item())
    # the repaired states are re-checked, not assumed: converged only if every step satisfies the recurrence
    final = step_residuals(h, cell.step(shift(h, boundary), xp)).max().reshape(1) if n else h0.new_zeros(1)
    final = comm.all_gather(final).reshape(-1)
    info.residual = math.nan if bool(torch.isnan(final).any()) else float(final.max())
    info.converged = info.residual <= opts.tol
    return h, boundary
