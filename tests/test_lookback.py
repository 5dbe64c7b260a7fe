"""Windowed decoupled look-back (kernels/_common.py) against float64 references (TRITON_INTERPRET=1 on CPU).

Two kinds of checks:

* whole kernels (scan_diag, fused DiagGRU / quasi GRU / DiagLSTM, scan_block2) with the
  windowed look-back on many small tiles (37 tiles of 4 steps, T not a multiple of the tile,
  T = 1), lane counts 1, 3, 16, 17, compared with a float64 sequential reference;
* the look-back itself on pre-filled flags / aggregates / inclusive states.  Under the
  interpreter programs run one after the other in ticket order, so in whole-kernel runs every
  predecessor already has its inclusive state; the probe kernels below instead start one
  program with hand-made predecessor states (runs of flag-1 tiles longer than a window, the
  nearest flag 2 several windows back, NaN in every value that must not be read), and call
  the window decoder directly for the flag-0 (wait) cases a sequential run cannot produce.
"""
import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from seqpar.cells import GRU, DiagGRU, DiagLSTM  # noqa: E402
from seqpar.newton import shift  # noqa: E402
from seqpar.structure import DIAG, Structure  # noqa: E402
from seqpar.kernels._common import lookback_block2, lookback_buffers, lookback_diag, poll_window  # noqa: E402

BLOCK2 = Structure("block", 2)
TT = 4  # tile of 4 steps: T = 145 spans 37 tiles (the last one partial)


def _seq_diag(J, b, h0, reverse=False):
    """float64 sequential h_t = J_t h_{t-1} + b_t over (T, N)."""
    J, b = J.double(), b.double()
    h = h0.double().clone()
    out = torch.empty_like(b)
    ts = range(J.shape[0] - 1, -1, -1) if reverse else range(J.shape[0])
    for t in ts:
        h = J[t] * h + b[t]
        out[t] = h
    return out


def _seq_block(J, b, h0):
    """float64 sequential 2x2 recurrence: J (T, M, 2, 2), b (T, M, 2), h0 (M, 2)."""
    h = h0.double().clone()
    out = torch.empty_like(b, dtype=torch.float64)
    for t in range(J.shape[0]):
        h = (J[t].double() @ h.unsqueeze(-1)).squeeze(-1) + b[t].double()
        out[t] = h
    return out


# ------------------------------------------------------------------ whole kernels
@pytest.mark.parametrize("W", [1, 4, 32])
@pytest.mark.parametrize("N", [1, 3, 16, 17])
@pytest.mark.parametrize("T", [1, 37 * TT - 3])
def test_scan_diag_window(W, N, T):
    from seqpar.kernels.scan_diag import scan_diag

    g = torch.Generator().manual_seed(100 * W + 10 * N + T)
    J = torch.rand(T, N, generator=g) * 1.2 - 0.1
    b = torch.randn(T, N, generator=g)
    h0 = torch.randn(N, generator=g)
    out = scan_diag(J, b, h0, block_t=TT, block_n=16, lookback_w=W)
    torch.testing.assert_close(out.double(), _seq_diag(J, b, h0), rtol=1e-5, atol=1e-5)
    if W == 32 and N in (1, 17):  # the adjoint direction and the zero start (interpreter time)
        out = scan_diag(J, b, h0, reverse=True, block_t=TT, block_n=16, lookback_w=W)
        torch.testing.assert_close(out.double(), _seq_diag(J, b, h0, reverse=True), rtol=1e-5, atol=1e-5)
        out = scan_diag(J, b, None, block_t=TT, block_n=16, lookback_w=W)
        torch.testing.assert_close(out.double(), _seq_diag(J, b, torch.zeros(N)), rtol=1e-5, atol=1e-5)


def _fused_case(kind, B, n):
    """(cell, structure, step(h, xp, bnd, **kw)) with the tile of TT steps and the window as kw."""
    from seqpar.kernels.fused_diag_gru import fused_diag_gru_step, fused_gru_quasi_step
    from seqpar.kernels.fused_diag_lstm import fused_diag_lstm_step

    if kind == "diag_gru":
        cell = DiagGRU(4, n)
        return cell, DIAG, lambda h, xp, bnd, **kw: fused_diag_gru_step(
            h, xp, cell.weight_hh, cell.bias_hh, bnd, block_t=TT, block_n=16, **kw)
    if kind == "diag_gru_seq":
        cell = DiagGRU(4, n)
        return cell, DIAG, lambda h, xp, bnd, **kw: fused_diag_gru_step(
            h, xp, cell.weight_hh, cell.bias_hh, bnd, block_t=TT, block_n=16, variant="seq", **kw)
    if kind == "gru_quasi":
        cell = GRU(4, n)
        return cell, DIAG, lambda h, xp, bnd, **kw: fused_gru_quasi_step(
            h, xp, cell.weight_hh, cell.bias_hh, bnd, block_t=TT, block_n=16, recurrent="gemm", **kw)
    if kind == "gru_quasi_dot":  # tl.dot needs 16 rows: tiles of 16 steps (T = 145: 10 tiles)
        cell = GRU(4, n)
        return cell, DIAG, lambda h, xp, bnd, **kw: fused_gru_quasi_step(
            h, xp, cell.weight_hh, cell.bias_hh, bnd, block_t=16, recurrent="dot", **kw)
    cell = DiagLSTM(4, n)
    return cell, BLOCK2, lambda h, xp, bnd, **kw: fused_diag_lstm_step(
        h, xp, cell.weight_hh, bnd, block_t=TT, block_n=16, **kw)


# (B, n): lanes B * n (GRU) or units B * n (LSTM) = 1, 3, 16, 17
SHAPES = [(1, 1), (3, 1), (2, 8), (1, 17)]


# (W, (B, n), T): every lane count with the widest window on 37 tiles; the smallest window and the
# one-at-a-time walk on two lane counts; T = 1 (a single, partial tile)
FUSED_CASES = ([(32, bn, 37 * TT - 3) for bn in SHAPES] + [(2, (3, 1), 37 * TT - 3), (2, (1, 17), 37 * TT - 3),
                                                           (1, (1, 17), 37 * TT - 3), (8, (1, 17), 1)])


@pytest.mark.parametrize("kind", ["diag_gru", "diag_gru_seq", "gru_quasi", "gru_quasi_dot", "lstm"])
@pytest.mark.parametrize("W,shape,T", FUSED_CASES)
def test_fused_window(kind, W, shape, T):
    B, n = shape
    torch.manual_seed(1000 * W + 10 * B + n + T)
    cell, st, step = _fused_case(kind, B, n)
    D = cell.state_size
    with torch.no_grad():
        xp = cell.project_inputs(torch.randn(T, B, 4))
        h, bnd, start = torch.randn(T, B, D) * 0.5, torch.randn(B, D), torch.randn(B, D)
        c64 = copy.deepcopy(cell).double()
        hp = shift(h.double(), bnd.double())
        f = c64.step(hp, xp.double())
        J = c64.jacobian(hp, xp.double(), st)
        bvec = f - st.matvec(J, hp)
        out, stats, phi = step(h, xp, bnd, start=start, want_summary=True, lookback_w=W)
    if st.kind == "diag":
        ref = _seq_diag(J.reshape(T, -1), bvec.reshape(T, -1), start.reshape(-1)).reshape(T, B, D)
        ref_phi = J.prod(0)
    else:
        M = B * D // 2
        ref = _seq_block(J.reshape(T, M, 2, 2), bvec.reshape(T, M, 2), start.reshape(M, 2)).reshape(T, B, D)
        ref_phi = torch.eye(2, dtype=torch.float64).expand(M, 2, 2)
        for t in range(T):
            ref_phi = J[t].reshape(M, 2, 2) @ ref_phi
        ref_phi = ref_phi.reshape(B, D // 2, 2, 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(phi.double(), ref_phi, rtol=1e-3, atol=1e-6 + 1e-5 * float(ref_phi.abs().max()))
    rel = (h.double() - f).abs() / f.abs().clamp_min(1)
    torch.testing.assert_close(float(stats[0]), float(rel.max()), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("W", [2, 32])
def test_scan_block2_window(W):
    from seqpar.kernels.scan_block import scan_block2

    g = torch.Generator().manual_seed(W)
    for T, M in ((1, 3), (37 * TT - 3, 17)):
        J = torch.randn(T, M, 2, 2, generator=g) * 0.5
        b = torch.randn(T, M, 2, generator=g)
        h0 = torch.randn(M, 2, generator=g)
        out = scan_block2(J, b, h0, block_t=TT, block_n=16, lookback_w=W)
        torch.testing.assert_close(out.double(), _seq_block(J, b, h0), rtol=1e-5, atol=1e-5)


def test_table_and_overrides():
    """Explicit tile arguments win over the table; the table narrows BN to the lanes present."""
    from seqpar.kernels._common import pick_tiles
    from seqpar.kernels.fused_diag_gru import TILES

    table = {16: dict(tt=256, bn=16, warps=4, w=16), 64: dict(tt=64, bn=64, warps=2, w=8),
             "wide": dict(tt=16, bn=256, warps=4, w=1)}
    assert pick_tiles(table, 16) == (256, 16, 4, 16)
    assert pick_tiles(table, 17) == (128, 32, 2, 8)  # bucket 64, BN narrowed to 32, TT * BN kept
    assert pick_tiles(table, 64) == (64, 64, 2, 8)
    assert pick_tiles(table, 5000) == (16, 256, 4, 1)
    assert pick_tiles(table, 17, block_t=8, lookback_w=32) == (8, 64, 2, 32)
    assert pick_tiles(table, 17, 4, 16, 1, 2) == (4, 16, 1, 2)
    for n in (1, 16, 64, 256, 1024, 4096):
        tt, bn, warps, w = pick_tiles(TILES, n)
        assert w in (1, 2, 4, 8, 16, 32) and tt * bn <= 8192 and bn >= 16
    with pytest.raises(ValueError, match="lookback_w"):
        lookback_buffers(4, 1, 3, "cpu")


# ------------------------------------------------------------------ look-back on pre-filled state
@triton.jit
def _probe_diag(Flags, AggA, AggC, Incl, Hf, Out, c, N, W: tl.constexpr, BN: tl.constexpr):
    """Program for chunk ``c`` of one lane block: own summary = row c of AggA/AggC (as given),
    look back over the pre-filled predecessors, write h_in to Out."""
    lanes = tl.arange(0, BN)
    lmask = lanes < N
    base = c * N + lanes
    aa = tl.load(AggA + base, mask=lmask, other=1.0)
    ca = tl.load(AggC + base, mask=lmask, other=0.0)
    hf = tl.load(Hf + lanes, mask=lmask, other=0.0)
    h = lookback_diag(Flags, AggA, AggC, Incl, c, 0, 1, N, lanes, lmask, hf, aa, ca, W)
    tl.store(Out + lanes, h, mask=lmask)


@triton.jit
def _probe_block2(Flags, Agg, Incl, Hf, Out, c, M, W: tl.constexpr, BN: tl.constexpr):
    lanes = tl.arange(0, BN)
    lmask = lanes < M
    b6 = c * 6 * M + lanes
    e00 = tl.load(Agg + b6, mask=lmask, other=1.0)
    e01 = tl.load(Agg + b6 + M, mask=lmask, other=0.0)
    e10 = tl.load(Agg + b6 + 2 * M, mask=lmask, other=0.0)
    e11 = tl.load(Agg + b6 + 3 * M, mask=lmask, other=1.0)
    f0 = tl.load(Agg + b6 + 4 * M, mask=lmask, other=0.0)
    f1 = tl.load(Agg + b6 + 5 * M, mask=lmask, other=0.0)
    g0 = tl.load(Hf + lanes, mask=lmask, other=0.0)
    g1 = tl.load(Hf + M + lanes, mask=lmask, other=0.0)
    h0, h1 = lookback_block2(Flags, Agg, Incl, c, 0, 1, M, lanes, lmask, g0, g1, e00, e01, e10, e11, f0, f1, W)
    tl.store(Out + lanes, h0, mask=lmask)
    tl.store(Out + M + lanes, h1, mask=lmask)


def _flags(states, W, n_chunks):
    """Flag buffer (one lane block) holding ``states`` (list of 0/1/2 per tile; 2 is written
    as both bits, as a real publisher leaves it, or the inclusive bit alone for tile 0)."""
    flags, _ = lookback_buffers(n_chunks, 1, W, "cpu")
    if W == 1:
        flags[:len(states)] = torch.tensor(states, dtype=torch.int32)
        return flags
    words = [0] * flags.numel()
    for j, s in enumerate(states):
        if s:
            words[j // W] |= (1 if s == 1 else (2 if j == 0 else 3)) << (2 * (j % W))
    bits = 64 if W == 32 else 32
    flags.copy_(torch.tensor([w - (1 << bits) if w >= 1 << (bits - 1) else w for w in words], dtype=flags.dtype))
    return flags


def _scenario(c, j2, W, seed, p_zero_below=0.3):
    """Tile states for predecessors 0..c-1: nearest inclusive state at j2, flag 1 above it,
    anything (0 / 1 / 2) below it (never read)."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for j in range(c):
        if j > j2:
            states.append(1)
        elif j == j2:
            states.append(2)
        elif j == 0:
            states.append(2 if float(torch.rand(1, generator=g)) < 0.5 else 0)
        else:
            u = float(torch.rand(1, generator=g))
            states.append(0 if u < p_zero_below else (1 if u < 0.7 else 2))
    return states + [0]  # the probing chunk itself: nothing published yet


# (c, j2): first window partial or full, flag 2 in the first window, one or several windows back,
# exactly on a window boundary, at tile 0
SCENARIOS = [(1, 0), (5, 4), (5, 0), (37, 36), (37, 31), (37, 32), (37, 5), (70, 3), (70, 0), (64, 31)]


@pytest.mark.parametrize("W", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("c,j2", SCENARIOS)
def test_lookback_diag_prefilled(W, c, j2):
    N, BN = 5, 8
    g = torch.Generator().manual_seed(1000 * c + j2 + W)
    n_chunks = c + 1
    states = _scenario(c, j2, W, seed=c * 7 + j2)
    agg_a = torch.rand(n_chunks, N, generator=g, dtype=torch.float64) * 1.5 - 0.25
    agg_c = torch.randn(n_chunks, N, generator=g, dtype=torch.float64)
    incl = torch.randn(n_chunks, N, generator=g, dtype=torch.float64)
    hf = torch.randn(N, generator=g)
    # every value the look-back must not read is NaN: aggregates of tiles at / below j2 and
    # inclusive states of every tile but j2
    A32, C32, I32 = agg_a.float(), agg_c.float(), incl.float()
    A32[:j2 + 1] = float("nan")
    C32[:j2 + 1] = float("nan")
    I32[torch.arange(n_chunks) != j2] = float("nan")
    own_a, own_c = agg_a[c].clone(), agg_c[c].clone()
    A32[c], C32[c] = own_a.float(), own_c.float()
    flags = _flags(states, W, n_chunks)
    out = torch.empty(N)
    _probe_diag[(1,)](flags, A32, C32, I32, hf, out, c, N, W=W, BN=BN)
    # float64 reference: compose the aggregates j2+1 .. c-1 on the inclusive state of j2
    h = incl[j2].clone()
    for j in range(j2 + 1, c):
        h = agg_a[j] * h + agg_c[j]
    torch.testing.assert_close(out.double(), h, rtol=1e-5, atol=1e-5)
    # own publications: inclusive state and flag 2 (with flag 1 before it)
    torch.testing.assert_close(I32[c].double(), own_a * h + own_c, rtol=1e-5, atol=1e-5)
    field = int(flags[c]) if W == 1 else (int(flags[c // W]) >> (2 * (c % W))) & 3
    assert field == (2 if W == 1 else 3)


def test_lookback_diag_chunk0_uses_start():
    N = 3
    for W in (1, 8):
        flags = _flags([0], W, 1)
        a, cc, incl = torch.rand(1, N), torch.randn(1, N), torch.full((1, N), float("nan"))
        hf, out = torch.randn(N), torch.empty(N)
        _probe_diag[(1,)](flags, a, cc, incl, hf, out, 0, N, W=W, BN=4)
        assert torch.equal(out, hf)
        torch.testing.assert_close(incl[0], a[0] * hf + cc[0])


@pytest.mark.parametrize("W", [1, 4, 32])
@pytest.mark.parametrize("c,j2", [(5, 4), (37, 31), (37, 5), (70, 0)])
def test_lookback_block2_prefilled(W, c, j2):
    M, BN = 3, 4
    g = torch.Generator().manual_seed(100 * c + j2 + W)
    n_chunks = c + 1
    states = _scenario(c, j2, W, seed=c * 11 + j2)
    Jm = torch.randn(n_chunks, M, 2, 2, generator=g, dtype=torch.float64) * 0.7
    cv = torch.randn(n_chunks, M, 2, generator=g, dtype=torch.float64)
    incl = torch.randn(n_chunks, M, 2, generator=g, dtype=torch.float64)
    agg = torch.cat([Jm.reshape(n_chunks, M, 4).permute(0, 2, 1), cv.permute(0, 2, 1)], 1).float().contiguous()
    inc32 = incl.permute(0, 2, 1).float().contiguous()  # (n_chunks, 2, M)
    own = agg[c].clone()
    agg[:j2 + 1] = float("nan")
    inc32[torch.arange(n_chunks) != j2] = float("nan")
    agg[c] = own
    flags = _flags(states, W, n_chunks)
    hf, out = torch.randn(2 * M, generator=g), torch.empty(2 * M)
    _probe_block2[(1,)](flags, agg, inc32, hf, out, c, M, W=W, BN=BN)
    h = incl[j2].clone()
    for j in range(j2 + 1, c):
        h = (Jm[j] @ h.unsqueeze(-1)).squeeze(-1) + cv[j]
    torch.testing.assert_close(out.reshape(2, M).T.double(), h, rtol=1e-5, atol=1e-5)
    hc = (Jm[c] @ h.unsqueeze(-1)).squeeze(-1) + cv[c]
    torch.testing.assert_close(inc32[c].T.double(), hc, rtol=1e-5, atol=1e-5)


@triton.jit
def _probe_window(Flags, Res, hi, W: tl.constexpr):
    lo, done, next_hi = poll_window(Flags, hi, 0, 1, W)
    tl.store(Res, lo)
    tl.store(Res + 1, done)
    tl.store(Res + 2, next_hi)


def _decode_ref(states, hi, W):
    """Python model of one window poll (see poll_window's docstring)."""
    wb = hi // W * W
    js = range(wb, hi + 1)
    j2 = max([j for j in js if states[j] == 2], default=-1)
    j0 = max([j for j in js if states[j] == 0], default=-1)
    lo = max(j0, j2)
    return [lo, int(j2 > j0), (lo if lo >= 0 else wb - 1)]


@pytest.mark.parametrize("W", [2, 4, 16, 32])
def test_poll_window_decode(W):
    """Flag-0 (wait) cases, which a sequential interpreter run never produces: nearest 0 above
    the nearest 2 (fold the 1s above it, re-poll from it), 0 below the nearest 2 (done), all 1
    (move one window back), tiles above ``hi`` (successors) ignored."""
    g = torch.Generator().manual_seed(W)
    n = 3 * W
    cases = []
    for trial in range(40):
        states = [int(s) for s in torch.randint(0, 3, (n,), generator=g)]
        hi = int(torch.randint(0, n, (1,), generator=g))
        cases.append((states, hi))
    # hand-made: all 1 in the window; a 0 just below hi; a 2 at the window's first tile
    cases.append(([1] * n, 2 * W - 1))
    cases.append(([1] * (2 * W - 2) + [0] + [1] * (W + 1), 2 * W - 1))
    cases.append(([1] * W + [2] + [1] * (2 * W - 1), 2 * W - 1))
    for states, hi in cases:
        flags = _flags(states, W, n)
        res = torch.zeros(3, dtype=torch.int32)
        _probe_window[(1,)](flags, res, hi, W=W)
        assert res.tolist() == _decode_ref(states, hi, W), (states, hi)


# ------------------------------------------------------------------ GPU (compiled, real concurrency)
gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                         reason="needs CUDA and TRITON_INTERPRET unset")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("W", [1, 8, 16, 32])
def test_gpu_window_narrow(W):
    """Narrow widths, many small tiles in flight at once: windows really see flag-1 runs and waits."""
    from seqpar.kernels.fused_diag_gru import fused_diag_gru_step
    from seqpar.kernels.fused_diag_lstm import fused_diag_lstm_step
    from seqpar.kernels.scan_diag import scan_diag

    dev = "cuda"
    for N, T in ((1, 300_001), (16, 1_000_003), (17, 200_003)):
        J = torch.rand(T, N, device=dev) * 0.5 + 0.45
        b = torch.randn(T, N, device=dev)
        h0 = torch.randn(N, device=dev)
        for reverse in (False, True):
            out = scan_diag(J, b, h0, reverse=reverse, block_t=16, block_n=16, lookback_w=W)
            Jd, bd = (J.flip(0), b.flip(0)) if reverse else (J, b)
            ref = affine_scan_diag(Jd.double(), bd.double(), h0.double())
            ref = ref.flip(0) if reverse else ref
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.manual_seed(W)
    for B, n in ((16, 1), (1, 64), (3, 17)):
        T = 200_003
        cell, st, _ = _fused_case("diag_gru", B, n)
        cell = cell.to(dev)
        with torch.no_grad():
            xp = torch.randn(T, B, 3 * n, device=dev)
            h, bnd = torch.randn(T, B, n, device=dev) * 0.5, torch.randn(B, n, device=dev)
            c64 = copy.deepcopy(cell).double()
            hp = shift(h.double(), bnd.double())
            f = c64.step(hp, xp.double())
            Jg = c64.jacobian(hp, xp.double(), st)
            ref = affine_scan_diag((Jg).reshape(T, -1), (f - Jg * hp).reshape(T, -1), bnd.double().reshape(-1))
            for tt, bn in ((16, 16), (64, 16), (None, None)):
                out, _ = fused_diag_gru_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, block_t=tt, block_n=bn,
                                             lookback_w=W)
                torch.testing.assert_close(out.double().reshape(T, -1), ref, rtol=1e-4, atol=1e-4)
    cell = DiagLSTM(4, 8).to(dev)
    T, B = 100_003, 2
    with torch.no_grad():
        xp = cell.project_inputs(torch.randn(T, B, 4, device=dev))
        h, bnd = torch.randn(T, B, 16, device=dev) * 0.3, torch.randn(B, 16, device=dev)
        c64 = copy.deepcopy(cell).double()
        hp = shift(h.double(), bnd.double())
        f = c64.step(hp, xp.double())
        Jl = c64.jacobian(hp, xp.double(), BLOCK2)
        from seqpar.scan import affine_scan
        ref = affine_scan(Jl, f - BLOCK2.matvec(Jl, hp), bnd.double(), BLOCK2)
        out, _ = fused_diag_lstm_step(h, xp, cell.weight_hh, bnd, block_t=16, block_n=16, lookback_w=W)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def affine_scan_diag(J, b, h0):
    """float64 diagonal scan (T, N) from h0 (N,) via the parallel reference."""
    from seqpar.scan import affine_scan

    return affine_scan(J.unsqueeze(1), b.unsqueeze(1), h0.unsqueeze(0), DIAG).squeeze(1)
