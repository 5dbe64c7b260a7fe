"""SolveInfo.phase_s (seqpar.phases): off by default, per-phase wall times with SEQPAR_PHASE_TIMES set."""
import pytest
import torch

import seqpar
import seqpar.newton as newton


def _solve(**kw):
    torch.manual_seed(0)
    cell = seqpar.DiagGRU(3, 5)
    x = torch.randn(60, 2, 3)
    return seqpar.solve(cell, x, return_info=True, **kw)[1]


def test_off_by_default(monkeypatch):
    monkeypatch.delenv("SEQPAR_PHASE_TIMES", raising=False)
    assert _solve().phase_s == {}
    monkeypatch.setenv("SEQPAR_PHASE_TIMES", "0")
    assert _solve().phase_s == {}


@pytest.mark.parametrize("mode", ["1", "sync"])
@pytest.mark.parametrize("backend,pipelined", [("torch", False), ("triton", False), ("triton", True)])
def test_phase_times_cover_the_solve(mode, backend, pipelined, monkeypatch):
    """Every phase of a one-rank solve is timed once it ran; the phases add up to no more than the solve's
    wall time (``sync`` is the same on CPU: there is no device to wait for)."""
    monkeypatch.setenv("SEQPAR_PHASE_TIMES", mode)
    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0 if pipelined else 2**62)
    info = _solve(backend=backend)
    expected = {"setup", "pass", "exchange", "finish"} | ({"carries"} if pipelined else set())
    assert set(info.phase_s) == expected
    assert all(v >= 0 for v in info.phase_s.values())
    assert sum(info.phase_s.values()) <= info.wall_time_s + 1e-3
    assert info.converged


def test_unknown_value_warns_and_is_off(monkeypatch):
    monkeypatch.setenv("SEQPAR_PHASE_TIMES", "yes")
    with pytest.warns(UserWarning, match="SEQPAR_PHASE_TIMES"):
        info = _solve()
    assert info.phase_s == {}
