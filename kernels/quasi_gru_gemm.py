"""The quasi-Newton dense GRU's recurrent GEMM with the GRU as its epilogue: ``(a, b)`` of one iteration.

One quasi-Newton iteration (diagonal Jacobian) of :class:`seqpar.cells.GRU` linearises the step at the
current iterate ``h`` (T, B, D): with ``h_prev = [boundary, h[:-1]]``,

    hh = h_prev W_hh^T + b_hh            (T, B, 3D: gates r, z, n)
    f  = GRU(h_prev, xp, hh)             (T, B, D)
    a  = diag(df/dh_prev),  b = f - a * h_prev

and the new iterate is the diagonal scan ``h_new_t = a_t h_new_{t-1} + b_t``.  The "gemm" variant of
:func:`seqpar.kernels.fused_diag_gru.fused_gru_quasi_step` writes ``hh`` (3 floats per state) and reads it
back in its fused look-back kernel.  Here the GEMM over rows ``m = t * B + b`` (M = T * B, K = D) keeps the
three gates' accumulators of an output tile in registers and finishes the step in its epilogue: gates,
f, the diagonal of J (:func:`seqpar.kernels._common.gru_f_jdiag`), the elementwise relative residual of
``h``, and writes only ``a`` and ``b`` (2 floats per state); :func:`seqpar.kernels.scan_diag.scan_diag`
then scans them (see ``fused_gru_quasi_step(..., recurrent="epilogue")``).

Program = ``BM`` rows x ``BD`` channels (all three gates of those channels: three ``BM x BD``
accumulators), walking K = D in steps of ``BK``; the channel block is the fastest grid index, so the
``ceil(D / BD)`` programs of a row block run together and share its h_prev rows in L2.  Row ``m`` of
h_prev is row ``m - B`` of ``h`` (``boundary[m]`` for ``m < B``): h_prev is never materialised.
Products in 3xTF32 by default (about fp32: f and the residual stay fp32-accurate, as in
:mod:`seqpar.kernels.linear`).  Every index is masked: any T, B, D >= 1.

Reference: :func:`quasi_gru_epilogue_reference` (tests/test_quasi_gemm.py compares in float64).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISIONS, dot, gru_f_jdiag, rel_residual, split_dot, tf32_parts
from .linear import tf32_split

# tile (rows BM x channels BD x reduction BK) and warps (benchmarks/bench_gru_quasi.py --epilogue --epilogue-tiles;
# run 63, H100, D = 64, B = 8, T = 1M: 64 x 64 x 32 at 4 warps 10.3 ms, at 8 warps 14.3 ms, 128 x 64 x 32 at 8 warps
# 12.3 ms, BD = 32 tiles ~19.5 ms; with the 2.9 ms scan, the best is 13.2 ms against 11.6 ms for the "gemm"
# variant's GEMM + look-back kernel).  BD and BK shrink to D (powers of two, >= 16) when no tile is given.
BM, BD, BK, WARPS = 64, 64, 32, 4
# whole-row kernel (D <= ROWS_MAX_D, no tiles given): rows per program, channels per block, warps.  Run 82
# (H100, D = 64, B = 8, T = 1M; benchmarks/bench_quasi_gemms.py): 64 x 64 at 4 warps 8.2 ms, 64 x 32 9.3 ms,
# 32 x 64 9.6 ms, 128 x 32 at 8 warps 10.7 ms (the tiled kernel's best, run 63: 10.3 ms); with the 2.9 ms
# scan still slower than the "gemm" variant (12.1 against 10.7 ms per iteration), so "epilogue" stays off
ROWS_MAX_D = 64
ROWS_BM, ROWS_BD, ROWS_WARPS = 64, 64, 4


@triton.jit
def _h_prev(H, Bnd, rows, cols, B, D, rmask, cmask):
    """h_prev[m, c] (float32, (len(rows), len(cols))) of rows ``m = t * B + b``: ``h[t - 1, b, c]``
    (``H[(m - B) * D + c]``, H contiguous (T, B, D)) for t >= 1, ``Bnd[b * D + c]`` for t = 0."""
    m2 = rmask[:, None] & cmask[None, :]
    inner = (rows >= B)[:, None]
    from_h = tl.load(H + (rows - B)[:, None] * D + cols[None, :], mask=m2 & inner, other=0.0)
    from_b = tl.load(Bnd + rows[:, None] * D + cols[None, :], mask=m2 & (rows < B)[:, None], other=0.0)
    return tl.where(inner, from_h.to(tl.float32), from_b.to(tl.float32))


@triton.jit
def _gru_epilogue(H, XP, W, BH, Bnd, A, Bv, rm, rd, mm, dm, B, D, sx_t, sx_b, sx_c, acc_r, acc_z, acc_n,
                  HAS_BIAS: tl.constexpr):
    """The GRU step on the gate accumulators ``h_prev W_g^T`` (BM, BD) of rows ``rm``, channels ``rd``: bias,
    gates, f, the diagonal of J; stores ``a`` and ``b = f - a h_prev`` (contiguous (M, D) float32) and returns
    the rows' maxima (BM,) of the relative residual of ``h`` and of |f|."""
    if HAS_BIAS:
        acc_r += tl.load(BH + rd, mask=dm, other=0.0).to(tl.float32)[None, :]
        acc_z += tl.load(BH + D + rd, mask=dm, other=0.0).to(tl.float32)[None, :]
        acc_n += tl.load(BH + 2 * D + rd, mask=dm, other=0.0).to(tl.float32)[None, :]
    m = mm[:, None] & dm[None, :]
    hp = _h_prev(H, Bnd, rm, rd, B, D, mm, dm)
    xo = (rm // B)[:, None] * sx_t + (rm % B)[:, None] * sx_b + rd[None, :].to(tl.int64) * sx_c
    xr = tl.load(XP + xo, mask=m, other=0.0).to(tl.float32)
    xz = tl.load(XP + xo + D * sx_c, mask=m, other=0.0).to(tl.float32)
    xn = tl.load(XP + xo + 2 * D * sx_c, mask=m, other=0.0).to(tl.float32)
    wd = rd * (D + 1)  # the diagonal of each gate's block W_g (the quasi-Newton Jacobian's)
    wr = tl.load(W + wd, mask=dm, other=0.0).to(tl.float32)[None, :]
    wz = tl.load(W + D * D + wd, mask=dm, other=0.0).to(tl.float32)[None, :]
    wn = tl.load(W + 2 * D * D + wd, mask=dm, other=0.0).to(tl.float32)[None, :]
    f, jd = gru_f_jdiag(hp, xr, xz, xn, acc_r, acc_z, acc_n, wr, wz, wn)
    off = rm[:, None] * D + rd[None, :]
    hc = tl.load(H + off, mask=m, other=0.0).to(tl.float32)
    rel, fab = rel_residual(hc, f, m)
    tl.store(A + off, jd, mask=m)
    tl.store(Bv + off, f - jd * hp, mask=m)
    return tl.max(rel, 1), tl.max(fab, 1)


@triton.jit
def _quasi_gru_gemm_kernel(H, XP, W, BH, Bnd, A, Bv, Res, M, B, D, NP, n_d, sx_t, sx_b, sx_c,
                           HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                           BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
    """Program ``pid = row block * n_d + channel block``: accumulators ``h_prev W_g^T`` (BM, BD) for the
    gates g = r, z, n, then the GRU epilogue; stores ``a``, ``b`` (contiguous (M, D) float32) and its
    partial maxima ``Res[pid]`` (relative residual) and ``Res[NP + pid]`` (|f|).  H (M, D) contiguous,
    XP (T, B, 3D) with strides (sx_t, sx_b, sx_c), W (3D, D) contiguous, BH (3D,), Bnd (B, D)."""
    pid = tl.program_id(0)
    rm = (pid // n_d).to(tl.int64) * BM + tl.arange(0, BM)  # rows m = t * B + b
    rd = (pid % n_d) * BD + tl.arange(0, BD)  # output channels of every gate
    mm = rm < M
    dm = rd < D
    acc_r = tl.zeros([BM, BD], tl.float32)
    acc_z = tl.zeros([BM, BD], tl.float32)
    acc_n = tl.zeros([BM, BD], tl.float32)
    for k0 in range(0, D, BK):
        rk = k0 + tl.arange(0, BK)
        km = rk < D
        hp = _h_prev(H, Bnd, rm, rk, B, D, mm, km)
        wo = rd[None, :] * D + rk[:, None]  # [k, j] -> W_hh[g D + j, k]
        wm = km[:, None] & dm[None, :]
        acc_r += dot(hp, tl.load(W + wo, mask=wm, other=0.0).to(tl.float32), PREC)
        acc_z += dot(hp, tl.load(W + D * D + wo, mask=wm, other=0.0).to(tl.float32), PREC)
        acc_n += dot(hp, tl.load(W + 2 * D * D + wo, mask=wm, other=0.0).to(tl.float32), PREC)
    rel, fab = _gru_epilogue(H, XP, W, BH, Bnd, A, Bv, rm, rd, mm, dm, B, D, sx_t, sx_b, sx_c,
                             acc_r, acc_z, acc_n, HAS_BIAS)
    tl.store(Res + pid, tl.max(rel, 0))  # per-program partial maxima: no same-address atomics
    tl.store(Res + NP + pid, tl.max(fab, 0))


@triton.jit
def _quasi_gru_rows_kernel(H, XP, W, W1, W2, BH, Bnd, A, Bv, Res, M, B, NP, sx_t, sx_b, sx_c,
                           D: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                           BM: tl.constexpr, BD: tl.constexpr, ND: tl.constexpr):
    """Program ``pid`` = rows ``pid * BM ..`` with all of K = D (h_prev loaded and, at PREC 2, split into TF32
    parts once), then the ND channel blocks of BD in turn (unrolled): per block three gate products
    (:func:`split_dot`, W in host-split parts W1 + W2; W itself for the Jacobian's diagonal) and the GRU
    epilogue of :func:`_quasi_gru_gemm_kernel`.  Res[pid], Res[NP + pid]: the program's partial maxima."""
    pid = tl.program_id(0)
    rm = pid.to(tl.int64) * BM + tl.arange(0, BM)
    mm = rm < M
    rk = tl.arange(0, KP)
    km = rk < D
    hk = _h_prev(H, Bnd, rm, rk, B, D, mm, km)  # (BM, KP)
    if PREC == 2:
        hk_hi, hk_lo = tf32_parts(hk)
    else:
        hk_hi, hk_lo = hk, hk
    worst = tl.zeros([BM], tl.float32)
    fmax = tl.zeros([BM], tl.float32)
    for nb in tl.static_range(ND):
        rd = nb * BD + tl.arange(0, BD)
        dm = rd < D
        wo = rd[None, :] * D + rk[:, None]  # [k, j] -> W_hh[g D + j, k]
        wm = km[:, None] & dm[None, :]
        acc_r = split_dot(hk, hk_hi, hk_lo, W1, W2, wo, wm, PREC)
        acc_z = split_dot(hk, hk_hi, hk_lo, W1 + D * D, W2 + D * D, wo, wm, PREC)
        acc_n = split_dot(hk, hk_hi, hk_lo, W1 + 2 * D * D, W2 + 2 * D * D, wo, wm, PREC)
        rel, fab = _gru_epilogue(H, XP, W, BH, Bnd, A, Bv, rm, rd, mm, dm, B, D, sx_t, sx_b, sx_c,
                                 acc_r, acc_z, acc_n, HAS_BIAS)
        worst = tl.maximum(worst, rel)
        fmax = tl.maximum(fmax, fab)
    tl.store(Res + pid, tl.max(worst, 0))
    tl.store(Res + NP + pid, tl.max(fmax, 0))


def epilogue_tiles(D: int, tiles: Optional[tuple] = None) -> Tuple[int, int, int, int]:
    """``(BM, BD, BK, warps)``: ``tiles`` if given (checked: BM, BD, BK powers of two >= 16), else the
    module's defaults with BD and BK cut to ``max(16, next_power_of_2(D))``."""
    if tiles is None:
        p = max(16, triton.next_power_of_2(D))
        return BM, min(BD, p), min(BK, p), WARPS
    if len(tiles) != 4 or any(v < 16 or v & (v - 1) for v in tiles[:3]) or tiles[3] < 1:
        raise ValueError(f"epilogue tiles must be (BM, BD, BK, warps) with BM, BD, BK powers of two >= 16; "
                         f"got {tiles}")
    return tuple(int(v) for v in tiles)


def quasi_gru_epilogue(h: torch.Tensor, xp: torch.Tensor, weight_hh: torch.Tensor,
                       bias_hh: Optional[torch.Tensor], boundary: torch.Tensor, *, precision: str = "tf32x3",
                       tiles: Optional[tuple] = None):
    """``(a, b, stats)`` of one quasi-Newton iteration of the dense GRU at the iterate ``h``.

    Args:
        h: (T, B, D) the current iterate (T >= 1; copied if not contiguous).
        xp: (T, B, 3D) projected inputs (``GRU.project_inputs``), any strides.
        weight_hh: (3D, D); bias_hh: (3D,) or None.
        boundary: (B, D) h_prev of step 0.
        precision: the GEMM's inputs, "tf32x3" (default, about fp32), "ieee" or "tf32".
        tiles: ``(BM, BD, BK, warps)`` (see :func:`epilogue_tiles`): the tiled kernel; None: the whole-row
            kernel (:func:`_quasi_gru_rows_kernel`, ``ROWS_BM`` x ``ROWS_BD`` at ``ROWS_WARPS``) where
            D <= ``ROWS_MAX_D``, else the tiled one at its defaults.
    Returns:
        a, b: (T, B, D) float32, the diagonal of df/dh_prev and ``f - a * h_prev``;
        stats: float32 ``[max |h - f| / max(1, |f|), max |f|]`` (NaN / Inf reported as inf).
    """
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(DOT_PRECISIONS)}; got {precision!r}")
    T, B, D = h.shape
    if T == 0 or xp.shape != (T, B, 3 * D) or weight_hh.shape != (3 * D, D) or boundary.shape != (B, D):
        raise ValueError(f"expected h (T>=1, B, D), xp (T, B, 3D), weight_hh (3D, D), boundary (B, D); got "
                         f"{tuple(h.shape)}, {tuple(xp.shape)}, {tuple(weight_hh.shape)}, {tuple(boundary.shape)}")
    M = T * B
    h = h.contiguous()
    w = weight_hh.detach().to(torch.float32).contiguous()
    a = torch.empty(T, B, D, dtype=torch.float32, device=h.device)
    b = torch.empty_like(a)
    bias = w if bias_hh is None else bias_hh.detach().contiguous()
    prec = DOT_PRECISIONS[precision]
    if tiles is None and D <= ROWS_MAX_D:
        w1, w2 = tf32_split(w) if prec == 2 else (w, w)
        bd = min(ROWS_BD, max(16, triton.next_power_of_2(D)))
        n_prog = triton.cdiv(M, ROWS_BM)
        part = torch.empty(2, n_prog, dtype=torch.float32, device=h.device)
        _quasi_gru_rows_kernel[(n_prog,)](
            h, xp, w, w1, w2, bias, boundary.contiguous(), a, b, part, M, B, n_prog, *xp.stride(),
            D=D, KP=max(16, triton.next_power_of_2(D)), HAS_BIAS=bias_hh is not None, PREC=prec, BM=ROWS_BM,
            BD=bd, ND=triton.cdiv(D, bd), num_warps=ROWS_WARPS)
        return a, b, part.amax(1)
    bm, bd, bk, warps = epilogue_tiles(D, tiles)
    n_d = triton.cdiv(D, bd)
    n_prog = triton.cdiv(M, bm) * n_d
    part = torch.empty(2, n_prog, dtype=torch.float32, device=h.device)
    _quasi_gru_gemm_kernel[(n_prog,)](
        h, xp, w, bias, boundary.contiguous(), a, b, part,
        M, B, D, n_prog, n_d, *xp.stride(), HAS_BIAS=bias_hh is not None, PREC=prec,
        BM=bm, BD=bd, BK=bk, num_warps=warps)
    return a, b, part.amax(1)


def _max_nan_inf(x: torch.Tensor) -> torch.Tensor:
    """max of ``x`` with NaN counted as +inf (as the kernels report it)."""
    return torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x).amax()


def quasi_gru_epilogue_reference(h: torch.Tensor, xp: torch.Tensor, weight_hh: torch.Tensor,
                                 bias_hh: Optional[torch.Tensor], boundary: torch.Tensor):
    """Pure-torch :func:`quasi_gru_epilogue`, computed in ``h``'s dtype (tests: float64).

    Same arguments; returns ``(a, b, stats)``: a, b (T, B, D), stats ``[max relative residual,
    max |f|]`` (NaN counted as inf), all in h's dtype.  The diagonal Jacobian is written out here
    (not taken from the kernels' helpers): ``z + (1 - z)(1 - n^2)(r(1 - r) hn W_r,ii + r W_n,ii)
    + (h_prev - n) z (1 - z) W_z,ii``."""
    dt = h.dtype
    D = h.shape[-1]
    W = weight_hh.detach().to(dt)
    hp = torch.cat([boundary.to(dt).unsqueeze(0), h[:-1]], 0)
    hh = torch.nn.functional.linear(hp, W, None if bias_hh is None else bias_hh.detach().to(dt))
    x = xp.to(dt)
    r = torch.sigmoid(x[..., :D] + hh[..., :D])
    z = torch.sigmoid(x[..., D:2 * D] + hh[..., D:2 * D])
    hn = hh[..., 2 * D:]
    n = torch.tanh(x[..., 2 * D:] + r * hn)
    f = n + z * (hp - n)
    wr, wz, wn = (W[g * D:(g + 1) * D].diagonal() for g in range(3))
    a = z + (1 - z) * (1 - n * n) * (r * (1 - r) * hn * wr + r * wn) + (hp - n) * z * (1 - z) * wz
    rel = (h - f).abs() / f.abs().clamp_min(1)
    return a, f - a * hp, torch.stack([_max_nan_inf(rel), _max_nan_inf(f.abs())])
