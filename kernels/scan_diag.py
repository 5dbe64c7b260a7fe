"""Affine scan with diagonal Jacobians over (T, N) lanes: ``h_t = J_t * h_{t-1} + b_t``.

Reference: :func:`seqpar.scan.affine_scan` with ``Structure("diag")``.
Float32 accumulation; storage float32 / bfloat16 / float16 (output in b's dtype).
``reverse=True`` runs ``h_t = J_t * h_{t+1} + b_t`` from t = T-1 down (the adjoint).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import comb_diag, last_row, lookback_buffers, lookback_diag, pick_tiles, ticket

DEFAULT_TT, DEFAULT_BN, DEFAULT_WARPS = 64, 64, 2  # best of a sweep on H100 at N = 1024 (benchmarks/)
# Tile shape, warps and look-back window per lane count N (first key >= N; "wide" beyond):
# measured by benchmarks/sweep_narrow.py.
TILES = {  # benchmarks/sweep_narrow.py, run 24 (H200, T=2^20): ms per scan, x minimum bytes
    16: dict(tt=256, bn=16, warps=2, w=8),    # 0.200 ms, 4.21x (W=1: 0.249 ms)
    64: dict(tt=64, bn=64, warps=4, w=8),     # 0.564 ms, 2.97x (W=1, 2 warps: 0.704 ms)
    256: dict(tt=64, bn=64, warps=2, w=16),   # 1.410 ms, 1.86x (W=1: 1.805 ms)
    1024: dict(tt=32, bn=64, warps=2, w=8),   # 4.487 ms, 1.48x (W=1: 4.573 ms)
    "wide": dict(tt=DEFAULT_TT, bn=DEFAULT_BN, warps=DEFAULT_WARPS, w=1),
}


@triton.jit
def _scan_diag_kernel(J, Bv, H0, Out, AggA, AggC, Incl, Flags, Counter, Carry,
                      T, N, n_lb, CH,
                      TT: tl.constexpr, BN: tl.constexpr, N_TILES: tl.constexpr, MODE: tl.constexpr,
                      REVERSE: tl.constexpr, HAS_H0: tl.constexpr, LB_W: tl.constexpr):
    c, lb = ticket(Counter, n_lb, MODE)
    lanes = lb * BN + tl.arange(0, BN)
    lmask = lanes < N
    rows = tl.arange(0, TT)
    if MODE == 2:
        h = tl.load(Carry + c.to(tl.int64) * N + lanes, mask=lmask, other=0.0)
    else:
        h = tl.zeros([BN], tl.float32)
        if HAS_H0:
            h = tl.load(H0 + lanes, mask=lmask & ((tl.zeros_like(lanes) + c) == 0), other=0.0).to(tl.float32)
    Ra = tl.full([BN], 1.0, tl.float32)
    Rc = tl.zeros([BN], tl.float32)
    for k in range(N_TILES):
        i = c * CH + k * TT + rows
        valid = i < T
        if REVERSE:
            p = T - 1 - i
        else:
            p = i
        off = p.to(tl.int64)[:, None] * N + lanes[None, :]
        m = valid[:, None] & lmask[None, :]
        j = tl.load(J + off, mask=m, other=1.0).to(tl.float32)
        b = tl.load(Bv + off, mask=m, other=0.0).to(tl.float32)
        if MODE == 1:
            Aa, Ca = tl.reduce((j, b), 0, comb_diag)
            Rc = Aa * Rc + Ca
            Ra = Aa * Ra
        else:
            A, C = tl.associative_scan((j, b), 0, comb_diag)
            if MODE == 0:
                h = lookback_diag(Flags, AggA, AggC, Incl, c, lb, n_lb, N, lanes, lmask, h,
                                  last_row(A, rows, TT), last_row(C, rows, TT), LB_W)
            out = A * h[None, :] + C
            tl.store(Out + off, out.to(Out.dtype.element_ty), mask=m)
            h = last_row(out, rows, TT)
    if MODE == 1:
        base = c.to(tl.int64) * N + lanes
        tl.store(AggA + base, Ra, mask=lmask)
        tl.store(AggC + base, Rc, mask=lmask)


@triton.jit
def _summary_scan_diag_kernel(AggA, AggC, H0, Carry, N, n_chunks, BN: tl.constexpr, HAS_H0: tl.constexpr):
    """Carry[c] = state entering chunk c (sequential over the short list of summaries)."""
    lanes = tl.program_id(0) * BN + tl.arange(0, BN)
    lmask = lanes < N
    h = tl.zeros([BN], tl.float32)
    if HAS_H0:
        h = tl.load(H0 + lanes, mask=lmask, other=0.0).to(tl.float32)
    pa, pc, pk = AggA + lanes, AggC + lanes, Carry + lanes
    for c in range(n_chunks):
        tl.store(pk, h, mask=lmask)
        a = tl.load(pa, mask=lmask, other=1.0)
        cc = tl.load(pc, mask=lmask, other=0.0)
        h = a * h + cc
        pa += N
        pc += N
        pk += N


def scan_diag(J: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None, *, reverse: bool = False,
              out: Optional[torch.Tensor] = None, mode: str = "lookback", block_t: Optional[int] = None,
              block_n: Optional[int] = None, num_warps: Optional[int] = None, chunks: Optional[int] = None,
              lookback_w: Optional[int] = None):
    """States of the diagonal affine recurrence.

    Args:
        J, b: (T, *L) with N = prod(L) lanes (contiguous; J float32/bf16/f16, same shape as b).
        h0: (*L) initial state (h_{-1}, or h_T when ``reverse``); zeros if None.
        mode: "lookback" (single pass) or "3pass" (reduce, scan of summaries, rescan).
        chunks: 3pass only: number of time chunks (default about 4 per SM-ish, 512).
        block_t, block_n, num_warps, lookback_w: tile (TT time steps x BN lanes), warps and
            look-back window (1 = one predecessor at a time; 2..32 = windowed, see
            :mod:`seqpar.kernels._common`); None = from ``TILES`` for this N.
    Returns:
        states (T, *L) in b's dtype (or written into ``out``).
    """
    if J.shape != b.shape:
        raise ValueError(f"J and b must have the same shape; got {tuple(J.shape)} and {tuple(b.shape)}")
    T = b.shape[0]
    N = b[0].numel() if T else 0
    out = torch.empty_like(b) if out is None else out
    if T == 0 or N == 0:
        return out
    J2, b2 = J.reshape(T, N).contiguous(), b.reshape(T, N).contiguous()
    o2 = out.view(T, N) if out.is_contiguous() else torch.empty(T, N, dtype=out.dtype, device=out.device)
    has_h0 = h0 is not None
    h0v = h0.reshape(N).contiguous() if has_h0 else b2
    block_t, block_n, num_warps, lb_w = pick_tiles(TILES, N, block_t, block_n, num_warps, lookback_w)
    n_lb = triton.cdiv(N, block_n)
    dev = b.device
    if mode == "lookback":
        n_chunks = triton.cdiv(T, block_t)
        flags, counter = lookback_buffers(n_chunks, n_lb, lb_w, dev)
        agg = torch.empty(3, n_chunks, N, dtype=torch.float32, device=dev)
        _scan_diag_kernel[(n_chunks * n_lb,)](
            J2, b2, h0v, o2, agg[0], agg[1], agg[2], flags, counter, agg[0],
            T, N, n_lb, block_t, TT=block_t, BN=block_n, N_TILES=1, MODE=0,
            REVERSE=reverse, HAS_H0=has_h0, LB_W=lb_w, num_warps=num_warps)
    elif mode == "3pass":
        tiles = max(1, triton.cdiv(T, block_t * (chunks or 512)))
        CH = tiles * block_t
        n_chunks = triton.cdiv(T, CH)
        agg = torch.empty(3, n_chunks, N, dtype=torch.float32, device=dev)
        grid = (n_chunks * n_lb,)
        common = dict(TT=block_t, BN=block_n, N_TILES=tiles, REVERSE=reverse, HAS_H0=has_h0, LB_W=1,
                      num_warps=num_warps)
        _scan_diag_kernel[grid](J2, b2, h0v, o2, agg[0], agg[1], agg[2], agg[0], agg[0], agg[2],
                                T, N, n_lb, CH, MODE=1, **common)
        _summary_scan_diag_kernel[(n_lb,)](agg[0], agg[1], h0v, agg[2], N, n_chunks, BN=block_n, HAS_H0=has_h0)
        _scan_diag_kernel[grid](J2, b2, h0v, o2, agg[0], agg[1], agg[2], agg[0], agg[0], agg[2],
                                T, N, n_lb, CH, MODE=2, **common)
    else:
        raise ValueError(f"mode must be 'lookback' or '3pass'; got {mode!r}")
    if o2.data_ptr() != out.data_ptr():
        out.copy_(o2.view(out.shape))
    return out


def scan_diag_reference(J, b, h0=None, reverse=False):
    """Pure-PyTorch reference (float32 accumulation) via :func:`seqpar.scan.affine_scan`."""
    from seqpar.scan import affine_scan
    from seqpar.structure import DIAG

    T = b.shape[0]
    Jf, bf = J.reshape(T, 1, -1).float(), b.reshape(T, 1, -1).float()
    if reverse:
        Jf, bf = Jf.flip(0), bf.flip(0)
    h_in = torch.zeros_like(bf[0]) if h0 is None else h0.reshape(1, -1).float()
    s = affine_scan(Jf, bf, h_in, DIAG)
    if reverse:
        s = s.flip(0)
    return s.reshape(b.shape).to(b.dtype)
