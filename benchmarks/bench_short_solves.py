#!/usr/bin/env python
"""Short one-GPU solves: the look-back and pipelined loops, with and without CUDA graphs (seqpar.graphs).

    python benchmarks/bench_short_solves.py [--dims 1,4] [--steps 100k] [--reps 15] [--out $OUT/short_solves.json]

torch.nn.GRU(D, D) weights (torch's initialisation), B = 16, forward solves under no_grad with
``jacobian="dense"``; for each shape, four variants in the same process: the loop forced by
``seqpar.newton.PIPELINE_MIN_ELEMENTS`` (look-back: 2^62, pipelined: 0) x ``seqpar.graphs.ENABLED``.
Median wall time of ``--reps`` synchronised calls after three warm-ups (with graphs on, the second
warm-up captures).  Run 55 (H200) chose ``PIPELINE_MIN_ELEMENTS = 2**20`` from these.
"""
import argparse

import torch

import common  # noqa: F401
import seqpar
import seqpar.graphs as graphs
import seqpar.newton as newton
from common import env_info, out_path, timed, write_json
from seqpar.problems import parse_count


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dims", default="1,4")
    p.add_argument("--steps", default="100k")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    res = {"env": env_info(), "rows": []}
    saved = newton.PIPELINE_MIN_ELEMENTS, graphs.ENABLED
    try:
        for D in [int(d) for d in a.dims.split(",")]:
            for T in [parse_count(s) for s in a.steps.split(",")]:
                torch.manual_seed(0)
                cell = seqpar.cells.GRU.from_torch(torch.nn.GRU(D, D).cuda())
                x = torch.randn(T, a.batch, D, device="cuda")
                row = {"D": D, "T": T, "B": a.batch}
                for loop, min_el in (("lookback", 2**62), ("pipelined", 0)):
                    for g in (False, True):
                        newton.PIPELINE_MIN_ELEMENTS, graphs.ENABLED = min_el, g
                        graphs.clear()
                        with torch.no_grad():
                            def solve():
                                return seqpar.solve(cell, x, jacobian="dense", return_info=True)
                            _, info = solve()
                            ms = timed(solve, repeats=a.reps, warmup=3)["median_s"] * 1e3
                        name = f"{loop}_{'graphs' if g else 'eager'}"
                        row[name + "_ms"], row[name + "_iterations"] = ms, info.iterations
                        print(f"D={D} T={T} {name}: {ms:.3f} ms, {info.iterations} iterations", flush=True)
                res["rows"].append(row)
    finally:
        newton.PIPELINE_MIN_ELEMENTS, graphs.ENABLED = saved
        graphs.clear()
    write_json(a.out or out_path("short_solves.json"), res)


if __name__ == "__main__":
    main()
