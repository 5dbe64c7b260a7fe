#!/usr/bin/env python
"""Quasi-Newton dense GRU (``jacobian="diag"``): W_hh h_prev inside the kernel vs one GEMM per iteration.

    python benchmarks/bench_gru_quasi.py --out $OUT/gru_quasi.json

For each (D, B) at T steps (torch.nn.GRU weights, input size D, fp32):

* ``iteration``: one fused look-back iteration (:func:`seqpar.kernels.fused_diag_gru.fused_gru_quasi_step`)
  with ``recurrent="gemm"`` (the GEMM of h_prev W_hh^T by cuBLAS (IEEE fp32) or by
  :func:`seqpar.kernels.linear.linear` (3xTF32), T x B x 3D written and read back) and ``recurrent="dot"``
  (tl.dot per tile, 3xTF32 unless --precisions says more) at the tile sizes in --tiles; the GEMM alone
  (cuBLAS vs ``linear`` at the tiles in --linear-tiles); CUDA-event median of --reps after two warm-ups;
  the largest difference from the cuBLAS variant;
* ``solve``: ``seqpar.solve(..., jacobian="diag")`` as before this change (cuBLAS GEMM, no in-kernel dot)
  and with the defaults, its iterations, the wall-clock median of --solve-reps after a warm-up,
  and the float64 elementwise residual of the returned states (the reported residual is trusted only if
  it agrees); ``torch.nn.GRU`` (cuDNN) on chunks of 65,535 steps in the same call.

With ``--epilogue`` (default shape D=64, B=8; benchmarks/run_quasi_epilogue.sh) it times instead the
``recurrent="epilogue"`` variant (:mod:`seqpar.kernels.quasi_gru_gemm`: the GEMM with the GRU step as its
epilogue writes only the diagonal maps a, b; ``scan_diag`` scans them) against ``recurrent="gemm"``:

* ``epilogue_iteration``: one iteration of each (CUDA-event median of --reps after two warm-ups, the
  largest difference from "gemm"), the GEMM-epilogue kernel alone at each of --epilogue-tiles
  (BM:BD:BK:warps) and the scan alone, with the bytes each variant moves at minimum;
* ``epilogue_solve``: ``seqpar.solve(..., jacobian="diag", backend="triton")`` with ``QUASI_EPILOGUE_MIN_D``
  off ("off": the default variant, "gemm" at D = 64) and set to D ("on": "epilogue"), for each of --inits
  ("torch": torch.nn.GRU's init; "flax": DEER's flax.linen GRUCell init, ``bench_vs_deer.make_weights``):
  iterations, wall-clock median of --solve-reps after the measured first solve, float64 residual, the
  largest state difference between the two, and cuDNN on chunks of 65,535 steps.

With ``--pipelined`` (default shapes 64:8,64:16,32:16,16:16; benchmarks/run_quasi_pipelined.sh) it times the
pipelined quasi-Newton pass (:mod:`seqpar.kernels.pipelined_quasi_gru`: the maps kept between passes, one
recurrent GEMM per pass, 32 bytes per state) against the look-back iteration ("gemm", the default before it):

* ``pipelined_iteration``: one look-back iteration and, per launch shape in --configs (rows:warps), one
  pipelined iteration (the pass and the scan of its run summaries), CUDA-event medians of --reps after two
  warm-ups; the pass alone and its bandwidth at 32 bytes per state; the largest difference between the two
  variants' new iterates from the same iterate;
* ``pipelined_solve`` (shapes in --solve-shapes): ``seqpar.solve(..., jacobian="diag")`` with the kernel off
  (``pipelined_quasi_gru.ENABLED = False``: the look-back path) and on, for each of --inits, as
  ``epilogue_solve``, and cuDNN.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import common  # noqa: F401
import seqpar
import seqpar.graphs
from common import env_info, event_ms, out_path, timed, write_json
from seqpar.kernels import fused_diag_gru as k
from seqpar.kernels._common import DOT_PRECISIONS
from seqpar.kernels import pipelined_quasi_gru as pq
from seqpar.kernels import quasi_gru_gemm as q
from seqpar.kernels.linear import linear
from seqpar.kernels.scan_diag import scan_diag
from seqpar.pipeline import scan_runs
from seqpar.structure import DIAG
from seqpar.problems import parse_count

CUDNN_CHUNK = 65535


@torch.no_grad()
def float64_residual(m: torch.nn.GRU, x, h0, states) -> float:
    """max_t,b,i |h_t - f(h_{t-1})| / max(1, |f|) in float64 (the cell of ``m``), in slices of time."""
    c64 = seqpar.cells.GRU.from_torch(copy.deepcopy(m).double())
    worst = 0.0
    T = x.shape[0]
    step = max(1, 2**26 // (x.shape[1] * states.shape[-1]))
    prev = h0.double()
    for s in range(0, T, step):
        e = min(T, s + step)
        xp = c64.project_inputs(x[s:e].double())
        h = states[s:e].double()
        hp = torch.cat([prev.unsqueeze(0), h[:-1]], 0)
        f = c64.step(hp, xp)
        worst = max(worst, float(((h - f).abs() / f.abs().clamp_min(1)).max()))
        prev = h[-1]
    return worst


def time_variant(row: dict, key: str, fn, ref: torch.Tensor, reps: int) -> None:
    """``row[key + "_ms"]``: CUDA-event median of ``fn()`` (which returns its result tensor);
    ``row[key + "_maxdiff"]``: that result's largest difference from ``ref``; a variant that fails
    (a tile that does not compile is a result too) is recorded as ``row[key + "_error"]``."""
    try:
        row[f"{key}_ms"] = event_ms(fn, reps)
        row[f"{key}_maxdiff"] = float((fn() - ref).abs().max())
    except Exception as e:  # noqa: BLE001
        row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]


def cudnn_ms(m: torch.nn.GRU, x, h0, reps: int) -> float:
    def run():
        h = h0.unsqueeze(0)
        for s in range(0, x.shape[0], CUDNN_CHUNK):
            _, h = m(x[s:s + CUDNN_CHUNK], h)
        return h
    with torch.no_grad():
        return timed(run, repeats=reps)["median_s"] * 1e3


# floats moved per state (T x B x D) at minimum by one iteration.  gemm: the GEMM reads h_prev (1) and writes
# W_hh h_prev + b (3); the fused kernel reads h (h_prev is the same array), that (3), xp (3), writes h_new (1).
# epilogue: the kernel reads h (1, h_prev again from L2), xp (3), writes a, b (2); the scan reads a, b, writes h_new.
ITERATION_FLOATS = {"gemm": 4 + 8, "epilogue": 6 + 3}


def gru_module(D: int, init: str, dev) -> torch.nn.GRU:
    """torch.nn.GRU(D, D) seeded with torch's init, or ("flax") DEER's flax.linen GRUCell init in torch.nn.GRU's
    layout (``bench_vs_deer.make_weights(D, D, "flax", 0)``)."""
    torch.manual_seed(0)
    m = torch.nn.GRU(D, D)
    if init == "flax":
        from bench_vs_deer import make_weights  # (imports no JAX)

        w = make_weights(D, D, "flax", 0)
        with torch.no_grad():
            for name, key in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"), ("bias_ih_l0", "b_ih"),
                              ("bias_hh_l0", "b_hh")):
                getattr(m, name).copy_(torch.from_numpy(w[key]))
    elif init != "torch":
        raise ValueError(f"init must be 'torch' or 'flax'; got {init!r}")
    return m.to(dev)


def iteration_inputs(D: int, B: int, T: int, dev):
    """``(cell, xp, h, boundary)`` of the one-iteration timings: torch.nn.GRU(D, D)'s weights, row-major projected
    random inputs, a random iterate in (-1, 1), zeros before step 0."""
    cell = seqpar.cells.GRU.from_torch(gru_module(D, "torch", dev))
    xp = cell.project_inputs(torch.randn(T, B, D, device=dev)).contiguous()
    return cell, xp, torch.tanh(torch.randn(T, B, D, device=dev)), torch.zeros(B, D, device=dev)


@torch.no_grad()
def epilogue_iteration(D: int, B: int, T: int, a, dev) -> dict:
    """One iteration, recurrent="gemm" vs "epilogue", and the epilogue's parts (kernel at each tile, scan)."""
    cell, xp, h, bnd = iteration_inputs(D, B, T, dev)
    w, b = cell.weight_hh, cell.bias_hh
    row = dict(D=D, B=B, T=T)

    def step(rec, **kw):
        return k.fused_gru_quasi_step(h, xp, w, b, bnd, recurrent=rec, **kw)

    ref = step("gemm")[0]
    row["gemm_ms"] = event_ms(lambda: step("gemm"), a.reps)
    time_variant(row, "epilogue", lambda: step("epilogue")[0], ref, a.reps)
    for name, floats in ITERATION_FLOATS.items():
        row[f"{name}_min_GB"] = T * B * D * 4 * floats / 1e9
        if f"{name}_ms" in row:
            row[f"{name}_GBps"] = row[f"{name}_min_GB"] / row[f"{name}_ms"] * 1e3
    ref = None
    a_ref, b_ref, _ = q.quasi_gru_epilogue(h, xp, w, b, bnd)
    for et in a.epilogue_tiles.split(","):
        tiles = tuple(int(v) for v in et.split(":"))
        time_variant(row, f"epi_kernel_{et}", lambda: q.quasi_gru_epilogue(h, xp, w, b, bnd, tiles=tiles)[0],
                     a_ref, a.reps)
        if f"epi_kernel_{et}_ms" in row:  # reads h, xp, writes a, b
            row[f"epi_kernel_{et}_GBps"] = T * B * D * 4 * 6 / 1e9 / row[f"epi_kernel_{et}_ms"] * 1e3
    out = torch.empty_like(h)
    row["scan_ms"] = event_ms(lambda: scan_diag(a_ref, b_ref, bnd, out=out), a.reps)
    return row


def measured_solve(cell, x, h0, m, reps: int, warmup: int = 0):
    """``(states, row)`` of ``seqpar.solve(cell, x, h0, jacobian="diag")`` (triton backend, no fallback): the
    first solve (compiles; gives the iterations and residuals), ``warmup`` more, then the wall-clock median of
    ``reps`` more; the float64 residual of the first solve's states (the cell of ``m``)."""
    out, info = seqpar.solve(cell, x, h0, jacobian="diag", backend="triton", fallback="none", return_info=True)
    out = out.detach()
    t = timed(lambda: seqpar.solve(cell, x, h0, jacobian="diag", backend="triton", fallback="none"),
              repeats=reps, warmup=warmup)
    return out, dict(ms=t["median_s"] * 1e3, times_ms=[v * 1e3 for v in t["times_s"]], iterations=info.iterations,
                     converged=info.converged, residual=info.residual, residuals=info.residuals,
                     residual_f64=float64_residual(m, x, h0, out))


def solve_once(cell, x, h0, m, min_d, reps: int):
    """``(states, info row)`` of seqpar.solve(jacobian="diag") with ``QUASI_EPILOGUE_MIN_D = min_d``: the first
    solve (compiles, gives iterations and residuals), then the wall-clock median of ``reps`` more."""
    default = k.QUASI_EPILOGUE_MIN_D
    k.QUASI_EPILOGUE_MIN_D = min_d
    recurrent = k.default_quasi_recurrent(h0.shape[-1])
    try:
        seqpar.graphs.clear()  # (a graph captured under the other setting would be replayed)
        out, row = measured_solve(cell, x, h0, m, reps)
    finally:
        k.QUASI_EPILOGUE_MIN_D = default
        seqpar.graphs.clear()
    return out, dict(recurrent=recurrent, **row)


def solve_problem(D: int, B: int, T: int, init: str, dev):
    """``(m, cell, x, h0)`` of the whole-solve rows: torch.nn.GRU(D, D) at ``init`` (:func:`gru_module`), its
    seqpar cell, inputs (T, B, D) from seed 1, h0 zeros."""
    m = gru_module(D, init, dev)
    cell = seqpar.cells.GRU.from_torch(m)  # (before the seed: building the cell may draw random numbers)
    torch.manual_seed(1)
    return m, cell, torch.randn(T, B, D, device=dev), torch.zeros(B, D, device=dev)


@torch.no_grad()
def off_on_solves(D: int, B: int, T: int, init: str, a, dev, solve) -> dict:
    """Whole solves of one init with a variant off and on (``solve(cell, x, h0, m, on) -> (states, row)``),
    the largest state difference between the two, and cuDNN."""
    m, cell, x, h0 = solve_problem(D, B, T, init, dev)
    srow = dict(D=D, B=B, T=T, init=init)
    ref, srow["off"] = solve(cell, x, h0, m, False)
    torch.cuda.empty_cache()
    out, srow["on"] = solve(cell, x, h0, m, True)
    srow["max_state_diff"] = float((out - ref).abs().max())
    out = ref = None
    torch.cuda.empty_cache()
    srow["cudnn_ms"] = cudnn_ms(m, x, h0, a.solve_reps)
    srow["on_vs_cudnn"] = srow["cudnn_ms"] / srow["on"]["ms"]
    return srow


def epilogue_solves(D: int, B: int, T: int, init: str, a, dev) -> dict:
    """Whole solves with QUASI_EPILOGUE_MIN_D off and = D, and cuDNN, for one init."""
    return off_on_solves(D, B, T, init, a, dev,
                         lambda cell, x, h0, m, on: solve_once(cell, x, h0, m, D if on else None, a.solve_reps))


def run_epilogue(a, dev) -> None:
    """--epilogue: the tables ``epilogue_iteration`` and ``epilogue_solve`` (module docstring)."""
    T = parse_count(a.steps)
    res = {"env": env_info(), "T": T, "epilogue_iteration": [], "epilogue_solve": []}
    for shape in (a.shapes or "64:8").split(","):
        D, B = (int(v) for v in shape.split(":"))
        row = epilogue_iteration(D, B, T, a, dev)
        print(row, flush=True)
        res["epilogue_iteration"].append(row)
        torch.cuda.empty_cache()
        write_json(a.out, res)
        if a.no_solves:
            continue
        for init in a.inits.split(","):
            srow = epilogue_solves(D, B, T, init, a, dev)
            print(srow, flush=True)
            res["epilogue_solve"].append(srow)
            torch.cuda.empty_cache()
            write_json(a.out, res)


def parse_config(conf: str, T: int, B: int, D: int):
    """``(precision, QuasiRunConfig)`` of a --configs entry: ``default`` (pipelined_quasi_gru.TILES) or
    ``rows:warps`` then optional fields: a precision name, ``cN`` (channels per program) or an int (the K chunk)."""
    if conf == "default":  # the shape solves use
        return pq.PRECISION, pq.run_config(T, B, D)
    rows, warps, *rest = conf.split(":")
    prec, bk, channels = pq.PRECISION, None, None
    for field in filter(None, rest):
        if field in DOT_PRECISIONS:
            prec = field
        elif field.startswith("c"):
            channels = int(field[1:])
        else:
            bk = int(field)
    return prec, pq.run_config(T, B, D, rows=int(rows), num_warps=int(warps), bk=bk, channels=channels)


@torch.no_grad()
def pipelined_iteration(D: int, B: int, T: int, a, dev) -> dict:
    """One look-back ("gemm") iteration against one pipelined iteration per launch shape (module docstring)."""
    cell, xp, h, bnd = iteration_inputs(D, B, T, dev)
    w, b = pq.prepare_weights(cell.weight_hh, cell.bias_hh)
    row = dict(D=D, B=B, T=T, pass_min_GB=T * B * D * 4 * 8 / 1e9)
    ref = k.fused_gru_quasi_step(h, xp, w, b, bnd, recurrent="gemm")[0]
    row["lookback_ms"] = event_ms(lambda: k.fused_gru_quasi_step(h, xp, w, b, bnd, recurrent="gemm"), a.reps)
    maps = pq.new_maps(T, B, D, dev)
    spare = None
    out = torch.empty_like(h)
    for conf in a.configs.split(","):
        prec, cfg = parse_config(conf, T, B, D)
        key = f"pipelined_{conf}"
        try:
            if cfg.splits(D) and spare is None:
                spare = pq.new_maps(T, B, D, dev)
            maps_out = spare if cfg.splits(D) else None  # split channels: the new maps to a second buffer
            first = pq.first_pass(h, xp, w, b, bnd, maps, cfg, precision=prec)
            incl = scan_runs(first.sum_a, first.sum_c, bnd, DIAG)
            step = pq.pipelined_step(xp, w, b, maps, incl, bnd, out=out, cfg=cfg, precision=prec,
                                     maps_out=maps_out)  # after h
            row[f"{key}_maxdiff"] = float((step.out - ref).abs().max())

            def one_pass():
                return pq.pipelined_step(xp, w, b, maps, incl, bnd, out=out, cfg=cfg, precision=prec,
                                         maps_out=maps_out)

            def iteration():
                res = one_pass()
                scan_runs(res.sum_a, res.sum_c, bnd, DIAG)
            row[f"{key}_ms"] = event_ms(iteration, a.reps)
            row[f"{key}_pass_ms"] = event_ms(one_pass, a.reps)
            row[f"{key}_pass_GBps"] = row["pass_min_GB"] / row[f"{key}_pass_ms"] * 1e3
        except Exception as e:  # noqa: BLE001 - a shape that does not compile is a result too
            row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def pipelined_solve(cell, x, h0, m, enabled: bool, reps: int):
    """``(states, info row)`` of seqpar.solve(jacobian="diag") with the pipelined quasi kernel on or off (as
    :func:`solve_once`)."""
    default = pq.ENABLED
    pq.ENABLED = enabled
    try:
        out, row = measured_solve(cell, x, h0, m, reps)
    finally:
        pq.ENABLED = default
    return out, dict(pipelined=enabled, **row)


def run_pipelined(a, dev) -> None:
    """--pipelined: the tables ``pipelined_iteration`` and ``pipelined_solve`` (module docstring)."""
    T = parse_count(a.steps)
    res = {"env": env_info(), "T": T, "configs": a.configs, "use_max_d": pq.USE_MAX_D,
           "tiles": {str(k): v for k, v in pq.TILES.items()}, "pipelined_iteration": [], "pipelined_solve": []}
    for shape in (a.shapes or "64:8,64:16,32:16,16:16").split(","):
        D, B = (int(v) for v in shape.split(":"))
        row = pipelined_iteration(D, B, T, a, dev)
        print(row, flush=True)
        res["pipelined_iteration"].append(row)
        torch.cuda.empty_cache()
        write_json(a.out, res)
    for shape in ([] if a.no_solves else a.solve_shapes.split(",")):
        D, B = (int(v) for v in shape.split(":"))
        for init in a.inits.split(","):
            srow = off_on_solves(D, B, T, init, a, dev,
                                 lambda cell, x, h0, m, on: pipelined_solve(cell, x, h0, m, on, a.solve_reps))
            print(srow, flush=True)
            res["pipelined_solve"].append(srow)
            torch.cuda.empty_cache()
            write_json(a.out, res)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default=None,
                    help="D:B pairs (default 4:16,8:16,16:16,32:16,64:16,64:8; with --epilogue 64:8)")
    ap.add_argument("--steps", default="1M")
    ap.add_argument("--tiles", default="32:4,64:4,128:4,64:8", help="TT:warps of the dot variant")
    ap.add_argument("--precisions", default="tf32x3")
    ap.add_argument("--linear-tiles", default="128:64:32:4,128:64:64:4,64:64:64:4,128:128:32:8,256:64:32:8",
                    help="BM:BN:BK:warps of seqpar.kernels.linear")
    ap.add_argument("--kernel-tiles", default="", help="TT:BN:warps:W tiles of the fused kernel (gemm variant)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--solve-reps", type=int, default=3)
    ap.add_argument("--no-solves", action="store_true")
    ap.add_argument("--epilogue", action="store_true",
                    help='time recurrent="epilogue" against "gemm" instead (module docstring)')
    ap.add_argument("--epilogue-tiles", default="64:64:32:4,64:64:32:8,128:64:32:8,128:32:32:4,64:32:64:4,128:64:64:8",
                    help="BM:BD:BK:warps of the GEMM-epilogue kernel (--epilogue)")
    ap.add_argument("--inits", default="torch,flax", help="weight inits of the --epilogue / --pipelined solves")
    ap.add_argument("--pipelined", action="store_true",
                    help="time the pipelined quasi-Newton kernel against the look-back path instead (module docstring)")
    ap.add_argument("--configs", default="default,16:1,32:2,32:4,64:4",
                    help="rows:warps[:precision][:bk][:cN] of the pipelined pass (cN: N channels per program), "
                         "or default (TILES)")
    ap.add_argument("--solve-shapes", default="16:16,32:16", help="D:B of the --pipelined solves")
    ap.add_argument("--use-max-d", type=int, default=None,
                    help="--pipelined: the widest D the solves hand to the kernel (pipelined_quasi_gru.USE_MAX_D)")
    ap.add_argument("--quasi-tiles", default="",
                    help="--pipelined: DP=rows:warps[:channels] entries replacing pipelined_quasi_gru.TILES's "
                         "(e.g. 64=16:4:32)")
    ap.add_argument("--out", default=out_path("gru_quasi.json"))
    a = ap.parse_args()
    dev = torch.device("cuda")
    if a.epilogue:
        return run_epilogue(a, dev)
    if a.pipelined:
        if a.use_max_d is not None:
            pq.USE_MAX_D = a.use_max_d
        for entry in filter(None, a.quasi_tiles.split(",")):
            dp, shape = entry.split("=")
            vals = [int(v) for v in shape.split(":")]
            pq.TILES[int(dp)] = (*vals[:2], vals[2] if len(vals) > 2 else int(dp))
        return run_pipelined(a, dev)
    a.shapes = a.shapes or "4:16,8:16,16:16,32:16,64:16,64:8"
    T = parse_count(a.steps)
    res = {"env": env_info(), "T": T, "iteration": [], "solve": []}
    tiles = [tuple(int(v) for v in t.split(":")) for t in a.tiles.split(",") if t]
    default_gemm = k.QUASI_GEMM
    for shape in a.shapes.split(","):
        D, B = (int(v) for v in shape.split(":"))
        torch.manual_seed(0)
        m = torch.nn.GRU(D, D).to(dev)
        cell = seqpar.cells.GRU.from_torch(m)
        x = torch.randn(T, B, D, device=dev)
        h0 = torch.zeros(B, D, device=dev)
        with torch.no_grad():
            xp = cell.project_inputs(x)
            h = torch.tanh(torch.randn(T, B, D, device=dev))
            bnd = torch.zeros(B, D, device=dev)
            w, b = cell.weight_hh, cell.bias_hh
            row = dict(D=D, B=B, T=T)
            gemm = {}
            for name in ("cublas", "tf32x3"):
                k.QUASI_GEMM = name
                gemm[name] = k.fused_gru_quasi_step(h, xp, w, b, bnd, recurrent="gemm")[0]
                row[f"gemm_{name}_ms"] = event_ms(lambda: k.fused_gru_quasi_step(h, xp, w, b, bnd,
                                                                                recurrent="gemm"), a.reps)
            k.QUASI_GEMM = default_gemm
            ref = gemm["cublas"]
            row["gemm_tf32x3_maxdiff"] = float((gemm["tf32x3"] - ref).abs().max())
            # the recurrent GEMM alone: cuBLAS (IEEE fp32) and seqpar.kernels.linear at each tile
            hp, W = h[:-1].reshape(-1, D), w.detach()
            y = torch.empty(hp.shape[0], 3 * D, device=dev)
            row["mm_cublas_ms"] = event_ms(lambda: torch.addmm(b, hp, W.t(), out=y), a.reps)
            y_ref = y.clone()
            for lt in a.linear_tiles.split(","):
                tl4 = tuple(int(v) for v in lt.split(":"))
                time_variant(row, f"mm_tf32x3_{lt}", lambda: linear(hp, W, b, out=y, tiles=tl4), y_ref, a.reps)
            hp = y = y_ref = gemm = None
            # the fused kernel's tile (with the GEMM before it) instead of the TILES entry for B * D lanes
            for kt in (a.kernel_tiles.split(",") if a.kernel_tiles else []):
                tt, bn, wp, lw = (int(v) for v in kt.split(":"))
                time_variant(row, f"gemm_tile_{kt}", lambda: k.fused_gru_quasi_step(
                    h, xp, w, b, bnd, recurrent="gemm", block_t=tt, block_n=bn, num_warps=wp, lookback_w=lw)[0],
                    ref, a.reps)
            min_bytes = T * B * D * 4 * 5  # read h, xp (3D), write the new iterate
            row["min_bytes_ms_at_4.3TBps"] = min_bytes / 4.3e12 * 1e3
            for prec in a.precisions.split(","):
                for tt, wp in tiles:
                    time_variant(row, f"dot_{prec}_{tt}x{wp}", lambda: k.fused_gru_quasi_step(
                        h, xp, w, b, bnd, recurrent="dot", block_t=tt, num_warps=wp, precision=prec)[0], ref, a.reps)
            print(row, flush=True)
            res["iteration"].append(row)
            h = ref = None  # free before the solves
            if not a.no_solves:
                srow = dict(D=D, B=B, T=T)
                default = (k.QUASI_DOT_MIN_D, k.QUASI_DOT_MAX_D)
                # before this change (cuBLAS, no in-kernel dot), and the defaults
                for name, gemm_kind, dot_range in (("cublas", "cublas", (1, 0)), ("default", default_gemm, default)):
                    k.QUASI_GEMM = gemm_kind
                    k.QUASI_DOT_MIN_D, k.QUASI_DOT_MAX_D = dot_range
                    out, info = seqpar.solve(cell, x, h0, jacobian="diag", fallback="none", return_info=True)
                    t = timed(lambda: seqpar.solve(cell, x, h0, jacobian="diag", fallback="none"),
                              repeats=a.solve_reps)
                    srow[name] = dict(ms=t["median_s"] * 1e3, times_ms=[v * 1e3 for v in t["times_s"]],
                                      iterations=info.iterations, converged=info.converged,
                                      residual=info.residual, residual_f64=float64_residual(m, x, h0, out))
                    out = None
                k.QUASI_DOT_MIN_D, k.QUASI_DOT_MAX_D = default
                k.QUASI_GEMM = default_gemm
                srow["cudnn_ms"] = cudnn_ms(m, x, h0, a.solve_reps)
                print(srow, flush=True)
                res["solve"].append(srow)
            xp = None
        torch.cuda.empty_cache()
        write_json(a.out, res)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"done in {time.time() - t0:.0f} s")
