#!/usr/bin/env python
"""Solve a seeded demo recurrence over a long time axis, sharded across ranks.

    python launch/solve.py --seq-len 1M                                   # one process
    torchrun --nproc-per-node N launch/solve.py --seq-len 10M             # NCCL on GPUs, gloo on CPU
    mpiexec -n N python launch/solve.py --backend mpi --seq-len 10M       # mpi4py, via host memory
    python launch/ray_solve.py --num-workers N [--use-gpu] --seq-len 10M  # the same job on Ray

Each rank generates only its own contiguous time shard of the inputs
(seqpar.problems.make_inputs), so a 10M+ step sequence never sits on one
rank; the cell and h0 = 0 are identical on every rank.  Rank 0 prints the
per-iteration residuals and a summary (world size, T, iterations, converged,
wall time, steps/s, peak memory per rank).

``--verify`` compares with step-by-step evaluation (rank by rank) of the
whole sequence or of its first ``--verify-window`` steps, and checks the
recurrence residual ``|h_t - f(h_{t-1}, u_t)|`` on every step of every shard.
``--out DIR`` writes each rank's states shard plus ``manifest.json``.
A rank that fails makes the whole job exit non-zero (never a hang).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import seqpar  # noqa: E402
from seqpar import distributed as sd  # noqa: E402
from seqpar.newton import step_residuals  # noqa: E402
from seqpar.shards import boundary_from_lasts  # noqa: E402
from seqpar.problems import CELLS, make_cell, make_inputs, parse_count, shard_range  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def build_parser(prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=parse_count, default=parse_count("1M"), help="T: 4096, 1e6, 10M, ... (default 1M)")
    p.add_argument("--cell", choices=sorted(CELLS), default="diag-gru")
    p.add_argument("--hidden", type=int, default=64, help="hidden size H (default 64)")
    p.add_argument("--input-size", type=int, default=None, help="input features (default = hidden)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--jacobian", default="auto", help="auto | dense | diag | block | block:k")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--tol", type=float, default=None)
    p.add_argument("--max-iter", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=None, help="time steps per chunk of recomputed Jacobians")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["auto", "nccl", "gloo", "mpi", "none"], default="auto",
                   help="auto: torchrun env -> nccl (cuda) / gloo (cpu), mpiexec env -> mpi, else one process")
    p.add_argument("--timeout", type=float, default=sd.DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait before the job fails (default %(default)s)")
    p.add_argument("--verify", action="store_true",
                   help="compare with step-by-step evaluation and check the recurrence residual of every step")
    p.add_argument("--verify-window", type=parse_count, default=None,
                   help="step-by-step comparison of the first N steps only (default: the whole sequence)")
    p.add_argument("--json", default=None, help="rank 0 writes the summary to this JSON file")
    p.add_argument("--out", default=None, help="directory: each rank writes its states shard, rank 0 a manifest")
    p.add_argument("--out-format", choices=["npy", "safetensors"], default="npy")
    p.add_argument("--quiet", action="store_true", help="no per-iteration lines")
    p.add_argument("--inject-failure", default=None, metavar="RANK:ITER[:hang]", type=parse_inject_failure,
                   help="testing: raise (or hang) on RANK at Newton iteration ITER; the job must fail, not hang")
    return p


class InjectedFailure(RuntimeError):
    pass


def parse_inject_failure(text):
    """'RANK:ITER[:hang|raise]' -> (rank, iteration, mode); argparse reports errors naming the option."""
    parts = str(text).split(":")
    if len(parts) not in (2, 3) or not all(p.strip().isdigit() for p in parts[:2]):
        raise argparse.ArgumentTypeError(f"expected RANK:ITER[:hang] with non-negative integers, e.g. 1:3 or "
                                         f"1:3:hang; got {text!r}")
    mode = parts[2] if len(parts) == 3 else "raise"
    if mode not in ("raise", "hang"):
        raise argparse.ArgumentTypeError(f"the third field must be 'hang' or 'raise'; got {mode!r} in {text!r}")
    return int(parts[0]), int(parts[1]), mode


def _launch_world_size(backend: str) -> int:
    """World size from the launcher's environment (before any process group exists)."""
    if backend == "none":
        return 1
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def check_inject_failure(parser, args, world_size: int):
    if args.inject_failure is not None and args.inject_failure[0] >= world_size:
        parser.error(f"argument --inject-failure: rank {args.inject_failure[0]} is out of range for a job of "
                     f"{world_size} rank(s) (0..{world_size - 1})")


def verify_bounds(dtype: torch.dtype, n_win: int, tol) -> tuple:
    """(relative error bound vs step-by-step evaluation, recurrence residual bound) for states in ``dtype``.

    A converged solve matches sequential evaluation to about eps * sqrt(T) (docs/design.md); the
    residual of states stored in ``dtype`` is at least its rounding (bfloat16: eps = 7.8e-3).
    """
    eps = torch.finfo(dtype).eps
    if dtype == torch.bfloat16:
        return 5e-2, max(2e-2, 10 * (tol or 0.0))
    if dtype == torch.float64:
        return max(1e-9, 50 * eps * max(1.0, n_win) ** 0.5), max(1e-9, 10 * (tol or 1e-12))
    return max(1e-5, 50 * eps * max(1.0, n_win) ** 0.5), max(1e-4, 10 * (tol or 4e-6))


def _peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return str(b)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _recurrence_residual(cell, inputs, states, h0, comm):
    """max_t |h_t - f(h_{t-1}, u_t)| / max(1, |f|) over every step of every shard, independently of the solver."""
    n = states.shape[0]
    B, D = h0.shape
    cdt = torch.float64 if states.dtype == torch.float64 else torch.float32
    last = states[-1].to(cdt) if n else h0.to(cdt)
    lasts = comm.all_gather(torch.cat([last.reshape(-1), last.new_tensor([float(n)])]))
    boundary = boundary_from_lasts(lasts, h0.to(cdt), comm.rank, B, D)
    worst = torch.zeros((), dtype=cdt, device=states.device)
    step = 1 << 18
    for s in range(0, n, step):
        e = min(n, s + step)
        h = states[s:e].to(cdt)
        hp = torch.cat([(boundary if s == 0 else states[s - 1].to(cdt)).unsqueeze(0), h[:-1]], 0)
        f = cell.step(hp, cell.project_inputs(inputs[s:e].to(cdt)).to(cdt))
        r = step_residuals(h, f).max()
        worst = torch.maximum(worst, r) if not torch.isnan(r) else r
    allw = comm.all_gather(worst.reshape(1).to(torch.float64)).reshape(-1)
    return float("nan") if bool(torch.isnan(allw).any()) else float(allw.max())


def _verify(args, cell, inputs, states, h0, start, T, comm):
    n_win = min(T, args.verify_window or T)
    m = max(0, min(inputs.shape[0], n_win - start))
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = seqpar.sequential_solve(cell, inputs[:m], h0, comm)
    err = (states[:m].double() - ref.double()).abs().max() if m else torch.zeros((), dtype=torch.float64)
    scale = ref.double().abs().max() if m else torch.zeros((), dtype=torch.float64)
    both = comm.all_gather(torch.stack([err.cpu(), scale.cpu()]).to(torch.float64))
    err, scale = float(both[:, 0].max()), max(1.0, float(both[:, 1].max()))
    res = _recurrence_residual(cell, inputs, states, h0, comm)
    bound, res_bound = verify_bounds(states.dtype, n_win, args.tol)
    rel = err / scale
    return {
        "verify_window": f"[0, {n_win})" + (" (whole sequence)" if n_win == T else f" of T={T}"),
        "verify_steps": n_win, "verify_max_abs_error": err, "verify_rel_error": rel, "verify_bound": bound,
        "verify_recurrence_residual_all_steps": res, "verify_residual_bound": res_bound,
        "verify_ok": bool(rel <= bound and res <= res_bound),
        "verify_time_s": time.perf_counter() - t0,
    }


def _write_out(args, states, start, comm, summary):
    os.makedirs(args.out, exist_ok=True)
    rank, P = comm.rank, comm.world_size
    arr = states.detach()
    stored = arr.dtype
    if arr.dtype == torch.bfloat16 and args.out_format == "npy":
        arr, stored = arr.float(), torch.float32
    name = f"states_rank{rank:05d}.{args.out_format}"
    path = os.path.join(args.out, name)
    if args.out_format == "npy":
        import numpy as np

        np.save(path, arr.cpu().numpy())
    else:
        from safetensors.torch import save_file

        save_file({"states": arr.cpu().contiguous()}, path, metadata={"start": str(start), "rank": str(rank)})
    info = torch.tensor([float(start), float(states.shape[0])], dtype=torch.float64)
    rows = comm.all_gather(info)  # also: every shard is on disk before the manifest names it
    if rank == 0:
        manifest = {
            "format": args.out_format, "layout": "time-major (T_shard, B, D) per file; concatenate in rank order",
            "dtype": str(stored).replace("torch.", ""), "seq_len": summary["seq_len"], "batch": summary["batch"],
            "state_size": int(states.shape[-1]), "world_size": P,
            "shards": [{"rank": q, "file": f"states_rank{q:05d}.{args.out_format}", "start": int(rows[q, 0]),
                        "length": int(rows[q, 1])} for q in range(P)],
            "summary": summary,
        }
        with open(os.path.join(args.out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)


def run(args, ctx: sd.DistContext) -> dict:
    """The job on this rank; returns the summary (identical on every rank).  Raises on failure."""
    comm, device = ctx.comm, ctx.device
    rank, P = comm.rank, comm.world_size
    dtype = DTYPES[args.dtype]
    T, B, H = args.seq_len, args.batch, args.hidden
    if T < 1:
        raise ValueError("--seq-len must be >= 1")
    d_in = args.input_size or H
    start, length = shard_range(T, P, rank)
    t_setup = time.perf_counter()
    cell = make_cell(args.cell, d_in, H, seed=args.seed, dtype=torch.float32 if dtype == torch.bfloat16 else dtype,
                     device=device)
    inputs = make_inputs(start, length, B, d_in, seed=args.seed, dtype=dtype, device=device)
    h0 = torch.zeros(B, cell.state_size, dtype=dtype, device=device)
    setup_s = time.perf_counter() - t_setup
    if rank == 0:
        print(f"seqpar solve: cell={args.cell} T={T:,} B={B} H={H} D={cell.state_size} jacobian={args.jacobian} "
              f"device={device.type} dtype={args.dtype} world_size={P} backend={ctx.backend} "
              f"shard={length:,} steps/rank", flush=True)

    fail_rank, fail_iter, fail_mode = (None, None, "raise")
    if args.inject_failure:
        if isinstance(args.inject_failure, str):  # run() called with a hand-made namespace
            args.inject_failure = parse_inject_failure(args.inject_failure)
        fail_rank, fail_iter, fail_mode = args.inject_failure
        if fail_rank >= P:
            raise ValueError(f"--inject-failure: rank {fail_rank} is out of range for {P} rank(s)")

    def progress(it, res):
        if rank == fail_rank and it == fail_iter:
            if fail_mode == "hang":  # a rank that stops answering: the others must time out, not wait forever
                print(f"[rank {rank}] injected hang at Newton iteration {it} (--inject-failure)", flush=True)
                time.sleep(10**6)
            raise InjectedFailure(f"injected failure on rank {rank} at Newton iteration {it} (--inject-failure)")
        if rank == 0 and not args.quiet:
            print(f"  iter {it:3d}  residual {res:.3e}", flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # warm-up on a short prefix of every shard: Triton compiles its kernels on the first call, which
    # would otherwise be counted in the solve time (seconds against a sub-second solve on GPUs)
    t_warm = time.perf_counter()
    if device.type == "cuda":
        with torch.no_grad():
            seqpar.solve(cell, inputs[:min(length, 4096)], h0, jacobian=args.jacobian, tol=args.tol,
                         max_iter=args.max_iter, chunk_size=args.chunk_size, group=comm if P > 1 else None)
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = time.perf_counter() - t_warm
    comm.all_gather(torch.zeros(1))  # start together
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        states, info = seqpar.solve(cell, inputs, h0, jacobian=args.jacobian, tol=args.tol, max_iter=args.max_iter,
                                    chunk_size=args.chunk_size, return_info=True, callback=progress,
                                    group=comm if P > 1 else None)
    _sync(device)
    wall_local = time.perf_counter() - t0
    row = torch.tensor([wall_local, float(_peak_memory_bytes(device)), float(length), setup_s], dtype=torch.float64)
    rows = comm.all_gather(row)
    wall = float(rows[:, 0].max())
    summary = {
        "cell": args.cell, "seq_len": T, "batch": B, "hidden": H, "state_size": cell.state_size,
        "jacobian": info.jacobian, "device": device.type, "dtype": args.dtype, "world_size": P,
        "backend": ctx.backend, "shard_lengths": [int(v) for v in rows[:, 2].tolist()],
        "iterations": info.iterations, "converged": bool(info.converged), "residual": info.residual,
        "residuals": info.residuals, "fallback": info.fallback, "fallback_steps": info.fallback_steps,
        "wall_time_s": wall, "steps_per_s": T * B / wall if wall > 0 else float("inf"),
        "setup_time_s": float(rows[:, 3].max()), "warmup_time_s": warmup_s,
        "peak_memory_bytes_per_rank": [int(v) for v in rows[:, 1].tolist()],
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
    }
    if args.verify:
        summary.update(_verify(args, cell, inputs, states, h0, start, T, comm))
    if args.out:
        _write_out(args, states, start, comm, summary)
    if rank == 0:
        mem = ", ".join(_fmt_bytes(b) for b in summary["peak_memory_bytes_per_rank"])
        print(f"summary: world_size={P} backend={ctx.backend} T={T:,} B={B} iterations={info.iterations} "
              f"converged={info.converged} residual={info.residual:.3e} wall_time={wall:.3f}s "
              f"(warm; first-call compilation {warmup_s:.2f}s not included) "
              f"steps/s={summary['steps_per_s']:.4g} peak_memory/rank=[{mem}] ({summary['peak_memory_kind']})",
              flush=True)
        if info.fallback:
            print(f"  fallback={info.fallback}: {info.fallback_steps:,} steps repaired", flush=True)
        if args.verify:
            print(f"verify: window {summary['verify_window']}: max abs error {summary['verify_max_abs_error']:.3e} "
                  f"(rel {summary['verify_rel_error']:.3e}, bound {summary['verify_bound']:.1e}); recurrence "
                  f"residual over all {T:,} steps {summary['verify_recurrence_residual_all_steps']:.3e} -> "
                  f"{'OK' if summary['verify_ok'] else 'FAILED'}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    return summary


def _set_threads(ctx: sd.DistContext):
    """One process per core share on CPU (torchrun already sets OMP_NUM_THREADS=1 for N > 1)."""
    if ctx.device.type == "cpu" and ctx.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_inject_failure(parser, args, _launch_world_size(args.backend))
    ctx = None
    try:
        ctx = sd.init_from_env(args.backend, args.device, args.timeout)
        _set_threads(ctx)
        summary = run(args, ctx)
        ok = summary["converged"] and summary.get("verify_ok", True)
    except BaseException as e:  # noqa: BLE001 - any failure takes the whole job down, at once
        if ctx is not None and ctx.kind == "single":
            raise
        rank = ctx.rank if ctx is not None else os.environ.get("RANK", "?")
        sys.stdout.flush()
        print(f"[rank {rank}] seqpar solve failed: {type(e).__name__}: {e}", file=sys.stderr)
        if not isinstance(e, (seqpar.RemoteRankError, InjectedFailure, KeyboardInterrupt)):
            traceback.print_exc()
        if ctx is None:
            raise
        sd.abort(ctx, 1)  # never returns: no destroy_process_group / finalize that could wait on a dead peer
    ctx.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
