#!/usr/bin/env python
"""Thin wrapper, for a checkout that is not installed: the README's default job is ``seqpar.cli.default_job``.

    python launch/default_job.py                 # = torchrun --standalone --nproc-per-node N -m seqpar.cli.solve ...
    python launch/default_job.py --seq-len 100M  # extra options go to the solve (and win)

Installed, the same job is ``seqpar-default-job``.  GPUs: N = number of GPUs, NCCL, T = 10M steps,
hidden 64, --verify on the first 100k steps.  No GPU: 2 gloo ranks on CPU, T = 1M, same check.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from seqpar.cli.default_job import main  # noqa: E402

if __name__ == "__main__":
    main()
