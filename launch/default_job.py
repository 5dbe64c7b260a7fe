#!/usr/bin/env python
"""The README's default job: the sharded solve on every GPU present, else on 2 CPU ranks.

    python launch/default_job.py                 # = torchrun --standalone --nproc-per-node N launch/solve.py ...
    python launch/default_job.py --seq-len 100M  # extra options go to launch/solve.py (and win)

GPUs: N = number of GPUs, NCCL, T = 10M steps, hidden 64, --verify on the
first 100k steps.  No GPU: 2 gloo ranks on CPU, T = 1M, hidden 64, same check.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def command(extra):
    import torch

    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ngpu:
        base = [f"--nproc-per-node={ngpu}", os.path.join(HERE, "solve.py"), "--device", "cuda", "--seq-len", "10M"]
    else:
        base = ["--nproc-per-node=2", os.path.join(HERE, "solve.py"), "--device", "cpu", "--seq-len", "1M"]
    base += ["--hidden", "64", "--verify", "--verify-window", "100k"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", *base, *extra]


def main():
    cmd = command(sys.argv[1:])
    print("default job: " + " ".join(cmd[2:]), flush=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
