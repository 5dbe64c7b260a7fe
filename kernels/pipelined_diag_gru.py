"""Pipelined Newton pass of :class:`seqpar.cells.DiagGRU` (exact, diagonal Jacobian): no look-back.

A Newton iteration needs the incoming state of every piece of the sequence,
and that state depends on all earlier pieces.  The look-back kernels
(:mod:`seqpar.kernels.fused_diag_gru`) resolve it inside the pass, as a chain
of tiles; at narrow widths (B * D <= 256) that chain, not memory, bounds the
pass.  Here the dependency is moved *between* passes instead:

* The sequence is cut into **runs** of ``R`` consecutive steps of one lane;
  each thread walks its runs in order, in registers (no cross-thread
  communication inside the pass).
* Pass k reads the iterate ``h^k`` and the projected inputs, re-derives the
  linearised maps ``(J^k_t, b^k_t)`` at ``h^k_{t-1}`` and applies them from the
  run's carry, writing ``h^{k+1}``.  With ``h^{k+1}`` in registers it evaluates
  ``f(h^{k+1}_{t-1})``: the residual of ``h^{k+1}`` and the maps of the *next*
  iteration, which it reduces to one summary ``(A, C)`` per run
  (``x -> A x + C``, the composition of the run's maps).
* A program walks a **group** of ``S`` consecutive runs (x ``BN`` lanes); at the end
  of the pass it composes their summaries with an in-register associative scan
  and stores each run's group prefix (the group's maps up to that run).
* Between passes one small launch (:func:`scan_groups`) scans only the group
  totals (n_runs / S rows) from the shard's incoming state: the group carries.
  The next pass starts run s of a group from the group carry through the stored
  prefix of run s - 1.  Where that scan is short and the next start is known (one
  rank), the pass's last program to finish can do it (``next_start``, :func:`fuses`;
  off by default, ``FUSE_MAX_ELEMENTS``).  On P ranks the shard's composed map (:func:`compose`) is
  what the ranks exchange.

So one pass reads ``h^k`` and the inputs once and writes ``h^{k+1}`` once: the
minimum bytes of a Newton iteration, plus ``4 / R`` of a state for the prefixes
(written, then read by the next pass).
A first, summary-only pass (``first_pass``) starts the pipeline from the
initial guess.

Shapes: ``h`` (T, B, D), ``xp`` (T, B, 3D) of any strides (one lane's gate g at channel g * D + d; the
gate-major layout of :meth:`seqpar.cells.GRU.project_inputs` at D = 1 makes every gate's load
contiguous across lanes), ``weight_hh`` (3D,), ``bias_hh``
(3D,) or None, boundaries (B, D); group prefixes float32 (n_runs, B*D) with
``n_runs = ceil(T / R)``; carries (n_groups, B*D), ``n_groups = ceil(n_runs / S)``.
A cell with one input feature can skip the projected inputs altogether: with ``proj``
(:func:`prepare_projection`) ``xp`` is the raw inputs (T, B, 1), projected inside each pass (it reads 4
bytes of input per batch row and step instead of 12 per state, and no projection runs before the solve).
Reference: :func:`pipelined_step_reference` (and
``seqpar.newton``'s ``cell.step`` / ``cell.jacobian`` + ``affine_scan``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import comb_diag, gru_f_jdiag, rcp_fast
from .stopping import HISTORY, RECORD_BLOCK, record_partials

# Run length, lanes per program and warps by lane count N = B * D (first key >= N; "wide" beyond).
# Runs of R steps: the summaries cost 2/R of a state per pass, and T * N / R threads must fill the GPU
# (run_length() shortens R for short sequences).
RUNS = {  # benchmarks/bench_pipeline.py --sweep, run 29 (H200, B=16, T=2^20): one iteration, x minimum bytes
    # 16: one step's loads in flight (pf=1; was 0): run 68 (H100, copy bandwidth 3036 GB/s measured in the same
    # process) timed one iteration at T = 1M / 10M at 0.1460 / 1.2965 ms (1.38x / 1.23x min bytes) against
    # 0.1614 / 1.4121 ms (1.53x / 1.34x) without; 1, 2 or 8 warps and 8 or 32 runs per program were slower
    16: dict(r=64, bn=16, s=16, warps=4, pf=1),    # run 29 (H200, pf=0): 2.85x (look-back kernel: 7.4x)
    # 64: runs of 64, 8 per program (was 32 and 4): 2-3 % faster in every shape timed, run 50 (H200, B=16, T=1M:
    # 1.49x against 1.53x) and run 60 (H100; B=16 T=1M / 10M, B=1 D=64 T=10M: 0.540 / 5.134 / 4.514 ms against
    # 0.550 / 5.237 / 4.572 ms per iteration, results/n64_configs_run60.log)
    64: dict(r=64, bn=64, s=8, warps=4, pf=2),     # run 29: 1.85x (5.8x)
    256: dict(r=64, bn=128, s=2, warps=4, pf=1),   # 1.36x (2.9x)
    1024: dict(r=64, bn=128, s=2, warps=4, pf=1),  # 1.28x (2.4x)
    "wide": dict(r=64, bn=128, s=2, warps=4, pf=1),
}
MIN_THREADS = 2**17  # shorten runs until T * N / R reaches this many walkers (or R reaches MIN_RUN)
MIN_RUN = 4
# scan_groups: lanes per program, group totals per associative scan, most groups walked by one launch
GROUP_SCAN_BN, GROUP_SCAN_CH, GROUP_SCAN_WALK = 32, 256, 64
# ... in chunks of GROUP_SCAN_CH_SHORT up to GROUP_SCAN_SHORT groups: run 66 (H100, B*D = 16) took one GRU(1, 1)
# solve's graphed passes (T = 100k, 782 groups) from 182 to 145 us and one T = 1M iteration (977 groups) from 0.171
# to 0.161 ms with three launches over 64-group chunks instead of one program scanning all groups as one tile
# (15-17 us per pass in run 65's timeline); beyond that, chunks of GROUP_SCAN_CH as before
GROUP_SCAN_CH_SHORT, GROUP_SCAN_SHORT = 64, 1024
# ... except that up to GROUP_SCAN_TILE totals (lanes x groups, powers of two) are scanned as one tile, with a
# warp per GROUP_SCAN_TILE_PER_WARP of them: at B*D = 16, T = 100k (782 groups) the four-chunk walk was as
# long as the pass itself (11.5 us against 10-14 us, H100, profile_short_solve.py)
GROUP_SCAN_TILE, GROUP_SCAN_TILE_PER_WARP = 16384, 1024
# a pass fuses the scan of its group totals (one launch and the residual reduction less per iteration)
# when its last program's walk is at most this many totals; lanes and totals per step of that walk.
# Off (0): run 38 (2 x H200 host, B=16, 5 repeats) measured the fused solves at 3.11 ms against 2.54 ms
# unfused for GRU(1, 1), T=1M, and 2.47 against 1.37 ms for DiagGRU D=4, T=100k (faster only for GRU(1, 1)
# at T=100k, 1.80 against 2.31 ms).  The tests set 2**16.
FUSE_MAX_ELEMENTS = 0
FUSE_TB, FUSE_TCH = 32, 256
# a guarded pass (``stop``: CUDA graphs) records its residual into the stopping state in its last program, instead of
# a stopping.record launch after it (one launch less per pass).  Off: run 71 (H100, GRU(1, 1), B = 16, T = 100k,
# alternating processes, results/record_ab_run71.log) timed 229.8 / 199.4 / 210.2 us off against 213.7 / 202.1 /
# 198.4 us on, within the processes' noise
RECORD_IN_PASS = False


class RunConfig(NamedTuple):
    r: int       # steps per run
    bn: int      # lanes per program
    s: int       # runs per program
    warps: int
    prefetch: int  # steps whose loads are in flight ahead of the one computed (0, 1 or 2)


@triton.jit
def _gru_f_jdiag(hp, xr, xz, xn, wr, wz, wn, br, bz, bn):
    """DiagGRU step f(hp) and d f / d hp (diagonal) from the projected inputs."""
    return gru_f_jdiag(hp, xr, xz, xn, wr * hp + br, wz * hp + bz, wn * hp + bn, wr, wz, wn)


@triton.jit
def _per_gate(P, d, D, lmask):
    """The three gates' values (1, BN) of units ``d`` from a (3D,) vector: ``P[g * D + d]``."""
    return (tl.load(P + d, mask=lmask, other=0.0)[None, :], tl.load(P + D + d, mask=lmask, other=0.0)[None, :],
            tl.load(P + 2 * D + d, mask=lmask, other=0.0)[None, :])


@triton.jit
def _load_step(H, XP, t0, k, R: tl.constexpr, T, N, XT, XG, lanes, xcol, m0, PROJ: tl.constexpr):
    """h and the three projected gate inputs of step ``k`` of every run (zeros past the run / T):
    gate g of a lane at ``XP + t * XT + xcol + g * XG``.  PROJ: ``XP`` holds the raw scalar input of
    each batch row, loaded once and returned for the three gates (:func:`_project` maps it)."""
    t = t0 + k
    m = m0 & ((t < T) & (k < R))[:, None]
    xo = t[:, None] * XT + xcol
    hk = tl.load(H + t[:, None] * N + lanes[None, :], mask=m, other=0.0).to(tl.float32)
    xr = tl.load(XP + xo, mask=m, other=0.0).to(tl.float32)
    if PROJ:
        xz = xr
        xn = xr
    else:
        xz = tl.load(XP + xo + XG, mask=m, other=0.0).to(tl.float32)
        xn = tl.load(XP + xo + 2 * XG, mask=m, other=0.0).to(tl.float32)
    return hk, xr, xz, xn


@triton.jit
def _project(xr, xz, xn, pwr, pwz, pwn, pbr, pbz, pbn, PROJ: tl.constexpr):
    """The gates' projected inputs: as loaded, or (PROJ) ``pw * x + pb`` per gate of the raw input x."""
    if PROJ:
        return pwr * xr + pbr, pwz * xz + pbz, pwn * xn + pbn
    return xr, xz, xn


@triton.jit
def _pipelined_diag_gru_kernel(H, XP, W, BH, WI, BI, Bnd, PrevA, PrevC, Carry, St, Out, SumA, SumC, Res,
                               Counter, NextSt, NextCarry, Stats, Stop, T, D, N, n_runs, NPROG, XT, XB, XC,
                               R: tl.constexpr, S: tl.constexpr, BN: tl.constexpr, PF: tl.constexpr,
                               FIRST: tl.constexpr, FUSE: tl.constexpr, TB: tl.constexpr, TCH: tl.constexpr,
                               GUARD: tl.constexpr, PROJ: tl.constexpr, RECORD: tl.constexpr,
                               HIST: tl.constexpr, RBLOCK: tl.constexpr):
    """Program (pid_r, pid_n): group ``pid_r`` (runs ``pid_r * S + [0, S)``) x lanes ``pid_n * BN + [0, BN)``.

    FIRST: group prefixes of the maps at ``H`` (linearised at H_{t-1}, ``Bnd`` before step 0) and the
    residual of H.  Else: the new iterate into ``Out``, each run starting from its carry: the group's
    carry (``Carry[pid_r - 1]``, ``St`` for group 0) through the previous pass's group prefix of the runs
    before it (``PrevA``/``PrevC`` at run r - 1); then the group prefixes / residual of the new iterate.
    Group prefixes: row r of ``SumA``/``SumC`` is the composition of the group's runs up to r.
    FUSE: the last program to finish (``Counter``, zero before the launch and after it) also writes the
    next pass's carries from ``NextSt`` (``NextCarry``, as :func:`scan_groups`) and the residual
    ``Stats`` (2,), walking TB lanes and TCH groups at a time.
    GUARD: a no-op if ``Stop[0]`` (a :mod:`seqpar.kernels.stopping` state) is nonzero.  RECORD (with GUARD): the
    last program to finish (``Counter``, as FUSE) records the largest residual partial into that state
    (:func:`seqpar.kernels.stopping.record_partials`).
    PROJ: ``XP`` holds the raw inputs of a one-feature cell (read at ``t * XT + b * XB``, ``XC`` = 0), projected
    here: gate g of unit d gets ``WI[g * D + d] * x + BI[g * D + d]`` (no projected-inputs tensor at all)."""
    if GUARD:
        if tl.load(Stop) != 0:
            return
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    lanes = pid_n * BN + tl.arange(0, BN)
    lmask = lanes < N
    s_in = tl.arange(0, S)
    runs = pid_r * S + s_in
    m0 = (runs < n_runs)[:, None] & lmask[None, :]
    d = lanes % D
    wr, wz, wn = _per_gate(W, d, D, lmask)
    br, bz, bn = _per_gate(BH, d, D, lmask)
    if PROJ:
        pwr, pwz, pwn = _per_gate(WI, d, D, lmask)
        pbr, pbz, pbn = _per_gate(BI, d, D, lmask)
    else:  # (not read)
        pwr, pwz, pwn, pbr, pbz, pbn = wr, wz, wn, br, bz, bn
    xcol = ((lanes // D).to(tl.int64) * XB + d * XC)[None, :]  # xp of lane (b, d), gate 0: b * XB + d * XC
    XG = D * XC
    t0 = runs.to(tl.int64) * R                     # first step of each run (S,)
    first_run = (runs == 0)[:, None]
    hk_prev = tl.load(H + (t0 - 1)[:, None] * N + lanes[None, :], mask=m0 & (t0 > 0)[:, None], other=0.0)
    bnd = tl.load(Bnd + lanes, mask=lmask, other=0.0).to(tl.float32)[None, :]
    hk_prev = tl.where(first_run, bnd, hk_prev.to(tl.float32))
    if not FIRST:
        carry = _carry_in(Carry, St, pid_r, N, lanes, lmask)
        po = (runs.to(tl.int64) - 1)[:, None] * N + lanes[None, :]
        pm = m0 & (s_in > 0)[:, None]               # the group's first run starts from the carry itself
        hn_prev = (tl.load(PrevA + po, mask=pm, other=1.0) * carry[None, :]
                   + tl.load(PrevC + po, mask=pm, other=0.0))
    A = tl.full([S, BN], 1.0, tl.float32)
    C = tl.zeros([S, BN], tl.float32)
    rel = tl.zeros([S, BN], tl.float32)
    fmx = tl.zeros([S, BN], tl.float32)
    # software prefetch: the loads of the next PF steps are in flight while a step is computed
    # (the store to Out between steps would otherwise keep the compiler from hoisting them)
    ha, ra, za, na = _load_step(H, XP, t0, 0, R, T, N, XT, XG, lanes, xcol, m0, PROJ)
    if PF == 2:
        hb, rb, zb, nb = _load_step(H, XP, t0, 1, R, T, N, XT, XG, lanes, xcol, m0, PROJ)
    for k in range(R):
        t = t0 + k
        m = m0 & (t < T)[:, None]
        off = t[:, None] * N + lanes[None, :]
        hk, xr, xz, xn = ha, ra, za, na
        if PF == 2:
            ha, ra, za, na = hb, rb, zb, nb
            hb, rb, zb, nb = _load_step(H, XP, t0, k + 2, R, T, N, XT, XG, lanes, xcol, m0, PROJ)
        elif PF == 1:
            ha, ra, za, na = _load_step(H, XP, t0, k + 1, R, T, N, XT, XG, lanes, xcol, m0, PROJ)
        else:
            hk, xr, xz, xn = _load_step(H, XP, t0, k, R, T, N, XT, XG, lanes, xcol, m0, PROJ)
        xr, xz, xn = _project(xr, xz, xn, pwr, pwz, pwn, pbr, pbz, pbn, PROJ)
        if FIRST:
            hc = hk
            hp = hk_prev
        else:
            f, jd = _gru_f_jdiag(hk_prev, xr, xz, xn, wr, wz, wn, br, bz, bn)
            hc = jd * hn_prev + (f - jd * hk_prev)
            hc = hc.to(Out.dtype.element_ty)
            tl.store(Out + off, hc, mask=m)
            hc = hc.to(tl.float32)  # what the next pass reads back
            hp = hn_prev
            hn_prev = tl.where(m, hc, hn_prev)
        f2, j2 = _gru_f_jdiag(hp, xr, xz, xn, wr, wz, wn, br, bz, bn)
        j2 = tl.where(m, j2, 1.0)
        A = j2 * A
        C = j2 * C + tl.where(m, f2 - j2 * hp, 0.0)
        fab = tl.where(m, tl.abs(f2), 0.0)
        r = tl.abs(hc - f2) * rcp_fast(tl.maximum(fab, 1.0))  # 1 ulp: a residual
        r = tl.where(m, tl.where(r == r, r, float("inf")), 0.0)  # NaN -> inf: reported as divergence
        rel = tl.maximum(rel, r)
        fmx = tl.maximum(fmx, tl.where(fab == fab, fab, float("inf")))
        hk_prev = hk
    A, C = tl.associative_scan((A, C), 0, comb_diag)  # runs past n_runs / T are identities
    so = runs.to(tl.int64)[:, None] * N + lanes[None, :]
    tl.store(SumA + so, A, mask=m0)
    tl.store(SumC + so, C, mask=m0)
    pid = pid_r * tl.num_programs(1) + pid_n
    tl.store(Res + pid, tl.max(tl.max(rel, 1), 0))
    tl.store(Res + NPROG + pid, tl.max(tl.max(fmx, 1), 0))
    if FUSE or RECORD:  # the last program to finish: the group totals' scan (FUSE), the record (RECORD)
        tl.debug_barrier()  # every thread's stores above precede the release of the counter
        if tl.atomic_add(Counter, 1, sem="acq_rel") == NPROG - 1:
            if RECORD:
                record_partials(Res, NPROG, Stop, HIST, RBLOCK)
            if FUSE:
                _fused_tail(SumA, SumC, Res, NextSt, NextCarry, Stats, N, n_runs, NPROG, S, TB, TCH)
            tl.atomic_xchg(Counter, 0)  # ready for the next pass


@triton.jit
def _fused_tail(SumA, SumC, Res, NextSt, NextCarry, Stats, N, n_runs, NPROG, S: tl.constexpr, TB: tl.constexpr,
                TCH: tl.constexpr):
    """FUSE's last program: the next pass's carries from ``NextSt`` and the residual ``Stats`` (2,)."""
    for l0 in range(0, N, TB):
        tlanes = l0 + tl.arange(0, TB)
        tlm = tlanes < N
        h = tl.load(NextSt + tlanes, mask=tlm, other=0.0).to(tl.float32)
        _walk_groups(SumA, SumC, h, NextCarry, tlanes, tlm, n_runs, tl.num_programs(0), N, S, TCH)
    mx0 = tl.zeros([TCH], tl.float32)
    mx1 = tl.zeros([TCH], tl.float32)
    for p0 in range(0, NPROG, TCH):
        p = p0 + tl.arange(0, TCH)
        mx0 = tl.maximum(mx0, tl.load(Res + p, mask=p < NPROG, other=0.0, cache_modifier=".cg"))
        mx1 = tl.maximum(mx1, tl.load(Res + NPROG + p, mask=p < NPROG, other=0.0, cache_modifier=".cg"))
    tl.store(Stats, tl.max(mx0, 0))
    tl.store(Stats + 1, tl.max(mx1, 0))


@triton.jit
def _carry_in(Carry, St, k, N, lanes, lm):
    """The state before block ``k`` of a scan, float32 (lanes,): row ``k - 1`` of ``Carry`` (rows of N),
    ``St`` for k == 0."""
    after_first = (tl.zeros_like(lanes) + k) > 0
    h = tl.load(Carry + (k - 1).to(tl.int64) * N + lanes, mask=lm & after_first, other=0.0)
    return tl.where(after_first, h, tl.load(St + lanes, mask=lm, other=0.0).to(tl.float32))


@triton.jit
def _scan_totals(SumA, SumC, g, lanes, lm, n_runs, n_groups, N, G: tl.constexpr):
    """``(a, c, m)``: the inclusive compositions, along ``g`` (CH,), of the totals of groups ``g`` (the
    prefix at each group's last run; identities past n_groups) for ``lanes``, and their mask.  Loads
    bypass L1: the fused tail reads what other programs of its own launch wrote."""
    m = (g < n_groups)[:, None] & lm[None, :]
    src = tl.minimum(g * G + G - 1, n_runs - 1)[:, None] * N + lanes[None, :]
    a, c = tl.associative_scan((tl.load(SumA + src, mask=m, other=1.0, cache_modifier=".cg"),
                                tl.load(SumC + src, mask=m, other=0.0, cache_modifier=".cg")), 0, comb_diag)
    return a, c, m


@triton.jit
def _walk_groups(SumA, SumC, h, Out, lanes, lm, n_runs, n_groups, N, G: tl.constexpr, CH: tl.constexpr):
    """Store the states after every group (``Out`` (n_groups, N)) of ``lanes``, from ``h``, walking the
    group totals CH at a time."""
    rows = tl.arange(0, CH)
    for c0 in range(0, n_groups, CH):
        g = (c0 + rows).to(tl.int64)
        a, c, m = _scan_totals(SumA, SumC, g, lanes, lm, n_runs, n_groups, N, G)
        hs = a * h[None, :] + c
        tl.store(Out + g[:, None] * N + lanes[None, :], hs, mask=m)
        h = tl.sum(tl.where((rows == CH - 1)[:, None], hs, 0.0), 0)  # masked rows are identities


@triton.jit
def _group_scan_kernel(SumA, SumC, St, Out, n_runs, n_groups, N,
                       G: tl.constexpr, CH: tl.constexpr, BN: tl.constexpr):
    """Program = lanes ``pid * BN + [0, BN)``: the states after every group (``Out`` (n_groups, N))
    from ``St`` (:func:`_walk_groups`)."""
    lanes = tl.program_id(0) * BN + tl.arange(0, BN)
    lm = lanes < N
    h = tl.load(St + lanes, mask=lm, other=0.0).to(tl.float32)
    _walk_groups(SumA, SumC, h, Out, lanes, lm, n_runs, n_groups, N, G, CH)


@triton.jit
def _chunk_scan_kernel(SumA, SumC, Carry, St, OutA, OutC, n_runs, n_groups, N,
                       G: tl.constexpr, CH: tl.constexpr, BN: tl.constexpr, APPLY: tl.constexpr):
    """Program (chunk c of CH groups, lanes ``pid_n * BN + [0, BN)``) over the group totals.  Not APPLY:
    the chunk's composed map into ``OutA``/``OutC`` row c.  APPLY: the states after each of its groups
    into ``OutA`` (n_groups, N), from the chunk's carry (``Carry[c - 1]``, ``St`` for chunk 0)."""
    c_id = tl.program_id(0)
    lanes = tl.program_id(1) * BN + tl.arange(0, BN)
    lm = lanes < N
    rows = tl.arange(0, CH)
    g = (c_id * CH + rows).to(tl.int64)
    a, c, m = _scan_totals(SumA, SumC, g, lanes, lm, n_runs, n_groups, N, G)
    if APPLY:
        h = _carry_in(Carry, St, c_id, N, lanes, lm)
        tl.store(OutA + g[:, None] * N + lanes[None, :], a * h[None, :] + c, mask=m)
    else:
        last = (rows == CH - 1)[:, None]
        tl.store(OutA + c_id.to(tl.int64) * N + lanes, tl.sum(tl.where(last, a, 0.0), 0), mask=lm)
        tl.store(OutC + c_id.to(tl.int64) * N + lanes, tl.sum(tl.where(last, c, 0.0), 0), mask=lm)


def run_length(T: int, walkers_per_run: int, r: int, min_walkers: int, run: Optional[int] = None) -> int:
    """``run`` if given (>= 1), else ``r`` halved (down to ``MIN_RUN``) while fewer than ``min_walkers``
    walkers (``ceil(T / r) * walkers_per_run``) would run."""
    if run is not None:
        if run < 1:
            raise ValueError(f"run must be >= 1; got {run}")
        return run
    while r > MIN_RUN and triton.cdiv(T, r) * walkers_per_run < min_walkers:
        r //= 2
    return r


def run_config(T: int, N: int, run: Optional[int] = None, block_n: Optional[int] = None,
               runs_per_program: Optional[int] = None, num_warps: Optional[int] = None,
               prefetch: Optional[int] = None) -> RunConfig:
    """The launch shape for T steps of N lanes: from ``RUNS`` (first key >= N), with the run
    shortened (halved, down to ``MIN_RUN``) while fewer than ``MIN_THREADS`` walkers would run.
    Arguments that are not None override the table."""
    key = next((k for k in sorted(k for k in RUNS if k != "wide") if N <= k), "wide")
    cfg = RUNS[key]
    r = run_length(T, N, cfg["r"], MIN_THREADS, run)
    bn = cfg["bn"] if block_n is None else block_n
    while block_n is None and bn > 16 and bn // 2 >= N:
        bn //= 2
    s = cfg["s"] if runs_per_program is None else runs_per_program
    if block_n is None and runs_per_program is None:
        s = max(1, cfg["s"] * cfg["bn"] // bn)
    pf = cfg["pf"] if prefetch is None else prefetch
    if pf not in (0, 1, 2):
        raise ValueError(f"prefetch must be 0, 1 or 2; got {pf}")
    return RunConfig(r, bn, s, cfg["warps"] if num_warps is None else num_warps, pf)


class PassResult(NamedTuple):
    """One pipelined pass: ``out`` the new iterate (None for the first pass), ``sum_a``/``sum_c`` float32
    summaries of the maps linearised at it, ``stats`` float32 ``[max elementwise |h - f| / max(1, |f|),
    max |f|]`` of that iterate (NaN/Inf as inf).  The runs are taken in groups of ``group`` consecutive
    runs: row r of the summaries is the composition of the maps of its group's runs up to and including
    run r (``group == 1``: each run's own summary).  Diagonal kernel: (n_runs, N); dense kernel: see
    :mod:`seqpar.kernels.pipelined_dense_gru`."""
    out: Optional[torch.Tensor]
    sum_a: torch.Tensor
    sum_c: torch.Tensor
    stats: torch.Tensor
    group: int = 1
    carry: Optional[torch.Tensor] = None  # the next pass's carries, where the pass computed them (fused)
    recorded: bool = False  # the pass recorded its residual into its ``stop`` state itself (RECORD_IN_PASS)


def prepare_weights(weight_hh, bias_hh):
    """``(w, b)``: the recurrent weights (3D,) here, (3D, D) for the dense kernel, and the bias (3D,)
    (zeros if None) as the pipelined kernels read them (float32, contiguous, detached).  Done once per
    solve, not per pass (then a no-op in every launch)."""
    w = weight_hh.detach().to(torch.float32).contiguous()
    b = (torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if bias_hh is None
         else bias_hh.detach().to(torch.float32).contiguous())
    return w, b


def prepare_projection(weight_ih, bias_ih):
    """``(w, b)`` (3D,) float32 each: the input projection ``xp = w * x + b`` of a one-feature cell
    (``weight_ih`` (3D, 1), ``bias_ih`` (3D,) or None: zeros), as the passes read it with ``proj``."""
    return prepare_weights(weight_ih.reshape(-1), bias_ih)


def fuses(n_groups: int, N: int) -> bool:
    """Whether a pass also scans its group totals in its last program (``next_start`` given): only where
    that one program's walk (n_groups x N totals) is short; else :func:`scan_groups` launches."""
    return 0 < n_groups * N <= FUSE_MAX_ELEMENTS


def _launch(first: bool, h, xp, w, bh, boundary, prev, carry, start, out, cfg: RunConfig,
            next_start=None, counter=None, stop=None, proj=None):
    T, B, D = h.shape
    N = B * D
    dev = h.device
    n_runs = triton.cdiv(T, cfg.r) if T else 0
    sums = torch.empty(2, n_runs, N, dtype=torch.float32, device=dev)
    if T == 0:
        return PassResult(None if first else (torch.empty_like(h) if out is None else out), sums[0], sums[1],
                          torch.zeros(2, dtype=torch.float32, device=dev), cfg.s)
    w, bh = prepare_weights(w, bh)  # no-ops when prepared once per solve
    h, boundary = h.contiguous(), boundary.contiguous()  # xp: any strides (e.g. gate-major, see GRU)
    grid = (triton.cdiv(n_runs, cfg.s), triton.cdiv(N, cfg.bn))
    n_prog = grid[0] * grid[1]
    part = torch.empty(2, n_prog, dtype=torch.float32, device=dev)
    if first:
        out_arg, prev_a, prev_c, carry_arg, start_arg = h, sums[0], sums[1], sums[0], boundary
    else:
        if prev.group != cfg.s or prev.sum_a.shape != (n_runs, N):
            raise ValueError("prev: summaries of another run layout (group, runs) than cfg's")
        out = torch.empty_like(h) if out is None else out
        out_arg, prev_a, prev_c, carry_arg, start_arg = out, prev.sum_a, prev.sum_c, carry, start.contiguous()
    fuse = next_start is not None and counter is not None and fuses(grid[0], N)
    record = RECORD_IN_PASS and stop is not None and counter is not None
    if fuse:
        next_carry = torch.empty(grid[0], N, dtype=torch.float32, device=dev)
        stats = torch.empty(2, dtype=torch.float32, device=dev)
        fuse_args = (counter, next_start.reshape(N).to(torch.float32).contiguous(), next_carry, stats)
    else:
        fuse_args = (counter if record else part, boundary, part, part)  # (not read, but the counter by RECORD)
    XT, XB, XC = xp.stride()
    if proj is not None:  # xp: the raw inputs (T, B, 1), projected in the kernel
        if xp.shape != (T, B, 1):
            raise ValueError(f"proj: xp must be the raw inputs (T, B, 1) = ({T}, {B}, 1); got {tuple(xp.shape)}")
        wi, bi = proj
        XC = 0
    else:
        wi, bi = w, bh  # (not read)
    _pipelined_diag_gru_kernel[grid](
        h, xp, w, bh, wi, bi, boundary, prev_a, prev_c, carry_arg, start_arg, out_arg, sums[0], sums[1], part,
        *fuse_args, part if stop is None else stop, T, D, N, n_runs, n_prog, XT, XB, XC, R=cfg.r, S=cfg.s,
        BN=cfg.bn, PF=cfg.prefetch, FIRST=first, FUSE=fuse, TB=min(FUSE_TB, triton.next_power_of_2(N)), TCH=FUSE_TCH,
        GUARD=stop is not None, PROJ=proj is not None, RECORD=record, HIST=HISTORY, RBLOCK=RECORD_BLOCK,
        num_warps=cfg.warps)
    if fuse:
        return PassResult(None if first else out, sums[0], sums[1], stats, cfg.s, next_carry, record)
    # guarded passes (graphs) leave the per-program partials to seqpar.kernels.stopping.record: one launch less
    return PassResult(None if first else out, sums[0], sums[1], part if stop is not None else part.amax(1), cfg.s,
                      None, record)


def first_pass(h, xp, weight_hh, bias_hh, boundary, cfg: Optional[RunConfig] = None, next_start=None,
               counter=None, stop=None, proj=None) -> PassResult:
    """Group summaries and residual of the iterate ``h`` (T, B, D) (maps linearised at ``h_{t-1}``,
    ``boundary`` (B, D) before step 0).  ``out`` of the result is None.  With ``next_start`` (B, D) and
    ``counter`` (a zero int32 tensor (1,), reusable) the pass also returns ``carry``, the next pass's
    carries from ``next_start``, where :func:`fuses` allows (else ``carry`` is None).  With ``stop`` (a
    :mod:`seqpar.kernels.stopping` state) the pass does nothing once that state says stopped, and ``stats``
    are the per-program partials (2, n_programs), not reduced (unless fused), for
    :func:`seqpar.kernels.stopping.record` (of row 0).  With ``proj`` (:func:`prepare_projection`) ``xp`` is
    the raw inputs (T, B, 1) of a one-feature cell, projected inside the pass."""
    T, B, D = h.shape
    return _launch(True, h, xp, weight_hh, bias_hh, boundary, None, None, None, None,
                   cfg or run_config(T, B * D), next_start, counter, stop, proj)


def group_scan_tile(n_groups: int, bn: int) -> tuple:
    """``(CH, warps)`` of the one-launch group scan: all groups in one tile where ``bn`` lanes x the groups'
    power of two fit ``GROUP_SCAN_TILE`` (a warp per ``GROUP_SCAN_TILE_PER_WARP``), else chunks of
    ``GROUP_SCAN_CH`` walked by 4 warps."""
    whole = max(16, triton.next_power_of_2(n_groups))
    if whole > GROUP_SCAN_CH and whole * bn <= GROUP_SCAN_TILE:
        return whole, max(4, min(16, whole * bn // GROUP_SCAN_TILE_PER_WARP))
    return min(GROUP_SCAN_CH, whole), 4


def scan_groups(res: PassResult, start: torch.Tensor) -> torch.Tensor:
    """States (n_groups, N) float32 after each group of ``res``'s runs, from ``start`` (B, D) or (N,):
    the carries of the next pass.  Up to ``GROUP_SCAN_WALK`` groups: one launch, each program walking
    the group totals of ``GROUP_SCAN_BN`` lanes ``GROUP_SCAN_CH`` at a time (an in-register associative
    scan each).  More: reduce chunks of group totals (``GROUP_SCAN_CH_SHORT`` up to ``GROUP_SCAN_SHORT``
    groups, else ``GROUP_SCAN_CH``) in parallel, walk the chunk maps (the launch above), rescan the chunks
    from their carries (three launches, none serial in T)."""
    n_runs, N = res.sum_a.shape
    n_groups = triton.cdiv(n_runs, res.group)
    dev = res.sum_a.device
    out = torch.empty(n_groups, N, dtype=torch.float32, device=dev)
    if not n_groups:
        return out
    start = start.reshape(N).to(torch.float32).contiguous()
    bn = min(GROUP_SCAN_BN, triton.next_power_of_2(N))
    if n_groups <= GROUP_SCAN_WALK:
        ch, warps = group_scan_tile(n_groups, bn)
        _group_scan_kernel[(triton.cdiv(N, bn),)](res.sum_a, res.sum_c, start, out, n_runs, n_groups, N,
                                                   G=res.group, CH=ch, BN=bn, num_warps=warps)
        return out
    ch = GROUP_SCAN_CH_SHORT if n_groups <= GROUP_SCAN_SHORT else GROUP_SCAN_CH
    n_ch = triton.cdiv(n_groups, ch)
    grid = (n_ch, triton.cdiv(N, bn))
    tot = torch.empty(2, n_ch, N, dtype=torch.float32, device=dev)
    _chunk_scan_kernel[grid](res.sum_a, res.sum_c, tot[0], start, tot[0], tot[1], n_runs, n_groups, N,
                             G=res.group, CH=ch, BN=bn, APPLY=False, num_warps=4)
    carry = scan_groups(PassResult(None, tot[0], tot[1], res.stats, 1), start)
    _chunk_scan_kernel[grid](res.sum_a, res.sum_c, carry, start, out, out, n_runs, n_groups, N,
                             G=res.group, CH=ch, BN=bn, APPLY=True, num_warps=4)
    return out


def compose(res: PassResult, B: int, D: int):
    """``(Phi, c)`` (B, D) each: the composition of all of ``res``'s maps (identity for no runs)."""
    n_runs, N = res.sum_a.shape
    if n_runs == 0:
        return res.sum_a.new_ones(B, D), res.sum_a.new_zeros(B, D)
    last = torch.arange(res.group - 1, n_runs + res.group - 1, res.group, device=res.sum_a.device).clamp_(max=n_runs - 1)
    phi = res.sum_a.index_select(0, last).prod(0)
    c = scan_groups(res, res.sum_c.new_zeros(N))[-1]
    return phi.reshape(B, D), c.reshape(B, D)


def pipelined_step(h, xp, weight_hh, bias_hh, boundary, prev: PassResult, carry: torch.Tensor,
                   start: torch.Tensor, out=None, cfg: Optional[RunConfig] = None, next_start=None,
                   counter=None, stop=None, proj=None) -> PassResult:
    """One Newton iteration from the iterate ``h`` (T, B, D), whose maps (linearised at ``h_{t-1}``,
    ``boundary`` (B, D) before step 0) ``prev`` (the previous pass's result) summarised, with
    ``carry = scan_groups(prev, start)`` (or ``prev.carry``), ``start`` (B, D) the new iterate's state
    before step 0.  Writes the new iterate into ``out`` and returns it with its own summaries and
    residual; ``next_start`` / ``counter`` / ``stop`` / ``proj``: as :func:`first_pass`."""
    T, B, D = h.shape
    return _launch(False, h, xp, weight_hh, bias_hh, boundary, prev, carry, start, out,
                   cfg or run_config(T, B * D), next_start, counter, stop, proj)


@torch.no_grad()
def pipelined_step_reference(h, xp, weight_hh, bias_hh, boundary, start, run: int, group: int = 1):
    """Float64 reference of :func:`pipelined_step` (carries from a sequential scan of exact maps):
    ``(out, sum_a, sum_c, residual)`` with group prefixes of ``group`` runs; with ``start=None`` the
    first pass (``out`` None)."""
    from seqpar.cells import DiagGRU
    from seqpar.scan import affine_scan
    from seqpar.structure import DIAG

    h, xp, weight_hh, boundary = h.cpu(), xp.cpu(), weight_hh.cpu(), boundary.cpu()
    bias_hh = None if bias_hh is None else bias_hh.cpu()
    start = None if start is None else start.cpu()
    T, B, D = h.shape
    cell = DiagGRU(1, D, bias=bias_hh is not None).double()
    with torch.no_grad():
        cell.weight_hh.copy_(weight_hh.double())
        if bias_hh is not None:
            cell.bias_hh.copy_(bias_hh.double())
    h, xp, boundary = h.double(), xp.double(), boundary.double()

    def maps(states, before):
        hp = torch.cat([before.unsqueeze(0), states[:-1]], 0)
        f = cell.step(hp, xp)
        J = cell.jacobian(hp, xp, DIAG)
        return f, J, f - J * hp

    out = None
    if start is not None:
        _, J, b = maps(h, boundary)
        out = affine_scan(J, b, start.double(), DIAG)
        h, boundary = out, start.double()
    f, J, b = maps(h, boundary)
    res = ((h - f).abs() / f.abs().clamp_min(1.0)).max() if T else torch.zeros((), dtype=torch.float64)
    n_runs = -(-T // run)
    sum_a = torch.ones(n_runs, B * D, dtype=torch.float64)
    sum_c = torch.zeros(n_runs, B * D, dtype=torch.float64)
    for r in range(n_runs):
        if r % group:  # continue the group's composition
            sum_a[r], sum_c[r] = sum_a[r - 1], sum_c[r - 1]
        for t in range(r * run, min(T, (r + 1) * run)):
            sum_c[r] = J[t].reshape(-1) * sum_c[r] + b[t].reshape(-1)
            sum_a[r] = J[t].reshape(-1) * sum_a[r]
    return out, sum_a, sum_c, res
