#!/usr/bin/env python
"""Thin wrapper, for a checkout that is not installed: the launcher is ``seqpar.cli.solve``.

Installed (``pip install -e .``), the same job is ``seqpar-solve`` or ``python -m seqpar.cli.solve``:

    python launch/solve.py --seq-len 1M                                   # one process
    torchrun --nproc-per-node N launch/solve.py --seq-len 10M             # = torchrun ... -m seqpar.cli.solve
    mpiexec -n N python launch/solve.py --backend mpi --seq-len 10M       # mpi4py, via host memory

``python launch/solve.py --help`` lists the options.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from seqpar.cli.solve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
