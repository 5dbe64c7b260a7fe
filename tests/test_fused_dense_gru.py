"""The fused exact-Newton kernel of the dense GRU (kernels/fused_dense_gru.py) against its reference.

Reference: ``GRU.step`` / ``GRU.jacobian`` (dense) + ``seqpar.scan.sequential_scan`` in float64.
CPU: TRITON_INTERPRET=1 on tiny shapes (both the broadcast path, D <= 8, and the tl.dot path,
D > 8, including non-powers of two and D > 32, where W_hh is reloaded every step); chunk
lengths that do not divide T, ``start`` != ``boundary``, no bias, bfloat16 inputs, NaN
iterates, empty sequences; the wiring into ``seqpar.solve`` and the sharded-solve
correction.  GPU variants (``-m gpu``) check one iteration on T = 5003 against float64 and full solves on
T = 100k (IEEE and TF32 summaries) against torch.nn.GRU in float64 on the GPU.
"""
import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

import seqpar  # noqa: E402
from seqpar.cells import GRU  # noqa: E402
from seqpar.newton import LocalPass, NewtonOptions, SolveInfo, shift  # noqa: E402
from seqpar.scan import jacobian_product, sequential_scan  # noqa: E402
from seqpar.structure import DENSE  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _step(*a, **kw):
    from seqpar.kernels.fused_dense_gru import fused_dense_gru_step

    return fused_dense_gru_step(*a, **kw)


def _reference(cell, h, xp, bnd, start):
    """(out, elementwise relative residual, max|f|, Phi) of one Newton iteration, in float64."""
    c64 = GRU(cell.input_size, cell.hidden_size, bias=cell.bias).double().to(h.device)
    c64.load_state_dict(cell.state_dict())
    h, xp, bnd, start = h.double(), xp.double(), bnd.double(), start.double()
    with torch.no_grad():
        hp = shift(h, bnd)
        f = c64.step(hp, xp)
        J = c64.jacobian(hp, xp, DENSE)
        out = sequential_scan(J, f - DENSE.matvec(J, hp), start, DENSE)
        rel = (h - f).abs() / f.abs().clamp_min(1)
        rel = float("inf") if bool(torch.isnan(rel).any()) else float(rel.max()) if rel.numel() else 0.0
        fmax = float(f.abs().max()) if f.numel() else 0.0
        phi = jacobian_product(J, DENSE) if h.shape[0] else None
    return out, rel, fmax, phi


def _problem(D, B, T, bias=True, seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    cell = GRU(3, D, bias=bias).to(device)
    with torch.no_grad():
        xp = cell.project_inputs(torch.randn(T, B, 3, device=device))
        h = torch.randn(T, B, D, device=device) * 0.5
        bnd, start = torch.randn(B, D, device=device), torch.randn(B, D, device=device)
    return cell, xp.to(dtype), h.to(dtype), bnd.to(dtype), start.to(dtype)


# (D, B, T, chunk, bias): D <= 8 broadcast products, D > 8 tl.dot (DP = 16 / 32 / 64), D > 32 W reloaded per step
CASES = [(2, 1, 1, None, True), (2, 3, 7, 3, True), (3, 1, 100, 9, True), (3, 2, 7, 3, False), (5, 3, 7, 4, True),
         (16, 1, 7, 3, True), (17, 3, 7, 4, False), (17, 1, 100, 16, True), (40, 2, 5, 2, True)]


@pytest.mark.parametrize("D,B,T,chunk,bias", CASES)
def test_step_matches_float64_reference(D, B, T, chunk, bias):
    cell, xp, h, bnd, start = _problem(D, B, T, bias, seed=D * 100 + T)
    out, stats, phi = _step(h, xp, cell.weight_hh, cell.bias_hh, bnd, start=start, want_summary=True, chunk=chunk)
    ref, rel, fmax, ref_phi = _reference(cell, h, xp, bnd, start)
    assert out.dtype == torch.float32 and out.shape == (T, B, D)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert stats.dtype == torch.float32 and stats.shape == (2,)
    torch.testing.assert_close(float(stats[0]), rel, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(float(stats[1]), fmax, rtol=1e-5, atol=1e-6)
    assert phi.dtype == torch.float32 and phi.shape == (B, 1, D, D)
    torch.testing.assert_close(phi.double(), ref_phi, rtol=1e-4, atol=1e-5 * float(ref_phi.abs().max()) + 1e-12)
    # start=None scans from the boundary, bit-identical to start=boundary
    out0, stats0 = _step(h, xp, cell.weight_hh, cell.bias_hh, bnd, chunk=chunk)
    out1, stats1 = _step(h, xp, cell.weight_hh, cell.bias_hh, bnd, start=bnd.clone(), chunk=chunk)
    assert torch.equal(out0, out1) and torch.equal(stats0, stats1) and torch.equal(stats0, stats)
    torch.testing.assert_close(out0.double(), _reference(cell, h, xp, bnd, bnd)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [5, 17])
def test_options_do_not_change_the_result(D):
    """Default chunk length, W held vs reloaded, explicit num_warps, TF32 / 3xTF32 products (the
    interpreter computes every precision in fp32, so on CPU they must agree to rounding)."""
    cell, xp, h, bnd, start = _problem(D, 2, 11, seed=D)
    base = _step(h, xp, cell.weight_hh, cell.bias_hh, bnd, start=start, want_summary=True, chunk=4)
    variants = [dict(), dict(w_in_loop=True, num_warps=4, chunk=5), dict(w_in_loop=False, chunk=11)]
    if D > 8:
        variants += [dict(precision="tf32", chunk=4), dict(precision="tf32x3", chunk=3)]
    for kw in variants:
        got = _step(h, xp, cell.weight_hh, cell.bias_hh, bnd, start=start, want_summary=True, **kw)
        for a, b in zip(got, base):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=str(kw))


def test_bfloat16_inputs():
    cell, xp, h, bnd, start = _problem(17, 2, 9, seed=3, dtype=torch.bfloat16)
    out, stats, phi = _step(h, xp, cell.weight_hh, cell.bias_hh, bnd, start=start, want_summary=True, chunk=4)
    assert out.dtype == torch.bfloat16 and stats.dtype == torch.float32 and phi.dtype == torch.float32
    ref, rel, fmax, ref_phi = _reference(cell, h, xp, bnd, start)  # same bf16 values, fp32 compute vs fp64
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    torch.testing.assert_close(float(stats[0]), rel, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(phi.double(), ref_phi, rtol=1e-4, atol=1e-5 * float(ref_phi.abs().max()))


def test_empty_sequence():
    cell = GRU(3, 6)
    out, stats, phi = _step(torch.zeros(0, 3, 6), torch.zeros(0, 3, 18), cell.weight_hh, cell.bias_hh,
                            torch.randn(3, 6), start=torch.randn(3, 6), want_summary=True)
    assert out.shape == (0, 3, 6) and stats.tolist() == [0.0, 0.0]
    assert torch.equal(phi, torch.eye(6).expand(3, 1, 6, 6))


@pytest.mark.parametrize("D,t_nan", [(5, 0), (5, 12), (17, 19)])
def test_nan_iterate_reports_inf(D, t_nan):
    cell, xp, h, bnd, start = _problem(D, 2, 20, seed=t_nan)
    h[t_nan, 1, 3] = float("nan")
    _, stats = _step(h, xp, cell.weight_hh, cell.bias_hh, bnd, chunk=6)
    assert float(stats[0]) == float("inf")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # sigmoid(-3000): exp overflows to inf, 1/inf = 0
def test_elementwise_residual_sees_a_small_component():
    """One component ~1000 (z ~ 1 keeps it), a unit-scale one wrong by 0.1: the residual is 0.1."""
    cell, xp, h, bnd, start = _problem(5, 2, 13, seed=1)
    with torch.no_grad():
        xp[..., 5] += 3000.0  # z gate of unit 0
        bnd[:, 0] = 1000.0
        hcur = bnd
        for t in range(13):
            hcur = cell.step(hcur, xp[t])
            h[t] = hcur
        h[-1, 1, 1] += 0.1
    _, rel, fmax, _ = _reference(cell, h, xp, bnd, bnd)
    assert fmax > 500 and rel >= 0.1 * (1 - 1e-3)
    _, stats = _step(h, xp, cell.weight_hh, cell.bias_hh, bnd, chunk=4)
    torch.testing.assert_close(float(stats[0]), rel, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(float(stats[1]), fmax, rtol=1e-5, atol=1e-6)


def test_shape_checks():
    cell = GRU(3, 65)
    with pytest.raises(ValueError, match="D <= 64"):
        _step(torch.zeros(2, 1, 65), torch.zeros(2, 1, 195), cell.weight_hh, None, torch.zeros(1, 65))
    cell = GRU(3, 4)
    with pytest.raises(ValueError, match="precision"):
        _step(torch.zeros(2, 1, 4), torch.zeros(2, 1, 12), cell.weight_hh, None, torch.zeros(1, 4), precision="fp16")


# ------------------------------------------------------------------ wiring
class _TorchJacobianGRU(GRU):
    """Redefines ``jacobian`` (same function): the backend refuses the kernel, the torch path runs."""

    def jacobian(self, h_prev, xp, structure):
        return super().jacobian(h_prev, xp, structure)


def test_fused_newton_step_dispatch():
    from seqpar.backend import fused_stepper
    from seqpar.structure import DIAG, Structure

    xp = torch.zeros(3, 1, 12)
    assert fused_stepper(GRU(3, 4), DENSE, xp, "triton") is not None
    assert fused_stepper(GRU(3, 4), DIAG, xp, "triton") is not None  # quasi-Newton kernel, unchanged
    assert fused_stepper(GRU(3, 4), Structure("block", 2), xp, "triton") is None
    assert fused_stepper(GRU(3, 4), DENSE, xp, "torch") is None
    assert fused_stepper(GRU(3, 65), DENSE, torch.zeros(3, 1, 195), "triton") is None  # D > 64: torch path
    assert fused_stepper(_TorchJacobianGRU(3, 4), DENSE, xp, "triton") is None
    # D = 1 "dense" resolves to the diagonal (its kernel); D >= 2 dense to the new kernel
    from seqpar.validation import resolve_jacobian
    assert resolve_jacobian("dense", GRU(3, 1)).kind == "diag"
    assert resolve_jacobian("dense", GRU(3, 2)).kind == "dense"


@pytest.mark.parametrize("D", [2, 17])
def test_solve_on_kernel_matches_torch_and_sequential(D):
    torch.manual_seed(D)
    cell = GRU(3, D)
    x = torch.randn(30, 2, 3)
    h0 = torch.randn(2, D)
    with torch.no_grad():
        seq = seqpar.solve(cell, x, h0, method="sequential")
        got, info = seqpar.solve(cell, x, h0, jacobian="dense", backend="triton", return_info=True)
        ref, info_t = seqpar.solve(cell, x, h0, jacobian="dense", backend="torch", return_info=True)
    assert info.converged and info.newton_converged and info_t.converged
    assert info.iterations == info_t.iterations
    for a, b in zip(info.residuals, info_t.residuals):
        assert abs(a - b) <= 1e-3 * max(a, b) + 1e-6
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got, seq, rtol=1e-5, atol=2e-6)


def test_sharded_correction_uses_the_kernels_jacobian():
    """A shard's pass from a guessed start, corrected with ``LocalPass.correct`` (cell.jacobian on the
    torch side) equals the pass run from the exact incoming state; Phi maps the start error."""
    cell, xp, h, bnd, start = _problem(6, 2, 24, seed=7)
    opts = NewtonOptions(structure=DENSE, tol=1e-5, max_iter=10, backend="triton")
    lp = LocalPass(cell, xp, opts, chunk=8)
    assert lp.fused is not None
    beta = start + 0.3 * torch.randn_like(start)
    with torch.no_grad():
        out, res, phi = lp(h, bnd, start, want_summary=True)
        direct, _, _ = lp(h, bnd, beta)
        torch.testing.assert_close(out[-1] + DENSE.matvec(phi, beta - start), direct[-1], rtol=1e-5, atol=1e-5)
        info = SolveInfo(converged=False, iterations=0, residual=0.0)
        lp.correct(h, bnd, out, start, beta, info)
    assert info.corrected_steps > 0
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ GPU (compiled)
gpu = pytest.mark.skipif(not CUDA or INTERPRET, reason="needs CUDA and TRITON_INTERPRET unset")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("D", [4, 16, 64])
def test_gpu_step_matches_float64(D):
    cell, xp, h, bnd, start = _problem(D, 16, 5003, seed=D, device="cuda")  # float64 J of all steps: < 3 GB
    out, stats = _step(h, xp, cell.weight_hh, cell.bias_hh, bnd, start=start)
    ref, rel, fmax, _ = _reference(cell, h, xp, bnd, start)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(float(stats[0]), rel, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(float(stats[1]), fmax, rtol=1e-5, atol=1e-6)
    # Phi over a prefix short enough not to underflow, composed from many chunk summaries
    for prec, n in (("ieee", 300), ("tf32", 40)):  # TF32: ~5e-4 relative per product, short prefix
        _, _, phi = _step(h[:n], xp[:n], cell.weight_hh, cell.bias_hh, bnd, want_summary=True, precision=prec)
        ref_phi = _reference(cell, h[:n], xp[:n], bnd, bnd)[3]
        tol = 1e-3 if prec == "ieee" else 3e-2
        torch.testing.assert_close(phi.double(), ref_phi, rtol=tol, atol=tol * float(ref_phi.abs().max()) + 1e-30)


def _cudnn_float64(cell, x, h0, piece=50_000):
    """torch.nn.GRU in float64 on the GPU over T steps, in pieces (cuDNN refuses T >= 65536), state carried."""
    m = torch.nn.GRU(cell.input_size, cell.hidden_size, bias=cell.bias).to(x.device).double()
    with torch.no_grad():
        m.weight_ih_l0.copy_(cell.weight_ih)
        m.weight_hh_l0.copy_(cell.weight_hh)
        if cell.bias:
            m.bias_ih_l0.copy_(cell.bias_ih)
            m.bias_hh_l0.copy_(cell.bias_hh)
        h, outs = h0.double().unsqueeze(0), []
        for s in range(0, x.shape[0], piece):
            o, h = m(x[s:s + piece].double(), h)
            outs.append(o)
    return torch.cat(outs, 0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("D", [4, 16, 64])
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_gpu_solve_matches_float64_cudnn(D, precision, monkeypatch):
    import seqpar.cells as cells

    monkeypatch.setattr(cells, "DENSE_KERNEL_PRECISION", precision)
    torch.manual_seed(D)
    cell = GRU(8, D).cuda()
    x = torch.randn(100_000, 16, 8, device="cuda")
    h0 = 0.5 * torch.randn(16, D, device="cuda")
    with torch.no_grad():
        out, info = seqpar.solve(cell, x, h0, jacobian="dense", backend="triton", return_info=True)
    ref = _cudnn_float64(cell, x, h0)
    assert info.converged and info.newton_converged and info.fallback is None, info.summary()
    err = float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1))
    assert err < 1e-4, (precision, err, info.summary())


@pytest.mark.parametrize("bias", [True, False])
def test_gru_hidden_one_runs_the_diag_kernel_exactly(bias):
    """D = 1: W_hh is its own diagonal, so the GRU runs the DiagGRU kernel (exact Newton, no per-iteration
    GEMM); with one input feature the projection is a multiply-add.  Same states as sequential evaluation."""
    from seqpar.backend import fused_stepper
    from seqpar.kernels.fused_diag_gru import fused_diag_gru_step
    from seqpar.structure import DIAG

    torch.manual_seed(7)
    m = torch.nn.GRU(1, 1, bias=bias)
    cell = GRU.from_torch(m)
    x = torch.randn(41, 3, 1)
    h0 = torch.randn(3, 1)
    xp = cell.project_inputs(x)
    ref_xp = torch.nn.functional.linear(x, m.weight_ih_l0, m.bias_ih_l0 if bias else None)
    torch.testing.assert_close(xp, ref_xp)
    step = fused_stepper(cell, DIAG, xp, "triton")
    assert step is not None
    h = torch.randn(41, 3, 1)
    out, stats = step(h, h0, h0)
    ref_out, ref_stats = fused_diag_gru_step(h, xp, cell.weight_hh.reshape(3), cell.bias_hh, h0)
    torch.testing.assert_close(out, ref_out)
    with torch.no_grad():
        seq = seqpar.solve(GRU.from_torch(copy.deepcopy(m).double()), x.double(), h0.double(), method="sequential")
        got, info = seqpar.solve(cell, x, h0, jacobian="dense", backend="triton", return_info=True)
    assert info.converged and info.jacobian == "diag"
    torch.testing.assert_close(got.double(), seq, rtol=1e-5, atol=2e-6)
