"""Affine scan with 2 x 2 block-diagonal Jacobians (the LSTM h/c pair).

``J`` (T, *L, 2, 2), ``b`` (T, *L, 2) with M = prod(L) lanes (one 2 x 2 block
each): ``h_t = J_t h_{t-1} + b_t`` per lane; ``reverse=True`` runs from t = T-1
down (``h_t = J_t h_{t+1} + b_t``; pass J already transposed for the adjoint).
Float32 accumulation, storage in b's dtype.  Single pass with decoupled
look-back (see :mod:`seqpar.kernels._common`).  Reference:
:func:`seqpar.scan.affine_scan` with ``Structure("block", 2)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import comb_block2, last_row, lookback_block2, lookback_buffers, pick_tiles, ticket

DEFAULT_TT, DEFAULT_BN, DEFAULT_WARPS = 8, 128, 2  # best of a sweep on H100 at M = 512 (benchmarks/)
# Tile shape, warps and look-back window per block count M (first key >= M; "wide" beyond):
# initial guesses (old defaults narrowed), not yet swept.
TILES = {
    16: dict(tt=64, bn=16, warps=2, w=16),
    64: dict(tt=16, bn=64, warps=2, w=16),
    256: dict(tt=8, bn=128, warps=2, w=16),
    1024: dict(tt=8, bn=128, warps=2, w=16),
    "wide": dict(tt=DEFAULT_TT, bn=DEFAULT_BN, warps=DEFAULT_WARPS, w=1),
}


@triton.jit
def _scan_block2_kernel(J, Bv, H0, Out, Agg, Incl, Flags, Counter, T, M, n_lb,
                        TT: tl.constexpr, BN: tl.constexpr, REVERSE: tl.constexpr, HAS_H0: tl.constexpr,
                        LB_W: tl.constexpr):
    c, lb = ticket(Counter, n_lb, 0)
    lanes = lb * BN + tl.arange(0, BN)
    lmask = lanes < M
    rows = tl.arange(0, TT)
    i = c * TT + rows
    valid = i < T
    if REVERSE:
        p = T - 1 - i
    else:
        p = i
    p64 = p.to(tl.int64)[:, None]
    m = valid[:, None] & lmask[None, :]
    jo = p64 * (4 * M) + 4 * lanes[None, :]
    bo = p64 * (2 * M) + 2 * lanes[None, :]
    a00 = tl.load(J + jo, mask=m, other=1.0).to(tl.float32)
    a01 = tl.load(J + jo + 1, mask=m, other=0.0).to(tl.float32)
    a10 = tl.load(J + jo + 2, mask=m, other=0.0).to(tl.float32)
    a11 = tl.load(J + jo + 3, mask=m, other=1.0).to(tl.float32)
    c0 = tl.load(Bv + bo, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(Bv + bo + 1, mask=m, other=0.0).to(tl.float32)
    g0 = tl.zeros([BN], tl.float32)
    g1 = tl.zeros([BN], tl.float32)
    if HAS_H0:
        first = lmask & ((tl.zeros_like(lanes) + c) == 0)
        g0 = tl.load(H0 + 2 * lanes, mask=first, other=0.0).to(tl.float32)
        g1 = tl.load(H0 + 2 * lanes + 1, mask=first, other=0.0).to(tl.float32)
    A00, A01, A10, A11, C0, C1 = tl.associative_scan((a00, a01, a10, a11, c0, c1), 0, comb_block2)
    h0, h1 = lookback_block2(Flags, Agg, Incl, c, lb, n_lb, M, lanes, lmask, g0, g1,
                             last_row(A00, rows, TT), last_row(A01, rows, TT), last_row(A10, rows, TT),
                             last_row(A11, rows, TT), last_row(C0, rows, TT), last_row(C1, rows, TT), LB_W)
    o0 = A00 * h0[None, :] + A01 * h1[None, :] + C0
    o1 = A10 * h0[None, :] + A11 * h1[None, :] + C1
    tl.store(Out + bo, o0.to(Out.dtype.element_ty), mask=m)
    tl.store(Out + bo + 1, o1.to(Out.dtype.element_ty), mask=m)


def scan_block2(J: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None, *, reverse: bool = False,
                out: Optional[torch.Tensor] = None, block_t: Optional[int] = None, block_n: Optional[int] = None,
                num_warps: Optional[int] = None, lookback_w: Optional[int] = None):
    """States (T, *L, 2) of the 2 x 2 block recurrence; ``h0`` (*L, 2) or None (zeros).
    Tile (``block_t`` steps x ``block_n`` blocks), warps, look-back window: None = from ``TILES``."""
    T = b.shape[0]
    if J.shape[-2:] != (2, 2) or b.shape[-1] != 2 or J.shape[:-1] != b.shape:
        raise ValueError(f"expected J (T, *L, 2, 2) and b (T, *L, 2); got {tuple(J.shape)}, {tuple(b.shape)}")
    M = b[0].numel() // 2 if T else 0
    out = torch.empty_like(b) if out is None else out
    if T == 0 or M == 0:
        return out
    J2, b2 = J.reshape(T, 4 * M).contiguous(), b.reshape(T, 2 * M).contiguous()
    o2 = out.view(T, 2 * M) if out.is_contiguous() else torch.empty(T, 2 * M, dtype=out.dtype, device=out.device)
    has_h0 = h0 is not None
    h0v = h0.reshape(2 * M).contiguous() if has_h0 else b2
    block_t, block_n, num_warps, lb_w = pick_tiles(TILES, M, block_t, block_n, num_warps, lookback_w)
    n_lb = triton.cdiv(M, block_n)
    n_chunks = triton.cdiv(T, block_t)
    flags, counter = lookback_buffers(n_chunks, n_lb, lb_w, b.device)
    agg = torch.empty(n_chunks, 6, M, dtype=torch.float32, device=b.device)
    incl = torch.empty(n_chunks, 2, M, dtype=torch.float32, device=b.device)
    _scan_block2_kernel[(n_chunks * n_lb,)](J2, b2, h0v, o2, agg, incl, flags, counter, T, M, n_lb,
                                            TT=block_t, BN=block_n, REVERSE=reverse, HAS_H0=has_h0,
                                            LB_W=lb_w, num_warps=num_warps)
    if o2.data_ptr() != out.data_ptr():
        out.copy_(o2.view(out.shape))
    return out
