"""Newton's iteration over the whole (sharded) sequence: one iteration shape for 1 or P ranks.

Every rank holds a contiguous time shard [0, n) of the sequence.  One
iteration, linearised around the current iterate h^k (docs/design.md):

1. **local pass** (one fused kernel where the cell offers one, else the torch
   reference): with ``boundary`` = h^k of the step before the shard,
   ``h_prev = [boundary, h[:-1]]``, ``f = f(h_prev, u)``, ``J = df/dh_prev``,
   ``b = f - J h_prev``, the residual of h^k, and the scan
   ``out_t = J_t out_{t-1} + b_t`` from a *guessed* incoming state ``start``
   (the current boundary).  With P > 1 the pass also returns the shard's
   composed Jacobian Phi = J_{n-1} ... J_0.
2. **exchange** (P > 1): one all-gather of (Phi, out_last - Phi start,
   residual); each rank composes the summaries of the ranks before it with h0:
   the exact incoming state beta of the new iterate (= the previous rank's new
   last state, so it is also the next iteration's ``boundary``).
3. **correction**: the exact new iterate is ``out_t + Phi_t (beta - start)``
   with Phi_t the running Jacobian product.  ``Phi_t (beta - start)`` is
   applied on the prefix of the shard where it is larger than a hundredth of
   the dtype's epsilon (for a contracting cell a few hundred steps); if that
   prefix grows past ``CORRECTION_CAP`` the pass is simply rerun from beta.
   So the iterate is Newton's own, to rounding: the same iterations and
   residuals on 1 and P ranks.

One rank is P = 1: ``start`` is h0, exact, and steps 2-3 vanish.

If Newton stalls, diverges or hits ``max_iter``, :mod:`seqpar.fallback` keeps
the converged prefix and repairs the tail exactly, or reports
``converged=False`` / raises, as the caller asked.  ``converged`` always means
that every step satisfies ``|h - f| <= tol * max(1, |f|)`` elementwise.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import graphs
from .comm import Communicator
from .phases import PhaseTimes
from .pipeline import pipelined_iterations
from .scan import chunked_scan
from .shards import ShardLayout, gather_boundary
from .structure import Structure

FALLBACKS = ("sequential", "raise", "none")
JACOBIAN_MEMORY_BUDGET = 256 * 2**20  # bytes of Jacobians alive per chunk (with scan temporaries), CPU
# on a GPU: a larger budget, so few chunks (each chunk costs tens of kernel launches; at 256 MiB a dense
# neural-ODE solve was bound by launch overhead: 1.94 s -> 0.46 s at T=100k, D=16, benchmarks/results)
JACOBIAN_MEMORY_BUDGET_CUDA = 2 * 2**30
CORRECTION_FIRST = 256                # steps of the first correction chunk (doubles each chunk)
CORRECTION_CAP_FRACTION = 8           # correct at most n / 8 steps (and at least CORRECTION_MIN_CAP), else rerun
CORRECTION_MIN_CAP = 8192
PIPELINED = True                      # use a cell's pipelined kernel (seqpar.pipeline) where it has one ...
# ... for sequences of at least this many states (T * B * D of the whole sequence, the same on every rank):
# below it the look-back kernel's single launch per iteration wins (host-bound).  Run 31 (H200) put this at
# 2^22 (GRU(1, 1), B=16, T=100k: 0.96 ms look-back vs 1.08 ms pipelined).  Since the pipelined pass got
# faster and one-rank solves replay CUDA graphs (seqpar.graphs), run 55 measured that solve at 1.25 ms
# pipelined vs 1.55 ms look-back eager, 0.58 vs 0.85 ms with graphs: 2^20.
PIPELINE_MIN_ELEMENTS = 2**20
# the first pass of a solve without an initial guess runs the fused step's ``from_zeros`` (the iterate is zero:
# the dense GRU's quasi-Newton pass needs no recurrent GEMM), where the cell has one; False: the plain step
ZERO_FIRST_PASS = True


@dataclass
class SolveInfo:
    """What a solve did.  Residuals: ``max over steps and elements of |h_t - f(h_{t-1}, u_t)| / max(1, |f|)``."""

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
    exchange_s: float = 0.0   # wall time inside the all-gather calls: includes waiting for the slowest rank and, on
    #                           GPUs (asynchronous), for this rank's own pass to finish; not pure communication
    corrected_steps: int = 0  # steps touched by incoming-state corrections on this rank (all iterations)
    reruns: int = 0           # local passes rerun because the correction would have covered too much
    phase_s: Dict[str, float] = field(default_factory=dict)  # seconds per phase with SEQPAR_PHASE_TIMES set
    #                                                          (seqpar.phases); empty otherwise
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
    backend: str = "torch"      # resolved backend: "torch" (reference scans) or "triton" (seqpar.kernels)
    first_sync_check: Optional[Callable[[], None]] = None  # called (may raise) once the first residual is known
    cell_key: Optional[tuple] = None  # validation.tensors_key of the cell's tensors, where the caller has it


def default_tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 4e-6


def min_tol(dtype: torch.dtype) -> float:
    """The smallest tolerance a solve in ``dtype`` is allowed to ask for (a few ulps of a unit value)."""
    return 8 * torch.finfo(dtype).eps


def correction_threshold(dtype: torch.dtype) -> float:
    """Incoming-state corrections below this (times max(1, |beta|)) are dropped: far below rounding."""
    return 1e-2 * torch.finfo(dtype).eps


def jacobian_memory_budget(device=None) -> int:
    """Bytes of Jacobians a chunk may hold on ``device``: JACOBIAN_MEMORY_BUDGET on CPU; on a GPU the
    larger JACOBIAN_MEMORY_BUDGET_CUDA, capped at 1/32 of the card's memory."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return JACOBIAN_MEMORY_BUDGET
    total = _card_memory(device.index if device.index is not None else torch.cuda.current_device())
    return max(JACOBIAN_MEMORY_BUDGET, min(JACOBIAN_MEMORY_BUDGET_CUDA, total // 32))


@functools.lru_cache(maxsize=None)
def _card_memory(index: int) -> int:
    """Total memory of CUDA device ``index`` (asked once: ~15 us per query, every solve asks)."""
    return torch.cuda.get_device_properties(index).total_memory


def auto_chunk(structure: Structure, B: int, D: int, dtype: torch.dtype, budget: Optional[int] = None,
               device=None) -> int:
    """Steps per chunk of the torch (reference-Jacobian) path: ``budget`` bytes (default
    :func:`jacobian_memory_budget` of ``device``) over the per-step Jacobian and scan temporaries."""
    if budget is None:  # the usual call: the same few arguments every solve (host time of short solves)
        return _auto_chunk_cached(structure, B, D, dtype, device, JACOBIAN_MEMORY_BUDGET, JACOBIAN_MEMORY_BUDGET_CUDA)
    return _auto_chunk(structure, B, D, dtype, budget)


@functools.lru_cache(maxsize=256)
def _auto_chunk_cached(structure: Structure, B: int, D: int, dtype: torch.dtype, device, *budgets) -> int:
    """``auto_chunk`` at the default budget; ``budgets``: the module's budget constants (part of the key)."""
    return _auto_chunk(structure, B, D, dtype, jacobian_memory_budget(device))


def _auto_chunk(structure: Structure, B: int, D: int, dtype: torch.dtype, budget: int) -> int:
    per_step = math.prod(structure.jac_shape((B,), D)) + 2 * B * D
    itemsize = torch.finfo(dtype).bits // 8
    return max(1, budget // (4 * per_step * itemsize))


def projected_inputs(cell, inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``xp``: the cell's projection of ``inputs`` (n, B, I), computed and returned in ``dtype``."""
    return cell.project_inputs(inputs.to(dtype)).to(dtype)


def shift(h: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """``h_prev``: states shifted one step later, ``boundary`` first.  (n, B, D)."""
    return torch.cat([boundary.unsqueeze(0), h[:-1]], 0)


def step_residuals(h: torch.Tensor, fval: torch.Tensor) -> torch.Tensor:
    """Relative residual of each step, elementwise-scaled: ``max_{b,i} |h - f| / max(1, |f|)``, shape (n,).

    Every component is held to its own scale, so a large component or sequence
    cannot hide the error of a small one.  NaN/Inf make a step's residual NaN or Inf.
    """
    return ((h - fval).abs() / fval.abs().clamp_min(1.0)).amax(dim=(1, 2))


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
    """Compose the summaries of ranks 0..rank-1 with h0: this rank's incoming state."""
    h = h0
    for q in range(rank):
        h = structure.matvec(gathered_A[q], h) + gathered_c[q]
    return h


class SummaryExchange:
    """The one all-gather per iteration of a multi-rank solve (P > 1): every rank's shard summary
    ``(Phi, c)`` (``x -> Phi x + c``, Phi in ``st``'s storage with leading dim B) and residual; then the
    exact incoming state of this rank's shard.  The time spent in the all-gather goes to
    ``info.exchange_s``."""

    def __init__(self, comm: Communicator, st: Structure, h0: torch.Tensor, info: "SolveInfo"):
        self.comm, self.st, self.h0, self.info = comm, st, h0, info
        B, D = h0.shape
        self.nA = math.prod(st.jac_shape((B,), D))
        self.gathered: Optional[torch.Tensor] = None

    def gather(self, phi: torch.Tensor, c: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """All-gather this rank's ``(Phi, c, residual)``; returns every rank's residual (P,)."""
        dt = self.h0.dtype
        t_x = time.perf_counter()
        self.gathered = self.comm.all_gather(torch.cat([phi.reshape(-1).to(dt), c.reshape(-1).to(dt),
                                                        res.reshape(1).to(dt)]))
        self.info.exchange_s += time.perf_counter() - t_x
        return self.gathered[:, -1]

    def incoming(self) -> torch.Tensor:
        """This rank's exact incoming state (B, D), from the last gathered summaries."""
        B, D = self.h0.shape
        P, nA = self.comm.world_size, self.nA
        gA = self.gathered[:, :nA].reshape(P, *self.st.jac_shape((B,), D))
        gc = self.gathered[:, nA:nA + B * D].reshape(P, B, D)
        return incoming_state(gA, gc, self.h0, self.comm.rank, self.st)


class LocalPass:
    """This rank's part of one Newton iteration, on the cell's fused kernel or the torch reference.

    ``__call__(h, boundary, start, out, want_summary) -> (out, residual, Phi)``:
    ``h`` (n, B, D) the iterate, ``boundary`` (B, D) its state before step 0,
    ``start`` (B, D) the scan's incoming state; ``out`` (n, B, D) receives the
    scanned states; ``residual`` a 1-element tensor (elementwise relative
    residual of ``h``); ``Phi`` the shard's Jacobian product (structure storage,
    leading dim B) if ``want_summary`` else None.  ``zero_iterate``: ``h`` is zero
    at every step (the fused step's ``from_zeros`` runs, where the cell has one).
    """

    def __init__(self, cell, xp: torch.Tensor, opts: NewtonOptions, chunk: int):
        from .backend import fused_stepper, scan_function

        self.cell, self.xp, self.st, self.chunk = cell, xp, opts.structure, chunk
        self.scan = scan_function(opts.backend)
        self.fused = fused_stepper(cell, self.st, xp, opts.backend) if xp.shape[0] else None

    def __call__(self, h, boundary, start, out=None, want_summary: bool = False, zero_iterate: bool = False):
        if self.fused is not None:
            step = getattr(self.fused, "from_zeros", self.fused) if zero_iterate else self.fused
            res = step(h, boundary, start, out=out, want_summary=want_summary)
            out, stats = res[0], res[1]
            phi = res[2].to(h.dtype) if want_summary else None
            return out, stats[:1].to(h.dtype), phi
        h_prev = shift(h, boundary)
        fval = self.cell.step(h_prev, self.xp)
        err = step_residuals(h, fval).max().reshape(1)
        lin = _Linearisation(self.cell, self.st, h_prev, self.xp, fval)
        out, phi = chunked_scan(lin, h.shape[0], start, self.st, self.chunk, out=out, scan=self.scan,
                                product=want_summary)
        return out, err, phi

    def jacobians(self, h, boundary, s: int, e: int):
        """J_t for t in [s, e), linearised around the iterate ``h`` (the J the pass used)."""
        hp = shift(h[s:e], boundary if s == 0 else h[s - 1])
        return self.cell.jacobian(hp, self.xp[s:e], self.st)

    def correct(self, h, boundary, out, start, beta, info: "SolveInfo") -> None:
        """Make ``out`` (scanned from ``start``) the scan from ``beta``: ``out_t += Phi_t (beta - start)``.

        Applied chunk by chunk from the shard's start until the correction falls
        below :func:`correction_threshold`; past ``CORRECTION_CAP`` the pass is rerun.
        """
        n = h.shape[0]
        if n == 0:
            return
        e_in = beta - start
        tiny = correction_threshold(h.dtype) * max(1.0, float(beta.abs().max()))
        if float(e_in.abs().max()) <= tiny:
            return
        cap = max(CORRECTION_MIN_CAP, n // CORRECTION_CAP_FRACTION)
        s, L = 0, CORRECTION_FIRST
        while s < n:
            if s >= cap:
                info.reruns += 1
                self(h, boundary, beta, out=out)
                return
            e = min(n, s + L)
            J = self.jacobians(h, boundary, s, e)
            if self.st.kind == "diag":
                corr = torch.cumprod(J, 0) * e_in
            else:
                corr = self.scan(J, torch.zeros_like(out[s:e]), e_in, self.st)
            out[s:e] += corr.to(out.dtype)
            info.corrected_steps += e - s
            e_in = corr[-1]
            if float(e_in.abs().max()) <= tiny:
                return
            s, L = e, 2 * L


def newton_solve(cell, xp: Optional[torch.Tensor], h0: torch.Tensor, opts: NewtonOptions, comm: Communicator,
                 initial_guess: Optional[torch.Tensor] = None, inputs: Optional[torch.Tensor] = None):
    """Solve the recurrence on this rank's shard.

    ``xp`` (n, B, P) projected inputs of the shard, ``h0`` (B, D) the global
    initial state (same on every rank).  Or ``xp=None`` and ``inputs`` (n, B, I)
    in h0's dtype: projected here by ``cell.project_inputs`` (inside the captured
    graphs where :mod:`seqpar.graphs` replays the solve).  Returns ``(states (n, B, D), info,
    boundary (B, D))`` where ``boundary`` is the state before the shard's first
    step (h0 on rank 0).
    """
    from .backend import pipelined_stepper
    from .fallback import handle_non_convergence

    t_start = time.perf_counter()
    phases = PhaseTimes(h0.device)
    src = xp if xp is not None else inputs  # what a graphed loop copies in (it projects inputs itself)
    n = src.shape[0]
    B, D = h0.shape
    st = opts.structure
    P = comm.world_size
    chunk = opts.chunk_size or auto_chunk(st, B, D, h0.dtype, device=h0.device)
    layout = ShardLayout.exchange(comm, n, h0.device)
    info = SolveInfo(converged=False, iterations=0, residual=math.nan, jacobian=st.describe(), tol=opts.tol,
                     world_size=P, seq_len=layout.total)
    stopping = _Stopping(opts, info)
    pipelined = PIPELINED and layout.total * B * D >= PIPELINE_MIN_ELEMENTS
    graphed = graphs.graphed_loop(cell, st, xp, h0, opts, chunk, pipelined, inputs) if P == 1 else None
    if graphed is not None:  # one rank, a short solve seen before: its iterations replayed from CUDA graphs
        h, boundary, it = graphed.run(src, h0, initial_guess, stopping, phases)
    else:
        pipe = None
        if xp is None and pipelined:  # a kernel that projects the inputs itself: no xp at all
            pipe = pipelined_stepper(cell, st, inputs, opts.backend, raw_inputs=True)
        if xp is None and pipe is None:
            xp = projected_inputs(cell, inputs, h0.dtype)
        h = initial_guess.to(h0.dtype).clone() if initial_guess is not None else h0.new_zeros(n, B, D)
        boundary = gather_boundary(comm, h, h0)  # the initial iterate's state before this shard
        if pipe is None and pipelined:
            pipe = pipelined_stepper(cell, st, xp, opts.backend)
        phases.mark("setup")
        if pipe is not None:
            h, boundary, it = pipelined_iterations(pipe, h, boundary, h0, comm, stopping,
                                                   SummaryExchange(comm, pipe.structure, h0, info), phases)
        else:
            h, boundary, it = _iterations(LocalPass(cell, xp, opts, chunk), h, boundary, h0, st, comm, stopping,
                                          SummaryExchange(comm, st, h0, info), info, phases,
                                          zero_first=ZERO_FIRST_PASS and initial_guess is None)
    info.iterations = it
    info.residual = info.residuals[-1]
    if info.converged and P > 1:
        # the boundary came from composed summaries: check the first step against the state the
        # previous rank actually holds (agrees to ~1e-2 eps; a mismatch is never reported as converged)
        actual = gather_boundary(comm, h, h0)
        if n:  # (xp is None where the passes projected the raw inputs themselves)
            xp0 = xp[0] if xp is not None else projected_inputs(cell, inputs[:1], h0.dtype)[0]
            first = step_residuals(h[:1], cell.step(actual, xp0).unsqueeze(0)).reshape(1)
        else:
            first = h0.new_zeros(1)
        worst = float(comm.all_gather(first).max())
        boundary = actual
        if not worst <= opts.tol:
            info.converged = False
            info.residual = max(info.residual, worst) if math.isfinite(worst) else math.nan
    info.newton_converged = info.converged
    if not info.converged:
        if xp is None:
            xp = projected_inputs(cell, inputs, h0.dtype)
        h, boundary = handle_non_convergence(cell, xp, h0, h, boundary, opts, comm, layout, info)
    phases.mark("finish")
    info.phase_s = phases.times
    info.wall_time_s = time.perf_counter() - t_start
    return h, info, boundary


def _iterations(local: "LocalPass", h, boundary, h0, st: Structure, comm: Communicator, stopping: "_Stopping",
                exchange: SummaryExchange, info: SolveInfo, phases: Optional[PhaseTimes] = None,
                zero_first: bool = False):
    """The reference loop (any cell): local pass from the guessed incoming state, exchange, correction.
    Returns ``(h, boundary, iterations)``; ``phases`` (:class:`seqpar.phases.PhaseTimes`) times its parts;
    ``zero_first``: the first iterate ``h`` is zero at every step."""
    phases = phases or PhaseTimes(mode="")
    n, B, D = h.shape
    P = comm.world_size
    spare: Optional[torch.Tensor] = None
    it = 0
    while True:
        start = boundary  # rank 0: h0, exact; others: a guess, corrected after the exchange
        out, res_local, phi = local(h, boundary, start, out=spare, want_summary=P > 1,
                                    zero_iterate=zero_first and it == 0) if n else \
            (h, h0.new_zeros(1), st.identity((B,), D, h0.dtype, h0.device) if P > 1 else None)
        phases.mark("pass")
        if P > 1:
            c = (out[-1] - st.matvec(phi, start)) if n else h0.new_zeros(B, D)
            all_res = exchange.gather(phi, c, res_local)
        else:
            all_res = res_local
        res = float(all_res.max() if P > 1 else all_res)  # one host sync per iteration; max propagates NaN
        phases.mark("exchange")
        if stopping.record(it, res):  # one element on one rank: no reduction launch
            break
        if P > 1:
            beta = exchange.incoming()
            phases.mark("incoming")
            local.correct(h, boundary, out, start, beta, info)
            phases.mark("correct")
            boundary = beta
        if n:
            h, spare = out, h
        it += 1
    return h, boundary, it


class _Stopping:
    """When to stop iterating, from the residual of each iterate: converged (``<= tol``), not
    finite, ``max_iter`` iterations, or ``patience`` iterations without halving the best residual."""

    def __init__(self, opts: NewtonOptions, info: SolveInfo):
        self.opts, self.info = opts, info
        self.best, self.since_best = math.inf, 0

    def record(self, it: int, res: float) -> bool:
        """Log the residual of iterate ``it``; True to stop (``info.converged`` set if it converged).
        The first call runs ``opts.first_sync_check`` (a deferred argument check) before anything else."""
        if self.opts.first_sync_check is not None:
            check, self.opts.first_sync_check = self.opts.first_sync_check, None
            check()
        self.info.residuals.append(res)
        if self.opts.callback is not None:
            self.opts.callback(it, res)
        if res <= self.opts.tol:
            self.info.converged = True
            return True
        if not math.isfinite(res):
            return True
        if res < 0.5 * self.best:
            self.best, self.since_best = res, 0
        else:
            self.since_best += 1
        return it >= self.opts.max_iter or self.since_best >= self.opts.patience
