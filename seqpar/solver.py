"""``seqpar.solve``: the user-facing entry point."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .autograd import SolveFunction
from .comm import get_communicator
from .backend import resolve_backend
from .newton import FALLBACKS, NewtonOptions, SolveInfo, default_tol, min_tol
from .validation import METHODS, check_solve_args, compute_dtype, is_exact, resolve_jacobian

DEFAULT_MAX_ITER_NEWTON = 50
DEFAULT_MAX_ITER_QUASI = 200


def solve(cell, inputs: torch.Tensor, h0: Optional[torch.Tensor] = None, *, jacobian="auto",
          tol: Optional[float] = None, max_iter: Optional[int] = None,
          initial_guess: Optional[torch.Tensor] = None, return_info: bool = False,
          method: str = "newton", fallback: str = "sequential", chunk_size: Optional[int] = None,
          group=None, callback: Optional[Callable[[int, float], None]] = None, backend: str = "auto"):
    """Evaluate ``h_t = cell(h_{t-1}, u_t)`` for all t in parallel over time.

    Args:
        cell: a :class:`seqpar.cells.Cell` (holds the parameters).
        inputs: (T, B, D_in) time-major inputs (under ``group``: this rank's shard).
        h0: (B, D) initial state, zeros if None (under ``group``: the same on every rank).
        jacobian: Newton's linearisation: "auto" (the cell's exact structure),
            "dense" (exact Newton, DEER), "diag" (exact for diagonal cells,
            quasi-Newton otherwise), "block" / "block:k" (k x k blocks).
        tol: convergence tolerance on the residual ``max_t |h_t - f(h_{t-1}, u_t)|_max /
            max(1, |f(h_{t-1}, u_t)|_max)``; default 1e-12 for float64, 4e-6 otherwise.
        max_iter: Newton iteration cap (default 50, or 200 for quasi-Newton).
        initial_guess: (T, B, D) warm start (e.g. the previous training step's states).
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
        callback: ``callback(iteration, residual)`` called every Newton iteration.
        backend: "auto" (Triton kernels for CUDA tensors when triton is installed,
            the pure-PyTorch reference otherwise), "triton" (force the kernels:
            error if they cannot run) or "torch" (force the reference).

    Returns:
        states (T, B, D) in the dtype of ``inputs``, and the SolveInfo if ``return_info``.
        Gradients flow to ``inputs``, ``h0`` and the cell's parameters through the
        adjoint scan.
    """
    t0 = time.perf_counter()
    comm = get_communicator(group)
    error = None
    try:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}; got {fallback!r}")
        if tol is not None and not (tol > 0):
            raise ValueError(f"tol must be > 0; got {tol}")
        if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 0):
            raise ValueError(f"max_iter must be a non-negative int; got {max_iter!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
        h0 = check_solve_args(cell, inputs, h0, initial_guess, allow_empty=comm.world_size > 1)
        structure = resolve_jacobian(jacobian, cell)
        resolved_backend = resolve_backend(backend, inputs.device if torch.is_tensor(inputs) else "cpu")
    except Exception as e:  # noqa: BLE001 - re-raised on this rank, reported to the others
        error = e
    comm.agree(error)

    if method == "sequential":
        states = sequential_solve(cell, inputs, h0, comm)
        info = SolveInfo(converged=True, iterations=0, residual=0.0, newton_converged=False,
                         method="sequential", jacobian="none", seq_len=inputs.shape[0],
                         world_size=comm.world_size, wall_time_s=time.perf_counter() - t0)
        return (states, info) if return_info else states

    cdt = compute_dtype(inputs.dtype)
    exact = is_exact(structure, cell.structure, cell.state_size)
    opts = NewtonOptions(
        structure=structure,
        tol=float(tol) if tol is not None else default_tol(cdt),
        max_iter=max_iter if max_iter is not None else (DEFAULT_MAX_ITER_NEWTON if exact else DEFAULT_MAX_ITER_QUASI),
        fallback=fallback, chunk_size=chunk_size, callback=callback, backend=resolved_backend,
    )
    if opts.tol < min_tol(cdt):  # same on every rank (dtype and tol agree), so no rank is left waiting
        raise ValueError(f"tol={opts.tol:g} is below what {cdt} arithmetic can reach (min {min_tol(cdt):.1e}); "
                         f"use a larger tol or float64 inputs")
    params = [p for p in cell.parameters() if p.requires_grad]
    info_out: list = []
    args = (cell, opts, comm, info_out, inputs, h0, initial_guess, *params)
    if torch.is_grad_enabled() and (inputs.requires_grad or h0.requires_grad or params):
        states = SolveFunction.apply(*args)
    else:
        with torch.no_grad():
            states = SolveFunction.forward(_NoCtx(), *args)
    info = info_out[0]
    info.wall_time_s = time.perf_counter() - t0
    return (states, info) if return_info else states


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
    xp = cell.project_inputs(inputs.to(cdt)).to(cdt)
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
