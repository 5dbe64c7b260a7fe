#!/usr/bin/env python
"""Solve a seeded demo recurrence over a long sequence (the README's default job).

Single process:   python launch/solve.py --seq-len 1M
(The sharded variants -- torchrun, mpiexec, Ray -- use the same options.)

Prints per-iteration residuals and a summary; ``--verify`` compares with
step-by-step evaluation; ``--json PATH`` writes the summary as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import seqpar  # noqa: E402
from seqpar.problems import CELLS, make_cell, make_inputs, parse_count  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true", help="compare with step-by-step evaluation")
    p.add_argument("--verify-window", type=parse_count, default=None,
                   help="verify only the first N steps (default: whole sequence)")
    p.add_argument("--json", default=None, help="write the summary to this JSON file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    T, B, H = args.seq_len, args.batch, args.hidden
    if T < 1:
        raise SystemExit("--seq-len must be >= 1")
    d_in = args.input_size or H
    cell = make_cell(args.cell, d_in, H, seed=args.seed, dtype=torch.float32 if dtype == torch.bfloat16 else dtype,
                     device=device)
    inputs = make_inputs(0, T, B, d_in, seed=args.seed, dtype=dtype, device=device)
    print(f"seqpar solve: cell={args.cell} T={T:,} B={B} H={H} D={cell.state_size} jacobian={args.jacobian} "
          f"device={device} dtype={args.dtype}", flush=True)

    def progress(it, res):
        print(f"  iter {it:3d}  residual {res:.3e}", flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        states, info = seqpar.solve(cell, inputs, jacobian=args.jacobian, tol=args.tol, max_iter=args.max_iter,
                                    return_info=True, callback=progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    summary = {
        "cell": args.cell, "seq_len": T, "batch": B, "hidden": H, "jacobian": info.jacobian,
        "device": str(device), "dtype": args.dtype, "world_size": 1,
        "iterations": info.iterations, "converged": info.converged, "residual": info.residual,
        "fallback": info.fallback, "fallback_steps": info.fallback_steps,
        "wall_time_s": wall, "steps_per_s": T * B / wall,
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None),
    }
    if args.verify:
        n = min(T, args.verify_window or T)
        with torch.no_grad():
            ref = seqpar.sequential_solve(cell, inputs[:n], torch.zeros(B, cell.state_size, dtype=dtype, device=device))
        err = (states[:n].float() - ref.float()).abs().max().item()
        scale = max(1.0, ref.float().abs().max().item())
        summary.update(verify_steps=n, verify_max_abs_error=err, verify_rel_error=err / scale)
    print("summary: " + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if info.converged else 1


if __name__ == "__main__":
    sys.exit(main())
