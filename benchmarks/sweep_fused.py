#!/usr/bin/env python
"""Sweep of the fused DiagGRU iteration (T=2^20, B=1, D=1024): tile-scan and lane-sequential variants,
median of 7 CUDA-event timings; the copy bandwidth 3014 GB/s is the one measured in runs 4-6."""
import json
import statistics
import sys

import torch

import common  # noqa: F401
from seqpar.cells import DiagGRU
from seqpar.kernels.fused_diag_gru import fused_diag_gru_step

T, B, D = 1 << 20, 1, 1024
MIN_BYTES = 20 * T * B * D
cell = DiagGRU(64, D).cuda()
with torch.no_grad():
    xp = cell.project_inputs(torch.randn(T, B, 64, device="cuda"))
    h = torch.randn(T, B, D, device="cuda") * 0.3
bnd = torch.zeros(B, D, device="cuda")
res = {}
CONFIGS = [("tile", 16, 256, 4), ("tile", 16, 64, 2)] + [
    ("seq", tt, bn, w) for tt, bn, w in [(16, 128, 4), (32, 128, 4), (64, 128, 4), (128, 128, 4), (32, 256, 8),
                                         (64, 256, 8), (32, 512, 4), (64, 512, 4), (32, 256, 2), (64, 1024, 8)]]
for variant, tt, bn, w in CONFIGS:
    times = []
    with torch.no_grad():
        for r in range(8):
            s, e = torch.cuda.Event(True), torch.cuda.Event(True)
            s.record()
            fused_diag_gru_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, block_t=tt, block_n=bn, num_warps=w,
                                variant=variant)
            e.record()
            torch.cuda.synchronize()
            if r:
                times.append(s.elapsed_time(e) / 1e3)
    t = statistics.median(times)
    key = f"{variant}_tt{tt}_bn{bn}_w{w}"
    res[key] = {"median_s": t, "x_of_min_bytes_time": t / (MIN_BYTES / 3.014e12)}
    print(f"{key}: {t*1e3:.2f} ms  {res[key]['x_of_min_bytes_time']:.2f}x of the min-bytes time at 3014 GB/s",
          flush=True)
with torch.no_grad():  # the fastest seq config must agree with the tile kernel
    a, _ = fused_diag_gru_step(h, xp, cell.weight_hh, cell.bias_hh, bnd)
    best = min((k for k in res if k.startswith("seq")), key=lambda k: res[k]["median_s"])
    _, tt, bn, w = best.split("_")
    b, _ = fused_diag_gru_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, block_t=int(tt[2:]), block_n=int(bn[2:]),
                               num_warps=int(w[1:]), variant="seq")
    res["best_seq"] = best
    res["best_seq_max_abs_diff_vs_tile"] = float((a - b).abs().max())
    print("best seq", best, "max |seq - tile|", res["best_seq_max_abs_diff_vs_tile"], flush=True)
json.dump(res, open(sys.argv[1] if len(sys.argv) > 1 else "sweep_fused.json", "w"), indent=2)
