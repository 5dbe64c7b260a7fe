"""One fused Newton iteration of the dense :class:`seqpar.cells.GRU` with its exact Jacobian.

torch.nn.GRU's cell, gate order (r, z, n), ``W_hh`` (3D, D), ``b_hh`` (3D,) or None::

    r = sigmoid(xr + W_r h + b_r)      z = sigmoid(xz + W_z h + b_z)
    n = tanh(xn + r * (W_n h + b_n))   f = (1 - z) n + z h

From the current iterate ``h`` (T, B, D) and the projected inputs ``xp`` (T, B, 3D)
(``GRU.project_inputs``: one GEMM before the Newton loop), with
``h_prev = [boundary, h[:-1]]``, one iteration evaluates per step ``f_t``, the exact
``J_t = df/dh_prev = diag(a_r) W_r + diag(a_z) W_z + diag(a_n) W_n + diag(z)``
(``dn = (1-z)(1-n^2)``, ``a_r = dn hn r(1-r)``, ``a_n = dn r``, ``a_z = (h_prev - n) z(1-z)``,
``hn = W_n h_prev + b_n``; the formula of ``GRU.jacobian``), ``b_t = f_t - J_t h_prev``,
the residual of the iterate, and scans ``out_t = J_t out_{t-1} + b_t`` from ``start``.
J lives only in registers: nothing of size T x D x D is ever stored.

Structure (like :mod:`seqpar.kernels.scan_dense`): time is cut into chunks of ``L``
steps, one program per (chunk, batch row).

* ``MODE=1`` (reduce): walk the chunk; per step gates from the iterate's h_prev
  (three D x D mat-vecs), f, J (D x D, elementwise from the W tiles and the gate
  vectors), the chunk summary ``A <- J A`` (``tl.dot`` with fp32 accumulation: IEEE
  by default, TF32 / 3xTF32 on request; D <= 8: a broadcast-and-sum product instead,
  ``tl.dot`` needs >= 16) and ``c <- J (c - h_prev) + f`` (= ``J c + b``); the
  elementwise relative residual ``max |h_t - f_t| / max(1, |f_t|)`` (NaN -> inf) and
  ``max |f_t|`` as per-program partial maxima (reduced after the launch: no
  same-address atomics).
* the (n_chunks, B) summaries are scanned from ``start`` (a one-program-per-row
  kernel of n_chunks mat-vecs; reference :func:`seqpar.scan.affine_scan`): each
  chunk's carry.
* ``MODE=2`` (rescan): walk the chunk again from its carry, recomputing gates
  (mat-vecs only: ``out <- a_r (W_r v) + a_z (W_z v) + a_n (W_n v) + z v + f`` with
  ``v = out - h_prev``, J is not formed) and storing ``out_t``.

``want_summary`` also returns ``Phi = J_{T-1} ... J_0`` (B, 1, D, D) (the dense
structure's storage; the chunk summaries composed in time order with
:func:`seqpar.scan.jacobian_product`), used by the sharded solve.

Reference: ``GRU.step`` / ``GRU.jacobian`` + :func:`seqpar.scan.affine_scan` (the
torch path of ``seqpar.newton.LocalPass``); tests/test_fused_dense_gru.py compares
against it in float64.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISIONS, dot, rel_residual, sigmoid, tanh

MAX_D = 64
PRECISIONS = DOT_PRECISIONS
DEFAULT_PROGRAMS = None  # (chunk, batch row) programs to aim for; None: default_programs(D)
MIN_CHUNK = 8


@triton.jit
def _w_tiles(W, D, ri, ci, mm):
    """The three (DP, DP) recurrent blocks W_r, W_z, W_n of W_hh (3D, D), zero-padded."""
    off = ri[:, None] * D + ci[None, :]
    wr = tl.load(W + off, mask=mm, other=0.0)
    wz = tl.load(W + D * D + off, mask=mm, other=0.0)
    wn = tl.load(W + 2 * D * D + off, mask=mm, other=0.0)
    return wr, wz, wn


@triton.jit
def _mv(Wt, v):
    """(DP, DP) x (DP,) -> (DP,)."""
    return tl.sum(Wt * v[None, :], 1)


@triton.jit
def _step_inputs(XP, H, t, T_end, Bsz, bi, D, ri, rm, zero):
    """Step t's input pre-activations (xr, xz, xn) and iterate h_t, fp32, (DP,) each; zeros if t >= T_end."""
    m = rm & ((zero + t) < T_end)
    t64 = t.to(tl.int64)
    xo = (t64 * Bsz + bi) * (3 * D) + ri
    xr = tl.load(XP + xo, mask=m, other=0.0).to(tl.float32)
    xz = tl.load(XP + xo + D, mask=m, other=0.0).to(tl.float32)
    xn = tl.load(XP + xo + 2 * D, mask=m, other=0.0).to(tl.float32)
    hc = tl.load(H + (t64 * Bsz + bi) * D + ri, mask=m, other=0.0).to(tl.float32)
    return xr, xz, xn, hc


@triton.jit
def _gru_gates(wr, wz, wn, br, bz, bn, hp, xr, xz, xn):
    """Gates r, z, n, the recurrent n pre-activation hn and f at h_prev ``hp``."""
    hn = _mv(wn, hp) + bn
    r = sigmoid(xr + _mv(wr, hp) + br)
    z = sigmoid(xz + _mv(wz, hp) + bz)
    n = tanh(xn + r * hn)
    f = n + z * (hp - n)
    return r, z, n, hn, f


@triton.jit
def _fused_dense_gru_kernel(H, XP, W, BH, Bnd, Carry, SumA, SumC, Out, Res,
                            T, Bsz, D, L, NP,
                            DP: tl.constexpr, MODE: tl.constexpr, USE_DOT: tl.constexpr,
                            PREC: tl.constexpr, W_IN_LOOP: tl.constexpr, PREFETCH: tl.constexpr = True):
    pid = tl.program_id(0)
    c = pid // Bsz
    bi = pid % Bsz
    ri = tl.arange(0, DP)
    ci = tl.arange(0, DP)
    rm = ri < D
    mm = rm[:, None] & (ci < D)[None, :]
    eye = (ri[:, None] == ci[None, :]) & mm
    N = Bsz * D
    sb = (c * Bsz + bi).to(tl.int64)
    br = tl.load(BH + ri, mask=rm, other=0.0)
    bz = tl.load(BH + D + ri, mask=rm, other=0.0)
    bn = tl.load(BH + 2 * D + ri, mask=rm, other=0.0)
    if not W_IN_LOOP:
        wr, wz, wn = _w_tiles(W, D, ri, ci, mm)
    # h_prev of the chunk's first step: the iterate's previous state, or the boundary
    t0 = c * L
    zero = ri * 0
    hp = tl.load(H + (t0.to(tl.int64) - 1) * N + bi * D + ri, mask=rm & ((zero + t0) > 0), other=0.0).to(tl.float32)
    bnd = tl.load(Bnd + bi * D + ri, mask=rm, other=0.0).to(tl.float32)
    hp = tl.where((zero + t0) == 0, bnd, hp)
    if MODE == 1:
        A = tl.where(eye, 1.0, 0.0)
        acc = tl.zeros([DP], tl.float32)
        rmax = tl.zeros([DP], tl.float32)
        fmax = tl.zeros([DP], tl.float32)
    else:
        acc = tl.load(Carry + sb * D + ri, mask=rm, other=0.0)
    if PREFETCH:  # step t's inputs are loaded during step t-1: the load latency hides behind its math
        nxr, nxz, nxn, nhc = _step_inputs(XP, H, t0, T, Bsz, bi, D, ri, rm, zero)
    for k in range(L):
        # no branch on t < T (the tail of the last chunk is masked): keeps the loads pipelinable
        t = t0 + k
        valid = (zero + t) < T  # (DP,): a vector, the interpreter refuses scalar & vector masks
        m = rm & valid
        if W_IN_LOOP:
            wr, wz, wn = _w_tiles(W, D, ri, ci, mm)
        t64 = t.to(tl.int64)
        ho = (t64 * Bsz + bi) * D + ri
        if PREFETCH:
            xr, xz, xn, hc = nxr, nxz, nxn, nhc
            nxr, nxz, nxn, nhc = _step_inputs(XP, H, t + 1, tl.minimum(T, t0 + L), Bsz, bi, D, ri, rm, zero)
        else:
            xr, xz, xn, hc = _step_inputs(XP, H, t, T, Bsz, bi, D, ri, rm, zero)
        r, z, n, hn, f = _gru_gates(wr, wz, wn, br, bz, bn, hp, xr, xz, xn)
        dn = (1.0 - z) * (1.0 - n * n)
        a_r = dn * hn * r * (1.0 - r)
        a_n = dn * r
        a_z = (hp - n) * z * (1.0 - z)
        v = acc - hp  # J v + f = J acc + b
        if MODE == 1:
            J = a_r[:, None] * wr + a_z[:, None] * wz + a_n[:, None] * wn + tl.where(eye, z[:, None], 0.0)
            acc = tl.where(m, _mv(J, v) + f, acc)
            if USE_DOT:
                JA = dot(J, A, PREC)
            else:
                JA = tl.sum(J[:, :, None] * A[None, :, :], 1)
            A = tl.where(valid[:, None], JA, A)
            rel, fab = rel_residual(hc, f, m)  # NaN -> inf: divergence
            rmax = tl.maximum(rmax, rel)
            fmax = tl.maximum(fmax, fab)
        else:
            jv = a_r * _mv(wr, v) + a_z * _mv(wz, v) + a_n * _mv(wn, v) + z * v
            acc = tl.where(m, jv + f, acc)
            tl.store(Out + ho, acc.to(Out.dtype.element_ty), mask=m)
        hp = hc
    if MODE == 1:
        tl.store(SumA + sb * D * D + ri[:, None] * D + ci[None, :], A, mask=mm)
        tl.store(SumC + sb * D + ri, acc, mask=rm)
        tl.store(Res + sb, tl.max(rmax, 0))
        tl.store(Res + NP + sb, tl.max(fmax, 0))


@triton.jit
def _carry_kernel(SumA, SumC, St, Carry, n_chunks, Bsz, D, DP: tl.constexpr):
    """One program per batch row: carry_0 = start, carry_{k+1} = A_k carry_k + c_k (mat-vecs, fp32)."""
    bi = tl.program_id(0)
    ri = tl.arange(0, DP)
    ci = tl.arange(0, DP)
    rm = ri < D
    mm = rm[:, None] & (ci < D)[None, :]
    s = tl.load(St + bi * D + ri, mask=rm, other=0.0).to(tl.float32)
    Ak = tl.load(SumA + bi * D * D + ri[:, None] * D + ci[None, :], mask=mm, other=0.0)
    ck = tl.load(SumC + bi * D + ri, mask=rm, other=0.0)
    for k in range(n_chunks):
        sb = (k * Bsz + bi).to(tl.int64)
        tl.store(Carry + sb * D + ri, s, mask=rm)
        # chunk k+1's summary is loaded before chunk k's mat-vec (its latency hides behind the math)
        nb = ((k + 1) * Bsz + bi).to(tl.int64)
        more = (ri * 0 + k + 1) < n_chunks
        nA = tl.load(SumA + nb * D * D + ri[:, None] * D + ci[None, :], mask=mm & more[:, None], other=0.0)
        nc = tl.load(SumC + nb * D + ri, mask=rm & more, other=0.0)
        s = _mv(Ak, s) + ck
        Ak, ck = nA, nc


def default_programs(D: int) -> int:
    """Programs to aim for.  Small D is latency-bound (one short dependency chain per step, one
    warp): many short chunks; large D is bound by the D^3 summary product: fewer, longer chunks
    keep the summary scan short.  Measured: benchmarks/results/dense_gru_sweep.json."""
    if D <= 16:  # run 23 sweep (H200, B=16): 8192 within 6% of the best at T=100k and 1M for D=4 and 16
        return 8192
    return 2048


def chunk_length(T: int, B: int, programs: int) -> int:
    """Steps per chunk: about ``programs`` (chunk, batch row) programs, at least MIN_CHUNK steps."""
    return max(MIN_CHUNK, triton.cdiv(T, max(1, triton.cdiv(programs, B))))


def default_num_warps(D: int) -> int:
    if D <= 8:
        return 1
    if D <= 16:
        return 2
    return 4 if D <= 32 else 8


def fused_dense_gru_step(h, xp, weight_hh, bias_hh, boundary, out: Optional[torch.Tensor] = None, *,
                         start=None, want_summary: bool = False, chunk: Optional[int] = None,
                         precision: str = "ieee", num_warps: Optional[int] = None,
                         programs: Optional[int] = DEFAULT_PROGRAMS, w_in_loop: Optional[bool] = None,
                         prefetch: bool = True):
    """One Newton iteration of the dense GRU with its exact Jacobian.

    ``h`` (T, B, D) the iterate, ``xp`` (T, B, 3D) projected inputs (float32 or
    bfloat16/float16: computed in float32), ``weight_hh`` (3D, D), ``bias_hh`` (3D,) or
    None, ``boundary`` (B, D): the h_prev of step 0 (linearisation point), ``start``
    (B, D) or None (= ``boundary``): the scan's incoming state.  D <= 64.

    Returns ``(out (T, B, D), stats)``, with ``want_summary`` ``(out, stats, phi)``:
    ``stats`` float32 ``[max over t, b, i of |h - f| / max(1, |f|), max|f|]`` (NaN/Inf
    reported as inf); ``phi`` float32 (B, 1, D, D), ``J_{T-1} ... J_0`` (identity for
    T == 0).

    Tuning: ``chunk`` steps per program (default: :func:`chunk_length` for ``programs``
    programs, default :func:`default_programs`), ``precision`` of
    the summary products ``"ieee"`` | ``"tf32"`` | ``"tf32x3"`` (D > 8 only; the
    per-step states always use fp32 mat-vecs), ``num_warps``, ``w_in_loop`` (reload the
    W_hh tiles every step instead of holding them in registers; default for D > 32),
    ``prefetch`` (load step t+1's inputs while step t computes; the per-step chain is
    latency-bound at small D).
    """
    from seqpar.scan import jacobian_product
    from seqpar.structure import DENSE

    T, B, D = h.shape
    if D > MAX_D:
        raise ValueError(f"fused_dense_gru_step supports D <= {MAX_D}; got D={D}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}; got {precision!r}")
    if tuple(weight_hh.shape) != (3 * D, D):
        raise ValueError(f"weight_hh must have shape (3D, D) = ({3 * D}, {D}); got {tuple(weight_hh.shape)}")
    dev = h.device
    out = torch.empty_like(h) if out is None else out
    if T == 0:
        stats = torch.zeros(2, dtype=torch.float32, device=dev)
        if not want_summary:
            return out, stats
        return out, stats, torch.eye(D, dtype=torch.float32, device=dev).expand(B, 1, D, D).clone()
    h = h.contiguous()
    xp = xp.contiguous()
    W = weight_hh.detach().to(torch.float32).contiguous()
    bh = (torch.zeros(3 * D, dtype=torch.float32, device=dev) if bias_hh is None
          else bias_hh.detach().to(torch.float32).contiguous())
    boundary = boundary.contiguous()
    start = boundary if start is None else start
    use_dot = D > 8
    DP = max(16, triton.next_power_of_2(D)) if use_dot else max(2, triton.next_power_of_2(D))
    L = int(chunk) if chunk else chunk_length(T, B, programs or default_programs(D))
    n_chunks = triton.cdiv(T, L)
    NP = n_chunks * B
    nw = num_warps or default_num_warps(D)
    wil = (D > 32) if w_in_loop is None else bool(w_in_loop)
    sumA = torch.empty(n_chunks, B, D, D, dtype=torch.float32, device=dev)
    sumC = torch.empty(n_chunks, B, D, dtype=torch.float32, device=dev)
    part = torch.empty(2, NP, dtype=torch.float32, device=dev)
    kw = dict(DP=DP, USE_DOT=use_dot, PREC=PRECISIONS[precision], W_IN_LOOP=wil, PREFETCH=bool(prefetch),
              num_warps=nw)
    _fused_dense_gru_kernel[(NP,)](h, xp, W, bh, boundary, sumC, sumA, sumC, out, part,
                                   T, B, D, L, NP, MODE=1, **kw)
    # the chunk summaries scanned from start (reference: affine_scan(sumA.unsqueeze(2), sumC, start, DENSE)):
    # one small launch instead of the log-depth torch scan's many (n_chunks is ~programs / B)
    carry = torch.empty_like(sumC)
    _carry_kernel[(B,)](sumA, sumC, start.contiguous(), carry, n_chunks, B, D, DP=max(2, triton.next_power_of_2(D)),
                        num_warps=default_num_warps(D))
    _fused_dense_gru_kernel[(NP,)](h, xp, W, bh, boundary, carry, sumA, sumC, out, part,
                                   T, B, D, L, NP, MODE=2, **kw)
    stats = part.amax(1)
    if not want_summary:
        return out, stats
    return out, stats, jacobian_product(sumA.unsqueeze(2), DENSE)  # (B, 1, D, D): dense storage
