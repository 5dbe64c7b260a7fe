#!/usr/bin/env python
"""Newton iterations vs sequence length and vs cell regime; where the fallback triggers.

Regimes: "contractive" (recurrent weights scaled to spectral norm 0.5, like
trained RNNs), "random" (torch's default init), "edge" (gain ~1.5: near the
edge of chaos), and "chaotic" (the logistic map at r = 3.9).  For each
(regime, cell, jacobian mode, T): iterations, Newton converged or not, how
many steps the exact fallback re-solved, wall time.  Iteration counts do not
depend on the device much, so this runs on CPU or GPU.

    python benchmarks/bench_convergence.py [--max-T 1M] [--hidden 16] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch

import common  # noqa: F401  (puts the repo on sys.path)
import seqpar
from common import env_info, out_path, write_json
from seqpar.problems import make_inputs, parse_count


def scaled_cell(cls, H, gain, seed):
    torch.manual_seed(seed)
    cell = cls(H, H)
    with torch.no_grad():
        W = cell.weight_hh
        if W.dim() == 2:  # dense: scale each gate block to spectral norm `gain`
            for g in range(W.shape[0] // H):
                blk = W[g * H:(g + 1) * H]
                blk.mul_(gain / torch.linalg.matrix_norm(blk, 2))
        else:  # diagonal weights in [-gain, gain]
            W.uniform_(-gain, gain)
    return cell


def logistic_cell():
    return seqpar.FunctionCell(lambda h, u: 3.9 * h * (1 - h) + 0 * u, 1, structure="diag")


def cases(H):
    yield "contractive", "gru", lambda: scaled_cell(seqpar.GRU, H, 0.5, 0), ("auto", "diag")
    yield "random", "gru", lambda: seqpar.GRU(H, H), ("auto", "diag")
    yield "edge", "elman", lambda: scaled_cell(seqpar.Elman, H, 1.5, 0), ("auto", "diag")
    yield "contractive", "diag-gru", lambda: scaled_cell(seqpar.DiagGRU, H, 0.5, 0), ("auto",)
    yield "random", "diag-gru", lambda: seqpar.DiagGRU(H, H), ("auto",)
    yield "random", "lstm", lambda: seqpar.LSTM(H, H), ("auto", "diag")
    yield "chaotic", "logistic", logistic_cell, ("auto",)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-T", type=parse_count, default=parse_count("100k"))
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--time-budget", type=float, default=240.0, help="seconds; larger T are skipped once spent")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    Ts = [t for t in (1000, 10_000, 100_000, 1_000_000, 10_000_000) if t <= a.max_T]
    rows, t_start = [], time.perf_counter()
    for regime, name, make, modes in cases(a.hidden):
        torch.manual_seed(0)
        cell = make().to(a.device)
        D_in = cell.input_size or 1
        for T in Ts:
            if time.perf_counter() - t_start > a.time_budget:
                break
            x = make_inputs(0, T, a.batch, D_in, device=a.device) * (0 if name == "logistic" else 1)
            h0 = torch.full((a.batch, cell.state_size), 0.3, device=a.device) if name == "logistic" else None
            for mode in modes:
                t0 = time.perf_counter()
                with torch.no_grad():
                    _, info = seqpar.solve(cell, x, h0, jacobian=mode, return_info=True)
                wall = time.perf_counter() - t0
                row = dict(regime=regime, cell=name, jacobian=info.jacobian, T=T, hidden=cell.state_size,
                           iterations=info.iterations, newton_converged=info.newton_converged,
                           converged=info.converged, fallback=info.fallback, fallback_steps=info.fallback_steps,
                           first_unconverged=info.first_unconverged, wall_s=wall,
                           residuals=info.residuals[:60])
                rows.append(row)
                print(f"{regime:12s} {name:9s} {info.jacobian:6s} T={T:>9,d} iters={info.iterations:3d} "
                      f"newton_conv={info.newton_converged!s:5s} conv={info.converged!s:5s} "
                      f"fallback_steps={info.fallback_steps:>8,d} {wall:7.2f}s", flush=True)
    write_json(a.out or out_path("convergence.json"), {"env": env_info(), "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
