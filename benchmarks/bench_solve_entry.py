#!/usr/bin/env python
"""Host time of ``seqpar.solve``'s entry path: everything a solve does besides its Newton iterations.

    python benchmarks/bench_solve_entry.py [--device cpu|cuda] [--calls 2000] [--out results/solve_entry.json]

A short solve on a GPU is bound by host time (README, "Short sequences were bound by host time"); this
measures the part before and after the iterations: argument checks, the NaN / Inf check of the tensors,
the cell's parameter checks, the input projection and the autograd wrapper.  ``newton_solve`` is replaced
by a stand-in that returns zeros, so the number does not depend on the iterations (measured elsewhere:
``bench_short_solves.py``).  Rows: GRU(1, 1) with ``jacobian="dense"`` and DiagGRU(4, 4), B=16, T=8, with
and without gradient tracking; each the best of 3 medians of ``--calls`` calls after 200 warm-up calls.
"""
import argparse
import statistics
import time

import torch

import common  # noqa: F401  (puts the checkout on sys.path)
from common import env_info, out_path, sync, write_json
import seqpar
import seqpar.autograd as seqpar_autograd
from seqpar.newton import SolveInfo, projected_inputs


def stand_in_newton_solve(cell, xp, h0, opts, comm, initial_guess=None, inputs=None):
    """``newton_solve``'s return value without iterating: zero states, a converged SolveInfo (the inputs
    projected, as the eager path does)."""
    if xp is None:
        xp = projected_inputs(cell, inputs, h0.dtype)
    info = SolveInfo(converged=True, iterations=0, residual=0.0, jacobian=opts.structure.describe(), tol=opts.tol,
                     world_size=1, seq_len=xp.shape[0])
    if opts.first_sync_check is not None:  # the deferred NaN / Inf check runs at the first residual
        opts.first_sync_check()
    return h0.new_zeros(xp.shape[0], *h0.shape), info, h0


def entry_us(solve, calls: int, device) -> float:
    for _ in range(200):
        solve()
    sync(device)
    medians = []
    for _ in range(3):
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            solve()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return min(medians) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device(a.device)
    real = seqpar_autograd.newton_solve
    seqpar_autograd.newton_solve = stand_in_newton_solve
    rows = []
    try:
        torch.manual_seed(0)
        cells = (("GRU(1, 1)", seqpar.GRU.from_torch(torch.nn.GRU(1, 1)), 1, "dense"),
                 ("DiagGRU(4, 4)", seqpar.DiagGRU(4, 4), 4, "diag"))
        for name, cell, inputs, jacobian in cells:
            cell = cell.to(dev)
            x = torch.randn(8, 16, inputs, device=dev)
            h0 = torch.zeros(16, cell.state_size, device=dev)
            for grad in (False, True):
                with torch.set_grad_enabled(grad):
                    us = entry_us(lambda: seqpar.solve(cell, x, h0, jacobian=jacobian, return_info=True), a.calls, dev)
                rows.append({"cell": name, "grad": grad, "device": str(dev), "entry_us": us})
                print(f"{name:14s} grad={grad!s:5s} {us:7.1f} us", flush=True)
    finally:
        seqpar_autograd.newton_solve = real
    write_json(a.out or out_path("solve_entry.json"), {"env": env_info(), "rows": rows})


if __name__ == "__main__":
    main()
