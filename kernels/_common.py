"""Shared Triton pieces: affine-map combines and the decoupled look-back.

Every scan kernel in this package works on *lanes* (independent recurrences,
N = B * D for diagonal Jacobians, N = B * D / k for k x k blocks) and tiles of
``TT`` time steps.  A tile is scanned in registers with ``tl.associative_scan``;
tiles are chained across programs either

* in one pass (``MODE=0``, default on GPUs): each program takes a ticket from an
  atomic counter (so every program it waits on has already started: no
  deadlock), publishes its tile's summary map, looks back over its
  predecessors' summaries / inclusive states to get its incoming state, then
  publishes its own outgoing state ("decoupled look-back", a single-pass form
  of reduce-then-scan: inputs are read from HBM once);
* or in three passes (``MODE=1`` reduce chunks to summaries, a sequential scan
  of the summaries, ``MODE=2`` rescan each chunk from its carry).

Flags: 0 nothing yet, 1 aggregate (map) published, 2 inclusive state published.

Look-back window ``W`` (constexpr of every single-pass kernel, host argument
``lookback_w``):

* ``W == 1`` (the original scheme): one int32 flag per (tile, lane block); a
  waiting program reads its predecessors' flags one at a time, so it walks back
  one tile per L2 round trip.  With a single chain of tiles (narrow problems:
  one lane block) the inclusive-state frontier then advances about one tile per
  round trip, far below the bandwidth the tiles could be streamed at.
* ``W in {2, 4, 8, 16, 32}`` (windowed, as CUB's look-back inspects a warp's
  worth of predecessors at once): the flags of W consecutive tiles are packed as
  2-bit fields of one word (int32 words for W <= 16, int64 for W = 32; field
  k of word w = tile w*W + k, bit 0 = aggregate published, bit 1 = inclusive
  state published), set with release ``atomic_or``.  One acquire read of a word
  returns the state of up to W predecessors at once; it is a *scalar* atomic, so
  every thread of the program sees the same value (a vector of W flags loaded by
  several threads could disagree between replicated threads and make them take
  different branches), and acquiring the word synchronises with every publisher
  whose bit it contains (the ORs form a release sequence).  The program then
  composes, in time order, the published aggregates above the nearest published
  inclusive state (or above the nearest unpublished tile, where it re-polls), so
  the frontier moves up to W tiles per round trip.  Workspace:
  :func:`lookback_buffers`.

In both schemes a program waits only on tiles with smaller tickets, i.e. programs
that have already started and that never wait on later ones: no deadlock, whatever
the number of co-resident programs.  Memory order: data (aggregate / inclusive
state) is stored, a ``debug_barrier`` orders all the program's threads' stores before
the one thread's release of the flag; the reader's acquire of the flag is followed
by a ``debug_barrier`` before its threads' (volatile, L1-bypassing) loads of the data.

Tile shape, warps and window per lane count come from each kernel module's
``TILES`` table (:func:`pick_tiles`; explicit arguments override it).
"""
import os

import triton
import triton.language as tl

# Compiled kernels (not the interpreter, which runs no PTX): exp and reciprocal as single PTX
# approximations that flush denormals (ex2.approx.ftz, rcp.approx.ftz; ~2 ulp and 1 ulp, as the
# non-ftz forms).  The non-ftz forms cost four more instructions each for their denormal range fix-ups:
# in the narrow pipelined DiagGRU pass (six exps and seven divisions per state) about a quarter of all
# instructions.  No argument here is denormal but exp's underflow, which flushes to 0.
FAST_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def comb_diag(a1, c1, a2, c2):
    """(a2, c2) o (a1, c1): apply the earlier map (a1, c1) first."""
    return a2 * a1, a2 * c1 + c2


@triton.jit
def comb_block2(a00, a01, a10, a11, c0, c1, b00, b01, b10, b11, d0, d1):
    """2x2 maps: (B, d) o (A, c) = (B A, B c + d)."""
    return (b00 * a00 + b01 * a10, b00 * a01 + b01 * a11,
            b10 * a00 + b11 * a10, b10 * a01 + b11 * a11,
            b00 * c0 + b01 * c1 + d0, b10 * c0 + b11 * c1 + d1)


@triton.jit
def last_row(x, rows, TT: tl.constexpr):
    """Row TT-1 of a (TT, BN) tile as a (BN,) vector."""
    return tl.sum(tl.where(rows[:, None] == TT - 1, x, 0.0), 0)


@triton.jit
def exp_fast(x):
    """e^x (float32): ``ex2.approx.ftz`` of x log2(e) when compiled (:data:`FAST_PTX`), else ``tl.exp``."""
    if FAST_PTX:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x.to(tl.float32) * LOG2E],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x.to(tl.float32))


@triton.jit
def rcp_fast(x):
    """1 / x (float32): ``rcp.approx.ftz`` (1 ulp) when compiled (:data:`FAST_PTX`), else IEEE; 1/inf = 0."""
    if FAST_PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x.to(tl.float32)],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / x.to(tl.float32)


@triton.jit
def sigmoid(x):
    """1 / (1 + e^-x) with the approximate exp and reciprocal (:func:`exp_fast`, :func:`rcp_fast`)."""
    return rcp_fast(1.0 + exp_fast(-x))


@triton.jit
def tanh(x):
    """1 - 2 / (e^2x + 1), approximate exp and reciprocal; saturates correctly to +-1 for large |x|."""
    return 1.0 - 2.0 * rcp_fast(exp_fast(2.0 * x) + 1.0)


# tl.dot input precisions by code (a constexpr int keeps the kernels' signatures numeric)
DOT_PRECISIONS = {"ieee": 0, "tf32": 1, "tf32x3": 2}


@triton.jit
def dot(a, b, PREC: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation, inputs as ``PREC`` says (:data:`DOT_PRECISIONS`):
    0 IEEE fp32 (CUDA cores), 1 TF32 (tensor cores, 10-bit mantissa), 2 3xTF32 (tensor cores,
    about fp32 accuracy: the split a = a_hi + a_lo drops only the a_lo * b_lo term)."""
    if PREC == 1:
        return tl.dot(a, b, input_precision="tf32")
    elif PREC == 2:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def tf32_parts(a):
    """``(hi, lo)``: ``a`` rounded to TF32 (10-bit mantissa, to nearest by the bits) and the rest, ``a = hi +
    lo`` exactly; a tensor-core product reads ``lo``'s top 10 mantissa bits, an error near 2^-22 |a|.
    (|a| within 2^-11 of the largest float rounds to inf: no fp32 GEMM result is finite there anyway.)"""
    hi = ((a.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, a - hi


@triton.jit
def split_dot(a, a_hi, a_lo, B, B_lo, offs, mask, PREC: tl.constexpr):
    """``a @ b`` (fp32 accumulation) for ``b`` loaded from ``B + offs`` (masked, zeros outside).  PREC 2
    (3xTF32): ``a = a_hi + a_lo`` (:func:`tf32_parts`, split once by the caller for all its products) and
    ``b = B + B_lo`` in TF32 parts split on the host (``seqpar.kernels.linear.tf32_split``): three TF32
    products, small terms first; the dropped ``a_lo b_lo`` is near 2^-22.  Else ``dot(a, b, PREC)``
    (a_hi, a_lo, B_lo unused)."""
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    if PREC == 2:
        b_lo = tl.load(B_lo + offs, mask=mask, other=0.0)
        acc = tl.dot(a_lo, b, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        return tl.dot(a_hi, b, acc, input_precision="tf32")
    return dot(a, b, PREC)


@triton.jit
def gru_f_jdiag(hp, xr, xz, xn, hr, hz, hn, wr, wz, wn):
    """GRU step f and the diagonal of df/dh_prev from the gate pre-activations
    (input parts xr/xz/xn, recurrent parts hr/hz/hn; w* the diagonal recurrent weights)."""
    r = sigmoid(xr + hr)
    z = sigmoid(xz + hz)
    n = tanh(xn + r * hn)
    f = n + z * (hp - n)
    jd = (1 - z) * (1 - n * n) * (hn * r * (1 - r) * wr + r * wn) + z + (hp - n) * z * (1 - z) * wz
    return f, jd


@triton.jit
def rel_residual(hc, f, m):
    """Elementwise ``(|hc - f| / max(1, |f|), |f|)`` where ``m``, 0 elsewhere, NaN reported as inf
    (divergence): the inputs of the look-back kernels' partial maxima ``[residual, max|f|]``."""
    fab = tl.where(m, tl.abs(f), 0.0)
    rel = tl.abs(hc - f) / tl.maximum(fab, 1.0)
    rel = tl.where(m, tl.where(rel == rel, rel, float("inf")), 0.0)
    return rel, tl.where(fab == fab, fab, float("inf"))


@triton.jit
def ticket(Counter, n_lb, MODE: tl.constexpr):
    """(chunk, lane block) of this program; in MODE 0 in order of program start."""
    if MODE == 0:
        tid = tl.atomic_add(Counter, 1)
    else:
        tid = tl.program_id(0)
    return tid // n_lb, tid % n_lb


@triton.jit
def publish(Flags, c, lb, n_lb, STATE: tl.constexpr, W: tl.constexpr):
    """Release flag ``STATE`` (1 aggregate, 2 inclusive state) of tile ``c`` of lane block ``lb``.
    The caller has stored the data and run a ``debug_barrier`` (all its threads' stores precede the
    release)."""
    if W == 1:
        tl.atomic_xchg(Flags + c * n_lb + lb, STATE, sem="release")
    else:
        one = tl.full([], 1, Flags.dtype.element_ty)
        bit = one << (2 * (c % W) + (STATE - 1)).to(Flags.dtype.element_ty)
        tl.atomic_or(Flags + (c // W) * n_lb + lb, bit, sem="release")


@triton.jit
def poll_window(Flags, hi, lb, n_lb, W: tl.constexpr):
    """One acquire read of the flag word holding predecessor ``hi`` (>= 0): the tiles
    ``j = wb .. wb + W - 1`` (``wb = hi // W * W``), of which ``j <= hi`` are considered.

    Returns scalars ``(lo, done, next_hi)``: ``lo`` the nearest (highest) tile ``<= hi`` of
    the word that has its inclusive state (flag 2) or nothing yet (flag 0), -1 if all have
    flag 1; the flag-1 tiles ``lo < j <= hi`` are to be composed, then ``done`` = 1 if ``lo``
    has flag 2 (its inclusive state ends the look-back), else look on from ``next_hi``: ``lo``
    when it has flag 0 (re-poll it), ``wb - 1`` when every tile had flag 1."""
    w = hi // W
    v = tl.atomic_add(Flags + w * n_lb + lb, 0, sem="acquire")  # scalar: one value for all threads
    k = tl.arange(0, W)
    s = (v >> (2 * k).to(v.dtype)) & 3
    wb = w * W
    j = wb + k
    valid = j <= hi
    j2 = tl.max(tl.where(valid & (s >= 2), j, -1), 0)
    j0 = tl.max(tl.where(valid & (s == 0), j, -1), 0)
    lo = tl.maximum(j0, j2)
    done = (j2 > j0).to(tl.int32)
    next_hi = tl.where(lo >= 0, lo, wb - 1)
    return lo, done, next_hi


@triton.jit
def lookback_diag(Flags, AggA, AggC, Incl, c, lb, n_lb, N, lanes, lmask, h_first, Aa, Ca, W: tl.constexpr):
    """Store this chunk's summary (Aa, Ca) (every chunk, so the caller can compose a shard
    summary from them; published with flag 1 for chunks > 0), find its incoming state
    (``h_first`` for chunk 0: the scan's start), publish its outgoing state.
    Summaries/states are (n_chunks, N) float32; ``Flags`` from :func:`lookback_buffers` for
    this ``W``.  Returns h_in (BN,)."""
    base = c.to(tl.int64) * N + lanes
    tl.store(AggA + base, Aa, mask=lmask)  # every chunk, 0 included: the shard summary reads them all
    tl.store(AggC + base, Ca, mask=lmask)
    if c > 0:
        tl.debug_barrier()
        publish(Flags, c, lb, n_lb, 1, W)
    if W == 1:
        h_in = _walk_diag(Flags, AggA, AggC, Incl, c, lb, n_lb, N, lanes, lmask, h_first)
    else:
        h_in = _window_diag(Flags, AggA, AggC, Incl, c, lb, n_lb, N, lanes, lmask, h_first, W)
    tl.store(Incl + base, Aa * h_in + Ca, mask=lmask)
    tl.debug_barrier()
    publish(Flags, c, lb, n_lb, 2, W)
    return h_in


@triton.jit
def _walk_diag(Flags, AggA, AggC, Incl, c, lb, n_lb, N, lanes, lmask, h_first):
    """W = 1: predecessors one at a time (one int32 flag each)."""
    acc_a = tl.full(h_first.shape, 1.0, tl.float32)
    acc_c = tl.zeros(h_first.shape, tl.float32)
    h_in = h_first
    done = (c == 0).to(tl.int32)
    j = c - 1
    while done == 0:
        f = tl.atomic_add(Flags + j * n_lb + lb, 0, sem="acquire")
        tl.debug_barrier()
        bj = j.to(tl.int64) * N + lanes
        fv = tl.zeros_like(lanes) + f
        is1 = fv == 1
        is2 = fv == 2
        ia = tl.load(AggA + bj, mask=lmask & is1, other=1.0, volatile=True)
        ic = tl.load(AggC + bj, mask=lmask & is1, other=0.0, volatile=True)
        hv = tl.load(Incl + bj, mask=lmask & is2, other=0.0, volatile=True)
        h_in = tl.where(is2, acc_a * hv + acc_c, h_in)
        acc_c = tl.where(is1, acc_a * ic + acc_c, acc_c)
        acc_a = tl.where(is1, acc_a * ia, acc_a)
        j = tl.where(f == 1, j - 1, j)
        done = (f == 2).to(tl.int32)
    return h_in


@triton.jit
def _window_diag(Flags, AggA, AggC, Incl, c, lb, n_lb, N, lanes, lmask, h_first, W: tl.constexpr):
    """W > 1: windows of up to W predecessors per acquire read (see the module docstring).
    The accumulator holds the maps later in time; the window's flag-1 tiles are folded under
    it from the latest to the earliest (acc <- acc o (a_j, c_j), an order-preserving
    sequential composition, unrolled over the W rows with masked row loads: identity for the
    rows not taken), then the flag-2 tile's inclusive state, if any, gives h_in = acc(h)."""
    acc_a = tl.full(h_first.shape, 1.0, tl.float32)
    acc_c = tl.zeros(h_first.shape, tl.float32)
    done = (c == 0).to(tl.int32)
    hi = c - 1
    while done == 0:
        lo, dn, next_hi = poll_window(Flags, hi, lb, n_lb, W)
        tl.debug_barrier()
        wb = hi // W * W
        for k in tl.static_range(W - 1, -1, -1):
            j = wb + k
            take = lmask & ((tl.zeros_like(lanes) + j) > lo) & ((tl.zeros_like(lanes) + j) <= hi)
            off = j.to(tl.int64) * N + lanes
            a = tl.load(AggA + off, mask=take, other=1.0, volatile=True)
            b = tl.load(AggC + off, mask=take, other=0.0, volatile=True)
            acc_c = acc_a * b + acc_c
            acc_a = acc_a * a
        hv = tl.load(Incl + lo.to(tl.int64) * N + lanes, mask=lmask & ((tl.zeros_like(lanes) + dn) == 1),
                     other=0.0, volatile=True)
        acc_c = tl.where((tl.zeros_like(lanes) + dn) == 1, acc_a * hv + acc_c, acc_c)
        hi = next_hi
        done = dn
    return tl.where((tl.zeros_like(lanes) + c) == 0, h_first, acc_c)


@triton.jit
def lookback_block2(Flags, Agg, Incl, c, lb, n_lb, M, lanes, lmask, g0, g1,
                    a00, a01, a10, a11, c0, c1, W: tl.constexpr):
    """As :func:`lookback_diag` for 2x2 maps.  ``Agg`` is (n_chunks, 6, M), ``Incl``
    (n_chunks, 2, M).  Returns the incoming state (h0, h1)."""
    base6 = c.to(tl.int64) * 6 * M + lanes
    base2 = c.to(tl.int64) * 2 * M + lanes
    tl.store(Agg + base6, a00, mask=lmask)  # every chunk, 0 included: the shard summary reads them all
    tl.store(Agg + base6 + M, a01, mask=lmask)
    tl.store(Agg + base6 + 2 * M, a10, mask=lmask)
    tl.store(Agg + base6 + 3 * M, a11, mask=lmask)
    tl.store(Agg + base6 + 4 * M, c0, mask=lmask)
    tl.store(Agg + base6 + 5 * M, c1, mask=lmask)
    if c > 0:
        tl.debug_barrier()
        publish(Flags, c, lb, n_lb, 1, W)
    if W == 1:
        h0, h1 = _walk_block2(Flags, Agg, Incl, c, lb, n_lb, M, lanes, lmask, g0, g1)
    else:
        h0, h1 = _window_block2(Flags, Agg, Incl, c, lb, n_lb, M, lanes, lmask, g0, g1, W)
    tl.store(Incl + base2, a00 * h0 + a01 * h1 + c0, mask=lmask)
    tl.store(Incl + base2 + M, a10 * h0 + a11 * h1 + c1, mask=lmask)
    tl.debug_barrier()
    publish(Flags, c, lb, n_lb, 2, W)
    return h0, h1


@triton.jit
def _walk_block2(Flags, Agg, Incl, c, lb, n_lb, M, lanes, lmask, g0, g1):
    """W = 1 look-back of 2x2 maps: predecessors one at a time."""
    one = tl.full(g0.shape, 1.0, tl.float32)
    zero = tl.zeros(g0.shape, tl.float32)
    p00, p01, p10, p11, q0, q1 = one, zero, zero, one, zero, zero
    h0, h1 = g0, g1
    done = (c == 0).to(tl.int32)
    j = c - 1
    while done == 0:
        f = tl.atomic_add(Flags + j * n_lb + lb, 0, sem="acquire")
        tl.debug_barrier()
        b6 = j.to(tl.int64) * 6 * M + lanes
        b2 = j.to(tl.int64) * 2 * M + lanes
        fv = tl.zeros_like(lanes) + f
        is1 = fv == 1
        is2 = fv == 2
        m1 = lmask & is1
        m2 = lmask & is2
        e00 = tl.load(Agg + b6, mask=m1, other=1.0, volatile=True)
        e01 = tl.load(Agg + b6 + M, mask=m1, other=0.0, volatile=True)
        e10 = tl.load(Agg + b6 + 2 * M, mask=m1, other=0.0, volatile=True)
        e11 = tl.load(Agg + b6 + 3 * M, mask=m1, other=1.0, volatile=True)
        f0 = tl.load(Agg + b6 + 4 * M, mask=m1, other=0.0, volatile=True)
        f1 = tl.load(Agg + b6 + 5 * M, mask=m1, other=0.0, volatile=True)
        v0 = tl.load(Incl + b2, mask=m2, other=0.0, volatile=True)
        v1 = tl.load(Incl + b2 + M, mask=m2, other=0.0, volatile=True)
        h0 = tl.where(is2, p00 * v0 + p01 * v1 + q0, h0)
        h1 = tl.where(is2, p10 * v0 + p11 * v1 + q1, h1)
        # acc <- acc o (E, f)
        n00, n01, n10, n11, n0, n1 = comb_block2(e00, e01, e10, e11, f0, f1, p00, p01, p10, p11, q0, q1)
        p00 = tl.where(is1, n00, p00)
        p01 = tl.where(is1, n01, p01)
        p10 = tl.where(is1, n10, p10)
        p11 = tl.where(is1, n11, p11)
        q0 = tl.where(is1, n0, q0)
        q1 = tl.where(is1, n1, q1)
        j = tl.where(f == 1, j - 1, j)
        done = (f == 2).to(tl.int32)
    return h0, h1


@triton.jit
def _window_block2(Flags, Agg, Incl, c, lb, n_lb, M, lanes, lmask, g0, g1, W: tl.constexpr):
    """W > 1 look-back of 2x2 maps, as :func:`_window_diag`."""
    one = tl.full(g0.shape, 1.0, tl.float32)
    zero = tl.zeros(g0.shape, tl.float32)
    p00, p01, p10, p11, q0, q1 = one, zero, zero, one, zero, zero
    done = (c == 0).to(tl.int32)
    hi = c - 1
    while done == 0:
        lo, dn, next_hi = poll_window(Flags, hi, lb, n_lb, W)
        tl.debug_barrier()
        wb = hi // W * W
        for k in tl.static_range(W - 1, -1, -1):
            j = wb + k
            take = lmask & ((tl.zeros_like(lanes) + j) > lo) & ((tl.zeros_like(lanes) + j) <= hi)
            o6 = j.to(tl.int64) * (6 * M) + lanes
            e00 = tl.load(Agg + o6, mask=take, other=1.0, volatile=True)
            e01 = tl.load(Agg + o6 + M, mask=take, other=0.0, volatile=True)
            e10 = tl.load(Agg + o6 + 2 * M, mask=take, other=0.0, volatile=True)
            e11 = tl.load(Agg + o6 + 3 * M, mask=take, other=1.0, volatile=True)
            f0 = tl.load(Agg + o6 + 4 * M, mask=take, other=0.0, volatile=True)
            f1 = tl.load(Agg + o6 + 5 * M, mask=take, other=0.0, volatile=True)
            # acc <- acc o (E, f)
            p00, p01, p10, p11, q0, q1 = comb_block2(e00, e01, e10, e11, f0, f1, p00, p01, p10, p11, q0, q1)
        fin = (tl.zeros_like(lanes) + dn) == 1
        o2 = lo.to(tl.int64) * (2 * M) + lanes
        v0 = tl.load(Incl + o2, mask=lmask & fin, other=0.0, volatile=True)
        v1 = tl.load(Incl + o2 + M, mask=lmask & fin, other=0.0, volatile=True)
        q0 = tl.where(fin, p00 * v0 + p01 * v1 + q0, q0)
        q1 = tl.where(fin, p10 * v0 + p11 * v1 + q1, q1)
        hi = next_hi
        done = dn
    first = (tl.zeros_like(lanes) + c) == 0
    return tl.where(first, g0, q0), tl.where(first, g1, q1)


def lookback_buffers(n_chunks: int, n_lb: int, w: int, device):
    """Zeroed flags and ticket counter for the single-pass look-back with window ``w``:
    ``(flags, counter)``; flags are one int32 per (tile, lane block) for ``w == 1``, else
    packed words of ``w`` tiles (int32 for w <= 16, int64 for w == 32), one allocation."""
    import torch

    if w == 1:
        ws = torch.zeros(n_chunks * n_lb + 1, dtype=torch.int32, device=device)
        return ws[1:], ws[:1]
    if w not in (2, 4, 8, 16, 32):
        raise ValueError(f"lookback_w must be 1, 2, 4, 8, 16 or 32; got {w}")
    words = triton.cdiv(n_chunks, w) * n_lb
    ws = torch.zeros(words + 1, dtype=torch.int64 if w == 32 else torch.int32, device=device)
    counter = ws[:1] if w < 32 else ws[:1].view(torch.int32)[:1]
    return ws[1:], counter


def pick_tiles(table, n_lanes: int, block_t=None, block_n=None, num_warps=None, lookback_w=None):
    """``(TT, BN, num_warps, W)`` for ``n_lanes`` lanes from a kernel's tuning ``table``
    ``{16: cfg, 64: cfg, 256: cfg, 1024: cfg, "wide": cfg}`` (cfg a dict with keys tt, bn,
    warps, w; the first key >= n_lanes applies, "wide" beyond).  Arguments that are not None
    override the table.  When neither block_t nor block_n is given and the lanes are fewer
    than the entry's BN, :func:`narrow_tiles` trims BN to the lanes present (keeping TT * BN)."""
    key = next((k for k in sorted(k for k in table if k != "wide") if n_lanes <= k), "wide")
    cfg = table[key]
    tt, bn = cfg["tt"], cfg["bn"]
    if block_t is None and block_n is None:
        tt, bn = narrow_tiles(n_lanes, tt, bn)
    return (tt if block_t is None else block_t, bn if block_n is None else block_n,
            cfg["warps"] if num_warps is None else num_warps, cfg["w"] if lookback_w is None else lookback_w)


def narrow_tiles(n_lanes: int, block_t: int, block_n: int, max_t: int = 1024):
    """Tile shape for few lanes: shrink the lane width to the lanes present (power of two,
    at least 16) and lengthen the time tile to keep TT * BN, so a narrow problem (e.g.
    B * D = 16) does not idle most of each tile nor chain 16x more look-back tiles."""
    bn = block_n
    while bn > 16 and bn // 2 >= n_lanes:
        bn //= 2
    tt = min(max_t, block_t * (block_n // bn))
    return tt, bn
