"""Pipelined quasi-Newton pass of the dense :class:`seqpar.cells.GRU` at widths 9 <= D <= 64: one GEMM per pass.

Quasi-Newton (``jacobian="diag"``) linearises the GRU step at the iterate ``h^k`` with the diagonal of its
Jacobian: the maps ``h_t = a_t h_{t-1} + b_t`` with ``a_t = diag df/dh_prev (h^k_{t-1})`` and
``b_t = f(h^k_{t-1}) - a_t h^k_{t-1}``.  The look-back path (:func:`seqpar.kernels.fused_diag_gru.fused_gru_quasi_step`)
writes the recurrent GEMM's three gates per state and reads them back in a look-back kernel: about 48 bytes per
state per iteration.  Here the pipeline of :mod:`seqpar.pipeline` runs with the **maps themselves** as the
state between passes:

* the pass reads the maps ``(a, b)`` at ``h^k`` (8 bytes per state) and walks each run of ``R`` steps from its
  carry (the exact state before the run, scanned from the previous pass's run summaries): an in-register
  associative scan gives ``h^{k+1}`` for the run, which is written (the new iterate);
* it reads the run back one step behind (``h^{k+1}_{t-1}``, from L1/L2: the values just stored, so the
  residual belongs to the stored iterate), multiplies by ``W_hh^T`` on tensor cores (3xTF32 by default: about
  fp32) and finishes the GRU step with the projected inputs: ``f(h^{k+1}_{t-1})``, the residual
  ``|h^{k+1} - f| / max(1, |f|)`` and the maps at ``h^{k+1}``, which overwrite the maps it read (each program
  reads and writes only its own rows);
* a second in-register scan reduces the new maps to one summary ``(A, C)`` per run and batch row: the next
  pass's carries (:func:`seqpar.pipeline.scan_runs`, diagonal).

So a pass moves 8 + 12 (inputs) + 8 + 4 (iterate) = 32 bytes per state and runs one recurrent GEMM.
:func:`first_pass` starts the pipeline from an iterate (the initial guess): the maps and summaries at it and
its residual.

Program: a run of ``R`` steps x ``BB`` batch rows, all channels; tile rows ``i = lb * R + j`` (batch row
``lb``, step ``j``), so each batch row's steps are consecutive rows and the scans run along rows, restarted at
``j = 0`` by a zero multiplier.  Channels are padded to ``DP = max(16, next_power_of_2(D))`` (masked).

Shapes: ``h`` (T, B, D) (any float dtype), ``xp`` (T, B, 3D) of any strides, ``weight_hh`` (3D, D), ``bias_hh``
(3D,) or None, boundaries (B, D), ``maps`` float32 (2, T, B, D) (``a`` then ``b``), summaries float32
(n_runs, B, D), ``n_runs = ceil(T / R)``.  Reference: :func:`seqpar.kernels.pipelined_dense_gru.pipelined_step_reference`
(``exact=False``: the same iterate, summaries and residual from ``h^k``) and
:func:`seqpar.kernels.quasi_gru_gemm.quasi_gru_epilogue_reference` (the maps).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISIONS, dot, gru_f_jdiag, rel_residual
from .pipelined_diag_gru import PassResult, prepare_weights

MIN_D, MAX_D = 9, 64  # D <= 8: the walker kernel (pipelined_dense_gru); wider: the look-back path
ROWS, WARPS, MIN_RUN = 128, 8, 16  # tile rows (R x BB), warps; batch rows per program shrink so that R >= MIN_RUN
PRECISION = "tf32x3"  # the recurrent GEMM's inputs (see _common.dot): about fp32
ENABLED = True  # off: GRU quasi-Newton at these widths takes the look-back path (benchmarks compare the two)


class QuasiRunConfig(NamedTuple):
    r: int       # steps per run
    bb: int      # batch rows per program
    warps: int


def run_config(T: int, B: int, rows: Optional[int] = None, num_warps: Optional[int] = None) -> QuasiRunConfig:
    """Launch shape: ``rows`` (a power of two >= 16, default ``ROWS``) tile rows = R steps x BB batch rows, with
    BB the batch rounded up to a power of two but at most ``rows // MIN_RUN``."""
    rows = ROWS if rows is None else rows
    if rows < 16 or rows & (rows - 1):
        raise ValueError(f"rows must be a power of two >= 16; got {rows}")
    bb = min(triton.next_power_of_2(max(B, 1)), max(1, rows // MIN_RUN))
    return QuasiRunConfig(rows // bb, bb, WARPS if num_warps is None else num_warps)


def supports(D: int) -> bool:
    """Whether the kernel handles state size ``D``."""
    return MIN_D <= D <= MAX_D


@triton.jit
def _affine(a1, b1, a2, b2):
    """Composition of ``x -> a1 x + b1`` then ``x -> a2 x + b2``."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _affine2(a1, c1, p1, a2, c2, p2):
    """:func:`_affine` carrying two offsets: ``c`` the composed offset, ``p`` the composed multiplier of a run
    whose first element is ``(0, b_0, a_0)``."""
    return a1 * a2, a2 * c1 + c2, a2 * p1 + p2


@triton.jit
def _quasi_pass_kernel(Maps, XP, W, BH, H, Bnd, Incl, St, Out, SumA, SumC, Res, Stop,
                       T, B, D, n_bb, NPROG, map_stride, sx_t, sx_b, sx_c,
                       R: tl.constexpr, BB: tl.constexpr, DP: tl.constexpr, FIRST: tl.constexpr,
                       GUARD: tl.constexpr, PREC: tl.constexpr):
    """One pass (see the module).  FIRST: the maps at the iterate ``H`` (state before step 0: ``Bnd``);
    else the new iterate from the maps and the carries (``St`` before run 0, ``Incl[r - 1]`` before run r),
    stored to ``Out``, and the maps at it.  Both: maps overwritten, summaries, ``Res[pid]`` /
    ``Res[NPROG + pid]`` the partial maxima of the residual and |f|."""
    if GUARD:
        if tl.load(Stop) != 0:
            return
    pid = tl.program_id(0)
    run = pid // n_bb
    i = tl.arange(0, BB * R)
    j = i % R
    b = (pid % n_bb) * BB + i // R
    t = run.to(tl.int64) * R + j
    rv = (t < T) & (b < B)
    c = tl.arange(0, DP)
    cm = c < D
    m = rv[:, None] & cm[None, :]
    off = (t * B + b)[:, None] * D + c[None, :]
    back = B * D  # one step
    head = (j == 0)[:, None]
    if FIRST:
        hc = tl.load(H + off, mask=m, other=0.0).to(tl.float32)
        at0 = (t == 0)[:, None]
        hp = tl.where(at0, tl.load(Bnd + b[:, None] * D + c[None, :], mask=m & at0, other=0.0).to(tl.float32),
                      tl.load(H + off - back, mask=m & (t > 0)[:, None], other=0.0).to(tl.float32))
    else:
        first_run = (t < R)[:, None]  # run 0 (as a tensor: the interpreter takes no scalar masks)
        cof = b[:, None] * D + c[None, :]
        carry = tl.where(first_run, tl.load(St + cof, mask=m & head & first_run, other=0.0).to(tl.float32),
                         tl.load(Incl + (run - 1).to(tl.int64) * back + cof, mask=m & head & (t >= R)[:, None],
                                 other=0.0))
        ma = tl.load(Maps + off, mask=m, other=0.0)
        mb = tl.load(Maps + map_stride + off, mask=m, other=0.0)
        mb = tl.where(head, ma * carry + mb, mb)  # a run starts from its carry: no dependence on the row before
        ma = tl.where(head, 0.0, ma)
        _, hc = tl.associative_scan((ma, mb), 0, _affine)
        hc = hc.to(Out.dtype.element_ty)
        tl.store(Out + off, hc, mask=m)
        hc = hc.to(tl.float32)
        tl.debug_barrier()  # the run's stores are visible to the whole program: read it back one step behind
        carry = carry.to(Out.dtype.element_ty).to(tl.float32)
        hp = tl.where(head, carry, tl.load(Out + off - back, mask=m & (j > 0)[:, None], other=0.0).to(tl.float32))
    # the recurrent GEMM hp @ W_g^T per gate g (W_g: rows g * D .. g * D + D - 1 of W (3D, D))
    k = tl.arange(0, DP)
    wo = c[None, :] * D + k[:, None]  # [k, j] -> W[g D + j, k]
    wm = (k < D)[:, None] & cm[None, :]
    hr = dot(hp, tl.load(W + wo, mask=wm, other=0.0), PREC) + tl.load(BH + c, mask=cm, other=0.0)[None, :]
    hz = dot(hp, tl.load(W + D * D + wo, mask=wm, other=0.0), PREC) + tl.load(BH + D + c, mask=cm, other=0.0)[None, :]
    hn = dot(hp, tl.load(W + 2 * D * D + wo, mask=wm, other=0.0), PREC) + \
        tl.load(BH + 2 * D + c, mask=cm, other=0.0)[None, :]
    xo = t[:, None] * sx_t + b[:, None].to(tl.int64) * sx_b + c[None, :].to(tl.int64) * sx_c
    xr = tl.load(XP + xo, mask=m, other=0.0).to(tl.float32)
    xz = tl.load(XP + xo + D * sx_c, mask=m, other=0.0).to(tl.float32)
    xn = tl.load(XP + xo + 2 * D * sx_c, mask=m, other=0.0).to(tl.float32)
    wd = c * (D + 1)  # each gate block's diagonal: the quasi-Newton Jacobian's
    wr = tl.load(W + wd, mask=cm, other=0.0)[None, :]
    wz = tl.load(W + D * D + wd, mask=cm, other=0.0)[None, :]
    wn = tl.load(W + 2 * D * D + wd, mask=cm, other=0.0)[None, :]
    f, jd = gru_f_jdiag(hp, xr, xz, xn, hr, hz, hn, wr, wz, wn)
    rel, fab = rel_residual(hc, f, m)
    tl.store(Res + pid, tl.max(tl.max(rel, 1), 0))
    tl.store(Res + NPROG + pid, tl.max(tl.max(fab, 1), 0))
    nb = f - jd * hp
    tl.store(Maps + off, jd, mask=m)
    tl.store(Maps + map_stride + off, nb, mask=m)
    # run summaries of the new maps: rows past T are identities, so the run's last row holds its composition
    na = tl.where(m, jd, 1.0)
    nb = tl.where(m, nb, 0.0)
    _, sc, sa = tl.associative_scan((tl.where(head, 0.0, na), nb, tl.where(head, na, 0.0)), 0, _affine2)
    so = (run.to(tl.int64) * B + b)[:, None] * D + c[None, :]
    last = ((j == R - 1) & (b < B))[:, None] & cm[None, :]
    tl.store(SumA + so, sa, mask=last)
    tl.store(SumC + so, sc, mask=last)


def new_maps(T: int, B: int, D: int, device) -> torch.Tensor:
    """The maps buffer a pipeline of this kernel keeps between passes: float32 (2, T, B, D)."""
    return torch.empty(2, T, B, D, dtype=torch.float32, device=device)


def _launch(first: bool, maps, xp, w, bh, h, boundary, incl, start, out, cfg: QuasiRunConfig, stop, precision):
    T, B, D = maps.shape[1:]
    if not supports(D):
        raise ValueError(f"the pipelined quasi-Newton GRU kernel supports {MIN_D} <= D <= {MAX_D}; got D={D}")
    if xp.shape != (T, B, 3 * D) or w.shape != (3 * D, D) or maps.dtype != torch.float32 or not maps.is_contiguous():
        raise ValueError(f"expected maps float32 contiguous (2, T, B, D), xp (T, B, 3D), weight_hh (3D, D); got "
                         f"{tuple(maps.shape)} {maps.dtype}, {tuple(xp.shape)}, {tuple(w.shape)}")
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(DOT_PRECISIONS)}; got {precision!r}")
    dev = maps.device
    n_runs = triton.cdiv(T, cfg.r) if T else 0
    sum_a = torch.empty(n_runs, B, D, dtype=torch.float32, device=dev)
    sum_c = torch.empty(n_runs, B, D, dtype=torch.float32, device=dev)
    if not first and out is None:
        out = torch.empty(T, B, D, dtype=start.dtype, device=dev)
    if T == 0:
        return PassResult(None if first else out, sum_a, sum_c, torch.zeros(2, dtype=torch.float32, device=dev))
    n_bb = triton.cdiv(B, cfg.bb)
    grid = (n_runs * n_bb,)
    part = torch.empty(2, grid[0], dtype=torch.float32, device=dev)
    if first:
        h, boundary = h.contiguous(), boundary.contiguous()
        h_arg, bnd_arg, incl_arg, st_arg, out_arg = h, boundary, sum_c, boundary, h
    else:
        h_arg, bnd_arg, incl_arg, st_arg, out_arg = out, start, incl.contiguous(), start.contiguous(), out
    _quasi_pass_kernel[grid](maps, xp, w, bh, h_arg, bnd_arg, incl_arg, st_arg, out_arg, sum_a, sum_c, part,
                             part if stop is None else stop, T, B, D, n_bb, grid[0], T * B * D, *xp.stride(),
                             R=cfg.r, BB=cfg.bb, DP=max(16, triton.next_power_of_2(D)), FIRST=first,
                             GUARD=stop is not None, PREC=DOT_PRECISIONS[precision], num_warps=cfg.warps)
    return PassResult(None if first else out, sum_a, sum_c, part if stop is not None else part.amax(1))


def first_pass(h, xp, weight_hh, bias_hh, boundary, maps, cfg: Optional[QuasiRunConfig] = None, stop=None,
               precision: str = PRECISION) -> PassResult:
    """The maps at the iterate ``h`` (T, B, D), written to ``maps`` (2, T, B, D), their run summaries and the
    residual of ``h`` (``boundary`` (B, D): its state before step 0).  ``weight_hh``/``bias_hh`` as
    :func:`seqpar.kernels.pipelined_diag_gru.prepare_weights` returns them (any float tensors: converted).
    With ``stop`` (a :mod:`seqpar.kernels.stopping` state) nothing once that state says stopped, and
    ``stats`` unreduced (2, programs)."""
    w, bh = prepare_weights(weight_hh, bias_hh)
    return _launch(True, maps, xp, w, bh, h, boundary, None, None, None,
                   cfg or run_config(h.shape[0], h.shape[1]), stop, precision)


def pipelined_step(xp, weight_hh, bias_hh, maps, incl, start, out=None, cfg: Optional[QuasiRunConfig] = None,
                   stop=None, precision: str = PRECISION) -> PassResult:
    """One quasi-Newton iteration: the new iterate ``out`` (T, B, D, ``start``'s dtype) from the maps in ``maps``
    (which the previous pass wrote; replaced by the maps at the new iterate), ``incl`` (n_runs, B, D) the
    inclusive scan of that pass's summaries from ``start`` (B, D, the new iterate's state before step 0).
    Returns the new iterate's summaries and residual (``stop``: as :func:`first_pass`)."""
    w, bh = prepare_weights(weight_hh, bias_hh)
    T, B = maps.shape[1:3]
    return _launch(False, maps, xp, w, bh, None, None, incl, start, out, cfg or run_config(T, B), stop, precision)
