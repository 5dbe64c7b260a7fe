#!/usr/bin/env python
"""seqpar against the sequential peers, same run, same shapes: speedup vs T per D.

Peers: cuDNN ``torch.nn.GRU`` (called in chunks of < 65536 steps, carrying the
state, since cuDNN refuses longer calls), a torch eager loop of ``nn.GRUCell``
and seqpar's own ``method="sequential"``.  Eager loops are timed on
``--loop-steps`` steps and extrapolated linearly (flagged in the JSON); cuDNN is
timed directly up to ``--cudnn-max-T`` and extrapolated linearly beyond.

Cells: seqpar.GRU (dense Jacobian; solved with exact "dense" Newton where
D <= --dense-max-d and quasi-Newton "diag" always) and seqpar.DiagGRU (exact diagonal).

    python benchmarks/bench_peers.py [--dims 1,4,16,64,256,1024] [--Ts 1k,10k,100k,1M] [--batch 16]
"""
from __future__ import annotations

import argparse
import time

import torch

import common  # noqa: F401
import seqpar
from common import env_info, out_path, sync, timed, write_json
from seqpar.problems import parse_count

CUDNN_MAX_CALL = 65535


def cudnn_gru(m, x, h):
    for s in range(0, x.shape[0], CUDNN_MAX_CALL):
        _, h = m(x[s:s + CUDNN_MAX_CALL], h)
    return h


def eager_loop(cellmod, x, h):
    for t in range(x.shape[0]):
        h = cellmod(x[t], h)
    return h


def per_step_time(fn, steps, repeats=3):
    return timed(fn, repeats=repeats, warmup=1)["median_s"] / steps


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dims", default="1,4,16,64,256,1024")
    p.add_argument("--Ts", default="1k,10k,100k,1M")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batch-large-d", type=int, default=1, help="batch for D >= 256")
    p.add_argument("--loop-steps", type=int, default=2000)
    p.add_argument("--cudnn-max-T", type=parse_count, default=parse_count("1M"))
    p.add_argument("--max-elems", type=float, default=2e12, help="skip configs with T*B*D^2 above this")
    p.add_argument("--dense-max-d", type=int, default=4, help="also run exact dense Newton up to this D")
    p.add_argument("--time-budget", type=float, default=300.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dims = [int(d) for d in a.dims.split(",")]
    Ts = [parse_count(t) for t in a.Ts.split(",")]
    rows, t_start = [], time.perf_counter()
    for D in dims:
        B = a.batch if D < 256 else a.batch_large_d
        torch.manual_seed(0)
        ref = torch.nn.GRU(D, D).to(dev)
        gru = seqpar.GRU.from_torch(ref)
        dgru = seqpar.DiagGRU(D, D).to(dev)
        cellmod = torch.nn.GRUCell(D, D).to(dev)
        xl = torch.randn(a.loop_steps, B, D, device=dev)
        h = torch.zeros(B, D, device=dev)
        with torch.no_grad():
            eager_step = per_step_time(lambda: eager_loop(cellmod, xl, h), a.loop_steps, 1)
            seqmode_step = per_step_time(lambda: seqpar.solve(gru, xl, method="sequential"), a.loop_steps, 1)
        cudnn_step = None
        for T in Ts:
            if time.perf_counter() - t_start > a.time_budget:
                print(f"time budget spent; skipping D={D} T={T}", flush=True)
                continue
            if T * B * D * D > a.max_elems and D > 1:
                print(f"skip D={D} T={T} B={B}: T*B*D^2 above --max-elems", flush=True)
                continue
            x = torch.randn(T, B, D, device=dev)
            with torch.no_grad():
                if T <= a.cudnn_max_T:
                    cud = timed(lambda: cudnn_gru(ref, x, h.unsqueeze(0)), repeats=a.repeats)["median_s"]
                    cudnn_step = cud / T
                    cud_extrap = False
                else:
                    cud, cud_extrap = cudnn_step * T, True
                modes = [("gru", gru, "diag")] + ([("gru", gru, "dense")] if D <= a.dense_max_d else []) + [("diag-gru", dgru, "auto")]
                for name, cell, jac in modes:
                    try:
                        _, info = seqpar.solve(cell, x, jacobian=jac, return_info=True)
                        t = timed(lambda: seqpar.solve(cell, x, jacobian=jac), repeats=a.repeats)["median_s"]
                    except torch.OutOfMemoryError:
                        print(f"OOM D={D} T={T} {name} {jac}", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    row = dict(D=D, T=T, B=B, cell=name, jacobian=info.jacobian, seqpar_s=t,
                               iterations=info.iterations, converged=info.converged,
                               newton_converged=info.newton_converged,
                               cudnn_s=cud if name == "gru" else None, cudnn_extrapolated=cud_extrap,
                               eager_loop_s=eager_step * T, seq_mode_s=seqmode_step * T,
                               loops_extrapolated_from_steps=a.loop_steps)
                    row["speedup_vs_cudnn"] = row["cudnn_s"] / t if row["cudnn_s"] else None
                    row["speedup_vs_eager"] = row["eager_loop_s"] / t
                    row["speedup_vs_seq_mode"] = row["seq_mode_s"] / t
                    rows.append(row)
                    print(f"D={D:5d} T={T:>9,d} B={B:3d} {name:8s} {info.jacobian:5s} seqpar={t*1e3:9.2f}ms "
                          f"it={info.iterations:3d} conv={info.converged} cudnn={cud*1e3:9.2f}ms"
                          f"{'(extrap)' if cud_extrap else ''} eager={eager_step*T*1e3:10.1f}ms(extrap) "
                          f"x{row['speedup_vs_eager']:.0f} vs eager", flush=True)
            del x
            sync()
    write_json(a.out or out_path("peers.json"), {"env": env_info(), "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
