"""The pipelined Newton loop: carries between passes instead of a look-back inside them.

For cells that offer a pipelined kernel (:meth:`seqpar.cells.Cell.pipelined_newton`:
:class:`~seqpar.cells.DiagGRU`, and the GRU with D <= 8), one Newton iteration is one
pass over the shard plus a small scan:

* the pass (:mod:`seqpar.kernels.pipelined_diag_gru`, :mod:`seqpar.kernels.pipelined_dense_gru`)
  reads the iterate ``h^k`` and applies its maps from per-run carries, writing
  ``h^{k+1}``; with ``h^{k+1}`` in registers it also returns the residual of ``h^{k+1}``
  and the per-run summaries ``(A, C)`` of the maps linearised at ``h^{k+1}``;
* the summaries are scanned from the shard's incoming state (``Pipeline.carries``):
  the carries of the next pass.  The diagonal kernel takes its runs in groups (one
  program's runs) and returns each group's prefix compositions, so only the group
  totals are scanned between passes (one small launch,
  :func:`seqpar.kernels.pipelined_diag_gru.scan_groups`) and the next pass starts
  each run from its group's carry; the small-D GRU kernel's per-run summaries are
  scanned by :func:`scan_runs`.

On P ranks each rank composes its run summaries into the shard summary
``(Phi, c)`` and all-gathers it with its residual; the exact incoming state of
every shard (``beta``) follows as in :func:`seqpar.newton.newton_solve`, and the
carries are scanned from it.  No incoming-state correction pass is needed: the
carries are exact before the pass that uses them.

Same iterates as the reference loop (to rounding): ``h^{k+1}`` solves the
recurrence linearised at ``h^k``, and the residual decides convergence of the
iterate it belongs to.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .phases import PhaseTimes
from .scan import jacobian_product
from .structure import Structure


# one rank: queue the next pass's carries before waiting for the residual (False: after it, as on P ranks)
EARLY_CARRIES = True


class Pipeline(NamedTuple):
    """A cell's pipelined kernel bound to its inputs (see :mod:`seqpar.kernels.pipelined_diag_gru`).

    ``first(h, boundary, next_start=None) -> PassResult`` summarises the maps at ``h`` (no new iterate);
    ``carries(res, start)``: what the next pass needs of ``res``'s summaries to start every run, the
    new iterate's state before step 0 being ``start`` (B, D);
    ``step(h, boundary, res, carries, start, out=None, next_start=None) -> PassResult`` computes the next
    iterate.  Given ``next_start`` (the next iterate's state before step 0, when known before the pass:
    one rank), a pass may return the next carries itself (``PassResult.carry``, not None) and
    ``carries`` is not called; ``first`` and ``step`` take ``stop`` (a :mod:`seqpar.kernels.stopping`
    state, or None): given, the pass does nothing once that state says stopped (:mod:`seqpar.graphs`);
    ``compose(res) -> (Phi, c)``: the shard's map ``x -> Phi x + c`` (Phi in ``structure``'s storage
    with leading dim B, c (B, D)), exchanged between ranks;
    ``structure``: that of the maps (DIAG or DENSE).
    """

    first: Callable
    carries: Callable
    step: Callable
    compose: Callable
    structure: Structure


def scan_runs(sum_a: torch.Tensor, sum_c: torch.Tensor, start: torch.Tensor, st: Structure) -> torch.Tensor:
    """Inclusive scan (n_runs, B, D) of per-run summaries from ``start`` (B, D): diagonal maps by
    :func:`seqpar.kernels.pipelined_diag_gru.scan_groups` (groups of one run), small dense D by
    :func:`seqpar.kernels.pipelined_dense_gru.scan_maps`, others by the Triton look-back scans."""
    from .backend import kernel_scan
    from .kernels import pipelined_dense_gru, pipelined_diag_gru

    n = sum_a.shape[0]
    B, D = start.shape
    if st.kind == "dense" and 2 <= D <= pipelined_dense_gru.MAX_D:
        return pipelined_dense_gru.scan_maps(sum_a, sum_c, start)
    if st.kind == "diag":
        runs = pipelined_diag_gru.PassResult(None, sum_a.reshape(n, B * D).contiguous(),
                                             sum_c.reshape(n, B * D).contiguous(), None, 1)
        return pipelined_diag_gru.scan_groups(runs, start).reshape(n, B, D)
    return kernel_scan(sum_a.reshape(n, *st.jac_shape((B,), D)), sum_c.reshape(n, B, D),
                       start.to(torch.float32), st)


def shard_summary(sum_a: torch.Tensor, sum_c: torch.Tensor, st: Structure, B: int, D: int):
    """``(Phi, c)``: the composition of all per-run summaries (the shard's map ``x -> Phi x + c``;
    identity for an empty shard), Phi in ``st``'s storage with leading dim B, c (B, D)."""
    if sum_a.shape[0] == 0:
        return st.identity((B,), D, sum_a.dtype, sum_a.device), sum_a.new_zeros(B, D)
    c = scan_runs(sum_a, sum_c, sum_a.new_zeros(B, D), st)[-1]
    return jacobian_product(sum_a.reshape(sum_a.shape[0], *st.jac_shape((B,), D)), st), c


def pipelined_iterations(pipe: Pipeline, h: torch.Tensor, boundary: torch.Tensor, h0: torch.Tensor,
                         comm, stopping, exchange, phases: Optional[PhaseTimes] = None) -> tuple:
    """Newton iterations on this rank's shard ``h`` (n, B, D) with ``boundary`` (B, D) its state before
    step 0, until ``stopping.record(it, residual)`` says stop.

    ``exchange`` (:class:`seqpar.newton.SummaryExchange`, for ``pipe.structure``) all-gathers the shard
    summaries when P > 1.  Returns ``(h, boundary, iterations)``: the last iterate and its state
    before step 0; ``phases`` (:class:`seqpar.phases.PhaseTimes`) times its parts.

    On one rank every iterate starts from h0, known before the residual is: the next pass's carries are
    queued right after the pass, before the host waits for the residual, so that after the wait only the
    next pass's own launch stands between two passes (after the last pass they are not needed: a few
    microseconds of device time).  On P ranks the carries wait for the exchanged incoming state."""
    n, B, D = h.shape
    P = comm.world_size
    dtype = h.dtype
    phases = phases or PhaseTimes(mode="")
    fused_start = h0 if P == 1 else None  # one rank: every iterate starts from h0, known before each pass

    def carries_from(res, start):
        """The next pass's carries: the pass's own (fused) or a scan of its summaries from ``start``."""
        carries = res.carry if res.carry is not None else pipe.carries(res, start)
        phases.mark("carries")
        return carries

    def early_carries(res):
        return carries_from(res, h0) if P == 1 and n and EARLY_CARRIES else None

    cur = pipe.first(h, boundary, next_start=fused_start)
    phases.mark("pass")
    carries = early_carries(cur)
    spare: Optional[torch.Tensor] = None
    it = 0
    while True:
        if P > 1:
            summary = pipe.compose(cur)
            phases.mark("compose")
            all_res = exchange.gather(*summary, cur.stats[:1])
        else:
            all_res = cur.stats[0]
        res = float(all_res.max() if all_res.dim() else all_res)  # one host sync per iteration
        phases.mark("exchange")
        if stopping.record(it, res):
            break
        if P > 1:
            start = exchange.incoming().to(dtype)
            phases.mark("incoming")
        else:
            start = h0
        if n:
            if carries is None:
                carries = carries_from(cur, start)
            cur = pipe.step(h, boundary, cur, carries, start, out=spare, next_start=fused_start)
            phases.mark("pass")
            h, spare = cur.out, h
            carries = early_carries(cur)
        boundary = start
        it += 1
    return h, boundary, it
