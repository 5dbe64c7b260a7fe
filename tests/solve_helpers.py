"""Solves shared by the pipelined-kernel tests (tests/test_pipelined.py, tests/test_pipelined_quasi.py)."""
from __future__ import annotations

import seqpar
import seqpar.newton as newton


def solve_pipelined_and_reference(cell, x, jacobian, h0=None) -> dict:
    """``{True: (states, info, log), False: ...}``: ``seqpar.solve`` on the Triton backend with the pipelined
    loop (seqpar/pipeline.py) on, then off (the reference loop); ``log`` the callback's (iteration, residual)."""
    out = {}
    for pipelined in (True, False):
        newton.PIPELINED = pipelined
        try:
            log = []
            states, info = seqpar.solve(cell, x, h0, jacobian=jacobian, backend="triton", return_info=True,
                                        callback=lambda it, r: log.append((it, r)))
        finally:
            newton.PIPELINED = True
        out[pipelined] = (states, info, log)
    return out
