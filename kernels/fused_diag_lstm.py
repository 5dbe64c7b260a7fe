"""One fused Newton iteration of :class:`seqpar.cells.DiagLSTM` (exact, 2 x 2 blocks).

State interleaves each unit's pair ``[h_u, c_u]`` (D = 2H); ``xp`` (T, B, 4H)
holds the gate pre-activations ``[i, f, g, o]`` from the input GEMM (biases
included).  One pass evaluates f (with ``h_prev = [boundary, h[:-1]]``), the 2 x 2
Jacobian blocks, b = f - J h_prev, the elementwise relative residual
``max |h - f| / max(1, |f|)`` and ``max|f|``, and scans the block recurrence from
``start`` (default ``boundary``) with the decoupled look-back; J and b stay in
registers.  Optionally the pass also returns its summary ``J_{T-1} ... J_0`` per unit.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import comb_block2, last_row, lookback_block2, lookback_buffers, pick_tiles, sigmoid, tanh, ticket

DEFAULT_TT, DEFAULT_BN, DEFAULT_WARPS = 16, 32, 1  # best of a sweep on H100 at M = 512 (benchmarks/)
# Tile shape, warps and look-back window per unit count M = B * H (first key >= M; "wide"
# beyond): the old defaults narrowed to the units present; the window was swept (run 24), the tiles not.
TILES = {  # run 24 (H200, B=16, T=2^20): the window was slower here (H=1: 1.98 ms W=1 vs 2.17 W=16;
    #           H=16: 13.8 ms vs 17.9 ms), so the LSTM keeps the one-tile look-back
    16: dict(tt=32, bn=16, warps=1, w=1),
    64: dict(tt=16, bn=32, warps=1, w=1),
    256: dict(tt=16, bn=32, warps=1, w=1),
    1024: dict(tt=16, bn=32, warps=1, w=1),
    "wide": dict(tt=DEFAULT_TT, bn=DEFAULT_BN, warps=DEFAULT_WARPS, w=1),
}


@triton.jit
def _fused_diag_lstm_kernel(H, XP, W, Bnd, St, Out, Res, Agg, Incl, Flags, Counter,
                            T, Hs, M, n_lb, NP, TT: tl.constexpr, BN: tl.constexpr, LB_W: tl.constexpr):
    c, lb = ticket(Counter, n_lb, 0)
    lanes = lb * BN + tl.arange(0, BN)  # lane = (batch, unit)
    lmask = lanes < M
    bidx = lanes // Hs
    u = lanes % Hs
    rows = tl.arange(0, TT)
    i = c * TT + rows
    valid = i < T
    m = valid[:, None] & lmask[None, :]
    i64 = i.to(tl.int64)[:, None]
    so = i64 * (2 * M) + 2 * lanes[None, :]
    mp = m & (i >= 1)[:, None]
    first = (i == 0)[:, None]
    hc = tl.load(H + so, mask=m, other=0.0).to(tl.float32)
    cc = tl.load(H + so + 1, mask=m, other=0.0).to(tl.float32)
    g0 = tl.load(Bnd + 2 * lanes, mask=lmask, other=0.0).to(tl.float32)
    g1 = tl.load(Bnd + 2 * lanes + 1, mask=lmask, other=0.0).to(tl.float32)
    hp = tl.where(first, g0[None, :], tl.load(H + so - 2 * M, mask=mp, other=0.0).to(tl.float32))
    cp = tl.where(first, g1[None, :], tl.load(H + so - 2 * M + 1, mask=mp, other=0.0).to(tl.float32))
    xo = i64 * (4 * M) + (bidx * (4 * Hs) + u)[None, :]
    wi = tl.load(W + u, mask=lmask, other=0.0)[None, :]
    wf = tl.load(W + Hs + u, mask=lmask, other=0.0)[None, :]
    wg = tl.load(W + 2 * Hs + u, mask=lmask, other=0.0)[None, :]
    wo = tl.load(W + 3 * Hs + u, mask=lmask, other=0.0)[None, :]
    ig = sigmoid(tl.load(XP + xo, mask=m, other=0.0).to(tl.float32) + wi * hp)
    fg = sigmoid(tl.load(XP + xo + Hs, mask=m, other=0.0).to(tl.float32) + wf * hp)
    gg = tanh(tl.load(XP + xo + 2 * Hs, mask=m, other=0.0).to(tl.float32) + wg * hp)
    og = sigmoid(tl.load(XP + xo + 3 * Hs, mask=m, other=0.0).to(tl.float32) + wo * hp)
    c_new = fg * cp + ig * gg
    tc = tanh(c_new)
    h_new = og * tc
    dc_dh = cp * fg * (1 - fg) * wf + gg * ig * (1 - ig) * wi + ig * (1 - gg * gg) * wg
    k = og * (1 - tc * tc)
    a00 = tl.where(m, tc * og * (1 - og) * wo + k * dc_dh, 1.0)
    a01 = tl.where(m, k * fg, 0.0)
    a10 = tl.where(m, dc_dh, 0.0)
    a11 = tl.where(m, fg, 1.0)
    b0 = tl.where(m, h_new - a00 * hp - a01 * cp, 0.0)
    b1 = tl.where(m, c_new - a10 * hp - a11 * cp, 0.0)
    # elementwise relative residual |h - f| / max(1, |f|) of both components; NaN -> inf (divergence)
    fh = tl.abs(h_new)
    fc = tl.abs(c_new)
    rh = tl.abs(hc - h_new) / tl.maximum(fh, 1.0)
    rc = tl.abs(cc - c_new) / tl.maximum(fc, 1.0)
    rh = tl.where(rh == rh, rh, float("inf"))
    rc = tl.where(rc == rc, rc, float("inf"))
    rel = tl.where(m, tl.maximum(rh, rc), 0.0)
    fh = tl.where(fh == fh, fh, float("inf"))
    fc = tl.where(fc == fc, fc, float("inf"))
    fab = tl.where(m, tl.maximum(fh, fc), 0.0)
    # per-program partial maxima (reduced on the host side of the launch): no same-address atomics
    tl.store(Res + c * n_lb + lb, tl.max(tl.max(rel, 1), 0))
    tl.store(Res + NP + c * n_lb + lb, tl.max(tl.max(fab, 1), 0))
    A00, A01, A10, A11, C0, C1 = tl.associative_scan((a00, a01, a10, a11, b0, b1), 0, comb_block2)
    st0 = tl.load(St + 2 * lanes, mask=lmask, other=0.0).to(tl.float32)
    st1 = tl.load(St + 2 * lanes + 1, mask=lmask, other=0.0).to(tl.float32)
    s0, s1 = lookback_block2(Flags, Agg, Incl, c, lb, n_lb, M, lanes, lmask, st0, st1,
                             last_row(A00, rows, TT), last_row(A01, rows, TT), last_row(A10, rows, TT),
                             last_row(A11, rows, TT), last_row(C0, rows, TT), last_row(C1, rows, TT), LB_W)
    o0 = A00 * s0[None, :] + A01 * s1[None, :] + C0
    o1 = A10 * s0[None, :] + A11 * s1[None, :] + C1
    tl.store(Out + so, o0.to(Out.dtype.element_ty), mask=m)
    tl.store(Out + so + 1, o1.to(Out.dtype.element_ty), mask=m)


def fused_diag_lstm_step(h, xp, weight_hh, boundary, out=None, block_t: Optional[int] = None,
                         block_n: Optional[int] = None, num_warps: Optional[int] = None, *,
                         start=None, want_summary: bool = False, lookback_w: Optional[int] = None):
    """``h`` (T, B, 2H) interleaved [h, c], ``xp`` (T, B, 4H), ``weight_hh`` (4H,),
    ``boundary`` (B, 2H): the h_prev of step 0, ``start`` (B, 2H) or None (= ``boundary``):
    the scan's incoming state.

    Returns ``(h_new, stats)``, with ``want_summary`` ``(h_new, stats, phi)``: ``stats``
    float32 ``[max over t, b, i of |h - f| / max(1, |f|), max|f|]`` (NaN/Inf reported as
    inf); ``phi`` float32 (B, H, 2, 2), per unit the product ``J_{T-1} ... J_0`` of the 2 x 2
    blocks acting on ``[h_u, c_u]`` (identity for T == 0).  Tile (``block_t`` steps x ``block_n``
    units), warps and look-back window ``lookback_w``: None = from ``TILES`` for M = B * H."""
    T, B, D = h.shape
    Hs = D // 2
    M = B * Hs
    h = h.contiguous()
    xp = xp.contiguous()
    out = torch.empty_like(h) if out is None else out
    if T == 0:
        stats = torch.zeros(2, dtype=torch.float32, device=h.device)
        if not want_summary:
            return out, stats
        eye = torch.eye(2, dtype=torch.float32, device=h.device)
        return out, stats, eye.expand(B, Hs, 2, 2).clone()
    w = weight_hh.detach().to(torch.float32).contiguous()
    boundary = boundary.contiguous()
    start = boundary if start is None else start.contiguous()
    block_t, block_n, num_warps, lb_w = pick_tiles(TILES, M, block_t, block_n, num_warps, lookback_w)
    n_lb = triton.cdiv(M, block_n)
    n_chunks = triton.cdiv(T, block_t)
    flags, counter = lookback_buffers(n_chunks, n_lb, lb_w, h.device)
    agg = torch.empty(n_chunks, 6, M, dtype=torch.float32, device=h.device)
    incl = torch.empty(n_chunks, 2, M, dtype=torch.float32, device=h.device)
    n_prog = n_chunks * n_lb
    part = torch.empty(2, n_prog, dtype=torch.float32, device=h.device)
    _fused_diag_lstm_kernel[(n_prog,)](
        h, xp, w, boundary, start, out, part, agg, incl, flags, counter,
        T, Hs, M, n_lb, n_prog, TT=block_t, BN=block_n, LB_W=lb_w, num_warps=num_warps)
    stats = part.amax(1)
    if not want_summary:
        return out, stats
    # every chunk stored its aggregate: (n_chunks, M, 2, 2), composed in time order (later on the left)
    from seqpar.scan import jacobian_product  # later tiles on the left, log-depth tree
    from seqpar.structure import Structure

    tiles = agg[:, :4].reshape(n_chunks, 2, 2, M).permute(0, 3, 1, 2)  # (n_chunks, M, 2, 2)
    return out, stats, jacobian_product(tiles, Structure("block", 2)).reshape(B, Hs, 2, 2)
