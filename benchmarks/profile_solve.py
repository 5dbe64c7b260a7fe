#!/usr/bin/env python
"""Fixed costs of one ``seqpar.solve`` at narrow widths (GPU): where a short solve's time goes.

    python benchmarks/profile_solve.py --out $OUT/profile_solve.json

For a torch.nn.GRU-weights cell, B=16, D in --dims, T in --steps: the solve's median
time, its iterations, the time of the pieces a solve runs once (input projection,
argument checks) and of one fused iteration, and torch.profiler's top CPU-side ops.
"""
from __future__ import annotations

import argparse

import torch

import common  # noqa: F401
import seqpar
from common import env_info, out_path, timed, write_json
from seqpar.problems import parse_count


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dims", default="1,4")
    p.add_argument("--steps", default="100k,1M")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--jacobian", default="dense")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device("cuda")
    res = {"env": env_info(), "rows": []}
    for D in [int(x) for x in a.dims.split(",")]:
        for T in [parse_count(x) for x in a.steps.split(",")]:
            torch.manual_seed(0)
            m = torch.nn.GRU(D, D).to(dev)
            cell = seqpar.cells.GRU.from_torch(m)
            x = torch.randn(T, a.batch, D, device=dev)
            h0 = torch.zeros(a.batch, D, device=dev)
            with torch.no_grad():
                def solve():
                    return seqpar.solve(cell, x, h0, jacobian=a.jacobian, return_info=True)
                _, info = solve()
                total = timed(solve, repeats=a.repeats)["median_s"] * 1e3
                proj = timed(lambda: cell.project_inputs(x), repeats=a.repeats)["median_s"] * 1e3
                row = dict(D=D, T=T, B=a.batch, jacobian=a.jacobian, solve_ms=total, iterations=info.iterations,
                           project_ms=proj, residuals=info.residuals)
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    solve()
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
                row["profile"] = table
                kt = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)
                row["profile_cuda"] = kt
            print(f"D={D} T={T}: solve {total:.2f} ms, {info.iterations} iterations, projection {proj:.3f} ms",
                  flush=True)
            print(table, flush=True)
            print(kt, flush=True)
            res["rows"].append(row)
    write_json(a.out or out_path("profile_solve.json"), res)


if __name__ == "__main__":
    main()
