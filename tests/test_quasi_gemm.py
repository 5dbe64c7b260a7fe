"""The quasi-Newton dense GRU's GEMM with the GRU epilogue (seqpar.kernels.quasi_gru_gemm) and the
``recurrent="epilogue"`` iteration built on it (TRITON_INTERPRET=1 on CPU: tiny shapes).

* the epilogue's (a, b, stats) against its float64 torch reference;
* one iteration against ``recurrent="gemm"`` and against a float64 quasi-Newton step
  (``GRU.step`` / ``GRU.jacobian(.., diag)`` + ``affine_scan``), phi included;
* NaN in the iterate, the default dispatch (``QUASI_EPILOGUE_MIN_D``), a whole solve.

GPU variants (``-m gpu``) at T = 5000, B = 8, D = 64 against the gemm variant.
"""
import copy

import pytest
import torch

triton = pytest.importorskip("triton")  # (without a GPU, tests/conftest.py has set TRITON_INTERPRET=1)

import seqpar  # noqa: E402
import seqpar.graphs  # noqa: E402
from seqpar.cells import GRU  # noqa: E402
from seqpar.kernels import fused_diag_gru as k  # noqa: E402
from seqpar.kernels import quasi_gru_gemm as q  # noqa: E402
from seqpar.newton import shift  # noqa: E402
from seqpar.scan import affine_scan  # noqa: E402
from seqpar.structure import DIAG  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
SMALL_TILES = (16, 16, 16, 1)  # D = 33 spans three channel blocks and three K steps
SCAN16 = dict(block_t=16, block_n=16)  # the interpreter's cost grows with the scan tile, not with T


def _problem(T, B, D, bias=True, seed=0, device="cpu", input_size=4):
    """``(cell, xp, h, boundary, start)``: GRU(input_size, D) weights, an iterate near the states' scale,
    a nonzero boundary and a different scan start."""
    torch.manual_seed(seed)
    cell = GRU(input_size, D, bias=bias).to(device)
    with torch.no_grad():
        xp = cell.project_inputs(torch.randn(T, B, input_size, device=device))
        h = torch.tanh(torch.randn(T, B, D, device=device))
        return cell, xp, h, torch.randn(B, D, device=device) * 0.5, torch.randn(B, D, device=device) * 0.5


def _ref64(cell, xp, h, bnd):
    return q.quasi_gru_epilogue_reference(h.double(), xp.double(), cell.weight_hh.double(),
                                          None if cell.bias_hh is None else cell.bias_hh.double(), bnd.double())


def _newton64(cell, xp, h, bnd, start):
    """Float64 quasi-Newton step: (states, [max relative residual, max|f|], phi) from GRU.step / jacobian."""
    c64 = copy.deepcopy(cell).double()
    xp, h, bnd, start = xp.double(), h.double(), bnd.double(), start.double()
    hp = shift(h, bnd)
    f = c64.step(hp, xp)
    J = c64.jacobian(hp, xp, DIAG)
    out = affine_scan(J, f - DIAG.matvec(J, hp), start, DIAG)
    rel = ((h - f).abs() / f.abs().clamp_min(1)).max()
    return out, torch.stack([rel, f.abs().max()]), J.prod(0)


def _step(cell, xp, h, bnd, recurrent, **kw):
    return k.fused_gru_quasi_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, recurrent=recurrent, **kw)


@pytest.mark.parametrize("T,B,D,bias,tiles,precision", [
    (1, 1, 5, True, None, "tf32x3"), (7, 3, 5, False, None, "tf32x3"), (5, 2, 33, True, SMALL_TILES, "tf32x3"),
    (3, 2, 20, False, (32, 32, 16, 2), "tf32x3"),
    # the whole-row kernel (tiles None, D <= ROWS_MAX_D): two channel blocks (D = 64), K padded and the second
    # block partly past D (D = 33, 40), more rows than one program's (T B = 70 > ROWS_BM), IEEE products
    (3, 2, 64, True, None, "tf32x3"), (2, 3, 33, False, None, "tf32x3"), (35, 2, 40, True, None, "ieee")])
def test_epilogue_matches_float64_reference(T, B, D, bias, tiles, precision):
    cell, xp, h, bnd, _ = _problem(T, B, D, bias, seed=T + D)
    with torch.no_grad():
        a, b, stats = q.quasi_gru_epilogue(h, xp, cell.weight_hh, cell.bias_hh, bnd, tiles=tiles,
                                           precision=precision)
        ra, rb, rstats = _ref64(cell, xp, h, bnd)
    assert a.shape == b.shape == (T, B, D) and a.dtype == b.dtype == stats.dtype == torch.float32
    torch.testing.assert_close(a.double(), ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.double(), rb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.double(), rstats, rtol=1e-5, atol=1e-6)


def test_epilogue_reads_xp_of_any_strides_and_checks_arguments():
    """xp as a gate-major view ((T, 3D, B) in memory) and as every other row of a larger tensor."""
    cell, xp, h, bnd, _ = _problem(4, 3, 6, seed=3)
    with torch.no_grad():
        ref = q.quasi_gru_epilogue(h, xp, cell.weight_hh, cell.bias_hh, bnd)
        gate_major = xp.transpose(1, 2).contiguous().transpose(1, 2)
        strided = torch.stack([xp, torch.full_like(xp, 9.0)], 1).reshape(8, 3, 18)[::2]
        assert not gate_major.is_contiguous() and not strided.is_contiguous()
        for x in (gate_major, strided):
            for u, v in zip(q.quasi_gru_epilogue(h, x, cell.weight_hh, cell.bias_hh, bnd), ref):
                torch.testing.assert_close(u, v, rtol=0, atol=0)
    for bad in ((16, 16, 8, 1), (16, 48, 16, 1), (16, 16, 16)):
        with pytest.raises(ValueError, match="tiles"):
            q.quasi_gru_epilogue(h, xp, cell.weight_hh, cell.bias_hh, bnd, tiles=bad)
    with pytest.raises(ValueError, match="precision"):
        q.quasi_gru_epilogue(h, xp, cell.weight_hh, cell.bias_hh, bnd, precision="bf16")
    with pytest.raises(ValueError, match="expected"):
        q.quasi_gru_epilogue(h, xp[..., :-1], cell.weight_hh, cell.bias_hh, bnd)


@pytest.mark.parametrize("T,B,D,bias,tiles", [(1, 1, 5, True, None), (7, 3, 5, False, None),
                                              (5, 2, 33, True, SMALL_TILES)])
@pytest.mark.parametrize("want_summary,give_out", [(True, False), (False, True)])
def test_epilogue_step_matches_gemm_and_float64_newton(T, B, D, bias, tiles, want_summary, give_out):
    cell, xp, h, bnd, start = _problem(T, B, D, bias, seed=10 * T + D)
    with torch.no_grad():
        out = torch.full((T, B, D), 7.0) if give_out else None
        got = _step(cell, xp, h, bnd, "epilogue", start=start, want_summary=want_summary, out=out,
                    epilogue_tiles=tiles, **SCAN16)
        ref = _step(cell, xp, h, bnd, "gemm", start=start, want_summary=want_summary, **SCAN16)
        states64, stats64, phi64 = _newton64(cell, xp, h, bnd, start)
    assert len(got) == len(ref) == (3 if want_summary else 2)
    if give_out:
        assert got[0] is out
    for u, v in zip(got, ref):
        assert u.shape == v.shape and u.dtype == v.dtype
        torch.testing.assert_close(u, v, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got[0].double(), states64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].double(), stats64, rtol=1e-5, atol=1e-6)
    if want_summary:
        torch.testing.assert_close(got[2].double(), phi64, rtol=1e-4, atol=1e-7)


def test_epilogue_step_start_none_and_scan_tiles():
    """start=None scans from the boundary; the scan's tile arguments pass through."""
    cell, xp, h, bnd, _ = _problem(37, 2, 5, seed=5)
    with torch.no_grad():
        tiles = dict(block_t=16, block_n=16, lookback_w=2)  # three look-back tiles
        got, stats = _step(cell, xp, h, bnd, "epilogue", **tiles)
        same, _ = _step(cell, xp, h, bnd, "epilogue", start=bnd.clone(), **tiles)
        states64, _, _ = _newton64(cell, xp, h, bnd, bnd)
    torch.testing.assert_close(got.double(), states64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, same, rtol=0, atol=0)


def test_epilogue_nan_in_iterate_reported_like_gemm():
    cell, xp, h, bnd, start = _problem(6, 2, 5, seed=6)
    h[2, 1, 3] = float("nan")
    with torch.no_grad():
        _, stats = _step(cell, xp, h, bnd, "epilogue", start=start, **SCAN16)
        _, ref = _step(cell, xp, h, bnd, "gemm", start=start, **SCAN16)
        _, _, stats64 = _ref64(cell, xp, h, bnd)
    assert not bool(torch.isfinite(stats).any()) and not bool(torch.isnan(stats).any())  # inf, inf
    assert torch.equal(stats, ref) and torch.equal(stats.double(), stats64)


@pytest.mark.parametrize("min_d,D,expect", [(None, 64, "gemm"), (None, 12, "dot"), (32, 33, "epilogue"),
                                            (32, 20, "gemm"), (8, 12, "epilogue")])
def test_default_dispatch_by_epilogue_min_d(min_d, D, expect, monkeypatch):
    """recurrent=None: "epilogue" from QUASI_EPILOGUE_MIN_D on (when set), else as before."""
    monkeypatch.setattr(k, "QUASI_EPILOGUE_MIN_D", min_d)
    seen = []
    monkeypatch.setattr(k, "_quasi_epilogue_step", lambda *a, **kw: seen.append("epilogue"))
    monkeypatch.setattr(k, "_launch", lambda *a, **kw: seen.append({1: "gemm", 2: "dot"}[kw["hh"]]))
    cell = GRU(3, D)
    k.fused_gru_quasi_step(torch.zeros(3, 1, D), torch.zeros(3, 1, 3 * D), cell.weight_hh, cell.bias_hh,
                           torch.zeros(1, D))
    assert seen == [expect] and k.default_quasi_recurrent(D) == expect
    with pytest.raises(ValueError, match="epilogue"):
        k.fused_gru_quasi_step(torch.zeros(3, 1, D), torch.zeros(3, 1, 3 * D), cell.weight_hh, cell.bias_hh,
                               torch.zeros(1, D), recurrent="fused")


def test_epilogue_step_empty_sequence():
    cell = GRU(3, 5)
    out, stats, phi = k.fused_gru_quasi_step(torch.zeros(0, 2, 5), torch.zeros(0, 2, 15), cell.weight_hh,
                                             cell.bias_hh, torch.randn(2, 5), recurrent="epilogue",
                                             want_summary=True)
    assert out.shape == (0, 2, 5) and stats.tolist() == [0.0, 0.0] and bool((phi == 1).all())


def _solve_both(cell, x, monkeypatch, min_d, **kw):
    """States and info of seqpar.solve(jacobian="diag") with QUASI_EPILOGUE_MIN_D off, then ``min_d``;
    checks that the second solve ran the epilogue."""
    seqpar.graphs.clear()
    ref, info_ref = seqpar.solve(cell, x, jacobian="diag", backend="triton", return_info=True, **kw)
    calls = []
    inner = k._quasi_epilogue_step
    monkeypatch.setattr(k, "_quasi_epilogue_step", lambda *a: calls.append(1) or inner(*a))
    monkeypatch.setattr(k, "QUASI_EPILOGUE_MIN_D", min_d)
    seqpar.graphs.clear()
    out, info = seqpar.solve(cell, x, jacobian="diag", backend="triton", return_info=True, **kw)
    seqpar.graphs.clear()
    assert len(calls) >= info.iterations >= 1
    return ref.detach(), info_ref, out.detach(), info


def test_solve_with_epilogue_matches_default(monkeypatch):
    """Look-back tiles of 16 x 16 in both variants' tables (the interpreter's time grows with the tile:
    ~0.4 s per iteration with the default 256-step tile): two tiles of 16 steps."""
    from seqpar.kernels import scan_diag

    small = {"wide": dict(tt=16, bn=16, warps=1, w=2)}
    monkeypatch.setattr(k, "QUASI_TILES", small)
    monkeypatch.setattr(scan_diag, "TILES", small)
    torch.manual_seed(0)
    cell = GRU(3, 6)
    x = torch.randn(20, 2, 3)
    ref, info_ref, out, info = _solve_both(cell, x, monkeypatch, 2)
    assert info.converged and info.newton_converged and info.iterations == info_ref.iterations
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, seqpar.solve(cell, x, method="sequential").detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,B,D,tiles", [(5000, 8, 64, None), (5000, 8, 64, (128, 32, 32, 4)),
                                         (5000, 8, 64, (64, 64, 64, 8)), (4999, 3, 33, None), (3001, 2, 128, None)])
def test_gpu_epilogue_matches_gemm(T, B, D, tiles):
    cell, xp, h, bnd, start = _problem(T, B, D, seed=D, device=DEV, input_size=D)
    with torch.no_grad():
        ref = _step(cell, xp, h, bnd, "gemm", start=start, want_summary=True)
        got = _step(cell, xp, h, bnd, "epilogue", start=start, want_summary=True, epilogue_tiles=tiles)
        for u, v in zip(got, ref):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=2e-6)
        a, b, stats = q.quasi_gru_epilogue(h[:300], xp[:300], cell.weight_hh, cell.bias_hh, bnd, tiles=tiles)
        ra, rb, rstats = _ref64(cell, xp[:300], h[:300], bnd)
        torch.testing.assert_close(a.double(), ra, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.double(), rb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.double(), rstats, rtol=1e-5, atol=1e-6)
        h[17, 1, 3] = float("nan")
        assert torch.equal(_step(cell, xp, h, bnd, "epilogue", epilogue_tiles=tiles)[1],
                           _step(cell, xp, h, bnd, "gemm")[1])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_solve_with_epilogue_matches_gemm_and_float64(monkeypatch):
    torch.manual_seed(64)
    m = torch.nn.GRU(64, 64).to(DEV)
    cell = GRU.from_torch(m)
    x = torch.randn(5000, 8, 64, device=DEV)
    ref, info_ref, out, info = _solve_both(cell, x, monkeypatch, 32, fallback="none")
    assert info.converged and abs(info.iterations - info_ref.iterations) <= 1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    c64 = GRU.from_torch(copy.deepcopy(m).double())
    f = c64.step(shift(out.double(), torch.zeros(8, 64, dtype=torch.float64, device=DEV)),
                 c64.project_inputs(x.double()))
    assert float(((out.double() - f).abs() / f.abs().clamp_min(1)).max()) <= info.tol * 1.05
