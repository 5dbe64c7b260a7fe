"""The pipelined quasi-Newton pass of the dense GRU at 9 <= D <= 64 (kernels/pipelined_quasi_gru.py).

Kernel: ``first_pass`` (the maps at an iterate, their run summaries, its residual) against the float64
references ``quasi_gru_epilogue_reference`` and ``pipelined_dense_gru.pipelined_step_reference``
(``exact=False``), then ``pipelined_step`` (the next iterate from the maps and the scanned carries, the
summaries and residual at it) against the same reference, and a second step (the maps the first step
wrote in place); odd shapes: T = 1, B = 1, batches that do not fill a program, runs that do not divide T,
D not a power of two, no bias, bfloat16 iterates.  Loop: ``seqpar.solve(..., jacobian="diag")`` on this
path equals the reference loop and a float64 sequential evaluation, on one rank and (tests/test_distributed)
on several.  ``-m gpu``: the same on the device at T = 3001 / 100k.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

import seqpar  # noqa: E402
import seqpar.newton as newton  # noqa: E402
from seqpar.backend import pipelined_stepper  # noqa: E402
from seqpar.cells import GRU  # noqa: E402
from seqpar.kernels import pipelined_dense_gru as pd  # noqa: E402
from seqpar.kernels import pipelined_quasi_gru as pq  # noqa: E402
from seqpar.kernels.quasi_gru_gemm import quasi_gru_epilogue_reference  # noqa: E402
from seqpar.pipeline import scan_runs  # noqa: E402
from seqpar.structure import DENSE, DIAG  # noqa: E402
from solve_helpers import solve_pipelined_and_reference  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
cpu_only = pytest.mark.skipif(not INTERPRET, reason="interpreted kernels (TRITON_INTERPRET=1)")


def _close(got, ref, atol):
    return (got.double().cpu() - ref).abs().max().item() <= atol * max(1.0, ref.abs().max().item())


def _check(T, B, D, rows=None, bias=True, dtype=torch.float32, device="cpu", seed=0, atol=2e-6, channels=None):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, B, D, generator=g) * 0.5).to(dtype).to(device)
    xp = torch.randn(T, B, 3 * D, generator=g).to(device)
    w = (torch.randn(3 * D, D, generator=g) / D ** 0.5).to(device)
    b = (torch.randn(3 * D, generator=g) * 0.2).to(device) if bias else None
    bnd, start = (torch.randn(2, B, D, generator=g) * 0.5).to(dtype).to(device)
    cfg = pq.run_config(T, B, D, rows=rows, channels=channels)
    maps = pq.new_maps(T, B, D, device)
    spare = pq.new_maps(T, B, D, device) if cfg.splits(D) else None  # programs split the channels: two buffers
    # the first pass: maps, summaries and residual at h
    first = pq.first_pass(h, xp, w, b, bnd, maps, cfg)
    ra, rb, rst = quasi_gru_epilogue_reference(h.double(), xp.double(), w.double(),
                                               None if b is None else b.double(), bnd.double())
    assert _close(maps[0], ra.cpu(), atol) and _close(maps[1], rb.cpu(), atol)
    _, sa, sc, rres = pd.pipelined_step_reference(h, xp, w, b, bnd, None, cfg.r, exact=False)
    assert _close(first.sum_a, sa, atol) and _close(first.sum_c, sc, atol)
    assert abs(float(first.stats[0]) - float(rres)) <= 1e-5 * max(1.0, float(rres))
    assert abs(float(first.stats[1]) - float(rst[1])) <= 1e-5 * max(1.0, float(rst[1]))
    # two iterations from the maps kept in place (or alternating between two buffers)
    for _ in range(2):
        incl = scan_runs(first.sum_a, first.sum_c, start, DIAG)
        step = pq.pipelined_step(xp, w, b, maps, incl, start, cfg=cfg, maps_out=spare)
        if spare is not None:
            maps, spare = spare, maps
        ro, sa, sc, rres = pd.pipelined_step_reference(h, xp, w, b, bnd, start, cfg.r, exact=False)
        tol = atol if dtype == torch.float32 else 1e-2
        assert step.out.dtype == dtype
        assert _close(step.out, ro, tol)
        if dtype == torch.float32:  # (bfloat16: the reference linearises at the unrounded iterate)
            assert _close(step.sum_a, sa, atol) and _close(step.sum_c, sc, atol)
            assert abs(float(step.stats[0]) - float(rres)) <= 1e-4 * max(1.0, float(rres)) + 1e-6
        h, bnd, first = step.out, start, step


@cpu_only
@pytest.mark.parametrize("T,B,D,rows,bias,channels", [
    (37, 3, 16, None, True, None), (1, 1, 9, None, True, None), (70, 2, 16, 16, True, None),
    (50, 5, 33, 32, False, None), (20, 1, 12, 16, True, None), (9, 8, 64, 64, True, None),
    (33, 9, 17, 128, True, None),
    # programs splitting the channels: 2 or 4 per tile, the last block partly past D
    (50, 5, 33, 32, False, 16), (33, 9, 17, 128, True, 16), (9, 8, 64, 64, True, 32), (1, 1, 40, 16, True, 16),
    (26, 3, 64, None, True, 32),
])
def test_pass_matches_float64_reference(T, B, D, rows, bias, channels):
    _check(T, B, D, rows, bias, seed=T + D, channels=channels)


@cpu_only
def test_pass_in_bfloat16():
    _check(21, 2, 16, 32, dtype=torch.bfloat16, seed=3)


@cpu_only
def test_nan_iterate_reports_inf_residual():
    T, B, D = 20, 2, 16
    h = torch.zeros(T, B, D)
    h[7, 1, 3] = float("nan")
    maps = pq.new_maps(T, B, D, "cpu")
    res = pq.first_pass(h, torch.zeros(T, B, 3 * D), torch.randn(3 * D, D) * 0.1, None, torch.zeros(B, D), maps)
    assert res.stats[0].item() == float("inf")


@cpu_only
def test_empty_sequence_and_bad_arguments():
    maps = pq.new_maps(0, 2, 16, "cpu")
    res = pq.first_pass(torch.zeros(0, 2, 16), torch.zeros(0, 2, 48), torch.zeros(48, 16), None,
                        torch.zeros(2, 16), maps)
    assert res.sum_a.shape == (0, 2, 16) and float(res.stats.max()) == 0.0
    with pytest.raises(ValueError, match="D=8"):
        pq.first_pass(torch.zeros(4, 1, 8), torch.zeros(4, 1, 24), torch.zeros(24, 8), None, torch.zeros(1, 8),
                      pq.new_maps(4, 1, 8, "cpu"))
    with pytest.raises(ValueError, match="rows"):
        pq.run_config(100, 4, rows=48)
    with pytest.raises(ValueError, match="precision"):
        pq.first_pass(torch.zeros(4, 1, 16), torch.zeros(4, 1, 48), torch.zeros(48, 16), None, torch.zeros(1, 16),
                      pq.new_maps(4, 1, 16, "cpu"), precision="fp8")
    with pytest.raises(ValueError, match="channels"):
        pq.run_config(100, 4, 64, channels=24)
    # split channels: a step must write the new maps to a second buffer
    cfg = pq.run_config(4, 1, 40, channels=16)
    assert cfg.splits(40) and not pq.run_config(4, 1, 16, channels=16).splits(16)
    maps, incl, start = pq.new_maps(4, 1, 40, "cpu"), torch.zeros(1, 1, 40), torch.zeros(1, 40)
    args = (torch.zeros(4, 1, 120), torch.zeros(120, 40), None, maps, incl, start)
    with pytest.raises(ValueError, match="maps_out"):
        pq.pipelined_step(*args, cfg=cfg)
    with pytest.raises(ValueError, match="maps_out"):
        pq.pipelined_step(*args, cfg=cfg, maps_out=maps)
    with pytest.raises(ValueError, match="maps_out"):
        pq.pipelined_step(*args, cfg=cfg, maps_out=pq.new_maps(4, 1, 41, "cpu"))


def test_run_config_keeps_runs_at_least_min_run():
    for B in (1, 3, 8, 16, 100):
        for rows in (16, 64, 128, 256):
            cfg = pq.run_config(10**6, B, 64, rows=rows)
            assert cfg.r * cfg.bb == rows and cfg.bb <= max(1, rows // pq.MIN_RUN)
            assert cfg.bb <= max(1, 2 * B - 1)  # the batch rounded up, never more
    for D in (9, 16, 17, 33, 64):  # defaults from the table, by padded width
        rows, warps, channels = pq.TILES[pq.padded(D)]
        cfg = pq.run_config(10**6, 16, D)
        assert cfg.r * cfg.bb == rows and cfg.warps == warps and cfg.cb == min(channels, pq.padded(D))


def test_chosen_for_quasi_newton_at_its_widths_only(monkeypatch):
    xp = torch.zeros(4, 2, 48)
    assert pipelined_stepper(GRU(2, 16), DIAG, xp, "triton") is not None
    assert pipelined_stepper(GRU(2, 16), DENSE, xp, "triton") is None  # exact Newton: not this kernel
    assert pipelined_stepper(GRU(2, 9), DIAG, torch.zeros(4, 2, 27), "triton") is not None
    assert pipelined_stepper(GRU(2, 32), DIAG, torch.zeros(4, 2, 96), "triton") is not None
    assert pipelined_stepper(GRU(2, 33), DIAG, torch.zeros(4, 2, 99), "triton") is None  # D > USE_MAX_D
    monkeypatch.setattr(pq, "USE_MAX_D", pq.MAX_D)
    assert pipelined_stepper(GRU(2, 64), DIAG, torch.zeros(4, 2, 192), "triton") is not None
    assert pipelined_stepper(GRU(2, 65), DIAG, torch.zeros(4, 2, 195), "triton") is None  # D > MAX_D
    monkeypatch.setattr(pq, "ENABLED", False)
    assert pipelined_stepper(GRU(2, 16), DIAG, xp, "triton") is None


@cpu_only
@pytest.mark.parametrize("T,B,I,D,channels", [(45, 3, 3, 16, None), (1, 1, 2, 12, None), (40, 2, 3, 33, None),
                                               (19, 1, 4, 64, None), (40, 2, 3, 33, 16), (23, 3, 2, 64, 32)])
def test_solve_matches_reference_loop_and_sequential(monkeypatch, T, B, I, D, channels):
    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(pq, "USE_MAX_D", pq.MAX_D)  # every width the kernel takes, not only those solves use
    if channels:  # programs splitting the channels: the pipeline alternates two maps buffers
        rows, warps, _ = pq.TILES[pq.padded(D)]
        monkeypatch.setitem(pq.TILES, pq.padded(D), (rows, warps, channels))
    calls = []
    real = newton.pipelined_iterations
    monkeypatch.setattr(newton, "pipelined_iterations", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(T + D)
    cell = GRU(I, D)
    x = torch.randn(T, B, I)
    h0 = 0.3 * torch.randn(B, D)
    got = solve_pipelined_and_reference(cell, x, "diag", h0)
    assert calls == [1]  # the pipelined solve took this path, the reference loop did not
    (s1, i1, log1), (s0, i0, log0) = got[True], got[False]
    assert i1.converged and i1.iterations == i0.iterations
    assert [it for it, _ in log1] == [it for it, _ in log0]
    for a, b in zip(i1.residuals, i0.residuals):
        assert abs(a - b) <= 1e-3 * max(a, b) + 1e-6
    c64 = GRU(I, D).double()
    c64.load_state_dict(cell.state_dict())
    with torch.no_grad():
        ref = newton.sequential_states(c64, c64.project_inputs(x.double()), h0.double())
    assert (s1.double() - ref).abs().max().item() < 2e-5
    assert (s1 - s0).abs().max().item() < 2e-5


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("B,D,channels", [(8, 64, None), (3, 33, None), (16, 16, None), (8, 64, 32), (3, 33, 16)])
def test_gpu_pass_matches_reference(B, D, channels):
    _check(3001, B, D, device="cuda", seed=D, atol=5e-6, channels=channels)
    _check(1003, B, D, rows=64, device="cuda", seed=D + 1, atol=5e-6, channels=channels)  # another launch shape


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("T,B,D", [(100_003, 16, 32), (65_537, 3, 24)])
def test_gpu_solve_matches_float64(T, B, D):
    torch.manual_seed(0)
    m = torch.nn.GRU(D, D)
    cell = GRU.from_torch(m).cuda()
    x = torch.randn(T, B, D, device="cuda")
    calls = []
    real = newton.pipelined_iterations
    newton.pipelined_iterations = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        states, info = seqpar.solve(cell, x, jacobian="diag", return_info=True, fallback="none")
    finally:
        newton.pipelined_iterations = real
    assert calls == [1] and info.converged
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=False):  # (cuDNN has no float64 GRU)
        ref, _ = m.double().cuda()(x.double())
    assert (states.double() - ref).abs().max().item() < 1e-4
