#!/usr/bin/env python
"""Training cost: forward + backward of one seqpar layer against cuDNN, same shapes.

For T in --Ts and D in --dims (batch --batch), times ``loss = out.square().mean();
loss.backward()`` for seqpar.nn.DiagGRU (exact diagonal Newton), seqpar.nn.GRU
(quasi-Newton "diag" forward, exact adjoint backward) and seqpar.nn.DiagLSTM, and
for cuDNN torch.nn.GRU / LSTM (chunked below 65536 steps per call, state carried
with autograd through the chunks).  cuDNN beyond --cudnn-max-T is extrapolated
linearly from the largest measured T (flagged in the JSON).

    python benchmarks/bench_training.py [--Ts 4k,64k,1M] [--dims 256,1024] [--batch 1]
"""
from __future__ import annotations

import argparse
import time

import torch

import common  # noqa: F401
import seqpar.nn as snn
from common import env_info, out_path, timed, write_json
from seqpar.problems import parse_count

CUDNN_MAX_CALL = 65535


def chunked(m, x):
    h, outs = None, []
    for s in range(0, x.shape[0], CUDNN_MAX_CALL):
        o, h = m(x[s:s + CUDNN_MAX_CALL], h)
        outs.append(o)
    return torch.cat(outs, 0)


def step(model, x, chunk_cudnn):
    out = chunked(model, x) if chunk_cudnn else model(x)[0]
    loss = out.square().mean()
    loss.backward()
    return loss


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--Ts", default="4k,64k,1M")
    p.add_argument("--dims", default="256,1024")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cudnn-max-T", type=parse_count, default=parse_count("64k"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=240.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows, t_start = [], time.perf_counter()
    for D in [int(d) for d in a.dims.split(",")]:
        torch.manual_seed(0)
        models = {
            "cudnn-gru": (torch.nn.GRU(D, D).to(dev), True),
            "cudnn-lstm": (torch.nn.LSTM(D, D).to(dev), True),
            "seqpar-diag-gru": (snn.DiagGRU(D, D).to(dev), False),
            "seqpar-gru(quasi)": (snn.GRU(D, D, jacobian="diag").to(dev), False),
            "seqpar-diag-lstm": (snn.DiagLSTM(D, D).to(dev), False),
        }
        per_step = {}
        for T in [parse_count(t) for t in a.Ts.split(",")]:
            x = torch.randn(T, a.batch, D, device=dev)
            for name, (m, is_cudnn) in models.items():
                if time.perf_counter() - t_start > a.time_budget:
                    print(f"time budget spent; skipping {name} D={D} T={T}", flush=True)
                    continue
                extrap = is_cudnn and T > a.cudnn_max_T
                try:
                    if extrap:
                        t = per_step[name] * T
                    else:
                        t = timed(lambda: step(m, x, is_cudnn), repeats=a.repeats)["median_s"]
                        per_step[name] = t / T
                except torch.OutOfMemoryError:
                    print(f"OOM {name} D={D} T={T}", flush=True)
                    torch.cuda.empty_cache()
                    continue
                m.zero_grad(set_to_none=True)
                info = getattr(m, "last_info", None)
                rows.append(dict(model=name, D=D, T=T, B=a.batch, fwd_bwd_s=t, extrapolated=extrap,
                                 iterations=[i.iterations for i in info] if info else None))
                print(f"D={D:5d} T={T:>9,d} {name:18s} fwd+bwd={t*1e3:10.2f} ms{' (extrapolated)' if extrap else ''}",
                      flush=True)
            del x
    write_json(a.out or out_path("training.json"), {"env": env_info(), "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
