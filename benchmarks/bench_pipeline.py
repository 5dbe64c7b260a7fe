#!/usr/bin/env python
"""The pipelined DiagGRU Newton pass against its minimum bytes and the look-back pass; short solves.

    PYTHONUNBUFFERED=1 python benchmarks/bench_pipeline.py --out $OUT/pipeline.json [--sweep] [--budget 420]

One GPU, one run.  Measures the device copy bandwidth (a 2 GiB device-to-device ``copy_``,
read + write), then for lane counts N = B * D in {16, 64, 256, 1024} (B = 16, D = 1, 4, 16, 64)
and T = 2^20 (``--steps``), then the narrow ``LONG`` shapes (B = 16, D = 1 / 4; B = 1, D = 64 / 256) at
T = 10 * 2^20 (``--long-steps``):

* ``lookback_ms``: one iteration of the look-back kernel (``fused_diag_gru_step``, its table tile);
* ``pipelined_ms``: one iteration of the pipelined path, i.e. ``pipelined_step`` plus the scan of
  its group totals (``scan_groups`` on (T / (R S), N)) that the next pass needs; with ``--sweep`` also
  other run lengths / prefetch depths / warps / runs per program (group size) for N <= 256;
* ``ratio``: ms over the minimum-bytes time (20 B per state: read h 4 + xp 12, write 4) at the
  measured copy bandwidth; ``ratio_nominal`` at ``--nominal-gbps`` (4300).  These ``ms`` are CUDA events
  around each launched call: where the host's launches take longer than the kernels (narrow N at
  T = 2^20) they time the host.  ``kernel_ms`` / ``kernel_ratio`` (and ``lookback_kernel_ms``) are the
  device time: ten back-to-back iterations replayed from one CUDA graph (``common.graph_ms``);
* a check: the pipelined new iterate equals the look-back kernel's (same start, max abs diff).

Then full forward solves under no_grad (``seqpar.solve``; GRU at D = 1 (DEER's cell), 4 (exact and quasi)
and 8, DiagGRU at D = 4 / 16 / 64; B = 16, T = 100k and 1M) with ``seqpar.newton.PIPELINED`` on and off: wall
time with the device synchronised, iterations, residual; and a torch.profiler table of the 100k GRU(1, 1) solve
(host time per op: what a short solve spends outside the kernels).  ``--memory-only``: the peak device
memory of one forward solve above the inputs (T = 1M, B = 16), pipelined loop on and off.  ``--dense-only``:
the scans of run summaries alone (device and host time) and the small-D GRU kernel's run-length sweep.
``--fused-only``: solves with the pass-fused carry scan on and off, the carries queued after the residual
sync (``seqpar.pipeline.EARLY_CARRIES`` off), and on the look-back loop.

Timings: CUDA events (kernels) or perf_counter around a synchronised call (solves), median of
``--reps`` after two warm-up calls (the first compiles).
"""
from __future__ import annotations

import argparse
import time

import torch

import common
from common import env_info, event_ms, graph_ms, write_json
import seqpar
import seqpar.newton as newton
import seqpar.pipeline as pipeline
from seqpar.cells import GRU, DiagGRU
from seqpar.kernels import pipelined_diag_gru as pk
from seqpar.kernels.fused_diag_gru import fused_diag_gru_step

WIDTHS = ((16, 1), (16, 4), (16, 16), (16, 64))
LONG = ((16, 1), (16, 4), (1, 64), (1, 256))  # narrow lanes at --long-steps (the B = 1, T = 10M rows)
SWEEP = [dict(run=r, prefetch=p, num_warps=4, s=s) for r in (16, 32, 64) for p in (0, 2) for s in (8, 16, 32)]
SWEEP_MAX_N = 256


def copy_gbps():
    x = torch.empty(2**29, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = event_ms(lambda: y.copy_(x), 10)
    return 2 * x.numel() * 4 / ms / 1e6


def problem(T, B, D, seed=0):
    torch.manual_seed(seed)
    cell = DiagGRU(1, D).cuda()
    with torch.no_grad():
        xp = cell.project_inputs(torch.randn(T, B, 1, device="cuda"))
        h = 0.5 * torch.randn(T, B, D, device="cuda")
    bnd = torch.zeros(B, D, device="cuda")
    return cell, xp, h, bnd


def iteration_rows(args, gbps):
    rows = []
    t_start = time.perf_counter()
    shapes = [(B, D, args.steps) for B, D in WIDTHS] + [(B, D, args.long_steps) for B, D in LONG if args.long_steps]
    for B, D, T in shapes:
        N = B * D
        cell, xp, h, bnd = problem(T, B, D)
        w, b = cell.weight_hh, cell.bias_hh
        min_ms = 20 * T * N / gbps / 1e6
        row = {"B": B, "D": D, "N": N, "T": T, "min_bytes_ms": min_ms,
               "min_bytes_ms_nominal": 20 * T * N / args.nominal_gbps / 1e6}
        ref, _ = fused_diag_gru_step(h, xp, w, b, bnd)
        out = torch.empty_like(h)  # one scratch iterate for every timed call (T = 10M, N = 256 fills an 80 GB card)
        row["lookback_ms"] = event_ms(lambda: fused_diag_gru_step(h, xp, w, b, bnd, out=out), args.reps)
        configs = [dict()] + (SWEEP if args.sweep and N <= SWEEP_MAX_N else [])
        row["configs"] = {}
        for kw in configs:
            if time.perf_counter() - t_start > args.budget:
                row["skipped_for_budget"] = True
                break
            cfg = pk.run_config(T, N, run=kw.get("run"), prefetch=kw.get("prefetch"), num_warps=kw.get("num_warps"))
            if kw.get("s"):
                cfg = cfg._replace(s=kw["s"])
            first = pk.first_pass(h, xp, w, b, bnd, cfg)
            carry = pk.scan_groups(first, bnd)

            def one_iteration():
                res = pk.pipelined_step(h, xp, w, b, bnd, first, carry, bnd, out=out, cfg=cfg)
                pk.scan_groups(res, bnd)

            name = "table" if not kw else f"r{cfg.r}_pf{cfg.prefetch}_w{cfg.warps}_s{cfg.s}"
            ms = event_ms(one_iteration, args.reps)
            pass_ms = event_ms(lambda: pk.pipelined_step(h, xp, w, b, bnd, first, carry, bnd, out=out, cfg=cfg),
                               args.reps)
            kernel_ms = graph_ms(one_iteration, args.reps)  # device time: no host launch gaps
            new = pk.pipelined_step(h, xp, w, b, bnd, first, carry, bnd, out=out, cfg=cfg).out
            row["configs"][name] = {"cfg": cfg._asdict(), "ms": ms, "pass_only_ms": pass_ms,
                                    "kernel_ms": kernel_ms, "kernel_ratio": kernel_ms / min_ms,
                                    "ratio": ms / min_ms, "ratio_nominal": ms / row["min_bytes_ms_nominal"],
                                    "max_abs_diff_vs_lookback": float((new - ref).abs().max())}
            print(f"N={N} {name}: {ms:.3f} ms launched, {kernel_ms:.3f} ms device "
                  f"({kernel_ms / min_ms:.2f}x min bytes; pass {pass_ms:.3f}); "
                  f"look-back {row['lookback_ms']:.3f} ms", flush=True)
        best = min(row["configs"].items(), key=lambda kv: kv[1]["ms"])
        row["best"] = best[0]
        row["pipelined_ms"] = row["configs"]["table"]["ms"]
        row["pipelined_kernel_ms"] = row["configs"]["table"]["kernel_ms"]
        row["kernel_ratio"] = row["pipelined_kernel_ms"] / min_ms
        row["lookback_kernel_ms"] = graph_ms(lambda: fused_diag_gru_step(h, xp, w, b, bnd, out=out), args.reps)
        row["ratio"] = row["pipelined_ms"] / min_ms
        row["ratio_nominal"] = row["pipelined_ms"] / row["min_bytes_ms_nominal"]
        row["lookback_ratio"] = row["lookback_ms"] / min_ms
        rows.append(row)
        cell = xp = h = bnd = ref = out = first = carry = new = None  # free this shape before the next
        torch.cuda.empty_cache()
    return rows


def solve_ms(cell, x, jacobian, reps):
    info = None

    def run():
        nonlocal info
        _, info = seqpar.solve(cell, x, jacobian=jacobian, return_info=True)

    with torch.no_grad():  # forward only, as DEER's benchmark
        t = common.timed(run, repeats=reps, warmup=2)
    return 1e3 * t["median_s"], info


def solve_rows(args):
    rows = []
    cases = [("gru", 1, "dense"), ("gru", 4, "dense"), ("gru", 4, "diag"), ("gru", 8, "dense"),
             ("diag-gru", 4, "diag"), ("diag-gru", 16, "diag"), ("diag-gru", 64, "diag")]
    for T in (100_000, 1_000_000):
        for kind, D, jac in cases:
            torch.manual_seed(0)
            cell = (GRU(1, D) if kind == "gru" else DiagGRU(1, D)).cuda()
            x = torch.randn(T, 16, 1, device="cuda")
            row = {"cell": kind, "D": D, "B": 16, "T": T, "jacobian": jac}
            for flag in (True, False):
                newton.PIPELINED = flag
                ms, info = solve_ms(cell, x, jac, args.reps)
                key = "pipelined" if flag else "lookback"
                row[key + "_ms"] = ms
                row[key + "_iterations"] = info.iterations
                row[key + "_residual"] = info.residual
                row[key + "_converged"] = info.converged
            newton.PIPELINED = True
            print(f"solve {kind} D={D} {jac} T={T}: pipelined {row['pipelined_ms']:.3f} ms "
                  f"({row['pipelined_iterations']} it) vs look-back {row['lookback_ms']:.3f} ms", flush=True)
            rows.append(row)
    return rows


def dense_sweep_rows(args):
    """Full GRU solves (B = 16, no_grad) on the small-D pipelined kernel over its run length ``RUN`` and the
    walker floor ``MIN_WALKERS`` (below which runs are shortened): longer runs mean fewer summaries to scan."""
    from seqpar.kernels import pipelined_dense_gru as pd

    rows = []
    saved = pd.RUN, pd.MIN_WALKERS
    t_start = time.perf_counter()
    try:
        for T in (100_000, 1_000_000):
            for D, jac in ((4, "dense"), (4, "diag"), (8, "dense")):
                torch.manual_seed(0)
                cell = GRU(1, D).cuda()
                x = torch.randn(T, 16, 1, device="cuda")
                for run in (8, 16, 32, 64):
                    for floor in (2**14, 2**15, 2**16, 2**17):
                        if time.perf_counter() - t_start > args.budget:
                            return rows
                        pd.RUN, pd.MIN_WALKERS = run, floor
                        r = pd.run_config(T, 16).r
                        if any(row["T"] == T and row["D"] == D and row["jacobian"] == jac and row["r"] == r
                               for row in rows):
                            continue  # the floor shortened the run to one already measured
                        ms, info = solve_ms(cell, x, jac, args.reps)
                        rows.append({"D": D, "B": 16, "T": T, "jacobian": jac, "RUN": run, "MIN_WALKERS": floor,
                                     "r": r, "ms": ms, "iterations": info.iterations})
                        print(f"dense sweep D={D} {jac} T={T} r={r}: {ms:.3f} ms", flush=True)
    finally:
        pd.RUN, pd.MIN_WALKERS = saved
    return rows


def summary_scan_rows(args):
    """The scans of per-run summaries between passes: diagonal summaries (n, N) by the look-back
    ``scan_diag`` (the first pipelined version's) and by ``scan_groups`` (groups of one run: what
    ``seqpar.pipeline.scan_runs`` uses now), dense 4 x 4 summaries by ``scan_maps``; device time
    (events) and host time per call."""
    from seqpar.backend import kernel_scan
    from seqpar.kernels import pipelined_dense_gru as pd
    from seqpar.pipeline import scan_runs
    from seqpar.structure import DIAG

    rows = []
    for n, N in ((12_500, 64), (31_250, 64), (3_125, 64), (16_384, 16)):
        a = torch.rand(n, N, device="cuda") * 0.9
        c = torch.randn(n, N, device="cuda")
        start = torch.zeros(16, N // 16, device="cuda")  # (B=16, D=N/16)
        calls = {"scan_diag": lambda: kernel_scan(a.reshape(n, 16, -1), c.reshape(n, 16, -1), start, DIAG),
                 "scan_groups": lambda: scan_runs(a, c.reshape(n, 16, -1), start, DIAG)}
        if N == 64:
            a4 = torch.rand(n, 16, 4, 4, device="cuda") * 0.45
            c4 = torch.randn(n, 16, 4, device="cuda")
            calls["scan_maps_4x4"] = lambda: pd.scan_maps(a4, c4, start)
        for name, fn in calls.items():
            dev_ms = event_ms(fn, args.reps)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            host_us = 1e6 * (time.perf_counter() - t0) / 20
            torch.cuda.synchronize()
            rows.append({"n": n, "N": N, "scan": name, "ms": dev_ms, "host_us": host_us})
            print(f"summary scan n={n} N={N} {name}: {dev_ms * 1e3:.1f} us device, {host_us:.1f} us host",
                  flush=True)
    return rows


def fused_rows(args):
    """Forward solves (no_grad) with the fused carry scan (``pipelined_diag_gru.FUSE_MAX_ELEMENTS``) on and
    off, and the look-back loop; at T = 100k also the pipelined loop forced below its size threshold."""
    rows = []
    saved = pk.FUSE_MAX_ELEMENTS, newton.PIPELINE_MIN_ELEMENTS
    try:
        for kind, D, T in (("gru", 1, 1_000_000), ("gru", 1, 100_000), ("diag-gru", 4, 1_000_000),
                           ("diag-gru", 4, 100_000)):
            torch.manual_seed(0)
            cell = (GRU(1, D) if kind == "gru" else DiagGRU(1, D)).cuda()
            x = torch.randn(T, 16, 1, device="cuda")
            row = {"cell": kind, "D": D, "B": 16, "T": T}
            for name, fuse, floor, piped, early in (("fused", 2**16, 0, True, True), ("unfused", 0, 0, True, True),
                                                    ("unfused_late_carries", 0, 0, True, False),
                                                    ("lookback", saved[0], 0, False, True)):
                pk.FUSE_MAX_ELEMENTS, newton.PIPELINE_MIN_ELEMENTS, newton.PIPELINED = fuse, floor, piped
                pipeline.EARLY_CARRIES = early
                ms, info = solve_ms(cell, x, "diag", args.reps)
                row[name + "_ms"], row[name + "_iterations"] = ms, info.iterations
            print(row, flush=True)
            rows.append(row)
    finally:
        pk.FUSE_MAX_ELEMENTS, newton.PIPELINE_MIN_ELEMENTS = saved
        newton.PIPELINED = pipeline.EARLY_CARRIES = True
    return rows


def peak_MB(fn, base=None) -> float:
    """Peak device memory (MiB) while ``fn()`` runs, over ``base`` bytes (default: what is allocated before it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if base is None else base
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def memory_rows():
    """Peak device memory of one forward solve (no_grad, after a warm-up), pipelined loop on and off."""
    rows = []
    for kind, D, jac in [("gru", 1, "dense"), ("gru", 4, "dense"), ("gru", 4, "diag"), ("gru", 8, "dense"),
                         ("diag-gru", 64, "diag")]:
        torch.manual_seed(0)
        cell = (GRU(1, D) if kind == "gru" else DiagGRU(1, D)).cuda()
        x = torch.randn(1_000_000, 16, 1, device="cuda")
        row = {"cell": kind, "D": D, "B": 16, "T": 1_000_000, "jacobian": jac}
        with torch.no_grad():
            for flag in (False, True):
                newton.PIPELINED = flag
                seqpar.solve(cell, x, jacobian=jac)
                row[("pipelined" if flag else "lookback") + "_peak_MB"] = peak_MB(lambda: seqpar.solve(cell, x, jacobian=jac))
        newton.PIPELINED = True
        row["ratio"] = row["pipelined_peak_MB"] / row["lookback_peak_MB"]
        print(row, flush=True)
        rows.append(row)
    return rows


def graph_memory_rows():
    """Peak device memory of a forward solve replayed from CUDA graphs against the eager loop (no_grad, GRU(D, D),
    B = 16, T = 100k: the shapes where graphs apply).  Eager: the peak of a second solve over what was allocated
    before it.  Graphs: from a cleared cache, three solves (eager, capture, replay); the peak of the third over
    what was allocated before the first (so the static buffers held between solves count), and what stays held."""
    import seqpar.graphs as graphs

    rows = []
    saved = graphs.ENABLED
    try:
        for D in (1, 4):
            torch.manual_seed(0)
            cell = GRU(D, D).cuda()
            x = torch.randn(100_000, 16, D, device="cuda")
            row = {"cell": "gru", "D": D, "B": 16, "T": 100_000, "jacobian": "dense"}
            with torch.no_grad():
                def solve():
                    seqpar.solve(cell, x, jacobian="dense")
                graphs.ENABLED = False
                solve()
                row["eager_peak_MB"] = peak_MB(solve)
                graphs.ENABLED = True
                graphs.clear()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                for _ in range(2):  # eager (the key is seen), then the capture
                    solve()
                row["graphs_peak_MB"] = peak_MB(solve, base)
                row["graphs_held_MB"] = (torch.cuda.memory_allocated() - base) / 2**20
                graphs.clear()
            row["ratio"] = row["graphs_peak_MB"] / row["eager_peak_MB"]
            print(row, flush=True)
            rows.append(row)
    finally:
        graphs.ENABLED = saved
        graphs.clear()
    return rows


def profile_short_solve():
    torch.manual_seed(0)
    cell = GRU(1, 1).cuda()
    x = torch.randn(100_000, 16, 1, device="cuda")
    for _ in range(3):
        seqpar.solve(cell, x, jacobian="dense")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        seqpar.solve(cell, x, jacobian="dense")
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)


HOST_PARTS = [  # (module, attribute): host time spent inside each during a solve (no device sync added)
    ("seqpar.solver", "check_solve_args"), ("seqpar.solver", "check_cell_tensors_finite"),
    ("seqpar.solver", "_check_first_steps"), ("seqpar.solver", "get_communicator"),
    ("seqpar.autograd", "newton_solve"), ("seqpar.newton", "pipelined_iterations"),
    ("seqpar.kernels.pipelined_diag_gru", "first_pass"), ("seqpar.kernels.pipelined_diag_gru", "pipelined_step"),
    ("seqpar.kernels.scan_diag", "scan_diag"), ("seqpar.kernels.pipelined_diag_gru", "scan_groups"),
    ("seqpar.newton", "gather_boundary"),
    ("seqpar.backend", "pipelined_stepper"), ("seqpar.autograd", "SolveFunction.forward"),
    ("seqpar.cells", "GRU.project_inputs"), ("seqpar.kernels.scan_diag", "lookback_buffers"),
    ("seqpar.pipeline", "Stopping"), ("seqpar.newton", "_Stopping.record"),
]


def host_breakdown(T=100_000, reps=20):
    """Host milliseconds per solve inside each of ``HOST_PARTS`` (GRU(1, 1), B = 16, no_grad and grad),
    and the solve's wall time; the difference is the rest (autograd Function, info, casts)."""
    import importlib

    totals, orig = {}, {}
    for mod, name in HOST_PARTS:
        m = importlib.import_module(mod)
        owner, attr = m, name
        while "." in attr:  # Class.method
            head, attr = attr.split(".", 1)
            owner = getattr(owner, head)
        if not hasattr(owner, attr):
            continue
        f = getattr(owner, attr)
        orig[(owner, attr)] = f

        def wrapped(*a, _f=f, _k=f"{mod}.{name}", **kw):
            t0 = time.perf_counter()
            try:
                return _f(*a, **kw)
            finally:
                totals[_k] = totals.get(_k, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, staticmethod(wrapped) if isinstance(owner, type) and attr == "forward" else wrapped)
    torch.manual_seed(0)
    cell = GRU(1, 1).cuda()
    x = torch.randn(T, 16, 1, device="cuda")
    out = {}
    try:
        for mode in ("no_grad", "grad"):
            ctx = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
            with ctx:
                for _ in range(3):
                    seqpar.solve(cell, x, jacobian="dense")
                torch.cuda.synchronize()
                totals.clear()
                t0 = time.perf_counter()
                for _ in range(reps):
                    seqpar.solve(cell, x, jacobian="dense")
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / reps
            out[mode] = {"solve_ms": 1e3 * wall, **{k: 1e3 * v / reps for k, v in totals.items()}}
            print(mode, {k: round(v, 3) for k, v in out[mode].items()}, flush=True)
    finally:
        for (owner, attr), f in orig.items():
            setattr(owner, attr, staticmethod(f) if isinstance(owner, type) and attr == "forward" else f)
    # the floor: host microseconds per launch of a tiny Triton kernel and of a tiny torch op
    h = torch.zeros(8, 16, 1, device="cuda")
    xp = torch.zeros(8, 16, 3, device="cuda")
    w = torch.zeros(3, device="cuda")
    bnd = torch.zeros(16, 1, device="cuda")
    cfg = pk.run_config(8, 16)
    for _ in range(5):
        pk.first_pass(h, xp, w, None, bnd, cfg)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        pk.first_pass(h, xp, w, None, bnd, cfg)
    out["first_pass_host_us"] = 1e6 * (time.perf_counter() - t0) / 200
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        h.add_(0.0)
    out["torch_op_host_us"] = 1e6 * (time.perf_counter() - t0) / 200
    t0 = time.perf_counter()
    for _ in range(200):
        float(h[0, 0, 0])
    out["item_sync_us"] = 1e6 * (time.perf_counter() - t0) / 200
    print({k: out[k] for k in ("first_pass_host_us", "torch_op_host_us", "item_sync_us")}, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=common.out_path("pipeline.json"))
    ap.add_argument("--steps", type=int, default=2**20)
    ap.add_argument("--long-steps", type=int, default=10 * 2**20, help="T of the LONG rows (0: none)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the iteration sweep")
    ap.add_argument("--nominal-gbps", type=float, default=4300.0)
    ap.add_argument("--skip-solves", action="store_true")
    ap.add_argument("--host-only", action="store_true", help="only the host-time breakdown of a short solve")
    ap.add_argument("--solves-only", action="store_true", help="only the full solves")
    ap.add_argument("--memory-only", action="store_true", help="only the peak memory of 1M-step solves")
    ap.add_argument("--graph-memory-only", action="store_true",
                    help="only the peak memory of 100k-step solves replayed from CUDA graphs against the eager loop")
    ap.add_argument("--fused-only", action="store_true", help="only solves with the fused carry scan on / off")
    ap.add_argument("--dense-only", action="store_true",
                    help="only the summary scans and the small-D dense kernel's run-length sweep")
    args = ap.parse_args()
    result = {"env": env_info(), "args": vars(args)}
    if args.memory_only:
        result["memory"] = memory_rows()
        write_json(args.out, result)
        return
    if args.graph_memory_only:
        result["graph_memory"] = graph_memory_rows()
        write_json(args.out, result)
        return
    if args.fused_only:
        result["fused"] = fused_rows(args)
        write_json(args.out, result)
        return
    if args.dense_only:
        result["summary_scans"] = summary_scan_rows(args)
        write_json(args.out, result)
        result["dense_sweep"] = dense_sweep_rows(args)
        write_json(args.out, result)
        return
    if args.host_only:
        result["host_gru1_100k"] = host_breakdown()
        write_json(args.out, result)
        return
    if not args.solves_only:
        result["copy_GBps"] = gbps = copy_gbps()
        print(f"copy bandwidth {gbps:.0f} GB/s", flush=True)
        result["iterations"] = iteration_rows(args, gbps)
        write_json(args.out, result)
    if not args.skip_solves:
        result["solves"] = solve_rows(args)
        write_json(args.out, result)
        result["host_gru1_100k"] = host_breakdown()
        write_json(args.out, result)
        result["profile_gru1_100k"] = profile_short_solve()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
