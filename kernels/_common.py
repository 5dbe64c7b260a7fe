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
"""
import triton
import triton.language as tl


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
def sigmoid(x):
    """1 / (1 + e^-x) with the fast (approximate, ~2 ulp) division instead of IEEE division."""
    return tl.fdiv(tl.full(x.shape, 1.0, tl.float32), 1.0 + tl.exp(-x), ieee_rounding=False)


@triton.jit
def tanh(x):
    """1 - 2 / (e^2x + 1), fast division; saturates correctly to +-1 for large |x|."""
    return 1.0 - tl.fdiv(tl.full(x.shape, 2.0, tl.float32), tl.exp(2.0 * x) + 1.0, ieee_rounding=False)


@triton.jit
def ticket(Counter, n_lb, MODE: tl.constexpr):
    """(chunk, lane block) of this program; in MODE 0 in order of program start."""
    if MODE == 0:
        tid = tl.atomic_add(Counter, 1)
    else:
        tid = tl.program_id(0)
    return tid // n_lb, tid % n_lb


@triton.jit
def lookback_diag(Flags, AggA, AggC, Incl, c, lb, n_lb, N, lanes, lmask, h_first, Aa, Ca):
    """Store this chunk's summary (Aa, Ca) (every chunk, so the caller can compose a shard
    summary from them; published with flag 1 for chunks > 0), find its incoming state
    (``h_first`` for chunk 0: the scan's start), publish its outgoing state.
    Summaries/states are (n_chunks, N) float32.  Returns h_in (BN,)."""
    base = c.to(tl.int64) * N + lanes
    tl.store(AggA + base, Aa, mask=lmask)  # every chunk, 0 included: the shard summary reads them all
    tl.store(AggC + base, Ca, mask=lmask)
    if c > 0:
        tl.debug_barrier()
        tl.atomic_xchg(Flags + c * n_lb + lb, 1, sem="release")
    acc_a = tl.full(Aa.shape, 1.0, tl.float32)
    acc_c = tl.zeros(Aa.shape, tl.float32)
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
    tl.store(Incl + base, Aa * h_in + Ca, mask=lmask)
    tl.debug_barrier()
    tl.atomic_xchg(Flags + c * n_lb + lb, 2, sem="release")
    return h_in


@triton.jit
def lookback_block2(Flags, Agg, Incl, c, lb, n_lb, M, lanes, lmask, g0, g1,
                    a00, a01, a10, a11, c0, c1):
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
        tl.atomic_xchg(Flags + c * n_lb + lb, 1, sem="release")
    one = tl.full(a00.shape, 1.0, tl.float32)
    zero = tl.zeros(a00.shape, tl.float32)
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
    tl.store(Incl + base2, a00 * h0 + a01 * h1 + c0, mask=lmask)
    tl.store(Incl + base2 + M, a10 * h0 + a11 * h1 + c1, mask=lmask)
    tl.debug_barrier()
    tl.atomic_xchg(Flags + c * n_lb + lb, 2, sem="release")
    return h0, h1


def narrow_tiles(n_lanes: int, block_t: int, block_n: int, max_t: int = 1024):
    """Tile shape for few lanes: shrink the lane width to the lanes present (power of two,
    at least 16) and lengthen the time tile to keep TT * BN, so a narrow problem (e.g.
    B * D = 16) does not idle most of each tile nor chain 16x more look-back tiles."""
    bn = block_n
    while bn > 16 and bn // 2 >= n_lanes:
        bn //= 2
    tt = min(max_t, block_t * (block_n // bn))
    return tt, bn
