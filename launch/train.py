#!/usr/bin/env python
"""Thin wrapper, for a checkout that is not installed: the training example is ``seqpar.cli.train``.

Installed (``pip install -e .``), the same job is ``seqpar-train`` or ``python -m seqpar.cli.train``:

    python launch/train.py --seq-len 2048                                        # one process
    torchrun --nproc-per-node 2 launch/train.py --device cpu                     # = torchrun ... -m seqpar.cli.train
    torchrun --nproc-per-node 4 launch/train.py --device cpu --data-parallel 2   # 2-D mesh: data x sequence

``python launch/train.py --help`` lists the options; the task, the model and why the memory
initialisation is needed are in the docstring of ``seqpar/cli/train.py``.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from seqpar.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
