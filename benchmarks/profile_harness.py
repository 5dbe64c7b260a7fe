#!/usr/bin/env python
"""Why one short solve times differently under different harnesses (GPU): the same graph-replayed solve,
timed in one process several ways, with the GPU's clocks logged beside it.

    python benchmarks/profile_harness.py [--dims 1] [--steps 100k] [--inits torch,flax] [--phases short,long,...]
        [--set seqpar.kernels.pipelined_diag_gru.FUSE_MAX_ELEMENTS=65536] [--out $OUT/harness.json]

Session 8 timed GRU(1, 1), B = 16, T = 100k at 0.37 ms (profile_short_solve.py: 4 warm-ups, 21 calls), 0.50 ms
(profile_host.py: 300 calls) and 0.55 ms (bench_vs_deer.py: flax weights, 3 warm-ups, 9 calls) in one device
call.  Here, per weight initialisation (torch.nn.GRU's, or DEER's flax GRUCell: bench_vs_deer.make_weights):

* ``short``: 21 synchronised calls after the warm-ups (profile_short_solve.py's loop);
* ``long``: 300 calls, their medians per window of 30 (does a solve slow down as the loop goes on?);
* ``deer_harness``: bench_vs_deer.time_calls (3 warm-ups, 9 calls, the previous output dropped first);
* ``after_spin``: 21 calls right after 0.2 s of GPU matmuls (clocks raised by load);
* ``idle_gaps``: 21 calls with 20 ms of host sleep before each (clocks lowered by idleness);
* ``no_gc``: 100 calls with Python's garbage collector off;
* ``replays``: the graphed loop's replays alone (no host rule, no entry path), 21 times;
* ``split``: 100 calls with host timestamps at the solve's stages (:func:`split_us`): where the host time of
  a call goes, and how long the host waits for the device's queued passes.

``--set module.NAME=value`` (repeatable) overrides a module constant first (a Python literal), to time a
variant in the same call.  Each phase records its wall-clock start (``t_wall``) so that the clock log of run_harness.sh
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
from common import apply_sets, env_info, out_path, timed, write_json
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
    """Microseconds of each of ``n`` synchronised calls of ``fn`` (no warm-up: the caller warms up)."""
    return [v * 1e6 for v in timed(fn, repeats=n, warmup=0, before=before)["times_s"]]


SPLIT_STAGES = ("newton_solve", "loop.run", "first replay", "last replay", "read back", "loop.run done",
                "newton_solve done", "solve done", "synchronised")


def split_us(solve, n: int) -> tuple:
    """``(per-call us, {segment: median us})`` of ``n`` synchronised calls of ``solve`` (a graph-replayed one),
    with perf_counter stamps at the entry of ``newton_solve``, ``GraphedLoop.run``, each graph replay, the read
    of the stopping state (``_settle_finite_check`` runs right after it) and the returns.  A segment is named by
    the stage that ends it: "first replay" is the host time from ``run``'s entry to its first launch (copies in,
    the projection), "last replay" the launches, "read back" the wait for the device (queued passes), "loop.run
    done" the host rule and the result's copy."""
    import seqpar.autograd as sa

    stamps: list = []
    saved = [(sa, "newton_solve"), (graphs.GraphedLoop, "run"), (graphs.CudaGraph, "replay"),
             (graphs.GraphedLoop, "_settle_finite_check")]
    originals = {key: getattr(*key) for key in saved}

    def stamped(fn, enter, leave=None):
        def wrapped(*a, **k):
            stamps.append((enter, time.perf_counter()))
            out = fn(*a, **k)
            if leave:
                stamps.append((leave, time.perf_counter()))
            return out
        return wrapped

    sa.newton_solve = stamped(originals[saved[0]], "newton_solve", "newton_solve done")
    graphs.GraphedLoop.run = stamped(originals[saved[1]], "loop.run", "loop.run done")
    graphs.CudaGraph.replay = stamped(originals[saved[2]], "replay")
    graphs.GraphedLoop._settle_finite_check = stamped(originals[saved[3]], "read back")
    segments = {name: [] for name in SPLIT_STAGES}
    totals = []
    try:
        for _ in range(n):
            torch.cuda.synchronize()
            stamps.clear()
            t0 = time.perf_counter()
            solve()
            stamps.append(("solve done", time.perf_counter()))
            torch.cuda.synchronize()
            stamps.append(("synchronised", time.perf_counter()))
            replays = [i for i, (name, _) in enumerate(stamps) if name == "replay"]
            if not replays:
                continue  # not replayed (eager): no split
            named = [(("first replay" if i == replays[0] else "last replay" if i == replays[-1] else None)
                      if name == "replay" else name, t) for i, (name, t) in enumerate(stamps)]
            prev = t0
            for name, t in named:
                if name is None:
                    continue
                segments[name].append((t - prev) * 1e6)
                prev = t
            totals.append((prev - t0) * 1e6)
    finally:
        for key, fn in originals.items():
            setattr(*key, fn)
    return totals, {k: round(statistics.median(v), 1) for k, v in segments.items() if v}


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
    p.add_argument("--phases", default="short,long,deer_harness,after_spin,idle_gaps,no_gc,replays,split")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from bench_vs_deer import time_calls

    apply_sets(a.set)
    want = set(a.phases.split(","))

    res = {"env": env_info(), "seqpar": seqpar.__file__, "set": a.set, "rows": []}
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

                walls = []  # seqpar's own account of each call (info.wall_time_s: entry to return, host clock)

                def solve():
                    box.pop("out", None)
                    box["out"], box["info"] = seqpar.solve(cell, x, h0, jacobian="dense", return_info=True,
                                                           fallback="none")
                    walls.append(box["info"].wall_time_s)

                def replays_us():
                    loop = next((g for g in graphs._graphs.values() if g is not None), None)
                    if loop is None or getattr(loop, "state", None) is None:
                        return None
                    k = row["iterations"]

                    def replays():  # the device-side rule told to stop after k iterations
                        loop.state_start.copy_(seqpar.kernels.stopping.initial_values(0.0, k, 10**9))
                        loop.state_options = (0.0, k, 10**9)
                        for j in range(k + 1):
                            loop._replay(j)
                    return [v * 1e6 for v in timed(replays, repeats=21, warmup=2)["times_s"]]

                def no_gc_us():
                    gc.disable()
                    try:
                        return per_call_us(solve, 100)
                    finally:
                        gc.enable()

                def deer_harness_us():
                    t = time_calls(lambda: (solve(), torch.cuda.synchronize()), 9, 15.0)
                    return [v * 1e6 for v in t["times_s"]]

                def after_spin_us():
                    spin()
                    return per_call_us(solve, 21)

                segments = {}

                def split_phase():
                    times, segments["split"] = split_us(solve, 100)
                    return times

                phases = [("short", lambda: per_call_us(solve, 21)), ("long", lambda: per_call_us(solve, 300)),
                          ("deer_harness", deer_harness_us), ("after_spin", after_spin_us),
                          ("idle_gaps", lambda: per_call_us(solve, 21, before=lambda: time.sleep(0.02))),
                          ("no_gc", no_gc_us), ("replays", replays_us), ("split", split_phase)]
                with torch.no_grad():
                    for _ in range(4):
                        solve()
                    row["iterations"] = box["info"].iterations
                    for name, measure in phases:
                        if name not in want:
                            continue
                        t_wall = time.time()
                        n_walls = len(walls)
                        try:
                            times = measure()
                        except Exception as e:  # noqa: BLE001 - a phase a baseline tree lacks: say so, go on
                            print(f"D={D} T={T} init={init} {name}: failed: {type(e).__name__}: {e}", flush=True)
                            continue
                        if not times:
                            continue
                        row["phases"][name] = {"t_wall": t_wall, "median_us": statistics.median(times),
                                               "min_us": min(times), "times_us": [round(v, 1) for v in times]}
                        line = f"D={D} T={T} init={init} {name}: median {statistics.median(times):.1f} us, " \
                               f"min {min(times):.1f} us"
                        if len(walls) > n_walls:
                            w = statistics.median(walls[n_walls:]) * 1e6
                            row["phases"][name]["solve_wall_us"] = w
                            line += f", inside solve {w:.1f} us"
                        if name in segments:
                            row["phases"][name]["segments_us"] = segments[name]
                            line += f"; segments {segments[name]}"
                        if name == "long":
                            w = [round(statistics.median(times[i:i + 30]), 1) for i in range(0, len(times), 30)]
                            row["phases"][name]["window_medians_us"] = w
                            line += f"; windows of 30: {w}"
                        print(line, flush=True)
                res["rows"].append(row)
    write_json(a.out or out_path("harness.json"), res)


if __name__ == "__main__":
    main()
