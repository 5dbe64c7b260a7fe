"""seqpar: Newton-parallel evaluation and training of nonlinear recurrences over long sequences."""
import os as _os

# Running from a source checkout (repo root on sys.path, no install): the Triton
# kernels live in <root>/kernels, which an install maps to ``seqpar.kernels``.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)  # noqa: F821 - seqpar.kernels -> <root>/kernels

from . import cells, structure  # noqa: E402
from .cells import Cell, DiagGRU, DiagLSTM, Elman, FunctionCell, GRU, LSTM, ODECell
from .comm import Communicator, RemoteRankError
from .errors import NotConvergedError
from .newton import SolveInfo
from .odeint import odeint
from .solver import sequential_solve, solve
from .structure import Structure

__version__ = "0.1.0"

__all__ = ["solve", "sequential_solve", "SolveInfo", "NotConvergedError", "RemoteRankError", "Communicator",
           "Structure", "odeint", "Cell", "Elman", "GRU", "LSTM", "DiagGRU", "DiagLSTM", "FunctionCell", "ODECell",
           "cells", "structure"]
