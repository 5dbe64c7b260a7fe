#!/usr/bin/env python
"""Scale-out of the sharded solve: weak scaling, strong scaling, capacity.  Run under torchrun:

    torchrun --nproc-per-node N benchmarks/bench_scaling.py --kind weak --steps-per-rank 2.5M --hidden 256
    torchrun --nproc-per-node N benchmarks/bench_scaling.py --kind strong --seq-len 10M --hidden 256
    torchrun --nproc-per-node N benchmarks/bench_scaling.py --kind capacity --hidden 64 --try 100M,50M,20M,10M

(``benchmarks/run_scaling.sh`` runs N = 1, 2, 4, 8 up to the GPUs present.)  Rank 0
appends one JSON row per configuration to --out: time per Newton iteration
(median over repeats), solve time, the share of it spent in the per-iteration
collectives (timed with the device synchronised around each), peak memory per
rank, and for capacity the memory DEER's stored dense Jacobians would need
(T * B * D^2 * 4 bytes).
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


def run_solve(ctx, comm, T, a):
    start, length = shard_range(T, ctx.world_size, ctx.rank)
    dtype = torch.float32
    cell = make_cell(a.cell, a.hidden, a.hidden, seed=0, dtype=dtype, device=ctx.device)
    x = make_inputs(start, length, a.batch, a.hidden, seed=0, dtype=dtype, device=ctx.device)
    times, comm_times, iters = [], [], None
    for rep in range(a.repeats + 1):
        comm.seconds = 0.0
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            _, info = seqpar.solve(cell, x, jacobian=a.jacobian, return_info=True, group=comm)
        sync()
        if rep:  # first run is the warm-up (Triton compilation)
            times.append(time.perf_counter() - t0)
            comm_times.append(comm.seconds)
        iters = info.iterations
    t = statistics.median(times)
    return dict(T=T, steps_per_rank=length, solve_s=t, iterations=iters, converged=info.converged,
                time_per_iter_s=t / max(1, iters + 1), comm_share=statistics.median(comm_times) / t,
                peak_mem_bytes=torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kind", choices=["weak", "strong", "capacity"], required=True)
    p.add_argument("--steps-per-rank", type=parse_count, default=parse_count("2.5M"))
    p.add_argument("--seq-len", type=parse_count, default=parse_count("10M"))
    p.add_argument("--try", dest="tries", default="100M,50M,20M,10M")
    p.add_argument("--cell", default="diag-gru")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--jacobian", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    ctx = init_from_env("auto")
    try:
        comm = TimedComm(ctx.comm)
        rows = []
        if a.kind in ("weak", "strong"):
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
            r.update(kind=a.kind, world_size=ctx.world_size, cell=a.cell, hidden=a.hidden, batch=a.batch,
                     jacobian=a.jacobian, backend=ctx.backend,
                     label=a.label or f"{a.cell} D={a.hidden} B={a.batch}")
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
