#!/usr/bin/env python
"""Where a short graph-replayed solve's wall time goes (GPU): host versus device, iteration by iteration.

    python benchmarks/profile_short_solve.py [--dims 1,4] [--steps 100k] [--out-dir $OUT]

For torch.nn.GRU(D, D) weights, B = 16, ``jacobian="dense"``, no_grad, CUDA graphs on (the key
captured by the warm-ups), it measures, median of ``--reps`` synchronised calls:

* ``solve_ms``: one ``seqpar.solve``;
* ``project_ms``: the input projection alone;
* ``loop_ms``: the graphed loop's ``run`` alone (copies in, the projection where the graphs do it, replays
  with their residual reads, clone);
* ``replays_ms``: the same replays back to back with no residual read between them, one sync at the
  end: the device-bound floor of the loop (``loop_ms - replays_ms`` is what the per-iteration reads cost);
* ``entry_ms``: ``solve_ms - loop_ms - project_ms`` (``solve_ms - loop_ms`` where the graphs project):
  argument checks, options, result packaging.

and writes a torch.profiler chrome trace of one solve (``trace_d{D}.json``), summarised as GPU busy
time, the span from the first to the last kernel, and the largest idle gaps between kernels.
"""
from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

import torch

import common  # noqa: F401
import seqpar
import seqpar.graphs as graphs
from common import env_info, gru_problem, timed, write_json
from seqpar.problems import parse_count


def median_ms(fn, reps: int) -> float:
    """Median milliseconds of ``reps`` synchronised calls (no warm-up here: the caller warms up)."""
    return timed(fn, repeats=reps, warmup=0)["median_s"] * 1e3


class StopAt:
    """A stand-in for newton._Stopping: stop after iterate ``k`` (records nothing); ``opts`` make the
    device-side rule (seqpar.kernels.stopping) stop there too."""

    def __init__(self, k: int):
        self.k = k
        self.opts = SimpleNamespace(tol=0.0, max_iter=k, patience=10**9, first_sync_check=None)

    def record(self, it: int, res: float) -> bool:
        return it >= self.k


class NoPhases:
    def mark(self, name):
        pass


def trace_summary(path: str) -> dict:
    """GPU kernel / memcpy intervals of a chrome trace: busy time, span, idle gaps (microseconds)."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not gpu:
        return {"kernels": 0}
    busy, end, gaps = 0.0, gpu[0][0], []
    for s, e, name in gpu:
        if s > end:
            gaps.append((s - end, name))
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    gaps.sort(reverse=True)
    return {"kernels": len(gpu), "busy_us": busy, "span_us": end - gpu[0][0],
            "largest_gaps_us": [(round(g, 1), n[:60]) for g, n in gaps[:8]],
            "sequence": [(round(s - gpu[0][0], 1), round(e - s, 1), n[:50]) for s, e, n in gpu[:60]]}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dims", default="1,4")
    p.add_argument("--steps", default="100k")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    p.add_argument("--trace-dir", default=None, help="where the chrome traces go (default: --out-dir)")
    a = p.parse_args()
    res = {"env": env_info(), "rows": []}
    for D in [int(d) for d in a.dims.split(",")]:
        for T in [parse_count(s) for s in a.steps.split(",")]:
            cell, x, h0 = gru_problem(D, T, a.batch)
            with torch.no_grad():
                def solve():
                    return seqpar.solve(cell, x, h0, jacobian="dense", return_info=True)
                for _ in range(4):
                    _, info = solve()
                loop = next((g for g in graphs._graphs.values() if g is not None), None)
                row = {"D": D, "T": T, "B": a.batch, "iterations": info.iterations,
                       "graphed": loop is not None, "solve_ms": median_ms(solve, a.reps),
                       "project_ms": median_ms(lambda: cell.project_inputs(x), a.reps)}
                if loop is not None:
                    projects = getattr(loop, "project", None) is not None  # the graphs project the inputs
                    xp = x if projects else cell.project_inputs(x)
                    k = info.iterations
                    row["loop_ms"] = median_ms(lambda: loop.run(xp, h0, None, StopAt(k), NoPhases()), a.reps)

                    def replays():
                        if getattr(loop, "state", None) is not None:  # the device-side stopping rule: stop at k
                            from seqpar.kernels import stopping
                            loop.state_options = (0.0, k, 10**9)  # (the first graph copies state_start in)
                            loop.state_start.copy_(stopping.initial_values(*loop.state_options))
                        if projects:
                            loop.x.copy_(x)
                            loop.project.replay()
                        else:
                            loop.xp.copy_(xp)
                        loop.h0.copy_(h0)
                        loop.h[0].zero_()
                        for j in range(k + 1):
                            loop._replay(j)
                        return loop.h[k % 2].clone()
                    row["replays_ms"] = median_ms(replays, a.reps)
                    row["entry_ms"] = row["solve_ms"] - row["loop_ms"] - (0.0 if projects else row["project_ms"])
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    solve()
                    torch.cuda.synchronize()
                path = os.path.join(a.trace_dir or a.out_dir, f"trace_d{D}.json")
                prof.export_chrome_trace(path)
                row["trace"] = trace_summary(path)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "trace"},
                  flush=True)
            print(json.dumps({k: v for k, v in row["trace"].items() if k != "sequence"}), flush=True)
            res["rows"].append(row)
    write_json(os.path.join(a.out_dir, "profile_short_solve.json"), res)


if __name__ == "__main__":
    main()
