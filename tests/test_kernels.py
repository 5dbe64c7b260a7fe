"""Triton kernels against their pure-PyTorch references (TRITON_INTERPRET=1 on CPU).

Small shapes: T and N not multiples of the block sizes, T=1, reverse, initial state.
GPU variants (``-m gpu``) run the same checks compiled, on larger shapes.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

triton = pytest.importorskip("triton")

import seqpar  # noqa: E402
from seqpar.cells import GRU, DiagGRU, DiagLSTM  # noqa: E402
from seqpar.newton import shift  # noqa: E402
from seqpar.scan import affine_scan  # noqa: E402
from seqpar.structure import DENSE, DIAG, Structure  # noqa: E402

BLOCK2 = Structure("block", 2)
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _ref(J, b, h0, st, reverse):
    if reverse:
        return affine_scan(J.flip(0), b.flip(0), h0, st).flip(0)
    return affine_scan(J, b, h0, st)


@pytest.mark.parametrize("T,N", [(1, 3), (37, 13), (64, 129)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode", ["lookback", "3pass"])
def test_scan_diag(T, N, reverse, mode):
    from seqpar.kernels.scan_diag import scan_diag

    g = torch.Generator().manual_seed(T * 1000 + N)
    J = torch.rand(T, 1, N, generator=g) * 1.2 - 0.1
    b = torch.randn(T, 1, N, generator=g)
    for h0 in (None, torch.randn(1, N, generator=g)):
        out = scan_diag(J, b, h0, reverse=reverse, mode=mode, block_t=16, block_n=32, chunks=3)
        ref = _ref(J, b, torch.zeros(1, N) if h0 is None else h0, DIAG, reverse)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_scan_diag_bfloat16_storage():
    from seqpar.kernels.scan_diag import scan_diag

    g = torch.Generator().manual_seed(1)
    J = (torch.rand(45, 2, 7, generator=g) * 0.9).bfloat16()
    b = torch.randn(45, 2, 7, generator=g).bfloat16()
    out = scan_diag(J, b, None, block_t=16, block_n=16)
    assert out.dtype == torch.bfloat16
    ref = affine_scan(J.float(), b.float(), torch.zeros(2, 7), DIAG)  # float32 accumulation
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("T,M", [(1, 2), (37, 5)])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_block2(T, M, reverse):
    from seqpar.kernels.scan_block import scan_block2

    g = torch.Generator().manual_seed(T + M)
    J = torch.randn(T, 1, M, 2, 2, generator=g) * 0.5
    b = torch.randn(T, 1, M, 2, generator=g)
    h0 = torch.randn(1, M, 2, generator=g)
    out = scan_block2(J, b, h0, reverse=reverse, block_t=16, block_n=4)
    ref = _ref(J.reshape(T, 1, M, 2, 2), b.reshape(T, 1, 2 * M), h0.reshape(1, 2 * M), BLOCK2, reverse)
    torch.testing.assert_close(out.reshape(T, 1, 2 * M), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,B,D,reverse", [(1, 1, 3, False), (29, 2, 5, False), (23, 1, 17, True)])
def test_scan_dense(T, B, D, reverse):
    from seqpar.kernels.scan_dense import scan_dense

    g = torch.Generator().manual_seed(T + D)
    J = torch.randn(T, B, 1, D, D, generator=g) * 0.5 / D ** 0.5
    b = torch.randn(T, B, D, generator=g)
    h0 = torch.randn(B, D, generator=g)
    out = scan_dense(J, b, h0, reverse=reverse, chunk=4)
    torch.testing.assert_close(out, _ref(J, b, h0, DENSE, reverse), rtol=1e-5, atol=1e-5)


def _newton_step_ref(cell, st, h, xp, bnd):
    hp = shift(h, bnd)
    f = cell.step(hp, xp)
    J = cell.jacobian(hp, xp, st)
    return affine_scan(J, f - st.matvec(J, hp), bnd, st), (h - f).abs().amax(dim=(1, 2)), f


def _fused_gru_case(T, cell, structure, step):
    """Run ``step(h, xp, bnd)`` on a random iterate; check it against the reference linearisation."""
    torch.manual_seed(T)
    with torch.no_grad():
        xp = cell.project_inputs(torch.randn(T, 2, 4))
        h, bnd = torch.randn(T, 2, 9) * 0.3, torch.randn(2, 9)
        ref, err, f = _newton_step_ref(cell, structure, h, xp, bnd)
        out, stats = step(h, xp, bnd)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert float(stats[0]) <= float(err.max()) * (1 + 1e-5)  # no larger than the absolute residual
    torch.testing.assert_close(float(stats[0]), _elementwise_rel(h, f), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats[1], f.abs().max(), rtol=1e-5, atol=1e-6)
    return float(stats[0]), float((err / f.abs().amax(dim=(1, 2)).clamp_min(1)).max())


@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("variant,tiles", [("tile", (16, 8)), ("seq", (8, 16))])
def test_fused_diag_gru(T, variant, tiles):
    from seqpar.kernels.fused_diag_gru import fused_diag_gru_step

    cell = DiagGRU(4, 9)
    got, rel = _fused_gru_case(T, cell, DIAG, lambda h, xp, bnd: fused_diag_gru_step(
        h, xp, cell.weight_hh, cell.bias_hh, bnd, block_t=tiles[0], block_n=tiles[1], variant=variant))
    assert got >= rel * (1 - 1e-5)  # elementwise scaling: never below the per-step relative residual


@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("recurrent,tiles,gemm", [("gemm", dict(block_t=16, block_n=8), "tf32x3"),
                                                  ("gemm", dict(block_t=16, block_n=8), "cublas"),
                                                  ("dot", dict(block_t=16), None),
                                                  ("dot", dict(block_t=32, block_n=32, precision="ieee"), None)])
def test_fused_gru_quasi(T, recurrent, tiles, gemm, monkeypatch):
    """Dense GRU, quasi-Newton (diagonal J): the fused step equals the reference linearisation, with
    W_hh h_prev from a GEMM before the launch (seqpar.kernels.linear or torch.mm) or from tl.dot in the
    kernel (lanes padded to 16, 32)."""
    from seqpar.kernels import fused_diag_gru
    from seqpar.kernels.fused_diag_gru import fused_gru_quasi_step

    if gemm:
        monkeypatch.setattr(fused_diag_gru, "QUASI_GEMM", gemm)
    cell = GRU(4, 9)
    _fused_gru_case(T, cell, DIAG, lambda h, xp, bnd: fused_gru_quasi_step(
        h, xp, cell.weight_hh, cell.bias_hh, bnd, recurrent=recurrent, **tiles))


@pytest.mark.parametrize("T,B,D,bias", [(1, 2, 9, True), (37, 3, 9, True), (70, 1, 20, False), (33, 5, 3, True)])
def test_fused_gru_quasi_from_the_zero_iterate(T, B, D, bias):
    """zero_iterate=True (no recurrent GEMM: b_hh after step 0, W_hh boundary + b_hh at step 0) gives the
    pass from h = 0 of the GEMM variant and of the reference linearisation: new iterate, residual, max|f|
    and the shard summary, from a boundary and a start that are not zero; T = 1, B = 1, no bias."""
    from seqpar.kernels.fused_diag_gru import fused_gru_quasi_step

    torch.manual_seed(T + D)
    cell = GRU(4, D, bias=bias)
    with torch.no_grad():
        xp = cell.project_inputs(torch.randn(T, B, 4))
        h, bnd, start = torch.zeros(T, B, D), torch.randn(B, D), torch.randn(B, D)
        kw = dict(start=start, want_summary=True, block_t=16, block_n=8)
        got = fused_gru_quasi_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, zero_iterate=True, **kw)
        want = fused_gru_quasi_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, recurrent="gemm", **kw)
        hp = shift(h, bnd)  # the reference pass: linearised at [bnd, h[:-1]], scanned from start
        f = cell.step(hp, xp)
        J = cell.jacobian(hp, xp, DIAG)
        ref = affine_scan(J, f - DIAG.matvec(J, hp), start, DIAG)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(float(got[1][0]), _elementwise_rel(h, f), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], J.prod(0), rtol=1e-5, atol=1e-6)


def test_solve_gru_quasi_first_pass_has_no_gemm(monkeypatch):
    """A quasi-Newton GRU solve without an initial guess runs its first pass from the zero iterate with no
    recurrent GEMM (one GEMM fewer than passes), with an initial guess every pass has its GEMM; both
    match the sequential loop."""
    from seqpar.kernels import fused_diag_gru as k

    calls = []
    real = k.linear
    monkeypatch.setattr(k, "linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(2)
    cell = GRU(3, 20)
    x = torch.randn(45, 2, 3)
    ref = seqpar.solve(cell, x, method="sequential").detach()
    for guess in (None, torch.full((45, 2, 20), 0.1)):
        calls.clear()
        out, info = seqpar.solve(cell, x, jacobian="diag", backend="triton", return_info=True, fallback="none",
                                 initial_guess=guess)
        assert info.converged
        torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
        assert len(calls) == info.iterations + (0 if guess is None else 1)


def test_fused_gru_quasi_arguments():
    from seqpar.kernels import fused_diag_gru as k

    cell = GRU(4, 20)
    h, xp, bnd = torch.zeros(5, 2, 20), torch.zeros(5, 2, 60), torch.zeros(2, 20)
    with pytest.raises(ValueError, match="recurrent"):
        k.fused_gru_quasi_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, recurrent="mm")
    with pytest.raises(ValueError, match="precision"):
        k.fused_gru_quasi_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, recurrent="dot", precision="bf16")
    for bad in (16, 48, 8):  # below D, not a power of two, below 16
        with pytest.raises(ValueError, match="block_n"):
            k.fused_gru_quasi_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, recurrent="dot", block_n=bad)


@pytest.mark.parametrize("D,expect", [(4, "gemm"), (8, "gemm"), (9, "dot"), (16, "dot"), (17, "gemm"), (64, "gemm")])
def test_fused_gru_quasi_dispatch(D, expect, monkeypatch):
    """recurrent=None picks the measured variant by D (QUASI_DOT_MIN_D..QUASI_DOT_MAX_D: in the kernel)."""
    from seqpar.kernels import fused_diag_gru as k

    seen = []
    monkeypatch.setattr(k, "_launch", lambda *a, **kw: seen.append(kw["hh"]))
    cell = GRU(3, D)
    k.fused_gru_quasi_step(torch.zeros(3, 1, D), torch.zeros(3, 1, 3 * D), cell.weight_hh, cell.bias_hh,
                           torch.zeros(1, D))
    assert seen == [2 if expect == "dot" else 1]


def test_solve_gru_quasi_on_kernels_matches_sequential():
    torch.manual_seed(0)
    cell = GRU(3, 6)
    x = torch.randn(70, 2, 3)
    ref = seqpar.solve(cell, x, method="sequential").detach()
    out, info = seqpar.solve(cell, x, jacobian="diag", backend="triton", return_info=True)
    assert info.converged and info.newton_converged
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 37])
def test_fused_diag_lstm(T):
    from seqpar.kernels.fused_diag_lstm import fused_diag_lstm_step

    torch.manual_seed(T)
    cell = DiagLSTM(3, 5)
    with torch.no_grad():
        xp = cell.project_inputs(torch.randn(T, 2, 3))
        h, bnd = torch.randn(T, 2, 10) * 0.3, torch.randn(2, 10)
        ref, err, f = _newton_step_ref(cell, BLOCK2, h, xp, bnd)
        out, stats = fused_diag_lstm_step(h, xp, cell.weight_hh, bnd, block_t=16, block_n=4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert float(stats[0]) <= float(err.max()) * (1 + 1e-5)
    torch.testing.assert_close(float(stats[0]), _elementwise_rel(h, f), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats[1], f.abs().max(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------ start != boundary, elementwise residual, shard summary
def _fused(kind):
    """(cell factory of the state width n, structure, step(cell, h, xp, bnd, **kw), index of the z/f gate)."""
    from seqpar.kernels.fused_diag_gru import fused_diag_gru_step, fused_gru_quasi_step
    from seqpar.kernels.fused_diag_lstm import fused_diag_lstm_step

    if kind == "diag_tile":
        return lambda n: DiagGRU(4, n), DIAG, lambda c, h, xp, bnd, **kw: fused_diag_gru_step(
            h, xp, c.weight_hh, c.bias_hh, bnd, block_t=16, block_n=8, **kw)
    if kind == "diag_seq":
        return lambda n: DiagGRU(4, n), DIAG, lambda c, h, xp, bnd, **kw: fused_diag_gru_step(
            h, xp, c.weight_hh, c.bias_hh, bnd, block_t=8, block_n=16, variant="seq", **kw)
    if kind == "gru_quasi":
        return lambda n: GRU(4, n), DIAG, lambda c, h, xp, bnd, **kw: fused_gru_quasi_step(
            h, xp, c.weight_hh, c.bias_hh, bnd, block_t=16, block_n=8, recurrent="gemm", **kw)
    if kind == "gru_quasi_dot":  # W_hh h_prev by tl.dot in the kernel: lanes padded to 16
        return lambda n: GRU(4, n), DIAG, lambda c, h, xp, bnd, **kw: fused_gru_quasi_step(
            h, xp, c.weight_hh, c.bias_hh, bnd, block_t=16, recurrent="dot", **kw)
    return lambda n: DiagLSTM(4, n), BLOCK2, lambda c, h, xp, bnd, **kw: fused_diag_lstm_step(
        h, xp, c.weight_hh, bnd, block_t=16, block_n=4, **kw)


FUSED = ["diag_tile", "diag_seq", "gru_quasi", "gru_quasi_dot", "lstm"]


def _elementwise_rel(h, f):
    r = (h - f).abs() / f.abs().clamp_min(1)
    return float("inf") if bool(torch.isnan(r).any()) else float(r.max())


def _jac_product(J, st):
    """J_{T-1} ... J_0 in float64, from the per-step Jacobians (T, ...)."""
    P = st.identity(tuple(J.shape[1:2]), J.shape[2] * (2 if st.kind == "block" else 1), torch.float64, J.device)
    for t in range(J.shape[0]):
        P = st.matmul(J[t].double(), P)
    return P


@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("T", [1, 37, 100])
@pytest.mark.parametrize("B,n", [(1, 5), (3, 12)])
def test_fused_start_residual_summary(kind, T, B, n):
    make, st, step = _fused(kind)
    torch.manual_seed(1000 * T + 10 * B + n)
    cell = make(n)
    D = cell.state_size
    with torch.no_grad():
        xp = cell.project_inputs(torch.randn(T, B, 4))
        h, bnd, start = torch.randn(T, B, D) * 0.5, torch.randn(B, D), torch.randn(B, D)
        hp = shift(h, bnd)
        f = cell.step(hp, xp)
        J = cell.jacobian(hp, xp, st)
        b = f - st.matvec(J, hp)
        out, stats, phi = step(cell, h, xp, bnd, start=start, want_summary=True)
        torch.testing.assert_close(out, affine_scan(J, b, start, st), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(float(stats[0]), _elementwise_rel(h, f), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats[1], f.abs().max(), rtol=1e-5, atol=1e-6)
        assert stats.dtype == torch.float32 and stats.shape == (2,)
        ref_phi = _jac_product(J, st)
        assert phi.dtype == torch.float32 and phi.shape == ref_phi.shape
        torch.testing.assert_close(phi.double(), ref_phi, rtol=1e-3, atol=1e-5 * float(ref_phi.abs().max()) + 1e-12)
        # start=None: today's behaviour, the scan starts from boundary (bit-identical to start=boundary)
        out0, stats0 = step(cell, h, xp, bnd)
        torch.testing.assert_close(out0, affine_scan(J, b, bnd, st), rtol=1e-5, atol=1e-5)
        out1, stats1 = step(cell, h, xp, bnd, start=bnd.clone())
        assert torch.equal(out0, out1) and torch.equal(stats0, stats1) and torch.equal(stats0, stats)


@pytest.mark.parametrize("kind", FUSED)
def test_fused_summary_empty(kind):
    make, st, step = _fused(kind)
    cell = make(5)
    D = cell.state_size
    out, stats, phi = step(cell, torch.zeros(0, 3, D), cell.project_inputs(torch.zeros(0, 3, 4)),
                           torch.randn(3, D), start=torch.randn(3, D), want_summary=True)
    assert out.shape == (0, 3, D) and stats.tolist() == [0.0, 0.0]
    assert torch.equal(phi.double(), st.identity((3,), D, torch.float64, "cpu"))


@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("T", [1, 37])
def test_fused_residual_elementwise(kind, T):
    """One component ~1000, a unit-scale one wrong by 0.1: the residual must see the 0.1."""
    make, st, step = _fused(kind)
    torch.manual_seed(T)
    cell = make(5)
    D = cell.state_size
    big, small = (1, 2) if st.kind == "block" else (0, 1)  # c of unit 0 / h of unit 1; else components 0 / 1
    gate = cell.hidden_size + 0  # z gate (GRU) / forget gate (LSTM) of unit 0: ~1 keeps the big component
    with torch.no_grad():
        xp = cell.project_inputs(torch.randn(T, 2, 4))
        xp[..., gate] += 3000.0
        bnd = torch.randn(2, D) * 0.5
        bnd[:, big] = 1000.0
        h = torch.empty(T, 2, D)
        hcur = bnd
        for t in range(T):  # the exact solution ...
            hcur = cell.step(hcur, xp[t])
            h[t] = hcur
        h[-1, 1, small] += 0.1  # ... wrong by 0.1 in one unit-scale component of the last step
        f = cell.step(shift(h, bnd), xp)
        assert float(f.abs().max()) > 500 and float(f[-1, 1, small].abs()) <= 1.0
        per_step = ((h - f).abs().amax(dim=(1, 2)) / f.abs().amax(dim=(1, 2)).clamp_min(1)).max()
        assert float(per_step) < 1e-3  # the old per-step scaling hides the error
        ref = _elementwise_rel(h, f)
        assert ref >= 0.1 * (1 - 1e-3)
        _, stats = step(cell, h, xp, bnd)
        assert float(stats[0]) >= 0.1 * (1 - 1e-3)
        torch.testing.assert_close(float(stats[0]), ref, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(stats[1], f.abs().max(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("t_nan", [0, 20, 36])
def test_fused_residual_nan_is_inf(kind, t_nan):
    make, st, step = _fused(kind)
    torch.manual_seed(t_nan)
    cell = make(5)
    D = cell.state_size
    with torch.no_grad():
        xp = cell.project_inputs(torch.randn(37, 2, 4))
        h, bnd = torch.randn(37, 2, D) * 0.3, torch.randn(2, D)
        h[t_nan, 1, 3] = float("nan")
        assert _elementwise_rel(h, cell.step(shift(h, bnd), xp)) == float("inf")
        _, stats = step(cell, h, xp, bnd)
    assert float(stats[0]) == float("inf")


def test_backend_resolution():
    from seqpar.backend import resolve_backend

    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("triton", "cpu") == "triton"  # allowed under the interpreter
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", "cpu")


@pytest.mark.parametrize("cell_fn,jac", [(lambda: DiagGRU(3, 6), "auto"), (lambda: DiagLSTM(3, 4), "auto"),
                                         (lambda: GRU(3, 5), "diag"), (lambda: GRU(3, 5), "dense")])
def test_solve_triton_matches_sequential(cell_fn, jac):
    torch.manual_seed(0)
    cell = cell_fn()
    x = torch.randn(40, 2, 3)
    ref = seqpar.solve(cell, x, method="sequential").detach()
    out, info = seqpar.solve(cell, x, jacobian=jac, backend="triton", return_info=True, chunk_size=16)
    assert info.converged
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell_fn", [lambda: DiagGRU(3, 6), lambda: DiagLSTM(3, 4)])
def test_backward_triton_matches_torch(cell_fn):
    torch.manual_seed(1)
    cell = cell_fn()
    x = torch.randn(30, 2, 3, requires_grad=True)
    grads = []
    for backend in ("torch", "triton"):
        x.grad = None
        cell.zero_grad()
        out = seqpar.solve(cell, x, backend=backend, chunk_size=8)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in cell.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ GPU (compiled) checks
gpu = pytest.mark.skipif(not CUDA or os.environ.get("TRITON_INTERPRET") == "1",
                         reason="needs CUDA and TRITON_INTERPRET unset")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["lookback", "3pass"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_scan_diag(mode, reverse):
    from seqpar.kernels.scan_diag import scan_diag

    T, N = 100_003, 1000
    J = torch.rand(T, N, device=DEV) * 0.5 + 0.45
    b = torch.randn(T, N, device=DEV)
    h0 = torch.randn(N, device=DEV)
    out = scan_diag(J, b, h0, reverse=reverse, mode=mode)
    ref = _ref(J.double().unsqueeze(1), b.double().unsqueeze(1), h0.double().unsqueeze(0), DIAG, reverse)
    torch.testing.assert_close(out.double(), ref.squeeze(1), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_scan_block_dense_fused():
    from seqpar.kernels.fused_diag_gru import fused_diag_gru_step
    from seqpar.kernels.fused_diag_lstm import fused_diag_lstm_step
    from seqpar.kernels.scan_block import scan_block2
    from seqpar.kernels.scan_dense import scan_dense

    T = 50_001
    J = torch.randn(T, 3, 100, 2, 2, device=DEV) * 0.4
    b = torch.randn(T, 3, 100, 2, device=DEV)
    out = scan_block2(J, b, None)
    ref = affine_scan(J.double().reshape(T, 3, 100, 2, 2), b.double().reshape(T, 3, 200),
                      torch.zeros(3, 200, device=DEV, dtype=torch.float64), BLOCK2)
    torch.testing.assert_close(out.reshape(T, 3, 200).double(), ref, rtol=1e-4, atol=1e-4)
    Jd = torch.randn(4001, 8, 1, 64, 64, device=DEV) * 0.5 / 8
    bd = torch.randn(4001, 8, 64, device=DEV)
    refd = affine_scan(Jd.double(), bd.double(), torch.zeros(8, 64, device=DEV, dtype=torch.float64), DENSE)
    torch.testing.assert_close(scan_dense(Jd, bd).double(), refd, rtol=1e-4, atol=1e-4)
    for cell, st, step in ((DiagGRU(16, 1000).to(DEV), DIAG, None), (DiagLSTM(16, 300).to(DEV), BLOCK2, None)):
        with torch.no_grad():
            xp = cell.project_inputs(torch.randn(20_001, 2, 16, device=DEV))
            h = torch.randn(20_001, 2, cell.state_size, device=DEV) * 0.3
            bnd = torch.randn(2, cell.state_size, device=DEV)
            ref, _, _ = _newton_step_ref(cell, st, h.double(), xp.double(), bnd.double())
            if st.kind == "diag":
                out, _ = fused_diag_gru_step(h, xp, cell.weight_hh, cell.bias_hh, bnd)
            else:
                out, _ = fused_diag_lstm_step(h, xp, cell.weight_hh, bnd)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_solve_matches_sequential():
    torch.manual_seed(0)
    for cell in (DiagGRU(8, 64).to(DEV), DiagLSTM(8, 32).to(DEV)):
        x = torch.randn(3000, 4, 8, device=DEV)
        ref = seqpar.solve(cell, x, method="sequential").detach()
        out, info = seqpar.solve(cell, x, backend="triton", return_info=True)
        assert info.converged
        torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=2e-5)
    cell = GRU(8, 64).to(DEV)  # dense GRU, quasi-Newton on the fused kernel
    x = torch.randn(3000, 4, 8, device=DEV)
    ref = seqpar.solve(cell, x, method="sequential").detach()
    out, info = seqpar.solve(cell, x, jacobian="diag", backend="triton", return_info=True)
    assert info.converged and info.newton_converged
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=2e-5)
