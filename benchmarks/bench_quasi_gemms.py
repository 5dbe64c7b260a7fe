#!/usr/bin/env python
"""The quasi-Newton GRU's GEMMs on tensor cores (GPU): the whole-row 3xTF32 kernel against the tiled one, and
what that does to the D = 64, B = 8 solve against cuDNN (issue #10's last row).

    python benchmarks/bench_quasi_gemms.py [--shape 64:8] [--steps 1M] [--inits torch,flax] --out $OUT/quasi_gemms.json

In one process, at T steps, B batch rows, D = input = hidden size (fp32):

* ``gemm``: (T B x D) @ (D x 3D) + bias, as the input projection and the recurrent GEMM are: cuBLAS fp32
  (``F.linear``), cuBLAS TF32 (what ``allow_tf32`` would give: 1e-3 off, for scale), the tiled kernel
  (``seqpar.kernels.linear`` with its tiles) and the whole-row kernel (its default for K <= 64); CUDA-event
  medians of --reps after two warm-ups, each one's largest difference from float64 on the first 200k rows;
* ``iteration``: one look-back quasi-Newton iteration (``fused_gru_quasi_step(recurrent="gemm")``) with the
  whole-row and (``session12``) the tiled GEMM; the pass from the zero iterate (no GEMM) at QUASI_TILES' and at
  TILES' tile; the GEMM-epilogue iteration (``recurrent="epilogue"``), its scan, and its whole-row kernel at
  each of --rows-tiles (BM:BD:warps);
* ``solve``: ``seqpar.solve(cell, x, h0, jacobian="diag")`` per weight init (torch.nn.GRU's; DEER's flax
  GRUCell, ``bench_vs_deer.make_weights``) with ``before`` (session 12's solve: the tiled kernel, cuBLAS fp32
  for the projection, a GEMM in the first pass) and ``after`` (the defaults), with --epilogue-solves also
  ``epilogue``: wall-clock median of --solve-reps after a warm-up, iterations, the float64 residual of the
  returned states, the largest state difference from ``before``; cuDNN ``torch.nn.GRU`` on chunks of 65,535
  steps in the same process, and the speed-ups over it.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

import common  # noqa: F401
import seqpar
import seqpar.graphs
import seqpar.kernels.linear as lin
import seqpar.newton
from bench_gru_quasi import cudnn_ms, iteration_inputs, measured_solve, solve_problem
from common import env_info, event_ms, out_path, write_json
from seqpar.kernels import fused_diag_gru as k
from seqpar.kernels import quasi_gru_gemm as q
from seqpar.kernels.scan_diag import scan_diag
from seqpar.problems import parse_count


@contextlib.contextmanager
def constants(*settings):
    """Module constants set for the block: ``(module, name, value)`` triples, restored after."""
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in settings]
    for mod, name, value in settings:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def session12():
    """The solve as session 12 ran it: the tiled kernel for every ``linear`` call, cuBLAS fp32 for the
    inputs' projection, the first pass with its GEMM."""
    return constants((lin, "ROWS_MAX_K", 0), (lin, "FP32_LINEAR_MIN_ROWS", 1 << 62),
                     (seqpar.newton, "ZERO_FIRST_PASS", False))


def epilogue(D: int):
    """``recurrent="epilogue"`` by default at width D (the GEMM with the GRU epilogue, then the scan)."""
    return constants((k, "QUASI_EPILOGUE_MIN_D", D))


def rows_tiles(bm: int, bd: int, warps: int):
    return constants((q, "ROWS_BM", bm), (q, "ROWS_BD", bd), (q, "ROWS_WARPS", warps))


@torch.no_grad()
def gemm_rows(D: int, B: int, T: int, reps: int, dev) -> dict:
    torch.manual_seed(0)
    x = torch.randn(T * B, D, device=dev)
    w = torch.randn(3 * D, D, device=dev) / D ** 0.5
    b = torch.randn(3 * D, device=dev)
    n = min(200_000, T * B)
    ref = F.linear(x[:n].double(), w.double(), b.double())
    row = dict(M=T * B, K=D, N=3 * D)

    def variant(name, fn):
        row[f"{name}_ms"] = event_ms(fn, reps)
        row[f"{name}_maxdiff"] = float((fn()[:n].double() - ref).abs().max())
    variant("cublas_fp32", lambda: F.linear(x, w, b))
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        variant("cublas_tf32", lambda: F.linear(x, w, b))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    variant("tiled", lambda: lin.linear(x, w, b, tiles=(lin.BM, lin.BN, lin.BK, lin.WARPS)))
    variant("rows", lambda: lin.linear(x, w, b))
    return row


@torch.no_grad()
def iteration_row(D: int, B: int, T: int, reps: int, tiles: list, dev) -> dict:
    cell, xp, h, bnd = iteration_inputs(D, B, T, dev)
    w, b = cell.weight_hh, cell.bias_hh
    row = {}

    def step(recurrent):
        return lambda: k.fused_gru_quasi_step(h, xp, w, b, bnd, recurrent=recurrent)
    after = step("gemm")()[0]
    row["gemm_ms"] = event_ms(step("gemm"), reps)
    with session12():
        before = step("gemm")()[0]
        row["gemm_session12_ms"] = event_ms(step("gemm"), reps)
    row["gemm_vs_session12_diff"] = float((after - before).abs().max())
    zero = torch.zeros_like(h)
    row["zero_iterate_ms"] = event_ms(lambda: k.fused_gru_quasi_step(zero, xp, w, b, bnd, zero_iterate=True), reps)
    t = k.pick_tiles(k.TILES, B * D)  # DiagGRU's tile for these lanes instead of QUASI_TILES'
    row["zero_iterate_diag_tiles_ms"] = event_ms(lambda: k.fused_gru_quasi_step(
        zero, xp, w, b, bnd, zero_iterate=True, block_t=t[0], block_n=t[1], num_warps=t[2], lookback_w=t[3]), reps)
    zero = None
    epi = step("epilogue")()[0]
    row["epilogue_ms"] = event_ms(step("epilogue"), reps)
    row["epilogue_vs_gemm_diff"] = float((epi - after).abs().max())
    a_ref, b_ref, _ = q.quasi_gru_epilogue(h, xp, w, b, bnd)
    out = torch.empty_like(h)
    row["scan_ms"] = event_ms(lambda: scan_diag(a_ref, b_ref, bnd, out=out), reps)
    for bm, bd, warps in tiles:
        key = f"epilogue_kernel_{bm}x{bd}w{warps}"
        try:
            with rows_tiles(bm, bd, warps):
                row[f"{key}_ms"] = event_ms(lambda: q.quasi_gru_epilogue(h, xp, w, b, bnd), reps)
                row[f"{key}_diff"] = float((q.quasi_gru_epilogue(h, xp, w, b, bnd)[0] - a_ref).abs().max())
        except Exception as e:  # noqa: BLE001 - a shape that does not compile is a result too
            row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


EPILOGUE_SOLVES = False  # (--epilogue-solves)


def VARIANTS(D: int):
    """The solves timed: session 12's, the defaults, and (--epilogue-solves) the defaults with the
    GEMM-epilogue iteration."""
    both = (("before", session12), ("after", contextlib.nullcontext))
    return both + ((("epilogue", lambda: epilogue(D)),) if EPILOGUE_SOLVES else ())


@torch.no_grad()
def solve_row(D: int, B: int, T: int, init: str, reps: int, dev) -> dict:
    m, cell, x, h0 = solve_problem(D, B, T, init, dev)
    row = dict(D=D, B=B, T=T, init=init)
    outs = {}
    for name, ctx in VARIANTS(D):
        seqpar.graphs.clear()  # (no graph captured under the other setting)
        with ctx():
            outs[name], row[name] = measured_solve(cell, x, h0, m, reps, warmup=1)
        torch.cuda.empty_cache()
    for name in outs:
        row[f"{name}_vs_before_diff"] = float((outs[name] - outs["before"]).abs().max())
    outs = None
    torch.cuda.empty_cache()
    row["cudnn_ms"] = cudnn_ms(m, x, h0, reps)
    for name, _ in VARIANTS(D):
        row[f"{name}_vs_cudnn"] = row["cudnn_ms"] / row[name]["ms"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="64:8", help="D:B")
    ap.add_argument("--steps", default="1M")
    ap.add_argument("--inits", default="torch,flax")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--solve-reps", type=int, default=5)
    ap.add_argument("--rows-tiles", default="64:32:4,64:64:4,128:32:4,128:32:8,32:64:4,64:16:4",
                    help="BM:BD:warps of the GEMM-epilogue's whole-row kernel")
    ap.add_argument("--epilogue-solves", action="store_true", help="also solve with recurrent=\"epilogue\"")
    ap.add_argument("--out", default=out_path("quasi_gemms.json"))
    a = ap.parse_args()
    global EPILOGUE_SOLVES
    EPILOGUE_SOLVES = a.epilogue_solves
    dev = torch.device("cuda")
    D, B = (int(v) for v in a.shape.split(":"))
    T = parse_count(a.steps)
    res = {"env": env_info(), "D": D, "B": B, "T": T}
    res["gemm"] = gemm_rows(D, B, T, a.reps, dev)
    print("gemm", res["gemm"], flush=True)
    torch.cuda.empty_cache()
    tiles = [tuple(int(v) for v in t.split(":")) for t in a.rows_tiles.split(",") if t]
    res["iteration"] = iteration_row(D, B, T, a.reps, tiles, dev)
    print("iteration", res["iteration"], flush=True)
    torch.cuda.empty_cache()
    res["solve"] = []
    for init in a.inits.split(","):
        row = solve_row(D, B, T, init, a.solve_reps, dev)
        print(f"solve {init}: cuDNN {row['cudnn_ms']:.1f} ms; " + "; ".join(
            f"{name} {row[name]['ms']:.1f} ms ({row[name]['iterations']} it, f64 {row[name]['residual_f64']:.2e}, "
            f"{row[f'{name}_vs_cudnn']:.2f}x)" for name, _ in VARIANTS(D)), flush=True)
        res["solve"].append(row)
        write_json(a.out, res)
    write_json(a.out, res)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"done in {time.time() - t0:.0f} s")
