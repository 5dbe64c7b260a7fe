"""Solve a seeded demo recurrence over a long time axis, sharded across ranks (``seqpar-solve``).

    seqpar-solve --seq-len 1M                                             # one process
    torchrun --nproc-per-node N -m seqpar.cli.solve --seq-len 10M         # NCCL on GPUs, gloo on CPU
    mpiexec -n N python -m seqpar.cli.solve --backend mpi --seq-len 10M   # mpi4py, via host memory
    seqpar-ray-solve --num-workers N [--use-gpu] --seq-len 10M            # the same job on Ray
    (from a checkout without installing: python launch/solve.py ..., torchrun ... launch/solve.py ...)

Each rank generates only its own contiguous time shard of the inputs
(seqpar.problems.make_inputs), so a 10M+ step sequence never sits on one
rank; the cell and h0 = 0 are identical on every rank.  Rank 0 prints the
per-iteration residuals, then a summary (world size, T, iterations, converged,
wall time, steps/s, peak memory per rank) with the speed-up over step-by-step
evaluation: each rank times ``seqpar.solve(..., method="sequential")`` on the
first ``--baseline-window`` steps of its shard (default 20k), extrapolated to
the whole sequence (the time one process needs to evaluate it step by step).

What is fast where: the parallel solve pays off on GPUs (fused Triton kernels,
many steps per second per rank); on CPU the pure-PyTorch path runs and is
mainly for trying things out, tests and checking results: for small hidden
sizes it beats a Python step-by-step loop (the printed speed-up says by how
much on your machine), but dense Jacobians (--cell gru/lstm/elman with the
default --jacobian auto) cost O(D^3) per step and are slow on CPU; use
--jacobian diag (quasi-Newton) or the diagonal cells there.

``--verify`` (after the summary) compares with step-by-step evaluation (rank by
rank) of the whole sequence or of its first ``--verify-window`` steps, and
checks the recurrence residual ``|h_t - f(h_{t-1}, u_t)|`` on every step of
every shard.  ``--out DIR`` writes each rank's states shard plus
``manifest.json`` (refused for a non-empty DIR unless ``--overwrite``, which
removes only seqpar's own files there).  Command-line mistakes are reported
before any work starts (exit status 2); a rank that fails makes the whole job
exit non-zero (never a hang).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import sys
import time
import traceback

import torch

import seqpar
from seqpar import distributed as sd
from seqpar.newton import step_residuals
from seqpar.problems import CELLS, make_cell, make_inputs, parse_count, shard_range
from seqpar.shards import gather_boundary

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
JACOBIANS = "auto, dense, diag, block, block:k"
OWN_FILES = ("states_rank*.npy", "states_rank*.safetensors", "manifest.json")
DEFAULT_BASELINE_WINDOW = 20_000


# ------------------------------------------------------------------ argument parsing
class Parser(argparse.ArgumentParser):
    """argparse with one line per mistake (no usage block), printed once (by rank 0 of a launched job)."""

    def error(self, message):
        self.errors([message])

    def errors(self, messages):
        if _launch_rank() == 0:
            for m in messages:
                sys.stderr.write(f"{self.prog}: error: {m}\n")
            sys.stderr.flush()
        sys.exit(2)


def _launch_rank() -> int:
    """This process's rank from the launcher's environment (0 without a launcher)."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return 0


def count(text) -> int:
    """A step count: 4096, 1e6, 2.5k, 10M."""
    try:
        return parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_count(text) -> int:
    v = count(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {text!r}")
    return v


def _int_at_least(text, low: int, what: str) -> int:
    try:
        v = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} integer; got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected a {what} integer; got {text!r}")
    return v


def positive_int(text) -> int:
    return _int_at_least(text, 1, "positive")


def nonnegative_int(text) -> int:
    return _int_at_least(text, 0, "non-negative")


def tolerance(text) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), e.g. 1e-6; got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), e.g. 1e-6; got {text!r}")
    return v


def positive_seconds(text) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0; got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0; got {text!r}")
    return v


def jacobian_arg(text) -> str:
    t = str(text).strip()
    if t in ("auto", "dense", "diag", "block"):
        return t
    if t.startswith("block:") and t[6:].isdigit() and int(t[6:]) >= 1:
        return t
    raise argparse.ArgumentTypeError(f"expected one of {JACOBIANS} (k a block size dividing the state size); "
                                     f"got {text!r}")


def device_arg(text) -> str:
    t = str(text).strip()
    if t == "cpu" or t == "cuda" or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"expected cuda, cuda:N or cpu; got {text!r}")


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


def build_parser(prog=None):
    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=positive_count, default=parse_count("1M"),
                   help="T: 4096, 1e6, 10M, ... (default 1M)")
    p.add_argument("--cell", choices=sorted(CELLS), default="diag-gru")
    p.add_argument("--hidden", type=positive_int, default=64, help="hidden size H (default 64)")
    p.add_argument("--input-size", type=positive_int, default=None, help="input features (default = hidden)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--jacobian", type=jacobian_arg, default="auto", help=JACOBIANS.replace(", ", " | "))
    p.add_argument("--device", type=device_arg, default=None, help="cuda | cuda:N | cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--tol", type=tolerance, default=None)
    p.add_argument("--max-iter", type=nonnegative_int, default=None)
    p.add_argument("--chunk-size", type=positive_int, default=None, help="time steps per chunk of recomputed Jacobians")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["auto", "nccl", "gloo", "mpi", "none"], default="auto",
                   help="auto: torchrun env -> nccl (cuda) / gloo (cpu), mpiexec env -> mpi, else one process")
    p.add_argument("--timeout", type=positive_seconds, default=sd.DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait before the job fails (default %(default)s)")
    p.add_argument("--baseline-window", type=count, default=DEFAULT_BASELINE_WINDOW,
                   help="steps of each shard evaluated step by step for the printed speed-up, extrapolated to "
                        "the whole sequence (default 20k; 0: no baseline)")
    p.add_argument("--verify", action="store_true",
                   help="compare with step-by-step evaluation and check the recurrence residual of every step")
    p.add_argument("--verify-window", type=positive_count, default=None,
                   help="step-by-step comparison of the first N steps only (default: the whole sequence)")
    p.add_argument("--json", default=None, help="rank 0 writes the summary to this JSON file")
    p.add_argument("--out", default=None, help="directory: each rank writes its states shard, rank 0 a manifest")
    p.add_argument("--out-format", choices=["npy", "safetensors"], default="npy")
    p.add_argument("--overwrite", action="store_true",
                   help="--out may be a non-empty directory: seqpar's own files there (states_rank*.npy|"
                        "safetensors, manifest.json) are removed first, nothing else")
    p.add_argument("--quiet", action="store_true", help="no per-iteration lines")
    p.add_argument("--inject-failure", default=None, metavar="RANK:ITER[:hang]", type=parse_inject_failure,
                   help="testing: raise (or hang) on RANK at Newton iteration ITER; the job must fail, not hang")
    return p


def _launch_world_size(backend: str) -> int:
    """World size from the launcher's environment (before any process group exists)."""
    if backend == "none":
        return 1
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _state_size(cell: str, hidden: int) -> int:
    return 2 * hidden if cell in ("lstm", "diag-lstm") else hidden


def _own_files(directory: str) -> list:
    found = []
    for pat in OWN_FILES:
        found += glob.glob(os.path.join(glob.escape(directory), pat))
    return sorted(found)


def _check_writable_dir(option: str, directory: str, errors: list, target: str):
    if not os.path.exists(directory):
        errors.append(f"argument {option}: cannot write {target!r}: directory {directory!r} does not exist")
    elif not os.path.isdir(directory):
        errors.append(f"argument {option}: cannot write {target!r}: {directory!r} is not a directory")
    elif not os.access(directory, os.W_OK | os.X_OK):
        errors.append(f"argument {option}: cannot write {target!r}: directory {directory!r} is not writable")


def check_args(parser, args, world_size: int, *, check_device: bool = True):
    """Every mistake the options can show before any work starts: one line each, exit status 2."""
    errors = []
    D = _state_size(args.cell, args.hidden)
    jac = args.jacobian
    if jac == "block" or jac.startswith("block:"):
        k = int(jac[6:]) if jac.startswith("block:") else 2
        if D % k:
            errors.append(f"argument --jacobian: block size {k} does not divide the state size {D} "
                          f"(--cell {args.cell} --hidden {args.hidden})")
    if check_device and args.device is not None and args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            errors.append(f"argument --device: {args.device} requested but no CUDA GPU is available here "
                          f"(torch {torch.__version__}); use --device cpu")
        elif ":" in args.device and int(args.device.split(":")[1]) >= torch.cuda.device_count():
            errors.append(f"argument --device: {args.device} requested but only {torch.cuda.device_count()} "
                          f"GPU(s) are visible")
    if args.backend == "nccl" and args.device == "cpu":
        errors.append("argument --backend: nccl needs GPUs; use --backend gloo with --device cpu")
    if args.verify_window is not None and not args.verify:
        errors.append("argument --verify-window: only used with --verify")
    if args.json is not None:
        if os.path.isdir(args.json):
            errors.append(f"argument --json: {args.json!r} is a directory; give a file name, e.g. "
                          f"{os.path.join(args.json, 'summary.json')}")
        else:
            _check_writable_dir("--json", os.path.dirname(os.path.abspath(args.json)), errors, args.json)
    if args.overwrite and args.out is None:
        errors.append("argument --overwrite: only used with --out DIR")
    if args.out is not None:
        out = os.path.abspath(args.out)
        if os.path.exists(out) and not os.path.isdir(out):
            errors.append(f"argument --out: {args.out!r} exists and is not a directory")
        elif os.path.isdir(out):
            if not os.access(out, os.W_OK | os.X_OK):
                errors.append(f"argument --out: directory {args.out!r} is not writable")
            elif os.listdir(out) and not args.overwrite:
                own = _own_files(out)
                errors.append(f"argument --out: directory {args.out!r} is not empty ({len(os.listdir(out))} "
                              f"entries, {len(own)} of them seqpar output); pass --overwrite to replace seqpar's "
                              f"files there, or choose a new directory")
        else:
            parent = os.path.dirname(out)
            while parent and not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
                errors.append(f"argument --out: cannot create {args.out!r}: {parent!r} is not a writable directory")
        if args.out_format == "safetensors":
            try:
                import safetensors  # noqa: F401
            except ImportError:
                errors.append("argument --out-format: safetensors is not installed (pip install safetensors, "
                              "or pip install 'seqpar[io]'); use --out-format npy")
    if args.inject_failure is not None and args.inject_failure[0] >= world_size:
        errors.append(f"argument --inject-failure: rank {args.inject_failure[0]} is out of range for a job of "
                      f"{world_size} rank(s) (0..{world_size - 1})")
    if errors:
        parser.errors(errors)


def check_inject_failure(parser, args, world_size: int):  # kept for callers of the old launcher
    if args.inject_failure is not None and args.inject_failure[0] >= world_size:
        parser.error(f"argument --inject-failure: rank {args.inject_failure[0]} is out of range for a job of "
                     f"{world_size} rank(s) (0..{world_size - 1})")


class InjectedFailure(RuntimeError):
    pass


# ------------------------------------------------------------------ the job
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


def _fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.3g} s"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _recurrence_residual(cell, inputs, states, h0, comm):
    """max_t |h_t - f(h_{t-1}, u_t)| / max(1, |f|) over every step of every shard, independently of the solver."""
    n = states.shape[0]
    B, D = h0.shape
    cdt = torch.float64 if states.dtype == torch.float64 else torch.float32
    boundary = gather_boundary(comm, states, h0.to(cdt))
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


def _sequential_baseline(args, cell, inputs, h0, T, comm, device) -> dict:
    """Step-by-step evaluation of the first min(shard, --baseline-window) steps of every shard (at the same
    time on every rank), timed, extrapolated to the whole sequence: what one process would need for all T."""
    n = min(inputs.shape[0], args.baseline_window)
    dt = 0.0
    if n:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            seqpar.solve(cell, inputs[:n], h0, method="sequential")
        _sync(device)
        dt = time.perf_counter() - t0
    rows = comm.all_gather(torch.tensor([float(n), dt], dtype=torch.float64))
    steps, secs = float(rows[:, 0].sum()), float(rows[:, 1].sum())
    if steps == 0 or secs <= 0:
        return {}
    per_step = secs / steps
    return {"baseline": "sequential (seqpar.solve(method='sequential'), no_grad), extrapolated",
            "baseline_steps_per_rank": int(rows[:, 0].max()), "baseline_s_per_step": per_step,
            "baseline_extrapolated_s": per_step * T}


def _verify(args, cell, inputs, states, h0, start, T, comm, summary):
    n_win = min(T, args.verify_window or T)
    m = max(0, min(inputs.shape[0], n_win - start))
    if comm.rank == 0:
        est = summary.get("baseline_s_per_step")
        eta = f", about {_fmt_s(est * n_win)} at the measured step-by-step rate" if est else ""
        print(f"verify: step-by-step evaluation of steps [0, {n_win:,}) rank by rank{eta}, then the recurrence "
              f"residual of all {T:,} steps ...", flush=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = seqpar.sequential_solve(cell, inputs[:m], h0, comm)
    err = (states[:m].double() - ref.double()).abs().max() if m else torch.zeros((), dtype=torch.float64)
    scale = ref.double().abs().max() if m else torch.zeros((), dtype=torch.float64)
    both = comm.all_gather(torch.stack([err.cpu(), scale.cpu()]).to(torch.float64))
    err, scale = float(both[:, 0].max()), max(1.0, float(both[:, 1].max()))
    if comm.rank == 0:
        print(f"verify: step-by-step part done in {_fmt_s(time.perf_counter() - t0)}; checking the residual ...",
              flush=True)
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


def _clear_own_files(directory: str) -> list:
    removed = []
    for path in _own_files(directory):
        os.remove(path)
        removed.append(os.path.basename(path))
    return removed


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _versions() -> dict:
    return {"seqpar": seqpar.__version__, "torch": torch.__version__, "python": platform.python_version()}


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
    os.chmod(path, _file_mode())  # safetensors writes 0600, numpy 0666 & ~umask: the same for both
    info = torch.tensor([float(start), float(states.shape[0])], dtype=torch.float64)
    rows = comm.all_gather(info)  # also: every shard is on disk before the manifest names it
    if rank == 0:
        files = [f"states_rank{q:05d}.{args.out_format}" for q in range(P)]
        manifest = {
            "format": args.out_format, "layout": "time-major (T_shard, B, D) per file; concatenate in rank order",
            "dtype": str(stored).replace("torch.", ""), "compute_dtype": args.dtype, "cell": args.cell,
            "jacobian": summary["jacobian"], "jacobian_option": args.jacobian, "seed": args.seed,
            "seq_len": summary["seq_len"], "batch": summary["batch"], "hidden": args.hidden,
            "input_size": args.input_size or args.hidden, "state_size": int(states.shape[-1]), "world_size": P,
            "command_line": list(getattr(args, "command_line", None) or sys.argv),
            "versions": _versions(),
            "shards": [{"rank": q, "file": files[q], "start": int(rows[q, 0]), "length": int(rows[q, 1])}
                       for q in range(P)],
            "summary": summary,
        }
        mpath = os.path.join(args.out, "manifest.json")
        with open(mpath, "w") as f:
            json.dump(manifest, f, indent=2)
        os.chmod(mpath, _file_mode())
        shown = files[0] if P == 1 else f"{files[0]} .. {files[-1]}"
        print(f"wrote {P} states file(s) ({shown}, {args.out_format}, {manifest['dtype']}, time-major "
              f"(T_shard, B, D)) and manifest.json to {os.path.abspath(args.out)}", flush=True)


def run(args, ctx: sd.DistContext, *, print_summary: bool = True) -> dict:
    """The job on this rank; returns the summary (identical on every rank).  Raises on failure."""
    comm, device = ctx.comm, ctx.device
    rank, P = comm.rank, comm.world_size
    dtype = DTYPES[args.dtype]
    T, B, H = args.seq_len, args.batch, args.hidden
    if T < 1:
        raise ValueError("--seq-len must be >= 1")
    baseline_window = getattr(args, "baseline_window", DEFAULT_BASELINE_WINDOW)
    args.baseline_window = baseline_window
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
        if device.type == "cpu" and args.cell in ("gru", "lstm", "elman") and args.jacobian in ("auto", "dense"):
            print(f"  note: exact Newton for --cell {args.cell} uses dense {cell.state_size}x{cell.state_size} "
                  f"Jacobians (O(D^3) per step): slow on CPU; --jacobian diag is much cheaper per iteration",
                  flush=True)
    if getattr(args, "out", None) and getattr(args, "overwrite", False) and rank == 0:
        removed = _clear_own_files(args.out) if os.path.isdir(args.out) else []
        if removed:
            print(f"--overwrite: removed {len(removed)} earlier seqpar file(s) from {os.path.abspath(args.out)}",
                  flush=True)

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
    comm.all_gather(torch.zeros(1))  # start together (and: --overwrite has cleared the directory)
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
        "cell": args.cell, "seq_len": T, "batch": B, "hidden": H, "input_size": d_in, "seed": args.seed,
        "state_size": cell.state_size,
        "jacobian": info.jacobian, "device": device.type, "dtype": args.dtype, "world_size": P,
        "backend": ctx.backend, "shard_lengths": [int(v) for v in rows[:, 2].tolist()],
        "iterations": info.iterations, "converged": bool(info.converged), "residual": info.residual,
        "residuals": info.residuals, "fallback": info.fallback, "fallback_steps": info.fallback_steps,
        "wall_time_s": wall, "steps_per_s": T * B / wall if wall > 0 else float("inf"),
        "setup_time_s": float(rows[:, 3].max()), "warmup_time_s": warmup_s,
        "peak_memory_bytes_per_rank": [int(v) for v in rows[:, 1].tolist()],
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "versions": _versions(),
    }
    if baseline_window > 0:
        summary.update(_sequential_baseline(args, cell, inputs, h0, T, comm, device))
        if "baseline_extrapolated_s" in summary:
            summary["speedup_vs_sequential"] = summary["baseline_extrapolated_s"] / wall if wall > 0 else float("inf")
    if rank == 0 and print_summary:
        print(summary_line(summary, warmup_s), flush=True)
        if info.fallback:
            print(f"  fallback={info.fallback}: {info.fallback_steps:,} steps repaired", flush=True)
        if "speedup_vs_sequential" in summary:
            print(speedup_line(summary), flush=True)
    if args.verify:
        summary.update(_verify(args, cell, inputs, states, h0, start, T, comm, summary))
        if rank == 0 and print_summary:
            print(verify_line(summary), flush=True)
    if args.out:
        _write_out(args, states, start, comm, summary)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote the summary to {os.path.abspath(args.json)}", flush=True)
    return summary


def summary_line(summary: dict, warmup_s: float = None) -> str:
    warmup_s = summary.get("warmup_time_s", 0.0) if warmup_s is None else warmup_s
    mem = ", ".join(_fmt_bytes(b) for b in summary["peak_memory_bytes_per_rank"])
    return (f"summary: world_size={summary['world_size']} backend={summary['backend']} T={summary['seq_len']:,} "
            f"B={summary['batch']} iterations={summary['iterations']} converged={summary['converged']} "
            f"residual={summary['residual']:.3e} wall_time={summary['wall_time_s']:.3f}s "
            f"(warm; first-call compilation {warmup_s:.2f}s not included) "
            f"steps/s={summary['steps_per_s']:.4g} peak_memory/rank=[{mem}] ({summary['peak_memory_kind']})")


def speedup_line(summary: dict) -> str:
    return (f"speed-up vs step-by-step evaluation: {summary['speedup_vs_sequential']:.3g}x (sequential "
            f"{summary['baseline_steps_per_rank']:,} steps per rank at {summary['baseline_s_per_step'] * 1e6:.3g} "
            f"us/step, extrapolated to T={summary['seq_len']:,}: {_fmt_s(summary['baseline_extrapolated_s'])} "
            f"against {_fmt_s(summary['wall_time_s'])})")


def verify_line(summary: dict) -> str:
    return (f"verify: window {summary['verify_window']}: max abs error {summary['verify_max_abs_error']:.3e} "
            f"(rel {summary['verify_rel_error']:.3e}, bound {summary['verify_bound']:.1e}); recurrence "
            f"residual over all {summary['seq_len']:,} steps {summary['verify_recurrence_residual_all_steps']:.3e} "
            f"-> {'OK' if summary['verify_ok'] else 'FAILED'}")


def _set_threads(ctx: sd.DistContext):
    """One process per core share on CPU (torchrun already sets OMP_NUM_THREADS=1 for N > 1)."""
    if ctx.device.type == "cpu" and ctx.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def parse_args(argv=None, prog=None):
    """Parse and check the options (exit status 2 with one line per mistake); records the command line."""
    parser = build_parser(prog=prog)
    args = parser.parse_args(argv)
    check_args(parser, args, _launch_world_size(args.backend))
    args.command_line = [os.path.basename(sys.argv[0]) or "seqpar-solve"] + list(sys.argv[1:] if argv is None
                                                                                  else argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    ctx = None
    try:
        ctx = sd.init_from_env(args.backend, args.device, args.timeout)
        _set_threads(ctx)
        summary = run(args, ctx)
        ok = summary["converged"] and summary.get("verify_ok", True)
    except BaseException as e:  # noqa: BLE001 - any failure takes the whole job down, at once
        if ctx is not None and ctx.kind == "single":
            raise
        rank = ctx.rank if ctx is not None else _launch_rank()
        sys.stdout.flush()
        if isinstance(e, (seqpar.RemoteRankError, InjectedFailure, KeyboardInterrupt)):
            print(f"[rank {rank}] seqpar solve failed: {type(e).__name__}: {e}", file=sys.stderr)
        else:  # the traceback ends with the error (printed once)
            print(f"[rank {rank}] seqpar solve failed:", file=sys.stderr)
            traceback.print_exc()
        if ctx is None:
            sys.exit(1)
        sd.abort(ctx, 1)  # never returns: no destroy_process_group / finalize that could wait on a dead peer
    ctx.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
