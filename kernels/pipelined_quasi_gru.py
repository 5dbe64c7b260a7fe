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

Program: a run of ``R`` steps x ``BB`` batch rows (a tile), all channels or a block of ``CB`` of them
(``QuasiRunConfig.cb``: then the tile's programs split its channels and a pass writes the new maps to a second
buffer, see the kernel); tile rows ``i = lb * R + j`` (batch row ``lb``, step ``j``), so each batch row's steps
are consecutive rows and the scans run along rows, restarted at ``j = 0`` by a zero multiplier.  Channels are
padded to ``DP = max(16, next_power_of_2(D))`` (masked).

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

from ._common import DOT_PRECISIONS, comb_diag, dot, gru_f_jdiag, rel_residual
from .pipelined_diag_gru import PassResult, prepare_weights

MIN_D, MAX_D = 9, 64  # D <= 8: the walker kernel (pipelined_dense_gru); wider: the look-back path
# Solves take this kernel up to USE_MAX_D only: where it was measured faster than the look-back iteration.
# benchmarks/bench_gru_quasi.py --pipelined, run 73 (H100, T = 1M; results/quasi_pipelined_sweep_run73.json),
# one iteration (pass + carry scan) at the best launch shape against the look-back iteration:
#   D = 16, B = 16: 4.41 ms (16 rows, 1 warp) against 6.26 ms;  D = 32, B = 16: 10.54 ms (16:1) against 11.37 ms;
#   D = 64, B = 8: 13.21 ms (32:4) against 11.39 ms (register-bound: ptxas spills at every shape tried).
USE_MAX_D = 32
# tile rows (R steps x BB batch rows), warps and channels per program by padded width DP (run 73: small tiles,
# one warp, won at 16 / 32)
TILES = {16: (16, 1, 16), 32: (16, 1, 32), 64: (32, 4, 64)}
MIN_RUN = 16  # batch rows per program shrink so that R >= MIN_RUN
BK = 16  # the GEMM's K chunk (channels of h_prev per tl.dot; 32 was no faster in run 73)
PRECISION = "tf32x3"  # the recurrent GEMM's inputs (see _common.dot): about fp32
ENABLED = True  # off: solves at 9 <= D <= USE_MAX_D take the look-back path instead (benchmarks compare the two)


class QuasiRunConfig(NamedTuple):
    r: int       # steps per run
    bb: int      # batch rows per program
    warps: int
    bk: int = BK  # the GEMM's K chunk
    cb: int = 0   # channels per program (a power of two >= 16); 0: all (the padded width)

    def splits(self, D: int) -> bool:
        """Whether the programs of a tile split its channels (then a pass needs a second maps buffer)."""
        return 0 < self.cb < padded(D)


def padded(D: int) -> int:
    """The channel tile of state size ``D``: ``max(16, next_power_of_2(D))``."""
    return max(16, triton.next_power_of_2(D))


def run_config(T: int, B: int, D: int = MAX_D, rows: Optional[int] = None, num_warps: Optional[int] = None,
               bk: Optional[int] = None, channels: Optional[int] = None) -> QuasiRunConfig:
    """Launch shape: ``rows`` (a power of two >= 16; default from ``TILES`` by the padded width) tile rows = R
    steps x BB batch rows, with BB the batch rounded up to a power of two but at most ``rows // MIN_RUN``;
    ``num_warps`` (default from ``TILES``); ``bk`` the GEMM's K chunk (a power of two >= 16, cut to the padded
    width); ``channels`` per program (a power of two >= 16, cut to the padded width; default from ``TILES``)."""
    dp = padded(D)
    tile_rows, tile_warps, tile_cb = TILES[min(MAX_D, dp)]
    rows = tile_rows if rows is None else rows
    num_warps = tile_warps if num_warps is None else num_warps
    bk = BK if bk is None else bk
    cb = tile_cb if channels is None else channels
    for name, v in (("rows", rows), ("bk", bk), ("channels", cb)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16; got {v}")
    bb = min(triton.next_power_of_2(max(B, 1)), max(1, rows // MIN_RUN))
    return QuasiRunConfig(rows // bb, bb, num_warps, bk, min(cb, dp))


def supports(D: int) -> bool:
    """Whether the kernel handles state size ``D``."""
    return MIN_D <= D <= MAX_D


@triton.jit
def _affine2(a1, c1, p1, a2, c2, p2):
    """:func:`seqpar.kernels._common.comb_diag` carrying two offsets: ``c`` the composed offset, ``p`` the composed multiplier of a run
    whose first element is ``(0, b_0, a_0)``."""
    return a1 * a2, a2 * c1 + c2, a2 * p1 + p2


@triton.jit
def _h_prev(Src, Bnd, Incl, St, off, b, t, j, run, cols, m, B, D, R: tl.constexpr, FIRST: tl.constexpr):
    """h_prev (float32, rows x ``cols``) of the tile's rows: row ``off - B * D`` of ``Src`` (the iterate: ``H``
    in the first pass, the just-stored ``Out`` later) except where that is not this program's: the state
    before the sequence (``Bnd``, first pass) or the run's carry (``St`` before run 0, ``Incl[run - 1]``)."""
    back = B * D
    if FIRST:
        head = (t == 0)[:, None]
        inside = (t > 0)[:, None]
        before = tl.load(Bnd + b[:, None] * D + cols[None, :], mask=m & head, other=0.0)
    else:
        head = (j == 0)[:, None]
        inside = (j > 0)[:, None]
        first_run = (t < R)[:, None]  # run 0 (as a tensor: the interpreter takes no scalar masks)
        cof = b[:, None] * D + cols[None, :]
        before = tl.where(first_run, tl.load(St + cof, mask=m & head & first_run, other=0.0).to(Src.dtype.element_ty),
                          tl.load(Incl + (run - 1).to(tl.int64) * back + cof, mask=m & head & (t >= R)[:, None],
                                  other=0.0).to(Src.dtype.element_ty))
    inner = tl.load(Src + off - back, mask=m & inside, other=0.0)
    return tl.where(head, before.to(tl.float32), inner.to(tl.float32))


@triton.jit
def _quasi_pass_kernel(Maps, MapsOut, XP, W, BH, H, Bnd, Incl, St, Out, SumA, SumC, Res, Stop,
                       T, B, D, n_bb, NPROG, map_stride, sx_t, sx_b, sx_c,
                       R: tl.constexpr, BB: tl.constexpr, DP: tl.constexpr, CB: tl.constexpr, BK: tl.constexpr,
                       FIRST: tl.constexpr, GUARD: tl.constexpr, PREC: tl.constexpr):
    """One pass (see the module).  FIRST: the maps at the iterate ``H`` (state before step 0: ``Bnd``);
    else the new iterate from the maps ``Maps`` and the carries (``St`` before run 0, ``Incl[r - 1]`` before
    run r), stored to ``Out``, and the maps at it.  Both: the new maps to ``MapsOut``, summaries,
    ``Res[pid]`` / ``Res[NPROG + pid]`` the partial maxima of the residual and |f|.

    Program ``pid``: tile ``pid // NCB`` (a run of R steps x BB batch rows) and its channel block
    ``pid % NCB`` of ``CB`` channels (``NCB = DP // CB``).  Every program of a tile scans all channels (the
    GEMM needs all of h_prev) and stores the same new iterate; it computes the gates, residual, maps and
    summaries of its own channels only.  With ``CB < DP`` a program reads maps its siblings overwrite, so
    ``MapsOut`` must be another buffer; with ``CB == DP`` it may be ``Maps`` (each program reads and writes
    only its own rows).  The GEMM walks K in chunks of ``BK`` channels (h_prev's chunks re-read from L1/L2),
    so no operand is held whole in registers."""
    if GUARD:
        if tl.load(Stop) != 0:
            return
    pid = tl.program_id(0)
    NCB: tl.constexpr = DP // CB
    tile = pid // NCB
    run = tile // n_bb
    i = tl.arange(0, BB * R)
    j = i % R
    b = (tile % n_bb) * BB + i // R
    t = run.to(tl.int64) * R + j
    rv = (t < T) & (b < B)
    c = (pid % NCB) * CB + tl.arange(0, CB)  # this program's channels
    cm = c < D
    m = rv[:, None] & cm[None, :]
    row = (t * B + b)[:, None] * D
    off = row + c[None, :]
    head = (j == 0)[:, None]
    if FIRST:
        Src = H
        hc = tl.load(H + off, mask=m, other=0.0).to(tl.float32)
    else:
        Src = Out
        ca = tl.arange(0, DP)  # all channels: the new iterate of the whole run
        m_all = rv[:, None] & (ca < D)[None, :]
        offa = row + ca[None, :]
        carry = _h_prev(Out, Bnd, Incl, St, offa, b, t, j, run, ca, m_all & head, B, D, R, False)
        ma = tl.load(Maps + offa, mask=m_all, other=0.0)
        mb = tl.load(Maps + map_stride + offa, mask=m_all, other=0.0)
        mb = tl.where(head, ma * carry + mb, mb)  # a run starts from its carry: no dependence on the row before
        ma = tl.where(head, 0.0, ma)
        _, hs = tl.associative_scan((ma, mb), 0, comb_diag)
        tl.store(Out + offa, hs.to(Out.dtype.element_ty), mask=m_all)  # siblings store the same values
        tl.debug_barrier()  # the run's stores are visible to the whole program: read back one step behind
        if NCB == 1:
            hc = hs.to(Out.dtype.element_ty).to(tl.float32)
        else:
            hc = tl.load(Out + off, mask=m, other=0.0).to(tl.float32)
    # the recurrent GEMM h_prev @ W_g^T per gate g (W_g: rows g * D .. g * D + D - 1 of W (3D, D))
    hr = tl.zeros([BB * R, CB], tl.float32)
    hz = tl.zeros([BB * R, CB], tl.float32)
    hn = tl.zeros([BB * R, CB], tl.float32)
    for k0 in range(0, DP, BK):
        k = k0 + tl.arange(0, BK)
        km = k < D
        hpk = _h_prev(Src, Bnd, Incl, St, row + k[None, :], b, t, j, run, k, rv[:, None] & km[None, :], B, D, R,
                      FIRST)
        wo = c[None, :] * D + k[:, None]  # [k, j] -> W[g D + j, k]
        wm = km[:, None] & cm[None, :]
        hr += dot(hpk, tl.load(W + wo, mask=wm, other=0.0), PREC)
        hz += dot(hpk, tl.load(W + D * D + wo, mask=wm, other=0.0), PREC)
        hn += dot(hpk, tl.load(W + 2 * D * D + wo, mask=wm, other=0.0), PREC)
    hr += tl.load(BH + c, mask=cm, other=0.0)[None, :]
    hz += tl.load(BH + D + c, mask=cm, other=0.0)[None, :]
    hn += tl.load(BH + 2 * D + c, mask=cm, other=0.0)[None, :]
    hp = _h_prev(Src, Bnd, Incl, St, off, b, t, j, run, c, m, B, D, R, FIRST)
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
    tl.store(MapsOut + off, jd, mask=m)
    tl.store(MapsOut + map_stride + off, nb, mask=m)
    # run summaries of the new maps: rows past T are identities, so the run's last row holds its composition
    na = tl.where(m, jd, 1.0)
    nb = tl.where(m, nb, 0.0)
    _, sc, sa = tl.associative_scan((tl.where(head, 0.0, na), nb, tl.where(head, na, 0.0)), 0, _affine2)
    so = (run.to(tl.int64) * B + b)[:, None] * D + c[None, :]
    last = ((j == R - 1) & (b < B))[:, None] & cm[None, :]
    tl.store(SumA + so, sa, mask=last)
    tl.store(SumC + so, sc, mask=last)


def new_maps(T: int, B: int, D: int, device) -> torch.Tensor:
    """A maps buffer of this kernel's passes: float32 (2, T, B, D).  A pipeline keeps one between passes, or
    two when its programs split the channels (:meth:`QuasiRunConfig.splits`): a pass reads one, writes the
    other."""
    return torch.empty(2, T, B, D, dtype=torch.float32, device=device)


def _check_maps(name: str, maps, shape) -> None:
    if maps.shape != (2, *shape) or maps.dtype != torch.float32 or not maps.is_contiguous():
        raise ValueError(f"{name} must be float32 contiguous (2, T, B, D) = {(2, *shape)}; got "
                         f"{tuple(maps.shape)} {maps.dtype}")


def _launch(first: bool, maps, xp, w, bh, h, boundary, incl, start, out, cfg: QuasiRunConfig, stop, precision,
            maps_out=None):
    T, B, D = maps.shape[1:]
    if not supports(D):
        raise ValueError(f"the pipelined quasi-Newton GRU kernel supports {MIN_D} <= D <= {MAX_D}; got D={D}")
    _check_maps("maps", maps, (T, B, D))
    if xp.shape != (T, B, 3 * D) or w.shape != (3 * D, D):
        raise ValueError(f"expected xp (T, B, 3D), weight_hh (3D, D) with (T, B, D) = {(T, B, D)} of maps; got "
                         f"{tuple(xp.shape)}, {tuple(w.shape)}")
    if maps_out is None:
        if not first and cfg.splits(D):
            raise ValueError(f"cfg splits the channels (cb={cfg.cb} < {padded(D)}): pipelined_step needs maps_out, "
                             f"a second buffer")
        maps_out = maps
    else:
        _check_maps("maps_out", maps_out, (T, B, D))
        if maps_out.data_ptr() == maps.data_ptr() and not first and cfg.splits(D):
            raise ValueError("maps_out must be another buffer than maps when cfg splits the channels")
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
    dp = padded(D)
    cb = min(cfg.cb or dp, dp)
    grid = (n_runs * n_bb * (dp // cb),)
    part = torch.empty(2, grid[0], dtype=torch.float32, device=dev)
    if first:
        h, boundary = h.contiguous(), boundary.contiguous()
        h_arg, bnd_arg, incl_arg, st_arg, out_arg = h, boundary, sum_c, boundary, h
    else:
        h_arg, bnd_arg, incl_arg, st_arg, out_arg = out, start, incl.contiguous(), start.contiguous(), out
    _quasi_pass_kernel[grid](maps, maps_out, xp, w, bh, h_arg, bnd_arg, incl_arg, st_arg, out_arg, sum_a, sum_c, part,
                             part if stop is None else stop, T, B, D, n_bb, grid[0], T * B * D, *xp.stride(),
                             R=cfg.r, BB=cfg.bb, DP=dp, CB=cb, BK=min(dp, cfg.bk), FIRST=first,
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
                   cfg or run_config(*h.shape), stop, precision)


def pipelined_step(xp, weight_hh, bias_hh, maps, incl, start, out=None, cfg: Optional[QuasiRunConfig] = None,
                   stop=None, precision: str = PRECISION, maps_out=None) -> PassResult:
    """One quasi-Newton iteration: the new iterate ``out`` (T, B, D, ``start``'s dtype) from the maps in ``maps``
    (which the previous pass wrote), ``incl`` (n_runs, B, D) the inclusive scan of that pass's summaries from
    ``start`` (B, D, the new iterate's state before step 0).  The maps at the new iterate go to ``maps_out``
    (default ``maps``, replaced in place; another buffer when ``cfg`` splits the channels).  Returns the new
    iterate's summaries and residual (``stop``: as :func:`first_pass`)."""
    w, bh = prepare_weights(weight_hh, bias_hh)
    return _launch(False, maps, xp, w, bh, None, None, incl, start, out, cfg or run_config(*maps.shape[1:]), stop,
                   precision, maps_out)
