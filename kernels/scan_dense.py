"""Affine scan with dense Jacobians (D <= 64): chunked reduce-then-scan.

``J`` (T, B, D, D) (or the dense-structure storage (T, B, 1, D, D)), ``b`` (T, B, D).
Pass 1: one program per (chunk, batch) composes its chunk's maps into a summary
(A, c) with matrix products (``tl.dot``, IEEE fp32); the short list of
summaries is scanned with :func:`seqpar.scan.affine_scan` (batched matmuls);
pass 2 rescans each chunk from its carry with mat-vecs.  Callers recompute J
per chunk (``seqpar.scan.chunked_scan``), so J is never stored for all T.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MAX_CHUNK = 64  # steps per program (see scan_dense)


@triton.jit
def _dense_kernel(J, Bv, Carry, SumA, SumC, Out, T, Bsz, D, L,
                  DP: tl.constexpr, MODE: tl.constexpr, REVERSE: tl.constexpr):
    pid = tl.program_id(0)
    c = pid // Bsz
    bi = pid % Bsz
    r = tl.arange(0, DP)
    rm = r < D
    mm = rm[:, None] & rm[None, :]
    sb = (c * Bsz + bi).to(tl.int64)
    if MODE == 1:
        A = tl.where((r[:, None] == r[None, :]) & mm, 1.0, 0.0)
        h = tl.zeros([DP], tl.float32)
    else:
        h = tl.load(Carry + sb * D + r, mask=rm, other=0.0)
    for k in range(L):
        i = c * L + k
        if i < T:
            if REVERSE:
                p = T - 1 - i
            else:
                p = i
            row = p.to(tl.int64) * Bsz + bi
            Jt = tl.load(J + row * D * D + r[:, None] * D + r[None, :], mask=mm, other=0.0).to(tl.float32)
            bt = tl.load(Bv + row * D + r, mask=rm, other=0.0).to(tl.float32)
            h = tl.sum(Jt * h[None, :], 1) + bt
            if MODE == 1:
                A = tl.dot(Jt, A, input_precision="ieee")
            else:
                tl.store(Out + row * D + r, h.to(Out.dtype.element_ty), mask=rm)
    if MODE == 1:
        tl.store(SumA + sb * D * D + r[:, None] * D + r[None, :], A, mask=mm)
        tl.store(SumC + sb * D + r, h, mask=rm)


def scan_dense(J: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None, *, reverse: bool = False,
               chunk: Optional[int] = None, out: Optional[torch.Tensor] = None):
    """States (T, B, D) of ``h_t = J_t h_{t-1} + b_t`` (``reverse``: ``h_t = J_t h_{t+1} + b_t``)."""
    from seqpar.scan import affine_scan
    from seqpar.structure import DENSE

    T, Bsz, D = b.shape
    if D > 64:
        raise ValueError(f"scan_dense supports D <= 64; got D={D}")
    J = J.reshape(T, Bsz, D, D).contiguous()
    b = b.contiguous()
    out = torch.empty_like(b) if out is None else out
    if T == 0:
        return out
    DP = max(16, triton.next_power_of_2(D))
    # ~2048 programs, but at most MAX_CHUNK steps each: a chunk is replayed sequentially in fp32, and for
    # near-identity maps (ODE steps) the rounding of a replay grows with its length, not decaying
    L = chunk or min(MAX_CHUNK, max(8, triton.cdiv(T, max(1, 2048 // Bsz))))
    n_chunks = triton.cdiv(T, L)
    dev = b.device
    sumA = torch.empty(n_chunks, Bsz, D, D, dtype=torch.float32, device=dev)
    sumC = torch.empty(n_chunks, Bsz, D, dtype=torch.float32, device=dev)
    grid = (n_chunks * Bsz,)
    _dense_kernel[grid](J, b, sumC, sumA, sumC, out, T, Bsz, D, L, DP=DP, MODE=1, REVERSE=reverse, num_warps=4)
    h_in = torch.zeros(Bsz, D, dtype=torch.float32, device=dev) if h0 is None else h0.float().reshape(Bsz, D)
    states = affine_scan(sumA.unsqueeze(2), sumC, h_in, DENSE)  # state after each chunk
    carry = torch.cat([h_in.unsqueeze(0), states[:-1]], 0).contiguous()
    _dense_kernel[grid](J, b, carry, sumA, sumC, out, T, Bsz, D, L, DP=DP, MODE=2, REVERSE=reverse, num_warps=4)
    return out
