#!/usr/bin/env python
"""Host time of a short graph-replayed solve, piece by piece (GPU): where ``solve`` spends its microseconds.

    python benchmarks/profile_host.py [--dims 1] [--steps 100k] [--calls 300] [--out $OUT/profile_host.json]

GRU(D, D) with torch.nn.GRU weights, B = 16, ``jacobian="dense"``, no_grad, CUDA graphs on (warm).
Each listed function is wrapped by a perf_counter timer (inclusive host time per solve, nothing
synchronised by the wrappers); then cProfile's top entries over ``--calls`` solves (its own overhead
inflates Python-heavy rows: read them relative to each other).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections import defaultdict

import torch

import common  # noqa: F401
import seqpar
import seqpar.autograd as sa
import seqpar.graphs as graphs
import seqpar.newton as newton
import seqpar.solver as solver
from common import env_info, gru_problem, out_path, timed, write_json
from seqpar.problems import parse_count

SPENT = defaultdict(float)


def timer(owner, name: str, label: str):
    fn = getattr(owner, name)

    def wrapped(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            SPENT[label] += time.perf_counter() - t0
    setattr(owner, name, wrapped)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dims", default="1")
    p.add_argument("--steps", default="100k")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    res = {"env": env_info(), "rows": []}
    for D in [int(d) for d in a.dims.split(",")]:
        for T in [parse_count(s) for s in a.steps.split(",")]:
            cell, x, h0 = gru_problem(D, T)

            def solve():
                return seqpar.solve(cell, x, h0, jacobian="dense", return_info=True)
            with torch.no_grad():
                plain_us = timed(solve, repeats=a.calls, warmup=5)["median_s"] * 1e6
                saved = {}
                targets = [(solver, "check_solve_args", "check_solve_args"),
                           (solver, "check_cell_tensors_finite", "check_cell_tensors_finite"),
                           (solver, "resolve_backend", "resolve_backend"),
                           (solver, "resolve_jacobian", "resolve_jacobian"),
                           (solver, "get_communicator", "get_communicator"),
                           (type(cell), "project_inputs", "project_inputs"),
                           (sa, "newton_solve", "newton_solve"),
                           (newton, "auto_chunk", "newton.auto_chunk"),
                           (graphs, "graphed_loop", "graphs.graphed_loop"),
                           (graphs.GraphedLoop, "run", "GraphedLoop.run"),
                           (graphs.GraphedLoop, "_replay", "GraphedLoop._replay (all)"),
                           (newton._Stopping, "record", "_Stopping.record (all)")]
                for owner, name, label in targets:
                    saved[(owner, name)] = getattr(owner, name)
                    timer(owner, name, label)
                try:
                    SPENT.clear()
                    t_all = time.perf_counter()
                    for _ in range(a.calls):
                        solve()
                        torch.cuda.synchronize()
                    total = time.perf_counter() - t_all
                    pieces = {k: v / a.calls * 1e6 for k, v in SPENT.items()}
                finally:
                    for (owner, name), fn in saved.items():
                        setattr(owner, name, fn)
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(a.calls):
                    solve()
                    torch.cuda.synchronize()
                prof.disable()
                out = io.StringIO()
                st = pstats.Stats(prof, stream=out)
                st.sort_stats("tottime").print_stats(30)
                st.sort_stats("cumulative").print_stats(45)
            row = {"D": D, "T": T, "solve_us": plain_us, "wrapped_solve_us": total / a.calls * 1e6,
                   "pieces_us": pieces, "cprofile": out.getvalue()}
            print(f"D={D} T={T}: solve {plain_us:.1f} us (wrapped {row['wrapped_solve_us']:.1f} us)", flush=True)
            for k, v in sorted(pieces.items(), key=lambda kv: -kv[1]):
                print(f"  {k:32s} {v:8.1f} us", flush=True)
            print(out.getvalue(), flush=True)
            res["rows"].append(row)
    write_json(a.out or out_path("profile_host.json"), res)


if __name__ == "__main__":
    main()
