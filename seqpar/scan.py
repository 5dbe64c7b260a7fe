"""Scans of affine maps: reference loops and the pure-PyTorch parallel scans.

Conventions: time is dim 0.  ``J`` has the storage of a :class:`Structure`
for leading dims (n, B); ``b`` and states are (n, B, D).  The recurrence is
``h_t = J_t h_{t-1} + b_t`` with ``h_{-1} = h_in``.

Three levels (docs/design.md section 2):

* :func:`affine_scan` scans one block of time steps in log2(n) vectorised
  rounds (Hillis-Steele); it is also the CPU path.
* :func:`chunked_scan` walks a sequence chunk by chunk,
  asking a callback for each chunk's (J, b) so Jacobians are *recomputed*, never
  stored for the whole sequence (the memory bound of the dense path).
* the cross-rank level lives in :mod:`seqpar.newton`: each rank's scan also
  returns its shard's Jacobian product (``product=True``), the summaries are
  all-gathered and composed.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from .structure import Structure

ChunkFn = Callable[[int, int], Tuple[torch.Tensor, torch.Tensor]]


def sequential_scan(J, b, h_in, structure: Structure):
    """Reference: step-by-step loop.  Returns states (n, B, D)."""
    out = torch.empty_like(b)
    h = h_in
    for t in range(b.shape[0]):
        h = structure.matvec(J[t], h) + b[t]
        out[t] = h
    return out


def _prefix_maps(J, b, structure: Structure, need_A: bool):
    """Inclusive prefix compositions (A_t, c_t) = (J_t,b_t) o ... o (J_0,b_0)."""
    A, c = J, b
    n = b.shape[0]
    s = 1
    while s < n:
        last = 2 * s >= n
        c_tail = structure.matvec(A[s:], c[:-s]) + c[s:]
        if need_A or not last:
            A = torch.cat([A[:s], structure.matmul(A[s:], A[:-s])], 0)
        c = torch.cat([c[:s], c_tail], 0)
        s *= 2
    return A, c


TWO_LEVEL_MIN_STEPS = 64  # matrix (block/dense) scans at least this long use the two-level scan


def two_level_scan(J, b, h_in, structure: Structure, sub: int = 0):
    """Work-efficient scan for matrix Jacobians: (n, B, D) states.

    The block is cut into ``nc`` sub-chunks of ``sub`` steps (default ~sqrt(n)).
    Pass 1 walks the sub-chunks in lockstep (all nc at once) composing each one's
    summary map; the nc summaries are chained from ``h_in``; pass 2 walks them in
    lockstep again applying the steps from each sub-chunk's incoming state
    (matrix-vector products only).  O(n D^3) work instead of Hillis-Steele's
    O(n D^3 log n), with 2*sub + nc vectorised steps.
    """
    n = b.shape[0]
    B, D = b.shape[1:]
    sub = sub or max(1, math.isqrt(n))
    nc = -(-n // sub)
    pad = nc * sub - n
    if pad:
        J = torch.cat([J, structure.identity((pad, B), D, J.dtype, J.device)], 0)
        b = torch.cat([b, b.new_zeros(pad, B, D)], 0)
    Jr = J.reshape(nc, sub, *J.shape[1:])
    br = b.reshape(nc, sub, B, D)
    A = structure.identity((nc, B), D, J.dtype, J.device)
    c = b.new_zeros(nc, B, D)
    for k in range(sub):
        A = structure.matmul(Jr[:, k], A)
        c = structure.matvec(Jr[:, k], c) + br[:, k]
    carries = torch.empty_like(c)
    h = h_in
    for q in range(nc):
        carries[q] = h
        h = structure.matvec(A[q], h) + c[q]
    out = torch.empty_like(br)
    h = carries
    for k in range(sub):
        h = structure.matvec(Jr[:, k], h) + br[:, k]
        out[:, k] = h
    return out.reshape(nc * sub, B, D)[:n]


def affine_scan(J, b, h_in, structure: Structure):
    """Parallel inclusive scan: states (n, B, D) of ``h_t = J_t h_{t-1} + b_t``.

    Diagonal Jacobians: Hillis-Steele, ``h_in`` folded into the first step so only
    the offsets of the prefix maps are needed.  Block/dense Jacobians of at least
    TWO_LEVEL_MIN_STEPS steps: :func:`two_level_scan` (work-efficient).
    """
    if b.shape[0] == 0:
        return b.clone()
    if structure.kind != "diag" and b.shape[0] >= TWO_LEVEL_MIN_STEPS:
        return two_level_scan(J, b, h_in, structure)
    b = b.clone()
    b[0] = structure.matvec(J[0], h_in) + b[0]
    _, c = _prefix_maps(J, b, structure, need_A=False)
    return c


def affine_reduce(J, b, structure: Structure):
    """Summary map (A, c) of a block: the composition of all its steps, by tree reduction."""
    A, c = J, b
    while A.shape[0] > 1:
        n = A.shape[0]
        m = n // 2
        even_A, odd_A = A[0:2 * m:2], A[1:2 * m:2]
        even_c, odd_c = c[0:2 * m:2], c[1:2 * m:2]
        newA = structure.matmul(odd_A, even_A)
        newc = structure.matvec(odd_A, even_c) + odd_c
        if n % 2:
            newA = torch.cat([newA, A[-1:]], 0)
            newc = torch.cat([newc, c[-1:]], 0)
        A, c = newA, newc
    return A[0], c[0]


def chunk_bounds(n: int, chunk: int):
    chunk = max(1, int(chunk))
    return [(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def jacobian_product(J, structure: Structure):
    """Ordered product ``J_{n-1} ... J_1 J_0`` of a block of Jacobians (later on the left), by
    tree reduction; leading dim n dropped.  ``J`` must have n >= 1 steps."""
    if structure.kind == "diag":
        return J.prod(0)
    A = J
    while A.shape[0] > 1:
        m = A.shape[0] // 2
        newA = structure.matmul(A[1:2 * m:2], A[0:2 * m:2])
        A = torch.cat([newA, A[-1:]], 0) if A.shape[0] % 2 else newA
    return A[0]


def chunked_scan(chunk_fn: ChunkFn, n: int, h_in, structure: Structure, chunk: int,
                 out: Optional[torch.Tensor] = None, scan=affine_scan, product: bool = False):
    """Scan a sequence of ``n`` steps chunk by chunk, carrying the state.

    ``chunk_fn(s, e)`` returns (J, b) for steps [s, e); only one chunk's
    Jacobians are alive at a time.  Returns ``(states (n, B, D), Phi)`` where
    ``Phi`` is the product of all J (the summary's linear part, identity for
    n = 0) if ``product`` else None.
    """
    h = h_in
    pieces = [] if out is None else None
    phi = None
    for s, e in chunk_bounds(n, chunk):
        J, b = chunk_fn(s, e)
        states = scan(J, b, h, structure)
        if product:
            pj = jacobian_product(J, structure)
            phi = pj if phi is None else structure.matmul(pj, phi)
        if out is None:
            pieces.append(states)
        else:
            out[s:e] = states
        h = states[-1]
    if product and phi is None:
        phi = structure.identity(tuple(h_in.shape[:-1]), h_in.shape[-1], h_in.dtype, h_in.device)
    if out is None:
        out = torch.cat(pieces, 0) if pieces else h_in.new_zeros(0, *h_in.shape)
    return out, phi
