"""One fused Newton iteration of :class:`seqpar.cells.DiagGRU` (exact, diagonal Jacobian).

From the current iterate ``h`` (T, B, D) and the projected inputs ``xp``
(T, B, 3D) (one GEMM before the loop), one pass computes for every step
``h_prev = [boundary, h[:-1]]``, ``f = f(h_prev, xp)``, ``J = df/dh_prev``
(diagonal), ``b = f - J h_prev``, the elementwise relative residual
``max |h - f| / max(1, |f|)`` and ``max|f|``, and scans
``h_new_t = J_t h_new_{t-1} + b_t`` from ``start`` (default ``boundary``) with the
decoupled look-back of :mod:`seqpar.kernels._common`.  J and b live only in
registers.  Optionally the pass also returns its summary ``J_{T-1} ... J_0``
(composed from the per-tile aggregates of the look-back).  Reference: ``seqpar.newton`` (``cell.step`` / ``cell.jacobian`` +
``affine_scan``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (DOT_PRECISIONS, comb_diag, dot, gru_f_jdiag, last_row, lookback_buffers, lookback_diag,
                      pick_tiles, rel_residual, ticket)
from .linear import linear
from .quasi_gru_gemm import quasi_gru_epilogue
from .scan_diag import scan_diag

DEFAULT_TT, DEFAULT_BN, DEFAULT_WARPS = 16, 256, 4  # best of a sweep on H100 at N = 1024 (benchmarks/)
# Tile variant (DiagGRU and the quasi-Newton dense GRU): tile shape, warps and look-back window
# per lane count N = B * D (first key >= N; "wide" beyond), measured by benchmarks/sweep_narrow.py.
TILES = {  # benchmarks/sweep_narrow.py, run 24 (H200, B=16, T=2^20): ms per iteration, x minimum bytes
    16: dict(tt=256, bn=16, warps=4, w=16),   # 0.517 ms, 6.54x (W=1: 0.556 ms)
    64: dict(tt=16, bn=64, warps=4, w=16),    # 1.890 ms, 5.98x (old tile, W=1: 2.852 ms)
    256: dict(tt=16, bn=256, warps=4, w=16),  # 3.759 ms, 2.97x (W=1: 4.780 ms)
    1024: dict(tt=16, bn=64, warps=4, w=8),   # 12.462 ms, 2.46x (old tile, W=1: 13.375 ms)
    "wide": dict(tt=DEFAULT_TT, bn=DEFAULT_BN, warps=DEFAULT_WARPS, w=1),
}
SEQ_TT, SEQ_BN, SEQ_WARPS = DEFAULT_TT, DEFAULT_BN, DEFAULT_WARPS  # lane-sequential variant (not narrowed)
# the quasi-Newton GRU's "gemm" variant reads 3 more floats per state (the GEMM's output): its own entry for
# 256 < N <= 1024 (benchmarks/bench_gru_quasi.py --kernel-tiles, run 47, H200, T=1M, D=64, one iteration with
# its GEMM: B=8 10.89 ms vs 11.99 with TILES' tile, B=16 21.20 vs 22.66; best of 11); TILES elsewhere
QUASI_TILES = {**TILES, 1024: dict(tt=32, bn=64, warps=4, w=8)}
# quasi-Newton dense GRU: W_hh h_prev inside the kernel (tl.dot per tile) for QUASI_DOT_MIN_D <= D <=
# QUASI_DOT_MAX_D, else one GEMM before the launch.  benchmarks/bench_gru_quasi.py, runs 40-41 (H200,
# T=1M, B=16, one iteration): D=16 5.57 ms in the kernel vs 6.23 ms with the GEMM; D=8 8.52 vs 7.79 (16 lanes
# padded from 8), D=32 12.97 vs 12.84, D=64 32.0 vs 26.0 (B=8: 18.9 vs 13.8; best of TT 16-128 x 2-8 warps).
# The dot's input precision: 3xTF32 (about fp32: f and the residual stay fp32-accurate; run 40 found the
# same iterations and float64 residuals as the GEMM); time steps per tile and warps of the in-kernel variant
QUASI_DOT_MIN_D, QUASI_DOT_MAX_D = 9, 16
QUASI_DOT_PRECISION = "tf32x3"
# the GEMM of the "gemm" variant: "tf32x3" (seqpar.kernels.linear: tensor cores, about fp32) or "cublas"
# (torch.mm: IEEE fp32 on CUDA cores, or whatever torch's matmul precision allows)
QUASI_GEMM = "tf32x3"
QUASI_DOT_TT, QUASI_DOT_WARPS = 64, 4
# "epilogue" variant (seqpar.kernels.quasi_gru_gemm: the GEMM writes only the diagonal map (a, b), a diagonal scan
# follows): the default for D >= QUASI_EPILOGUE_MIN_D when set to an int (before the "dot" range); None: never by
# default.  Run 63 (H100, benchmarks/bench_gru_quasi.py --epilogue, D = 64, B = 8, T = 1M): 16.9 ms per iteration
# against 11.6 ms for "gemm" (the kernel alone 10.3 ms at its best tile, 1.2 TB/s), so it stays off
QUASI_EPILOGUE_MIN_D = None


@triton.jit
def _fused_diag_gru_seq_kernel(H, XP, W, BH, Bnd, St, Out, Res, AggA, AggC, Incl, Flags, Counter,
                               T, D, N, n_lb, NP, TT: tl.constexpr, BN: tl.constexpr, LB_W: tl.constexpr):
    """Lane-sequential variant: each thread owns lanes and walks the TT steps of its tile in
    order (no cross-warp scan, few registers).  Pass 1 reduces the tile to its summary map and
    the residual; the look-back gives the incoming state; pass 2 re-reads the tile (L2-resident)
    and writes the scanned states."""
    c, lb = ticket(Counter, n_lb, 0)
    lanes = lb * BN + tl.arange(0, BN)
    lmask = lanes < N
    bidx = lanes // D
    d = lanes % D
    wr = tl.load(W + d, mask=lmask, other=0.0)
    wz = tl.load(W + D + d, mask=lmask, other=0.0)
    wn = tl.load(W + 2 * D + d, mask=lmask, other=0.0)
    br = tl.load(BH + d, mask=lmask, other=0.0)
    bz = tl.load(BH + D + d, mask=lmask, other=0.0)
    bn = tl.load(BH + 2 * D + d, mask=lmask, other=0.0)
    bnd = tl.load(Bnd + lanes, mask=lmask, other=0.0).to(tl.float32)
    t0 = c * TT
    zero = lanes * 0
    hp0 = tl.load(H + (t0.to(tl.int64) - 1) * N + lanes, mask=lmask & ((zero + t0) > 0), other=0.0).to(tl.float32)
    hp0 = tl.where((zero + t0) == 0, bnd, hp0)
    xcol = bidx * (3 * D) + d
    A = tl.full([BN], 1.0, tl.float32)
    C = tl.zeros([BN], tl.float32)
    rel = tl.zeros([BN], tl.float32)  # running max of elementwise relative residuals
    fmx = tl.zeros([BN], tl.float32)
    hp = hp0
    for k in range(TT):
        t = t0 + k
        m = lmask & ((zero + t) < T)
        t64 = t.to(tl.int64)
        hc = tl.load(H + t64 * N + lanes, mask=m, other=0.0).to(tl.float32)
        xo = t64 * (3 * N) + xcol
        xr = tl.load(XP + xo, mask=m, other=0.0).to(tl.float32)
        xz = tl.load(XP + xo + D, mask=m, other=0.0).to(tl.float32)
        xn = tl.load(XP + xo + 2 * D, mask=m, other=0.0).to(tl.float32)
        f, jd = gru_f_jdiag(hp, xr, xz, xn, wr * hp + br, wz * hp + bz, wn * hp + bn, wr, wz, wn)
        bb = tl.where(m, f - jd * hp, 0.0)
        jd = tl.where(m, jd, 1.0)
        A = jd * A
        C = jd * C + bb
        r, fab = rel_residual(hc, f, m)  # NaN -> inf: reported as divergence
        rel = tl.maximum(rel, r)
        fmx = tl.maximum(fmx, fab)
        hp = hc
    tl.store(Res + c * n_lb + lb, tl.max(rel, 0))
    tl.store(Res + NP + c * n_lb + lb, tl.max(fmx, 0))
    st0 = tl.load(St + lanes, mask=lmask, other=0.0).to(tl.float32)
    h = lookback_diag(Flags, AggA, AggC, Incl, c, lb, n_lb, N, lanes, lmask, st0, A, C, LB_W)
    hp = hp0
    for k in range(TT):
        t = t0 + k
        m = lmask & ((zero + t) < T)
        t64 = t.to(tl.int64)
        xo = t64 * (3 * N) + xcol
        xr = tl.load(XP + xo, mask=m, other=0.0).to(tl.float32)
        xz = tl.load(XP + xo + D, mask=m, other=0.0).to(tl.float32)
        xn = tl.load(XP + xo + 2 * D, mask=m, other=0.0).to(tl.float32)
        f, jd = gru_f_jdiag(hp, xr, xz, xn, wr * hp + br, wz * hp + bz, wn * hp + bn, wr, wz, wn)
        h = tl.where(m, jd * h + (f - jd * hp), h)
        tl.store(Out + t64 * N + lanes, h.to(Out.dtype.element_ty), mask=m)
        hp = tl.load(H + t64 * N + lanes, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _fused_diag_gru_kernel(H, XP, W, BH, Bnd, St, Out, Res, AggA, AggC, Incl, Flags, Counter, WF,
                           T, D, N, n_lb, NP, TT: tl.constexpr, BN: tl.constexpr, LB_W: tl.constexpr,
                           HH: tl.constexpr = 0, PREC: tl.constexpr = 2):
    """Program = tile of TT steps x a lane block.  The recurrent pre-activations (hr, hz, hn) by ``HH``:
    0 DiagGRU, ``W * h_prev + BH`` (W, BH (3D,)); 1 dense GRU, loaded from ``BH`` (T, B, 3D) (one GEMM
    before the launch); 2 dense GRU, ``h_prev W_hh^T + BH`` by ``tl.dot`` in ``PREC`` from ``WF``
    (3D, D), a lane block being one batch row (BN >= D, padded lanes masked); 3 dense GRU at the zero
    iterate (h = 0 at every step, not read): ``b_hh`` (``WF``, (3D,)) at steps >= 1, and at step 0, whose h_prev
    is the boundary, ``W_hh boundary + b_hh`` from ``BH`` (B, 3D).  HH 1, 2 and 3: ``W`` holds the diagonal of W_hh
    (the quasi-Newton Jacobian's)."""
    c, lb = ticket(Counter, n_lb, 0)
    if HH == 2:  # lane block lb = batch row lb: its D lanes, padded to BN
        col = tl.arange(0, BN)
        lanes = lb * D + col
        lmask = col < D
    else:
        lanes = lb * BN + tl.arange(0, BN)
        lmask = lanes < N
    bidx = lanes // D
    d = lanes % D
    rows = tl.arange(0, TT)
    i = c * TT + rows
    valid = i < T
    m = valid[:, None] & lmask[None, :]
    i64 = i.to(tl.int64)[:, None]
    off = i64 * N + lanes[None, :]
    first = (i == 0)[:, None]
    if HH == 3:  # the zero iterate: nothing of h to read
        hc = tl.zeros([TT, BN], tl.float32)
        hp = hc
    else:
        hc = tl.load(H + off, mask=m, other=0.0).to(tl.float32)
        hp = tl.load(H + off - N, mask=m & (i >= 1)[:, None], other=0.0).to(tl.float32)
    bnd = tl.load(Bnd + lanes, mask=lmask, other=0.0).to(tl.float32)
    hp = tl.where(first, bnd[None, :], hp)
    xo = i64 * (3 * N) + (bidx * (3 * D) + d)[None, :]
    xr = tl.load(XP + xo, mask=m, other=0.0).to(tl.float32)
    xz = tl.load(XP + xo + D, mask=m, other=0.0).to(tl.float32)
    xn = tl.load(XP + xo + 2 * D, mask=m, other=0.0).to(tl.float32)
    wr = tl.load(W + d, mask=lmask, other=0.0)[None, :]
    wz = tl.load(W + D + d, mask=lmask, other=0.0)[None, :]
    wn = tl.load(W + 2 * D + d, mask=lmask, other=0.0)[None, :]
    if HH == 0 or HH == 2:
        br = tl.load(BH + d, mask=lmask, other=0.0)[None, :]
        bz = tl.load(BH + D + d, mask=lmask, other=0.0)[None, :]
        bn = tl.load(BH + 2 * D + d, mask=lmask, other=0.0)[None, :]
    if HH == 1:  # dense GRU, quasi-Newton: BH holds W_hh h_prev + b_hh (T, B, 3D); W the diagonal of W_hh
        hr = tl.load(BH + xo, mask=m, other=0.0).to(tl.float32)
        hz = tl.load(BH + xo + D, mask=m, other=0.0).to(tl.float32)
        hn = tl.load(BH + xo + 2 * D, mask=m, other=0.0).to(tl.float32)
    elif HH == 3:  # the zero iterate: no GEMM, the bias after step 0
        o0 = bidx * (3 * D) + d
        hr = tl.where(first, tl.load(BH + o0, mask=lmask, other=0.0)[None, :],
                      tl.load(WF + d, mask=lmask, other=0.0)[None, :]).to(tl.float32)
        hz = tl.where(first, tl.load(BH + o0 + D, mask=lmask, other=0.0)[None, :],
                      tl.load(WF + D + d, mask=lmask, other=0.0)[None, :]).to(tl.float32)
        hn = tl.where(first, tl.load(BH + o0 + 2 * D, mask=lmask, other=0.0)[None, :],
                      tl.load(WF + 2 * D + d, mask=lmask, other=0.0)[None, :]).to(tl.float32)
    elif HH == 2:  # h_prev (TT, BN) x W_g^T (BN, BN) per gate g; padded lanes of hp and W are zeros
        wt = col[None, :] * D + col[:, None]  # [k, j] -> W_hh[g D + j, k]
        wm = lmask[:, None] & lmask[None, :]
        hr = dot(hp, tl.load(WF + wt, mask=wm, other=0.0), PREC) + br
        hz = dot(hp, tl.load(WF + D * D + wt, mask=wm, other=0.0), PREC) + bz
        hn = dot(hp, tl.load(WF + 2 * D * D + wt, mask=wm, other=0.0), PREC) + bn
    else:
        hr = wr * hp + br
        hz = wz * hp + bz
        hn = wn * hp + bn
    f, jd = gru_f_jdiag(hp, xr, xz, xn, hr, hz, hn, wr, wz, wn)
    bb = f - jd * hp
    jd = tl.where(m, jd, 1.0)
    bb = tl.where(m, bb, 0.0)
    # elementwise relative residual |h - f| / max(1, |f|); NaN -> inf: reported as divergence
    rel, fab = rel_residual(hc, f, m)
    # per-program partial maxima (reduced on the host side of the launch): no same-address atomics
    tl.store(Res + c * n_lb + lb, tl.max(tl.max(rel, 1), 0))
    tl.store(Res + NP + c * n_lb + lb, tl.max(tl.max(fab, 1), 0))
    A, C = tl.associative_scan((jd, bb), 0, comb_diag)
    st0 = tl.load(St + lanes, mask=lmask, other=0.0).to(tl.float32)
    h_in = lookback_diag(Flags, AggA, AggC, Incl, c, lb, n_lb, N, lanes, lmask, st0,
                         last_row(A, rows, TT), last_row(C, rows, TT), LB_W)
    out = A * h_in[None, :] + C
    tl.store(Out + off, out.to(Out.dtype.element_ty), mask=m)


def fused_gru_quasi_step(h, xp, weight_hh, bias_hh, boundary, out=None,
                         block_t: Optional[int] = None, block_n: Optional[int] = None,
                         num_warps: Optional[int] = None, *, start=None, want_summary: bool = False,
                         lookback_w: Optional[int] = None, recurrent: Optional[str] = None,
                         precision: str = QUASI_DOT_PRECISION, epilogue_tiles: Optional[tuple] = None,
                         zero_iterate: bool = False):
    """One quasi-Newton iteration (diagonal Jacobian) of the *dense* :class:`seqpar.cells.GRU`.

    The recurrent pre-activations ``W_hh h_prev + b_hh`` (``h_prev = [boundary, h[:-1]]``) come,
    by ``recurrent``:

    * ``"dot"``: inside the kernel, a ``tl.dot`` per gate of the tile's h_prev (TT, D) with the
      gate's block of W_hh (inputs as ``precision``: "tf32x3" (default, about fp32), "ieee" or
      "tf32"); one program per (tile, batch row).  Nothing of size
      T x B x 3D is written.
    * ``"gemm"``: one GEMM (T, B, 3D) before the launch, read back by the kernel.
    * ``"epilogue"``: the GEMM with the GRU step as its epilogue
      (:func:`seqpar.kernels.quasi_gru_gemm.quasi_gru_epilogue`, inputs as ``precision``, tile
      ``epilogue_tiles`` = (BM, BD, BK, warps)) writes only the diagonal maps (a, b) (T, B, D) and the
      residual; :func:`seqpar.kernels.scan_diag.scan_diag` scans them (``block_t``, ``block_n``,
      ``num_warps``, ``lookback_w`` are the scan's); phi = the product of a over time.

    None: "epilogue" where ``QUASI_EPILOGUE_MIN_D`` (an int) <= D, else "dot" where
    ``QUASI_DOT_MIN_D <= D <= QUASI_DOT_MAX_D`` (where it measured faster), else "gemm".  With "dot"
    and "gemm" the gates, the diagonal of J, b, the residual and the scan (from ``start``) are fused as
    for DiagGRU.  ``weight_hh`` (3D, D).
    Returns ``(h_new, stats)`` or ``(h_new, stats, phi)`` like :func:`fused_diag_gru_step` (same
    tile / look-back arguments; with "dot" the lane block is one batch row, ``block_n`` >= D a
    power of two >= 16).  Reference: ``GRU.step`` / ``GRU.jacobian(.., diag)``.

    ``zero_iterate``: the caller guarantees ``h`` is zero at every step (the solver's first iterate when it
    has no initial guess; not checked: that would read h).  Then ``W_hh h_prev + b_hh`` is ``b_hh`` after
    step 0 and ``W_hh boundary + b_hh`` at step 0 (a (B, D) product): no GEMM, nothing of size T x B x 3D
    read and h not read at all, whatever ``recurrent`` says (at the "gemm" variant's tiles, QUASI_TILES).
    """
    T, B, D = h.shape
    if recurrent is None:
        recurrent = default_quasi_recurrent(D)
    if recurrent not in ("dot", "gemm", "epilogue"):
        raise ValueError(f"recurrent must be 'dot', 'gemm', 'epilogue' or None; got {recurrent!r}")
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(DOT_PRECISIONS)}; got {precision!r}")
    if T == 0:
        return fused_diag_gru_step(h, xp, weight_hh.new_zeros(3 * D), None, boundary, out,
                                   start=start, want_summary=want_summary)  # T == 0: no launch
    if zero_iterate:
        W, wdiag, bias = _quasi_weights(weight_hh, bias_hh, torch.float32)
        bias = W.new_zeros(3 * D) if bias is None else bias
        first = torch.nn.functional.linear(boundary.to(torch.float32), W, bias).contiguous()  # (B, 3D)
        return _launch(h, xp, wdiag, first, boundary, start, out, block_t, block_n, num_warps, hh=3,
                       want_summary=want_summary, lookback_w=lookback_w, wf=bias.contiguous())
    if recurrent == "epilogue":
        return _quasi_epilogue_step(h, xp, weight_hh, bias_hh, boundary, start, out, want_summary, precision,
                                    epilogue_tiles, dict(block_t=block_t, block_n=block_n, num_warps=num_warps,
                                                         lookback_w=lookback_w))
    W, wdiag, bias = _quasi_weights(weight_hh, bias_hh, h.dtype)
    if recurrent == "dot":
        bn = max(16, triton.next_power_of_2(D))
        if block_n is not None and (block_n < D or block_n < 16 or block_n & (block_n - 1)):
            raise ValueError(f"block_n must be a power of two >= max(16, D) = {bn} with recurrent='dot'; "
                             f"got {block_n}")
        bh = torch.zeros(3 * D, dtype=torch.float32, device=h.device) if bias is None else bias.float()
        return _launch(h, xp, wdiag, bh.contiguous(), boundary, start, out,
                       QUASI_DOT_TT if block_t is None else block_t, bn if block_n is None else block_n,
                       QUASI_DOT_WARPS if num_warps is None else num_warps, hh=2, want_summary=want_summary,
                       lookback_w=lookback_w, wf=W.float().contiguous(), precision=precision)
    # h_prev W^T + b without materialising h_prev: rows 1.. from h[:-1], row 0 from the boundary
    hh = torch.empty(T, B, 3 * D, dtype=h.dtype, device=h.device)
    if T > 1:
        rows = hh[1:].view(-1, 3 * D)
        hp = h[:-1].reshape(-1, D)
        if QUASI_GEMM == "tf32x3":
            linear(hp, W, bias, out=rows)
        elif bias is None:
            torch.mm(hp, W.t(), out=rows)
        else:
            torch.addmm(bias, hp, W.t(), out=rows)
    hh[0] = torch.nn.functional.linear(boundary.to(h.dtype), W, bias)
    return _launch(h, xp, wdiag, hh, boundary, start, out, block_t, block_n, num_warps, hh=1,
                   want_summary=want_summary, lookback_w=lookback_w)


def _quasi_weights(weight_hh, bias_hh, dtype):
    """``(W (3D, D), the diagonals of its three gate blocks (3D,), bias (3D,) or None)`` in ``dtype``, detached."""
    D = weight_hh.shape[1]
    W = weight_hh.detach().to(dtype)
    wdiag = torch.cat([W[g * D:(g + 1) * D].diagonal() for g in range(3)])
    return W, wdiag, None if bias_hh is None else bias_hh.detach().to(dtype)


def default_quasi_recurrent(D: int) -> str:
    """The quasi-Newton GRU's ``recurrent`` variant for state size ``D`` when none is asked for
    (module constants ``QUASI_EPILOGUE_MIN_D``, ``QUASI_DOT_MIN_D``, ``QUASI_DOT_MAX_D``)."""
    if QUASI_EPILOGUE_MIN_D is not None and D >= QUASI_EPILOGUE_MIN_D:
        return "epilogue"
    return "dot" if QUASI_DOT_MIN_D <= D <= QUASI_DOT_MAX_D else "gemm"


def _quasi_epilogue_step(h, xp, weight_hh, bias_hh, boundary, start, out, want_summary, precision, tiles,
                         scan_tiles):
    """``recurrent="epilogue"`` of :func:`fused_gru_quasi_step` (T >= 1): (a, b) and the stats from the GEMM
    epilogue, then the diagonal scan of h_t = a_t h_{t-1} + b_t from ``start`` (default ``boundary``) into
    ``out`` (h's dtype, any strides).  phi (B, D) float32: the product of a over time."""
    a, b, stats = quasi_gru_epilogue(h, xp, weight_hh, bias_hh, boundary, precision=precision, tiles=tiles)
    out = torch.empty_like(h) if out is None else out
    scan_diag(a, b, boundary if start is None else start, out=out, **scan_tiles)
    return (out, stats, a.prod(0)) if want_summary else (out, stats)


def fused_diag_gru_step(h, xp, weight_hh, bias_hh, boundary, out=None,
                        block_t: Optional[int] = None, block_n: Optional[int] = None,
                        num_warps: Optional[int] = None, variant: str = "tile", *, start=None,
                        want_summary: bool = False, lookback_w: Optional[int] = None):
    """One Newton iteration.  ``h`` (T, B, D), ``xp`` (T, B, 3D), ``weight_hh`` (3D,),
    ``bias_hh`` (3D,) or None, ``boundary`` (B, D): the h_prev of step 0 (linearisation
    point), ``start`` (B, D) or None (= ``boundary``): the scan's incoming state.

    Returns ``(h_new (T, B, D), stats)``, with ``want_summary`` ``(h_new, stats, phi)``:
    ``stats`` float32 ``[max over t, b, i of |h - f| / max(1, |f|), max|f|]`` (NaN/Inf
    reported as inf); ``phi`` float32 (B, D), the product ``J_{T-1} ... J_0`` of the
    pass's (diagonal) Jacobians (ones for T == 0).

    ``block_t`` x ``block_n`` is the tile (time steps x lanes) one program scans, ``lookback_w``
    the look-back window (1: one predecessor per round trip; 2..32: windowed, see
    :mod:`seqpar.kernels._common`); None = from ``TILES`` for N = B * D (tile variant) or the
    ``SEQ_*`` defaults (``variant="seq"``)."""
    w = weight_hh.detach().to(torch.float32).contiguous()
    bh = (torch.zeros_like(w) if bias_hh is None else bias_hh.detach().to(torch.float32)).contiguous()
    if variant == "seq":
        return _launch_seq(h, xp, w, bh, boundary, start, out, block_t, block_n, num_warps, want_summary,
                           lookback_w)
    if variant != "tile":
        raise ValueError(f"variant must be 'tile' or 'seq'; got {variant!r}")
    return _launch(h, xp, w, bh, boundary, start, out, block_t, block_n, num_warps, hh=0,
                   want_summary=want_summary, lookback_w=lookback_w)


def _finish(out, part, agg_a, B, D, T, want_summary, device):
    """``(out, stats)`` or ``(out, stats, phi)``: stats from the per-program partial maxima,
    phi the product of the per-chunk aggregates (every chunk stores its own)."""
    stats = part.amax(1) if T else torch.zeros(2, dtype=torch.float32, device=device)
    if not want_summary:
        return out, stats
    if T == 0:
        return out, stats, torch.ones(B, D, dtype=torch.float32, device=device)
    return out, stats, agg_a.prod(0).reshape(B, D)


def _launch_seq(h, xp, w, bh, boundary, start, out, block_t, block_n, num_warps, want_summary=False,
                lookback_w=None):
    T, B, D = h.shape
    N = B * D
    h, xp = h.contiguous(), xp.contiguous()
    out = torch.empty_like(h) if out is None else out
    if T == 0:
        return _finish(out, None, None, B, D, T, want_summary, h.device)
    boundary = boundary.contiguous()
    start = boundary if start is None else start.contiguous()
    block_t = SEQ_TT if block_t is None else block_t
    block_n = SEQ_BN if block_n is None else block_n
    num_warps = SEQ_WARPS if num_warps is None else num_warps
    lb_w = pick_tiles(TILES, N)[3] if lookback_w is None else lookback_w
    n_lb = triton.cdiv(N, block_n)
    n_chunks = triton.cdiv(T, block_t)
    n_prog = n_chunks * n_lb
    flags, counter = lookback_buffers(n_chunks, n_lb, lb_w, h.device)
    agg = torch.empty(3, n_chunks, N, dtype=torch.float32, device=h.device)
    part = torch.empty(2, n_prog, dtype=torch.float32, device=h.device)
    _fused_diag_gru_seq_kernel[(n_prog,)](
        h, xp, w.to(torch.float32).contiguous(), bh.contiguous(), boundary, start, out, part,
        agg[0], agg[1], agg[2], flags, counter, T, D, N, n_lb, n_prog, TT=block_t, BN=block_n, LB_W=lb_w,
        num_warps=num_warps)
    return _finish(out, part, agg[0], B, D, T, want_summary, h.device)


def _launch(h, xp, w, bh, boundary, start, out, block_t, block_n, num_warps, hh, want_summary=False,
            lookback_w=None, wf=None, precision="ieee"):
    T, B, D = h.shape
    N = B * D
    h = h.contiguous()
    xp = xp.contiguous()
    out = torch.empty_like(h) if out is None else out
    if T == 0:
        return _finish(out, None, None, B, D, T, want_summary, h.device)
    w = w.to(torch.float32).contiguous()
    bh = bh.contiguous()
    boundary = boundary.contiguous()
    start = boundary if start is None else start.contiguous()
    block_t, block_n, num_warps, lb_w = pick_tiles(QUASI_TILES if hh in (1, 3) else TILES, N, block_t, block_n,
                                                   num_warps, lookback_w)
    n_lb = B if hh == 2 else triton.cdiv(N, block_n)  # "dot": one lane block per batch row
    n_chunks = triton.cdiv(T, block_t)
    flags, counter = lookback_buffers(n_chunks, n_lb, lb_w, h.device)
    agg = torch.empty(3, n_chunks, N, dtype=torch.float32, device=h.device)
    n_prog = n_chunks * n_lb
    part = torch.empty(2, n_prog, dtype=torch.float32, device=h.device)
    _fused_diag_gru_kernel[(n_prog,)](
        h, xp, w, bh, boundary, start, out, part, agg[0], agg[1], agg[2], flags, counter,
        w if wf is None else wf, T, D, N, n_lb, n_prog, TT=block_t, BN=block_n, LB_W=lb_w, HH=hh,
        PREC=DOT_PRECISIONS[precision], num_warps=num_warps)
    return _finish(out, part, agg[0], B, D, T, want_summary, h.device)
