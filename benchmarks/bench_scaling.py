#!/usr/bin/env python
"""Scale-out of the sharded solve: weak scaling, strong scaling, capacity.  Run under torchrun:

    torchrun --nproc-per-node N benchmarks/bench_scaling.py --kind weak --steps-per-rank 2.5M --hidden 256
    torchrun --nproc-per-node N benchmarks/bench_scaling.py --kind strong --seq-len 10M --hidden 256
    torchrun --nproc-per-node N benchmarks/bench_scaling.py --kind capacity --hidden 64 --try 100M,50M,20M,10M
    torchrun --nproc-per-node N benchmarks/bench_scaling.py --kind suite     # every row of the scaling table

(``--kind suite`` runs, in one process per rank, strong scaling at T=10M for
DiagGRU D=256 and D=64 and the quasi-Newton GRU D=64, weak scaling at 2.5M
steps per rank D=256, and a training step (forward + backward) at T=1M,
DiagGRU H=256, B=4; ``benchmarks/run_scaling_2gpu.sh`` runs it on 1 and 2 GPUs.)

(``benchmarks/run_scaling.sh`` runs N = 1, 2, 4, 8 up to the GPUs present.)  Rank 0
appends one JSON row per configuration to --out: time per Newton iteration
(median over repeats), solve time, the share of it spent in the per-iteration
collectives (timed with the device synchronised around each), peak memory per
rank, and for capacity the memory DEER's stored dense Jacobians would need
(T * B * D^2 * 4 bytes).  With ``SEQPAR_PHASE_TIMES=sync`` in the environment (``seqpar.phases``)
each row also holds rank 0's seconds per phase of the last solve (``phase_s``: passes, carries,
compose, exchange, ...; the device synchronised after each phase, so the total is slower), and
the suite prints them:

    SEQPAR_PHASE_TIMES=sync bash benchmarks/run_scaling_2gpu.sh
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import common  # noqa: F401
import seqpar
from common import env_info, out_path, sync
from seqpar.comm import Communicator
from seqpar.distributed import abort, init_from_env
from seqpar.problems import make_cell, make_inputs, parse_count, shard_range


class TimedComm(Communicator):
    """Delegates to a communicator and accumulates the wall time of its collectives."""

    def __init__(self, inner):
        self.inner, self.rank, self.world_size, self.seconds = inner, inner.rank, inner.world_size, 0.0

    def _timed(self, fn, *a):
        sync()
        t0 = time.perf_counter()
        out = fn(*a)
        sync()
        self.seconds += time.perf_counter() - t0
        return out

    def all_gather(self, t):
        return self._timed(self.inner.all_gather, t)

    def all_reduce_sum(self, t):
        return self._timed(self.inner.all_reduce_sum, t)

    def broadcast(self, t, src):
        return self._timed(self.inner.broadcast, t, src)


def run_solve(ctx, comm, T, a, train=False):
    """Median solve time (or training step: forward + backward of a weighted sum) over ``a.repeats``
    runs after one warm-up; peak memory of this configuration alone."""
    start, length = shard_range(T, ctx.world_size, ctx.rank)
    dtype = torch.float32
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    input_size = a.input_size or a.hidden
    cell = make_cell(a.cell, input_size, a.hidden, seed=0, dtype=dtype, device=ctx.device)
    x = make_inputs(start, length, a.batch, input_size, seed=0, dtype=dtype, device=ctx.device)
    w = make_inputs(start, length, a.batch, cell.output_size, seed=1, dtype=dtype, device=ctx.device) if train else None
    times, comm_times, iters, info = [], [], None, None
    for rep in range(a.repeats + 1):
        comm.seconds = 0.0
        cell.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        if train:
            states, info = seqpar.solve(cell, x, jacobian=a.jacobian, return_info=True, group=comm)
            (cell.output(states) * w).sum().backward()
            del states
        else:
            with torch.no_grad():
                _, info = seqpar.solve(cell, x, jacobian=a.jacobian, return_info=True, group=comm)
        sync()
        if rep:  # first run is the warm-up (Triton compilation)
            times.append(time.perf_counter() - t0)
            comm_times.append(comm.seconds)
        iters = info.iterations
    t = statistics.median(times)
    row = dict(T=T, steps_per_rank=length, solve_s=t, times_s=times, iterations=iters, converged=info.converged,
               residuals=info.residuals, time_per_iter_s=t / max(1, iters + 1),
               comm_share=statistics.median(comm_times) / t, exchange_s=info.exchange_s,
               corrected_steps=info.corrected_steps, reruns=info.reruns, train=train, phase_s=info.phase_s,
               backward_iterations=info.backward_iterations,
               peak_mem_bytes=torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None,
               gpu=torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu")
    del x, w, cell
    return row


SUITE = [  # (kind, T or steps per rank, cell, hidden, batch, jacobian, input size, label)
    ("strong", "10M", "diag-gru", 256, 1, "auto", None, "diag-gru D=256"),
    ("strong", "10M", "diag-gru", 64, 1, "auto", None, "diag-gru D=64"),
    ("strong", "10M", "gru", 64, 1, "diag", None, "gru D=64 quasi"),
    ("weak", "2.5M", "diag-gru", 256, 1, "auto", None, "diag-gru D=256 weak"),
    ("train", "1M", "diag-gru", 256, 4, "auto", 16, "train diag-gru H=256 B=4"),
]


def run_suite(ctx, comm, a):
    rows = []
    for kind, size, cell, hidden, batch, jac, inp, label in SUITE:
        cfg = argparse.Namespace(**{**vars(a), "cell": cell, "hidden": hidden, "batch": batch, "jacobian": jac,
                                    "input_size": inp})
        n = parse_count(size)
        T = n * ctx.world_size if kind == "weak" else n
        r = run_solve(ctx, comm, T, cfg, train=kind == "train")
        r.update(kind=kind, cell=cell, hidden=hidden, batch=batch, jacobian=jac, label=label)
        if ctx.rank == 0:
            print(f"[suite] P={ctx.world_size} {label}: {r['solve_s'] * 1e3:.1f} ms, {r['iterations']} it, "
                  f"peak {r['peak_mem_bytes'] or 0:.3e} B, corrected {r['corrected_steps']}, reruns {r['reruns']}"
                  + ("".join(f", {k} {v * 1e3:.2f} ms" for k, v in r["phase_s"].items()) if r["phase_s"] else ""),
                  flush=True)
        rows.append(r)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kind", choices=["weak", "strong", "capacity", "suite"], required=True)
    p.add_argument("--steps-per-rank", type=parse_count, default=parse_count("2.5M"))
    p.add_argument("--seq-len", type=parse_count, default=parse_count("10M"))
    p.add_argument("--try", dest="tries", default="100M,50M,20M,10M")
    p.add_argument("--cell", default="diag-gru")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-size", type=int, default=None, help="default: --hidden")
    p.add_argument("--jacobian", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    ctx = init_from_env("auto")
    try:
        comm = TimedComm(ctx.comm)
        rows = []
        if a.kind == "suite":
            rows.extend(run_suite(ctx, comm, a))
        elif a.kind in ("weak", "strong"):
            T = a.steps_per_rank * ctx.world_size if a.kind == "weak" else a.seq_len
            rows.append(run_solve(ctx, comm, T, a))
        else:
            for T in [parse_count(t) for t in a.tries.split(",")]:
                try:
                    r = run_solve(ctx, comm, T, argparse.Namespace(**{**vars(a), "repeats": 1}))
                    ok = torch.tensor([1.0])
                except torch.OutOfMemoryError:
                    r, ok = None, torch.tensor([0.0])
                    torch.cuda.empty_cache()
                if float(ctx.comm.all_gather(ok).min()) > 0:
                    r["deer_jacobian_bytes"] = T * a.batch * a.hidden ** 2 * 4
                    rows.append(r)
                    break
        for r in rows:
            if a.kind != "suite":
                r.update(kind=a.kind, cell=a.cell, hidden=a.hidden, batch=a.batch, jacobian=a.jacobian,
                         label=a.label or f"{a.cell} D={a.hidden} B={a.batch}")
            r.update(world_size=ctx.world_size, backend=ctx.backend)
        if ctx.rank == 0:
            path = a.out or out_path("scaling.json")
            data = json.load(open(path)) if os.path.exists(path) else {"env": env_info(), "rows": []}
            data["rows"].extend(rows)
            with open(path, "w") as f:
                json.dump(data, f, indent=2)
            for r in rows:
                print(json.dumps(r), flush=True)
        ctx.shutdown()
    except BaseException as e:  # noqa: BLE001 - take the whole job down, never hang
        print(f"rank {ctx.rank}: {type(e).__name__}: {e}", flush=True)
        abort(ctx)


if __name__ == "__main__":
    main()
