"""seqpar: Newton-parallel evaluation and training of nonlinear recurrences over long sequences."""
import importlib as _importlib
import os as _os
import sys as _sys

# Running from a source checkout (repo root on sys.path, no install): the Triton kernels live in
# <root>/kernels, which an install maps to ``seqpar.kernels``.  Only that one name is mapped (not the
# whole checkout root: ``seqpar.benchmarks``, ``seqpar.tests`` must not exist).
_here = _os.path.dirname(_os.path.abspath(__file__))
_root_kernels = _os.path.join(_os.path.dirname(_here), "kernels")
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
        _os.path.join(_root_kernels, "__init__.py")):
    import importlib.abc as _abc
    import importlib.util as _util

    class _CheckoutKernelsFinder(_abc.MetaPathFinder):
        """``seqpar.kernels`` -> <checkout>/kernels of the checkout this seqpar was imported from (first on
        sys.meta_path: an editable install of another checkout must not supply its kernels)."""

        def find_spec(self, name, path=None, target=None):
            if name != "seqpar.kernels":
                return None
            return _util.spec_from_file_location(name, _os.path.join(_root_kernels, "__init__.py"),
                                                 submodule_search_locations=[_root_kernels])

    if not any(type(f).__name__ == "_CheckoutKernelsFinder" for f in _sys.meta_path):
        _sys.meta_path.insert(0, _CheckoutKernelsFinder())

from . import cells, structure  # noqa: E402
from .cells import Cell, DiagGRU, DiagLSTM, Elman, FunctionCell, GRU, LSTM, ODECell
from .comm import Communicator, RemoteRankError
from .errors import NotConvergedError
from .newton import SolveInfo
from .odeint import odeint
from .solver import sequential_solve, solve
from .structure import Structure

__version__ = "0.1.0"


def __getattr__(name):
    """``seqpar.nn``, ``seqpar.distributed`` (and ``seqpar.cli``) after a plain ``import seqpar``, imported on
    first use (``seqpar.distributed`` pulls in torch.distributed machinery only when needed)."""
    if name in ("nn", "distributed", "cli"):
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"nn", "distributed", "cli"})


__all__ = ["solve", "sequential_solve", "SolveInfo", "NotConvergedError", "RemoteRankError", "Communicator",
           "Structure", "odeint", "Cell", "Elman", "GRU", "LSTM", "DiagGRU", "DiagLSTM", "FunctionCell", "ODECell",
           "cells", "structure", "nn", "distributed"]
