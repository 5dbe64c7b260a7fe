"""The README's default job: the sharded solve on every GPU present, else on 2 CPU ranks (``seqpar-default-job``).

    seqpar-default-job                  # = torchrun --standalone --nproc-per-node N -m seqpar.cli.solve ...
    seqpar-default-job --seq-len 100M   # extra options go to seqpar-solve (and win)
    (from a checkout without installing: python launch/default_job.py ...)

GPUs: N = number of GPUs, NCCL, T = 10M steps, hidden 64, --verify on the
first 100k steps.  No GPU: 2 gloo ranks on CPU, T = 1M, hidden 64, same check.
The options are checked (one line per mistake, exit status 2) before torchrun starts.
"""
from __future__ import annotations

import os
import sys

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def base_options():
    """(number of ranks, solve options) for this machine."""
    import torch

    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ngpu:
        opts = ["--device", "cuda", "--seq-len", "10M"]
    else:
        opts = ["--device", "cpu", "--seq-len", "1M"]
    return (ngpu or 2), opts + ["--hidden", "64", "--verify", "--verify-window", "100k"]


def command(extra):
    nproc, opts = base_options()
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "seqpar.cli.solve", *opts, *extra]


def main(argv=None):
    from seqpar.cli import solve as job

    extra = list(sys.argv[1:] if argv is None else argv)
    cmd = command(extra)
    nproc = int(cmd[4].split("=")[1])
    prog = os.path.basename(sys.argv[0]) or "seqpar-default-job"
    parser = job.build_parser(prog=prog)
    parser.description = __doc__
    args = parser.parse_args(cmd[7:])  # the options torchrun would pass: mistakes are reported here, once
    if args.backend not in ("auto", "nccl", "gloo"):
        parser.error("argument --backend: the default job runs under torchrun: auto, nccl or gloo")
    job.check_args(parser, args, nproc)
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print("default job: torchrun " + " ".join(cmd[3:]), flush=True)
    os.execve(sys.executable, cmd, env)


if __name__ == "__main__":
    main()
