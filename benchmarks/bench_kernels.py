"""GPU benchmark of the seqpar Triton kernels (one run, one GPU).  Not run in CI.

    PYTHONUNBUFFERED=1 python benchmarks/bench_kernels.py --out results.json [--quick]

Measures the device's copy bandwidth (torch copy_ of a 4 GiB buffer), then for
each kernel the median time per call (CUDA events; inputs random, not all-zero,
two input sets rotated between calls; every input is >= 4 GiB, far larger than
L2) and the fraction of copy bandwidth counting the minimum bytes (each input
read once, each output written once).  Then full solves against a torch eager
loop (extrapolated from 10k steps) and cuDNN torch.nn.GRU (chunked in pieces of
32768 steps, carrying the state: cuDNN refuses T >= 65536 per call).
JSON is rewritten after every section, so a partial run still leaves results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import seqpar  # noqa: E402
from seqpar.cells import GRU, DiagGRU, DiagLSTM  # noqa: E402
from seqpar.kernels.fused_diag_gru import fused_diag_gru_step  # noqa: E402
from seqpar.kernels.fused_diag_lstm import fused_diag_lstm_step  # noqa: E402
from seqpar.kernels.scan_block import scan_block2  # noqa: E402
from seqpar.kernels.scan_dense import scan_dense  # noqa: E402
from seqpar.kernels.scan_diag import scan_diag  # noqa: E402

R = {}
OUT = "bench.json"


def save():
    with open(OUT, "w") as f:
        json.dump(R, f, indent=1)


def timeit(fn, sets, reps=10, warmup=2):
    """Median seconds per call of fn(*sets[i % len(sets)])."""
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    ts = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*sets[i % len(sets)])
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts), ts


def section(name):
    def deco(f):
        def run(*a, **k):
            t0 = time.time()
            print(f"== {name}", flush=True)
            try:
                R[name] = f(*a, **k)
            except Exception as e:  # noqa: BLE001
                R[name] = {"error": repr(e)}
            R[name]["section_wall_s"] = round(time.time() - t0, 2) if isinstance(R[name], dict) else None
            print(json.dumps(R[name])[:1500], flush=True)
            torch.cuda.empty_cache()
            save()
        return run
    return deco


@section("copy_bandwidth")
def copy_bw():
    n = 1 << 30  # 4 GiB of float32
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    t, _ = timeit(lambda: dst.copy_(src), [()], reps=10)
    return {"bytes": 8 * n, "median_s": t, "GBps": 8 * n / t / 1e9}


def bw_frac(nbytes, t):
    return {"median_s": t, "min_bytes": nbytes, "GBps": nbytes / t / 1e9,
            "frac_of_copy_bw": nbytes / t / 1e9 / R["copy_bandwidth"]["GBps"]}


@section("scan_diag_T1M_N1024")
def bench_scan_diag(T, N):
    sets = [(torch.rand(T, N, device="cuda") * 0.2 + 0.79, torch.randn(T, N, device="cuda")) for _ in range(2)]
    out = torch.empty(T, N, device="cuda")
    nbytes = 12 * T * N
    res = {"T": T, "N": N, "dtype": "float32", "configs": {}}
    cfgs = [("lookback", 32, 128, 4), ("lookback", 64, 128, 4), ("lookback", 32, 256, 4), ("lookback", 16, 256, 4),
            ("lookback", 64, 64, 2), ("3pass", 32, 128, 4), ("3pass", 32, 256, 4)]
    for mode, tt, bn, w in cfgs:
        key = f"{mode}_tt{tt}_bn{bn}_w{w}"
        try:
            t, _ = timeit(lambda J, b: scan_diag(J, b, None, out=out, mode=mode, block_t=tt, block_n=bn,
                                                  num_warps=w, chunks=2048), sets, reps=7)
            res["configs"][key] = bw_frac(nbytes, t)
        except Exception as e:  # noqa: BLE001
            res["configs"][key] = {"error": repr(e)[:300]}
        print(key, res["configs"][key], flush=True)
    best = min((v["median_s"], k) for k, v in res["configs"].items() if "median_s" in v)
    res["best"] = best[1]
    res.update(res["configs"][best[1]])
    # bf16 storage with the best lookback config
    sb = [(J.bfloat16(), b.bfloat16()) for J, b in sets]
    del sets
    ob = torch.empty(T, N, device="cuda", dtype=torch.bfloat16)
    tt, bn = int(best[1].split("_tt")[1].split("_")[0]), int(best[1].split("_bn")[1].split("_")[0])
    t, _ = timeit(lambda J, b: scan_diag(J, b, None, out=ob, block_t=tt, block_n=bn), sb, reps=7)
    res["bfloat16"] = bw_frac(6 * T * N, t)
    # reverse direction (the adjoint)
    t, _ = timeit(lambda J, b: scan_diag(J, b, None, out=ob, block_t=tt, block_n=bn, reverse=True), sb, reps=5)
    res["bfloat16_reverse"] = bw_frac(6 * T * N, t)
    return res


@section("fused_diag_gru_iteration_T1M_B1_D1024")
def bench_fused_gru(T, B, D):
    cell = DiagGRU(64, D).cuda()
    sets = []
    for _ in range(2):
        with torch.no_grad():
            xp = torch.randn(T, B, 3 * D, device="cuda")
            h = torch.randn(T, B, D, device="cuda") * 0.5
        sets.append((h, xp))
    bnd = torch.zeros(B, D, device="cuda")
    out = torch.empty(T, B, D, device="cuda")
    nbytes = 20 * T * B * D  # read h (4) + xp (12), write h_new (4)
    res = {"T": T, "B": B, "D": D, "min_bytes_per_state": 20, "configs": {}}
    for tt, bn, w in [(16, 256, 4), (16, 128, 2), (8, 256, 2), (16, 64, 1), (8, 512, 4), (16, 512, 8), (32, 128, 4)]:
        key = f"tt{tt}_bn{bn}_w{w}"
        try:
            t, _ = timeit(lambda h, xp: fused_diag_gru_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, out=out,
                                                            block_t=tt, block_n=bn, num_warps=w), sets, reps=7)
            res["configs"][key] = bw_frac(nbytes, t)
            res["configs"][key]["x_of_min_bytes_time"] = 1 / res["configs"][key]["frac_of_copy_bw"]
        except Exception as e:  # noqa: BLE001
            res["configs"][key] = {"error": repr(e)[:300]}
        print(key, res["configs"][key], flush=True)
    best = min((v["median_s"], k) for k, v in res["configs"].items() if "median_s" in v)
    res["best"] = best[1]
    res.update(res["configs"][best[1]])
    res["min_bytes_time_s"] = nbytes / (R["copy_bandwidth"]["GBps"] * 1e9)
    return res


@section("fused_diag_lstm_iteration_T1M_B1_H512")
def bench_fused_lstm(T, B, H):
    cell = DiagLSTM(64, H).cuda()
    sets = [(torch.randn(T, B, 2 * H, device="cuda") * 0.5, torch.randn(T, B, 4 * H, device="cuda")) for _ in range(2)]
    bnd = torch.zeros(B, 2 * H, device="cuda")
    out = torch.empty(T, B, 2 * H, device="cuda")
    nbytes = T * B * (8 * H + 16 * H + 8 * H)
    r = {"T": T, "B": B, "H": H, "configs": {}}
    for tt, bn, w in [(32, 64, 4), (16, 64, 2), (16, 32, 1), (8, 128, 2), (16, 128, 4)]:
        t, _ = timeit(lambda h, xp: fused_diag_lstm_step(h, xp, cell.weight_hh, bnd, out=out, block_t=tt,
                                                         block_n=bn, num_warps=w), sets, reps=5)
        r["configs"][f"tt{tt}_bn{bn}_w{w}"] = c = bw_frac(nbytes, t)
        c["x_of_min_bytes_time"] = 1 / c["frac_of_copy_bw"]
    best = min((v["median_s"], k) for k, v in r["configs"].items())
    r["best"] = best[1]
    r.update(r["configs"][best[1]])
    return r


@section("scan_block2_T1M_M512")
def bench_block(T, M):
    sets = [(torch.randn(T, M, 2, 2, device="cuda") * 0.5, torch.randn(T, M, 2, device="cuda")) for _ in range(2)]
    out = torch.empty(T, M, 2, device="cuda")
    r = {"T": T, "M": M, "configs": {}}
    for tt, bn, w in [(32, 64, 4), (16, 64, 2), (16, 32, 1), (8, 128, 2), (16, 128, 4)]:
        t, _ = timeit(lambda J, b: scan_block2(J, b, None, out=out, block_t=tt, block_n=bn, num_warps=w),
                      sets, reps=5)
        r["configs"][f"tt{tt}_bn{bn}_w{w}"] = bw_frac(T * M * (16 + 8 + 8), t)
    best = min((v["median_s"], k) for k, v in r["configs"].items())
    r["best"] = best[1]
    r.update(r["configs"][best[1]])
    return r


@section("scan_dense_T16k_B8_D64")
def bench_dense(T, B, D):
    sets = [(torch.randn(T, B, 1, D, D, device="cuda") * 0.5 / 8, torch.randn(T, B, D, device="cuda")) for _ in range(2)]
    t, _ = timeit(lambda J, b: scan_dense(J, b), sets, reps=5)
    r = bw_frac(T * B * (D * D + 2 * D) * 4, t)
    r.update({"T": T, "B": B, "D": D, "s_per_step_per_batch": t / T})
    return r


def cudnn_gru_time(D_in, D, B, T, piece=32768):
    """Run torch.nn.GRU (cuDNN) over T steps in pieces of ``piece`` steps, carrying the state."""
    gru = torch.nn.GRU(D_in, D).cuda()
    x = torch.randn(piece, B, D_in, device="cuda")
    with torch.no_grad():
        gru(x[:1000])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = None
        _, h = gru(x, h)
        torch.cuda.synchronize()
        t_piece = time.perf_counter() - t0
        n_pieces = math.ceil(T / piece)
        if t_piece * n_pieces > 60:  # too long for this run: extrapolate
            return {"s": t_piece * n_pieces, "extrapolated_from_steps": piece, "piece": piece}
        t0 = time.perf_counter()
        for _ in range(n_pieces):
            _, h = gru(x, h)
        torch.cuda.synchronize()
        return {"s": time.perf_counter() - t0, "extrapolated_from_steps": None, "piece": piece,
                "pieces": n_pieces, "note": "cuDNN refuses T>=65536 per call: chunked, state carried"}


@section("diag_gru_solve_T1M_B1_D1024")
def bench_solve_diag_gru(T, B, D, D_in):
    torch.manual_seed(0)
    cell = DiagGRU(D_in, D).cuda()
    x = torch.randn(T, B, D_in, device="cuda")
    ts, infos = [], []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out, info = seqpar.solve(cell, x, backend="triton", return_info=True)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
        infos.append(info)
    res = {"T": T, "B": B, "D": D, "input_size": D_in, "median_s": statistics.median(ts), "times": ts,
           "iterations": infos[-1].iterations, "residuals": infos[-1].residuals, "converged": infos[-1].converged,
           "fallback": infos[-1].fallback}
    # correctness spot check: sequential evaluation of the first 2000 steps
    with torch.no_grad():
        ref = seqpar.solve(cell, x[:2000], method="sequential")
    res["max_abs_err_first_2000_vs_sequential"] = float((out[:2000] - ref).abs().max())
    # torch eager loop of the same cell, 10k steps, extrapolated
    with torch.no_grad():
        xp = cell.project_inputs(x[:10_000])
        h = torch.zeros(B, D, device="cuda")
        for t in range(100):
            h = cell.step(h, xp[t])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t in range(10_000):
            h = cell.step(h, xp[t])
        torch.cuda.synchronize()
        loop = (time.perf_counter() - t0) * T / 10_000
    res["eager_loop_s_extrapolated_from_10k"] = loop
    res["speedup_vs_eager_loop"] = loop / res["median_s"]
    del x, out
    torch.cuda.empty_cache()
    cu = cudnn_gru_time(D_in, D, B, T)
    res["cudnn_gru"] = cu
    res["speedup_vs_cudnn"] = cu["s"] / res["median_s"]
    return res


@section("dense_gru_T1M_B8_D64")
def bench_dense_gru(T, B, D):
    torch.manual_seed(0)
    cell = GRU(D, D).cuda()
    res = {"T": T, "B": B, "D": D}
    res["cudnn_gru"] = cudnn_gru_time(D, D, B, T)
    # probe on 65536 steps to decide whether the full run fits this benchmark's time
    for TT in (65536, T):
        x = torch.randn(TT, B, D, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out, info = seqpar.solve(cell, x, jacobian="diag", backend="triton", return_info=True,
                                     chunk_size=131072, fallback="none", max_iter=200)
        torch.cuda.synchronize()
        s = time.perf_counter() - t0
        res[f"quasi_diag_T{TT}"] = {"s": s, "iterations": info.iterations, "converged": info.converged,
                                    "residual": info.residual}
        print(res, flush=True)
        if s * T / TT > 40:
            res["skipped_full"] = f"projected {s * T / TT:.1f} s at T={T}"
            break
    return res


def main():
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    OUT = a.out
    R["meta"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "cmd": " ".join(sys.argv)}
    only = set(a.only.split(",")) if a.only else None
    want = lambda k: only is None or k in only  # noqa: E731
    copy_bw()
    T = 1 << 20
    if want("scan"):
        bench_scan_diag(T, 1024)
    if want("gru"):
        bench_fused_gru(T, 1, 1024)
    if want("lstm"):
        bench_fused_lstm(T, 1, 512)
    if want("block"):
        bench_block(T, 512)
    if want("dense"):
        bench_dense(16384, 8, 64)
    if want("solve"):
        bench_solve_diag_gru(T, 1, 1024, 64)
    if want("densegru"):
        bench_dense_gru(T, 8, 64)
    save()


if __name__ == "__main__":
    main()
