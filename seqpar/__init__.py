"""seqpar: Newton-parallel evaluation and training of nonlinear recurrences over long sequences."""
from . import cells, structure
from .cells import Cell, DiagGRU, DiagLSTM, Elman, FunctionCell, GRU, LSTM, ODECell
from .comm import Communicator, RemoteRankError
from .errors import NotConvergedError
from .newton import SolveInfo
from .solver import sequential_solve, solve
from .structure import Structure

__version__ = "0.1.0"

__all__ = ["solve", "sequential_solve", "SolveInfo", "NotConvergedError", "RemoteRankError", "Communicator",
           "Structure", "Cell", "Elman", "GRU", "LSTM", "DiagGRU", "DiagLSTM", "FunctionCell", "ODECell",
           "cells", "structure"]
