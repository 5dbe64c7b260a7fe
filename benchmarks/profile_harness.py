#!/usr/bin/env python
"""Why one short solve times differently under different harnesses (GPU): the same graph-replayed solve,
timed in one process several ways, with the GPU's clocks logged beside it.

    python benchmarks/profile_harness.py [--dims 1] [--steps 100k] [--inits torch,flax] [--out $OUT/harness.json]

Session 8 timed GRU(1, 1), B = 16, T = 100k at 0.37 ms (profile_short_solve.py: 4 warm-ups, 21 calls), 0.50 ms
(profile_host.py: 300 calls) and 0.55 ms (bench_vs_deer.py: flax weights, 3 warm-ups, 9 calls) in one device
call.  Here, per weight initialisation (torch.nn.GRU's, or DEER's flax GRUCell: bench_vs_deer.make_weights):

* ``short``: 21 synchronised calls after the warm-ups (profile_short_solve.py's loop);
* ``long``: 300 calls, their medians per window of 30 (does a solve slow down as the loop goes on?);
* ``deer_harness``: bench_vs_deer.time_calls (3 warm-ups, 9 calls, the previous output dropped first);
* ``after_spin``: 21 calls right after 0.2 s of GPU matmuls (clocks raised by load);
* ``idle_gaps``: 21 calls with 20 ms of host sleep before each (clocks lowered by idleness);
* ``no_gc``: 100 calls with Python's garbage collector off;
* ``replays``: the graphed loop's replays alone (no host rule, no entry path), 21 times.

Each phase records its wall-clock start (``t_wall``) so that the clock log of run_harness.sh
(``nvidia-smi --query-gpu=clocks.sm,... -lms 20``) can be lined up with it.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import common  # noqa: F401
import seqpar
import seqpar.graphs as graphs
from common import env_info, out_path, timed, write_json
from seqpar.problems import parse_count


def flax_cell(D: int):
    """seqpar's GRU with bench_vs_deer's flax-initialised weights (seed 0) on the GPU."""
    from bench_vs_deer import make_weights

    w = make_weights(D, D, "flax", 0)
    m = torch.nn.GRU(D, D)
    m.load_state_dict({"weight_ih_l0": torch.from_numpy(w["w_ih"]), "weight_hh_l0": torch.from_numpy(w["w_hh"]),
                       "bias_ih_l0": torch.from_numpy(w["b_ih"]), "bias_hh_l0": torch.from_numpy(w["b_hh"])})
    return seqpar.cells.GRU.from_torch(m.cuda())


def per_call_us(fn, n: int, before=None) -> list:
    out = []
    for _ in range(n):
        if before is not None:
            before()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def spin(seconds: float = 0.2) -> None:
    a = torch.randn(4096, 4096, device="cuda")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dims", default="1")
    p.add_argument("--steps", default="100k")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--inits", default="torch,flax")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from bench_vs_deer import time_calls

    res = {"env": env_info(), "rows": []}
    for D in [int(d) for d in a.dims.split(",")]:
        for T in [parse_count(s) for s in a.steps.split(",")]:
            for init in a.inits.split(","):
                graphs.clear()
                torch.manual_seed(0)
                cell = (seqpar.cells.GRU.from_torch(torch.nn.GRU(D, D).cuda()) if init == "torch"
                        else flax_cell(D))
                x = torch.randn(T, a.batch, D, device="cuda")
                h0 = torch.zeros(a.batch, D, device="cuda")
                row = {"D": D, "T": T, "B": a.batch, "init": init, "phases": {}}
                box = {}

                def solve():
                    box.pop("out", None)
                    box["out"], box["info"] = seqpar.solve(cell, x, h0, jacobian="dense", return_info=True,
                                                           fallback="none")

                def phase(name, times):
                    row["phases"][name] = {"t_wall": t_wall, "median_us": statistics.median(times),
                                           "min_us": min(times), "times_us": [round(v, 1) for v in times]}
                    print(f"D={D} T={T} init={init} {name}: median {statistics.median(times):.1f} us, "
                          f"min {min(times):.1f} us", flush=True)

                with torch.no_grad():
                    for _ in range(4):
                        solve()
                    row["iterations"] = box["info"].iterations
                    t_wall = time.time()
                    phase("short", per_call_us(solve, 21))
                    t_wall = time.time()
                    long = per_call_us(solve, 300)
                    phase("long", long)
                    row["phases"]["long"]["window_medians_us"] = [round(statistics.median(long[i:i + 30]), 1)
                                                                  for i in range(0, 300, 30)]
                    print("   windows of 30:", row["phases"]["long"]["window_medians_us"], flush=True)
                    t_wall = time.time()
                    t = time_calls(lambda: (solve(), torch.cuda.synchronize()), 9, 15.0)
                    phase("deer_harness", [v * 1e6 for v in t["times_s"]])
                    spin()
                    t_wall = time.time()
                    phase("after_spin", per_call_us(solve, 21))
                    t_wall = time.time()
                    phase("idle_gaps", per_call_us(solve, 21, before=lambda: time.sleep(0.02)))
                    gc.disable()
                    try:
                        t_wall = time.time()
                        phase("no_gc", per_call_us(solve, 100))
                    finally:
                        gc.enable()
                    loop = next((g for g in graphs._graphs.values() if g is not None), None)
                    if loop is not None and getattr(loop, "state", None) is not None:
                        k = row["iterations"]

                        def replays():
                            loop.state_start.copy_(seqpar.kernels.stopping.initial_values(0.0, k, 10**9))
                            loop.state_options = (0.0, k, 10**9)
                            for j in range(k + 1):
                                loop._replay(j)
                        t_wall = time.time()
                        phase("replays", [v * 1e6 for v in timed(replays, repeats=21, warmup=2)["times_s"]])
                res["rows"].append(row)
    write_json(a.out or out_path("harness.json"), res)


if __name__ == "__main__":
    main()
