"""``seqpar.solve``: the user-facing entry point."""
from __future__ import annotations

import time
import zlib
from typing import Callable, Optional

import torch

from .autograd import SolveFunction
from .cells import Cell
from .distributed import get_communicator
from .backend import resolve_backend
from .newton import FALLBACKS, NewtonOptions, SolveInfo, default_tol, min_tol, projected_inputs
from .validation import (METHODS, cell_tensors, check_cell_tensors_finite, trusted_step, check_declared_structure,
                         check_options, check_solve_args, check_step_output, compute_dtype, is_exact,
                         resolve_jacobian)

DEFAULT_MAX_ITER_NEWTON = 50
DEFAULT_MAX_ITER_QUASI = 200


def solve(cell, inputs: torch.Tensor, h0: Optional[torch.Tensor] = None, *, jacobian="auto",
          tol: Optional[float] = None, max_iter: Optional[int] = None,
          initial_guess: Optional[torch.Tensor] = None, return_info: bool = False,
          method: str = "newton", fallback: str = "sequential", chunk_size: Optional[int] = None,
          group=None, callback: Optional[Callable[[int, float], None]] = None, backend: str = "auto",
          batch_first: bool = False):
    """Evaluate ``h_t = cell(h_{t-1}, u_t)`` for all t in parallel over time.

    Args:
        cell: a :class:`seqpar.cells.Cell` (holds the parameters).
        inputs: (T, B, D_in) time-major inputs by default (time first, as ``torch.nn.GRU``'s default);
            (B, T, D_in) with ``batch_first=True`` (under ``group``: this rank's time shard).
        h0: (B, D) initial state, zeros if None (under ``group``: the same on every rank).
        jacobian: Newton's linearisation: "auto" (the cell's exact structure),
            "dense" (exact Newton, DEER), "diag" (exact for diagonal cells,
            quasi-Newton otherwise), "block" / "block:k" (k x k blocks).
        tol: convergence tolerance: converged means ``|h_t - f(h_{t-1}, u_t)| <= tol *
            max(1, |f(h_{t-1}, u_t)|)`` for every element of every step; default 1e-12 for
            float64, 4e-6 otherwise; at least 8 ulp of the compute dtype.
        max_iter: Newton iteration cap (default 50, or 200 for quasi-Newton).
        initial_guess: (T, B, D) warm start (e.g. the previous training step's states); (B, T, D) with
            ``batch_first=True``.
        return_info: also return a :class:`SolveInfo`.
        method: "newton" or "sequential" (step-by-step reference, autograd through the loop).
        fallback: when Newton does not converge: "sequential" (keep the converged
            prefix, evaluate the rest step by step: exact, ``converged=True``),
            "none" (return the iterate with ``converged=False``) or "raise"
            (:class:`seqpar.NotConvergedError`).
        chunk_size: time steps per chunk of recomputed Jacobians (default: from a
            256 MiB budget).
        group: torch.distributed process group / 1-D DeviceMesh / mpi4py communicator /
            :class:`seqpar.comm.Communicator` over which the time axis is sharded.
        callback: ``callback(iteration, residual)`` called every Newton iteration, in order.  A short
            one-GPU solve replayed from CUDA graphs (:mod:`seqpar.graphs`) runs its queued iterations
            first and then calls it for each.
        backend: "auto" (Triton kernels for CUDA tensors when triton is installed,
            the pure-PyTorch reference otherwise), "triton" (force the kernels:
            error if they cannot run) or "torch" (force the reference).
        batch_first: False (default): ``inputs``, ``initial_guess`` and the states are time-major
            (T, B, ...); True: batch-major (B, T, ...), as ``torch.nn.GRU(batch_first=True)``.

    Returns:
        states (T, B, D) in the dtype of ``inputs`` ((B, T, D) with ``batch_first=True``), and the
        SolveInfo if ``return_info``.
        Gradients flow to ``inputs``, ``h0`` and the cell's parameters through the
        adjoint scan.
    """
    t0 = time.perf_counter()
    comm = get_communicator(group)
    error = None
    fingerprint = None
    pending_finite = None
    cell_key = None
    try:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}; got {fallback!r}")
        check_options(tol, max_iter, chunk_size, callback)
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be True or False; got {batch_first!r}")
        # one rank, Newton, a built-in cell: the NaN / Inf check of the tensors waits for the first residual
        # sync instead of a sync of its own (ranks of a group must agree on errors before the solve)
        defer = comm.world_size == 1 and method == "newton" and isinstance(cell, Cell) and trusted_step(cell)
        # the cell's parameters, walked once per solve (each walk of a module tree costs host time)
        named_params, named_buffers = cell_tensors(cell) if isinstance(cell, Cell) else (None, None)
        h0, pending_finite = check_solve_args(cell, inputs, h0, initial_guess, allow_empty=comm.world_size > 1,
                                              batch_first=batch_first, defer_finite=defer, named_params=named_params)
        if batch_first:  # everything below is time-major
            inputs = inputs.transpose(0, 1)
            if initial_guess is not None:
                initial_guess = initial_guess.transpose(0, 1)
        structure = resolve_jacobian(jacobian, cell)
        resolved_backend = resolve_backend(backend, inputs.device if torch.is_tensor(inputs) else "cpu")
        cell_key = check_cell_tensors_finite(cell, named_params, named_buffers)
        needs_grad = torch.is_grad_enabled() and (
            inputs.requires_grad or h0.requires_grad or any(p.requires_grad for _, p in named_params))
        if torch.is_grad_enabled() and method == "newton" and hasattr(cell, "check_captured"):
            cell.check_captured()  # captured tensors requiring grad would get no gradient from the adjoint
        if method == "sequential" and comm.world_size > 1 and needs_grad:
            raise ValueError("method='sequential' under a sequence group (group=...) does not propagate gradients "
                             "across ranks: use method='newton' (exact gradients), or call it under "
                             "torch.no_grad() for a forward-only reference")
        _check_first_steps(cell, inputs, h0, method)
        if comm.world_size > 1:
            fingerprint = rank_fingerprint(cell, inputs, h0, structure=structure, method=method, fallback=fallback,
                                           backend=backend, tol=tol, max_iter=max_iter, needs_grad=needs_grad)
    except Exception as e:  # noqa: BLE001 - re-raised on this rank, reported to the others
        error = e
    comm.agree(error)
    if comm.world_size > 1:
        check_ranks_agree(comm, fingerprint)

    if method == "sequential":
        states = sequential_solve(cell, inputs, h0, comm)
        info = SolveInfo(converged=True, iterations=0, residual=0.0, newton_converged=False,
                         method="sequential", jacobian="none", seq_len=inputs.shape[0],
                         world_size=comm.world_size, wall_time_s=time.perf_counter() - t0)
        if batch_first:
            states = states.transpose(0, 1)
        return (states, info) if return_info else states

    cdt = compute_dtype(inputs.dtype)
    exact = is_exact(structure, cell.structure, cell.state_size)
    opts = NewtonOptions(
        structure=structure,
        tol=float(tol) if tol is not None else default_tol(cdt),
        max_iter=max_iter if max_iter is not None else (DEFAULT_MAX_ITER_NEWTON if exact else DEFAULT_MAX_ITER_QUASI),
        fallback=fallback, chunk_size=chunk_size, callback=callback, backend=resolved_backend,
        first_sync_check=pending_finite, cell_key=cell_key,
    )
    if opts.tol < min_tol(cdt):  # same on every rank (dtype and tol agree), so no rank is left waiting
        raise ValueError(f"tol={opts.tol:g} is below what {cdt} arithmetic can reach (min {min_tol(cdt):.1e}); "
                         f"use a larger tol or float64 inputs")
    params = [p for _, p in named_params if p.requires_grad]
    info_out: list = []
    args = (cell, opts, comm, info_out, inputs, h0, initial_guess, *params)
    if torch.is_grad_enabled() and (inputs.requires_grad or h0.requires_grad or params):
        states = SolveFunction.apply(*args)
    else:
        with torch.no_grad():
            states = SolveFunction.forward(_NoCtx(), *args)
    info = info_out[0]
    info.wall_time_s = time.perf_counter() - t0
    if batch_first:
        states = states.transpose(0, 1)
    return (states, info) if return_info else states


FIRST_STEPS_CHECKED = 4


def _check_first_steps(cell, inputs, h0, method):
    """Once per solve, on at most ``FIRST_STEPS_CHECKED`` steps: the step function's output
    shape / dtype, and (Newton) the declared Jacobian structure of AD-differentiated cells."""
    if inputs.shape[0] == 0 or trusted_step(cell):  # built-in cells: nothing to probe (saves ~10 launches)
        return
    cdt = compute_dtype(inputs.dtype)
    with torch.no_grad():
        xp = cell.project_inputs(inputs[:FIRST_STEPS_CHECKED].detach().to(cdt)).to(cdt)
        hh = h0.detach().to(cdt)
    check_step_output(cell, hh, xp[0])
    if method == "newton":
        check_declared_structure(cell, hh, xp, steps=FIRST_STEPS_CHECKED)


# --------------------------------------------------------------- ranks must agree
_FP_FIELDS = ("state size", "batch size", "dtype", "input size", "cell type", "jacobian", "cell structure",
              "method", "fallback", "backend", "tol", "max_iter", "gradient tracking (requires_grad / grad mode)",
              "number of cell parameters", "h0", "h0", "cell parameters", "cell parameters")
_FP_SCALE = {14: 18, 15: 18, 16: 19, 17: 19}  # checksum field -> field holding its scale (sum of |x|)
_FP_LEN = len(_FP_FIELDS) + 3  # + two scales + the local sequence length
_DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.bfloat16: 3}


def _code(text) -> float:
    return float(zlib.crc32(str(text).encode()))  # deterministic across processes (unlike hash())


def _checksums(tensors, device):
    """(sum, weighted sum, sum |x|) of the tensors' values in float64, in 1M-element chunks."""
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    off = 0
    for t in tensors:
        flat = t.detach().reshape(-1)
        for s in range(0, flat.numel(), 1 << 20):
            x = flat[s:s + (1 << 20)].to(device=device, dtype=torch.float64)
            w = (torch.arange(off + s, off + s + x.numel(), dtype=torch.float64, device=device)
                 * 0.7548776662466927) % 1.0 + 0.5
            tot += torch.stack([x.sum(), (x * w).sum(), x.abs().sum()])
        off += flat.numel()
    return tot


def rank_fingerprint(cell, inputs, h0, *, structure, method, fallback, backend, tol, max_iter, needs_grad):
    """A fixed-length float64 vector describing this rank's call (what the ranks must agree on)."""
    dev = h0.device
    params = list(cell.parameters())
    hc = _checksums([h0], dev)
    pc = _checksums(params, dev)
    head = torch.tensor([
        float(h0.shape[1]), float(h0.shape[0]), float(_DTYPE_CODES.get(inputs.dtype, 0)), float(inputs.shape[2]),
        _code(type(cell).__qualname__), _code(structure), _code(cell.structure), _code(method), _code(fallback),
        _code(backend), -1.0 if tol is None else float(tol), -1.0 if max_iter is None else float(max_iter),
        float(bool(needs_grad)), float(sum(p.numel() for p in params)),
    ], dtype=torch.float64, device=dev)
    fp = torch.cat([head, hc[:2], pc[:2], hc[2:], pc[2:], head.new_tensor([float(inputs.shape[0])])])
    assert fp.numel() == _FP_LEN
    return fp


def check_ranks_agree(comm, fingerprint):
    """All-gather the fingerprints; every rank raises the same ValueError if they differ."""
    rows = comm.all_gather(fingerprint).to("cpu", torch.float64)
    differ = []
    for i, name in enumerate(_FP_FIELDS):
        col = rows[:, i]
        if i in _FP_SCALE:
            tol = 1e-9 * float(rows[:, _FP_SCALE[i]].abs().max()) + 1e-300
        else:
            tol = 0.0
        if float((col - col[0]).abs().max()) > tol and name not in differ:
            differ.append(name)
    if differ:
        raise ValueError(f"{', '.join(differ)} differ(s) across ranks of the sequence group: every rank must call "
                         f"solve with the same cell (parameters), h0, batch, dtype and options; only the time "
                         f"shard of inputs differs")
    if float(rows[:, -1].sum()) == 0:
        raise ValueError("inputs has T=0 time steps on every rank of the sequence group; the sequence must "
                         "not be empty")


class _NoCtx:
    """Stand-in autograd context for forward-only calls (saves nothing)."""

    needs_input_grad = ()

    def save_for_backward(self, *tensors):
        pass


def sequential_solve(cell, inputs, h0, comm=None):
    """Step-by-step evaluation with autograd through the loop (the reference).

    Under a sequence group the ranks run one after the other, each starting
    from the previous rank's last state (gradients do not cross ranks).
    """
    from .comm import SINGLE

    comm = comm or SINGLE
    cdt = compute_dtype(inputs.dtype)
    xp = projected_inputs(cell, inputs, cdt)
    h = h0.to(cdt)
    for q in range(comm.world_size):
        if q == comm.rank:
            outs = []
            for t in range(xp.shape[0]):
                h = cell.step(h, xp[t])
                outs.append(h)
            states = torch.stack(outs, 0) if outs else xp.new_zeros(0, *h.shape)
        if q + 1 < comm.world_size:
            nxt = comm.broadcast(h.detach().contiguous(), src=q)
            if comm.rank == q + 1:
                h = nxt
    return states.to(inputs.dtype)
