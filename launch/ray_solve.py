#!/usr/bin/env python
"""Thin wrapper, for a checkout that is not installed: the launcher is ``seqpar.cli.ray_solve``.

Installed (``pip install -e ".[ray]"``), the same job is ``seqpar-ray-solve`` or ``python -m seqpar.cli.ray_solve``:

    python launch/ray_solve.py --num-workers 2 --seq-len 1M --hidden 4 --device cpu
    python launch/ray_solve.py --num-workers 8 --use-gpu --seq-len 100M

``python launch/ray_solve.py --help`` lists the options.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from seqpar.cli.ray_solve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
