"""Pipelined Newton pass of the dense :class:`seqpar.cells.GRU` for small state sizes (2 <= D <= 8).

The scheme of :mod:`seqpar.kernels.pipelined_diag_gru` (runs of ``R`` steps walked
in registers, carries scanned between passes: see :mod:`seqpar.pipeline`) for a
GRU with a full ``W_hh``: one thread ("walker") owns one batch row of one run and
holds the whole state, the D x D Jacobian and the run summary in registers, so
mat-vecs and ``J A`` need no cross-thread reduction (the latency that bounds
:mod:`seqpar.kernels.fused_dense_gru` at small D).  Two linearisations:

* ``exact=True`` (Newton, ``jacobian="dense"``): J_t dense, summaries ``A`` (D x D)
  and ``C`` per walker, scanned with :func:`scan_maps`;
* ``exact=False`` (quasi-Newton, ``jacobian="diag"``): the diagonal of J_t, diagonal
  summaries (scanned with :func:`seqpar.kernels.pipelined_diag_gru.scan_groups`).

Triton has no per-thread arrays, so the kernel is generated per (D, exact) as
straight-line code over scalars-per-walker (``h_0 .. h_{D-1}``, ``J_0_0 ..``) and
imported from a cache file (Triton compiles from the source file).  Reference:
:func:`pipelined_step_reference` (``GRU.step`` / ``GRU.jacobian`` + a sequential
scan, float64).

Shapes: ``h`` (T, B, D), ``xp`` (T, B, 3D), ``weight_hh`` (3D, D), ``bias_hh`` (3D,)
or None, boundaries (B, D); summaries float32: exact ``sum_a`` (n_runs, B, D, D),
``sum_c`` (n_runs, B, D); quasi both (n_runs, B, D); ``n_runs = ceil(T / R)``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from typing import NamedTuple, Optional

import torch
import triton

from .pipelined_diag_gru import PassResult, prepare_weights, run_length

MAX_D = 8
MAP_SCAN_TILE = {2: 1024, 4: 512, 8: 128}  # scan_maps: tile elements (maps x batch rows) by D (first key >= D)
MAP_SCAN_WARPS = 4
RUN, BLOCK, WARPS = 32, 128, 4       # steps per run, walkers per program (one per thread), warps
# shorten runs until n_runs * B reaches this (or the run MIN_RUN).  Fewer, longer runs leave fewer summaries
# to scan: run 35 (H100, GRU B=16, D=4, T=100k): R=8 2.36 ms, 16 2.27, 32 2.11, 64 2.37 (exact Newton)
MIN_WALKERS = 2**15
_KERNELS = {}


class DenseRunConfig(NamedTuple):
    r: int       # steps per run
    block: int   # walkers per program
    warps: int


def run_config(T: int, B: int, run: Optional[int] = None, block: Optional[int] = None,
               num_warps: Optional[int] = None) -> DenseRunConfig:
    """Launch shape: runs of ``RUN`` steps, shortened (halved, down to ``MIN_RUN``) while fewer than
    ``MIN_WALKERS`` walkers would run; arguments that are not None override."""
    r = run_length(T, B, RUN, MIN_WALKERS, run)
    return DenseRunConfig(r, BLOCK if block is None else block, WARPS if num_warps is None else num_warps)


# ---------------------------------------------------------------- code generation
def _gates(D: int, p: str, out: str, exact: bool) -> list:
    """Lines computing, at the state ``{p}_i``, the step ``{out}f_i`` and the Jacobian
    ``{out}J_i_j`` (exact) or its diagonal ``{out}J_i_i`` (quasi)."""
    L = []
    for i in range(D):
        for g in "rzn":
            terms = " + ".join(f"w{g}_{i}_{j} * {p}_{j}" for j in range(D))
            L.append(f"{out}h{g}_{i} = b{g}_{i} + {terms}")
        L.append(f"{out}r_{i} = sigmoid(xr_{i} + {out}hr_{i})")
        L.append(f"{out}z_{i} = sigmoid(xz_{i} + {out}hz_{i})")
        L.append(f"{out}n_{i} = tanh(xn_{i} + {out}r_{i} * {out}hn_{i})")
        L.append(f"{out}f_{i} = {out}n_{i} + {out}z_{i} * ({p}_{i} - {out}n_{i})")
        L.append(f"{out}dn_{i} = (1 - {out}z_{i}) * (1 - {out}n_{i} * {out}n_{i})")
        L.append(f"{out}ar_{i} = {out}dn_{i} * {out}hn_{i} * {out}r_{i} * (1 - {out}r_{i})")
        L.append(f"{out}an_{i} = {out}dn_{i} * {out}r_{i}")
        L.append(f"{out}az_{i} = ({p}_{i} - {out}n_{i}) * {out}z_{i} * (1 - {out}z_{i})")
        cols = range(D) if exact else [i]
        for j in cols:
            diag = f" + {out}z_{i}" if i == j else ""
            L.append(f"{out}J_{i}_{j} = {out}ar_{i} * wr_{i}_{j} + {out}az_{i} * wz_{i}_{j} + "
                     f"{out}an_{i} * wn_{i}_{j}{diag}")
    return L


def _source(D: int, exact: bool) -> str:
    ind = "    "
    body = []
    add = body.append
    add("if GUARD:")
    add("    if tl.load(Stop) != 0:")
    add("        return")
    add("pid = tl.program_id(0)")
    add("wk = pid * BLOCK + tl.arange(0, BLOCK)")
    add("wm = wk < n_walk")
    add("run = wk // B")
    add("b = wk % B")
    add("t0 = run.to(tl.int64) * R")
    add("wk64 = wk.to(tl.int64)")
    add("zero = tl.zeros([BLOCK], tl.float32)")
    for g_i, g in enumerate("rzn"):
        for i in range(D):
            for j in range(D):
                add(f"w{g}_{i}_{j} = tl.load(W + {(g_i * D + i) * D + j})")
            add(f"b{g}_{i} = tl.load(BH + {g_i * D + i})")
    add("first_run = run == 0")
    add("pm = wm & (t0 > 0)")
    for i in range(D):
        add(f"hkp_{i} = tl.where(first_run, tl.load(Bnd + b * {D} + {i}, mask=wm, other=0.0).to(tl.float32), "
            f"tl.load(H + ((t0 - 1) * B + b) * {D} + {i}, mask=pm, other=0.0).to(tl.float32))")
    add("if not FIRST:")
    for i in range(D):
        add(f"    hnp_{i} = tl.where(first_run, tl.load(St + b * {D} + {i}, mask=wm, other=0.0).to(tl.float32), "
            f"tl.load(Incl + (wk64 - B) * {D} + {i}, mask=wm & (run > 0), other=0.0))")
    cols = (lambda i: range(D)) if exact else (lambda i: [i])
    for i in range(D):
        for j in cols(i):
            add(f"A_{i}_{j} = zero + {1.0 if i == j else 0.0}")
        add(f"C_{i} = zero")
    add("rel = zero")
    add("fmx = zero")
    add("for k in range(R):")
    loop = []
    la = loop.append
    la("t = t0 + k")
    la("m = wm & (t < T)")
    la(f"base = (t * B + b) * {D}")
    la(f"xb = (t * B + b) * {3 * D}")
    for i in range(D):
        la(f"hk_{i} = tl.load(H + base + {i}, mask=m, other=0.0).to(tl.float32)")
        la(f"xr_{i} = tl.load(XP + xb + {i}, mask=m, other=0.0).to(tl.float32)")
        la(f"xz_{i} = tl.load(XP + xb + {D + i}, mask=m, other=0.0).to(tl.float32)")
        la(f"xn_{i} = tl.load(XP + xb + {2 * D + i}, mask=m, other=0.0).to(tl.float32)")
    la("if FIRST:")
    for i in range(D):
        la(f"    hp_{i} = hkp_{i}")
        la(f"    hc_{i} = hk_{i}")
    la("else:")
    # the new iterate: f(hk_prev) + J(hk_prev) (hn_prev - hk_prev)
    for line in _gates(D, "hkp", "o", exact):
        la("    " + line)
    for i in range(D):
        terms = " + ".join(f"oJ_{i}_{j} * (hnp_{j} - hkp_{j})" for j in cols(i))
        la(f"    hc_{i} = (of_{i} + {terms}).to(Out.dtype.element_ty)")
        la(f"    tl.store(Out + base + {i}, hc_{i}, mask=m)")
        la(f"    hc_{i} = hc_{i}.to(tl.float32)")
        la(f"    hp_{i} = hnp_{i}")
    for i in range(D):
        la(f"    hnp_{i} = tl.where(m, hc_{i}, hnp_{i})")
    # maps at the (new) iterate: residual and run summary
    for line in _gates(D, "hp", "", exact):
        la(line)
    for i in range(D):
        la(f"fab_{i} = tl.where(m, tl.abs(f_{i}), 0.0)")
        la(f"res_{i} = tl.fdiv(tl.abs(hc_{i} - f_{i}), tl.maximum(fab_{i}, 1.0), ieee_rounding=False)")
        la(f"rel = tl.maximum(rel, tl.where(m, tl.where(res_{i} == res_{i}, res_{i}, float('inf')), 0.0))")
        la(f"fmx = tl.maximum(fmx, tl.where(fab_{i} == fab_{i}, fab_{i}, float('inf')))")
    for i in range(D):
        terms = " + ".join(f"J_{i}_{k} * (C_{k} - hp_{k})" for k in cols(i))
        la(f"nC_{i} = {terms} + f_{i}")
        for j in cols(i):
            if exact:
                t2 = " + ".join(f"J_{i}_{k} * A_{k}_{j}" for k in range(D))
            else:
                t2 = f"J_{i}_{i} * A_{i}_{i}"
            la(f"nA_{i}_{j} = {t2}")
    for i in range(D):
        la(f"C_{i} = tl.where(m, nC_{i}, C_{i})")
        for j in cols(i):
            la(f"A_{i}_{j} = tl.where(m, nA_{i}_{j}, A_{i}_{j})")
    for i in range(D):
        la(f"hkp_{i} = tl.where(m, hk_{i}, hkp_{i})")
    body += ["    " + line for line in loop]
    for i in range(D):
        add(f"tl.store(SumC + wk64 * {D} + {i}, C_{i}, mask=wm)")
        for j in cols(i):
            off = f"(wk64 * {D} + {i}) * {D} + {j}" if exact else f"wk64 * {D} + {i}"
            add(f"tl.store(SumA + {off}, A_{i}_{j}, mask=wm)")
    add("tl.store(Res + pid, tl.max(rel, 0))")
    add("tl.store(Res + NPROG + pid, tl.max(fmx, 0))")
    head = (
        '"""Generated by seqpar.kernels.pipelined_dense_gru (D=%d, exact=%s): do not edit."""\n'
        "import triton\nimport triton.language as tl\n\nfrom seqpar.kernels._common import sigmoid, tanh\n\n\n"
        "@triton.jit\n"
        "def kernel(H, XP, W, BH, Bnd, Incl, St, Out, SumA, SumC, Res, Stop, T, B, n_walk, NPROG,\n"
        "           R: tl.constexpr, BLOCK: tl.constexpr, FIRST: tl.constexpr, GUARD: tl.constexpr):\n" % (D, exact))
    return head + "".join(ind + line + "\n" for line in body)


def _kernel(D: int, exact: bool):
    """The generated pass kernel for (D, exact)."""
    return _generated(f"pipelined_dense_gru_d{D}_{'exact' if exact else 'quasi'}", lambda: _source(D, exact)).kernel


def _generated(stem: str, source):
    """The module generated by ``source()``, written once to a cache file (keyed by its hash) and imported."""
    if stem in _KERNELS:
        return _KERNELS[stem]
    src = source()
    digest = hashlib.sha1(src.encode()).hexdigest()[:12]
    folder = os.environ.get("SEQPAR_KERNEL_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                   f"seqpar_kernels_{os.getuid()}")
    os.makedirs(folder, exist_ok=True)
    name = f"seqpar_{stem}_{digest}"
    path = os.path.join(folder, name + ".py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(src)
        os.replace(tmp, path)  # atomic: concurrent ranks never import a partial file
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    _KERNELS[stem] = mod
    return mod


# ---------------------------------------------------------------- the scan of dense run summaries
def _map_scan_source(D: int) -> str:
    """Two kernels over maps ``x -> A x + C`` (A (n, B, D, D), C (n, B, D)), one program per (chunk of CH
    maps, BB batch rows), each component a [CH, BB] tile composed by ``tl.associative_scan`` along the
    chunk: ``reduce`` stores each chunk's composed map, ``apply`` the states after every map of the
    chunk from the chunk's carry (``Carry[c - 1]``, ``Start`` for chunk 0)."""
    idx = [(i, j) for i in range(D) for j in range(D)]
    comps = [f"a_{i}_{j}" for i, j in idx] + [f"c_{i}" for i in range(D)]
    out = ['"""Generated by seqpar.kernels.pipelined_dense_gru (map scan, D=%d): do not edit."""' % D,
           "import triton", "import triton.language as tl", "", ""]
    # combine: the earlier map (p, q) then the later (a, c): x -> a (p x + q) + c
    out += ["@triton.jit", "def combine(" + ", ".join([f"p_{i}_{j}" for i, j in idx] + [f"q_{i}" for i in range(D)]
                                            + comps) + "):"]
    res = [" + ".join(f"a_{i}_{k} * p_{k}_{j}" for k in range(D)) for i, j in idx]
    res += [" + ".join(f"a_{i}_{k} * q_{k}" for k in range(D)) + f" + c_{i}" for i in range(D)]
    out += ["    return " + ", ".join(res), "", ""]
    tile = ["    ch = tl.program_id(0)", "    b = tl.program_id(1) * BB + tl.arange(0, BB)",
            "    r = ch.to(tl.int64) * CH + tl.arange(0, CH)", "    m = (r < n)[:, None] & (b < B)[None, :]",
            "    row = r[:, None] * B + b[None, :]"]
    tile += [f"    a_{i}_{j} = tl.load(A + (row * {D} + {i}) * {D} + {j}, mask=m, other={1.0 if i == j else 0.0})"
             for i, j in idx]
    tile += [f"    c_{i} = tl.load(C + row * {D} + {i}, mask=m, other=0.0)" for i in range(D)]
    tile += [f"    {', '.join(comps)} = tl.associative_scan(({', '.join(comps)}), 0, combine)"]
    out += ["@triton.jit", "def reduce(A, C, SA, SC, n, B, CH: tl.constexpr, BB: tl.constexpr):"] + tile
    out += ["    last = (tl.arange(0, CH) == CH - 1)[:, None]  # masked maps are identities",
            "    bm = b < B", "    srow = ch.to(tl.int64) * B + b"]
    out += [f"    tl.store(SA + (srow * {D} + {i}) * {D} + {j}, tl.sum(tl.where(last, a_{i}_{j}, 0.0), 0), mask=bm)"
            for i, j in idx]
    out += [f"    tl.store(SC + srow * {D} + {i}, tl.sum(tl.where(last, c_{i}, 0.0), 0), mask=bm)" for i in range(D)]
    out += ["", "", "@triton.jit", "def apply(A, C, Carry, Start, Incl, n, B, CH: tl.constexpr, BB: tl.constexpr):"]
    out += tile
    out += ["    bm = b < B", "    after_first = (tl.zeros_like(b) + ch) > 0",
            "    crow = (ch.to(tl.int64) - 1) * B + b"]
    for k in range(D):
        out += [f"    h_{k} = tl.where(after_first, tl.load(Carry + crow * {D} + {k}, mask=bm & after_first, other=0.0),"
                f" tl.load(Start + b * {D} + {k}, mask=bm, other=0.0).to(tl.float32))[None, :]"]
    out += [f"    tl.store(Incl + row * {D} + {i}, " + " + ".join(f"a_{i}_{k} * h_{k}" for k in range(D))
            + f" + c_{i}, mask=m)" for i in range(D)]
    return "\n".join(out) + "\n"


def map_scan_tile(D: int, n: int, B: int) -> tuple:
    """``(CH, BB)``: maps per chunk and batch rows per program of :func:`scan_maps` (``MAP_SCAN_TILE``
    elements, fewer for larger D: every component of a map is a tile; CH at most n's power of two)."""
    elems = MAP_SCAN_TILE[min(k for k in MAP_SCAN_TILE if k >= D)]
    bb = max(1, min(triton.next_power_of_2(B), elems // 64))
    ch = max(2, min(elems // bb, triton.next_power_of_2(n)))
    return ch, bb


def scan_maps(sum_a: torch.Tensor, sum_c: torch.Tensor, start: torch.Tensor, tile: Optional[tuple] = None) -> torch.Tensor:
    """Inclusive states (n, B, D) of ``h_r = A_r h_{r-1} + C_r`` from ``start`` (B, D), for small dense D
    (2..MAX_D): chunks of CH maps are composed in parallel (``reduce``), the chunk maps are scanned by
    this same function, and every chunk is rescanned from its carry (``apply``); one ``apply`` when
    n <= CH.  ``tile``: ``(CH, BB)`` (default :func:`map_scan_tile`).  Reference:
    :func:`seqpar.scan.affine_scan` (DENSE)."""
    n, B, D = sum_c.shape
    out = torch.empty(n, B, D, dtype=torch.float32, device=sum_c.device)
    if n == 0:
        return out
    ch, bb = map_scan_tile(D, n, B) if tile is None else tile
    mod = _generated(f"map_scan_d{D}", lambda: _map_scan_source(D))
    A, C = sum_a.reshape(n, B, D, D).contiguous(), sum_c.contiguous()
    start = start.to(torch.float32).contiguous()
    n_ch = triton.cdiv(n, ch)
    grid = (n_ch, triton.cdiv(B, bb))
    carry = out  # unused when there is one chunk
    if n_ch > 1:
        sa = torch.empty(n_ch, B, D, D, dtype=torch.float32, device=C.device)
        sc = torch.empty(n_ch, B, D, dtype=torch.float32, device=C.device)
        mod.reduce[grid](A, C, sa, sc, n, B, CH=ch, BB=bb, num_warps=MAP_SCAN_WARPS)
        carry = scan_maps(sa, sc, start, tile)
    mod.apply[grid](A, C, carry, start, out, n, B, CH=ch, BB=bb, num_warps=MAP_SCAN_WARPS)
    return out


# ---------------------------------------------------------------- launches
def _launch(first, exact, h, xp, weight_hh, bias_hh, boundary, incl, start, out, cfg: DenseRunConfig, stop=None):
    T, B, D = h.shape
    if not 2 <= D <= MAX_D:
        raise ValueError(f"the pipelined dense GRU kernel supports 2 <= D <= {MAX_D}; got D={D}")
    dev = h.device
    n_runs = triton.cdiv(T, cfg.r) if T else 0
    sum_a = torch.empty((n_runs, B, D, D) if exact else (n_runs, B, D), dtype=torch.float32, device=dev)
    sum_c = torch.empty(n_runs, B, D, dtype=torch.float32, device=dev)
    if T == 0:
        return PassResult(None if first else (torch.empty_like(h) if out is None else out), sum_a, sum_c,
                          torch.zeros(2, dtype=torch.float32, device=dev))
    w, bh = prepare_weights(weight_hh, bias_hh)
    h, xp, boundary = h.contiguous(), xp.contiguous(), boundary.contiguous()
    n_walk = n_runs * B
    grid = (triton.cdiv(n_walk, cfg.block),)
    part = torch.empty(2, grid[0], dtype=torch.float32, device=dev)
    if first:
        out_arg, incl_arg, start_arg = h, sum_c, boundary
    else:
        out = torch.empty_like(h) if out is None else out
        out_arg, incl_arg, start_arg = out, incl.contiguous(), start.contiguous()
    _kernel(D, exact)[grid](h, xp, w, bh, boundary, incl_arg, start_arg, out_arg, sum_a, sum_c, part,
                            part if stop is None else stop, T, B, n_walk, grid[0], R=cfg.r, BLOCK=cfg.block,
                            FIRST=first, GUARD=stop is not None, num_warps=cfg.warps)
    return PassResult(None if first else out, sum_a, sum_c, part if stop is not None else part.amax(1))


def first_pass(h, xp, weight_hh, bias_hh, boundary, exact: bool = True,
               cfg: Optional[DenseRunConfig] = None, stop=None) -> PassResult:
    """Run summaries and residual of the iterate ``h`` (T, B, D) (see :mod:`seqpar.pipeline`); with ``stop``
    (a :mod:`seqpar.kernels.stopping` state) nothing once that state says stopped, and ``stats`` unreduced
    (as :func:`seqpar.kernels.pipelined_diag_gru.first_pass`)."""
    return _launch(True, exact, h, xp, weight_hh, bias_hh, boundary, None, None, None,
                   cfg or run_config(h.shape[0], h.shape[1]), stop)


def pipelined_step(h, xp, weight_hh, bias_hh, boundary, incl, start, out=None, exact: bool = True,
                   cfg: Optional[DenseRunConfig] = None, stop=None) -> PassResult:
    """One (quasi-)Newton iteration from ``h`` whose run summaries the previous pass returned; ``incl``
    (n_runs, B, D) their inclusive scan from ``start`` (B, D) (as
    :func:`seqpar.kernels.pipelined_diag_gru.pipelined_step`; ``stop``: as :func:`first_pass`)."""
    return _launch(False, exact, h, xp, weight_hh, bias_hh, boundary, incl, start, out,
                   cfg or run_config(h.shape[0], h.shape[1]), stop)


@torch.no_grad()
def pipelined_step_reference(h, xp, weight_hh, bias_hh, boundary, start, run: int, exact: bool = True):
    """Float64 reference: ``(out, sum_a, sum_c, residual)`` (``start=None``: the first pass, ``out`` None)."""
    from seqpar.cells import GRU
    from seqpar.scan import affine_scan
    from seqpar.structure import DENSE, DIAG

    st = DENSE if exact else DIAG
    T, B, D = h.shape
    cell = GRU(1, D, bias=bias_hh is not None).double()
    cell.weight_hh.copy_(weight_hh.double().cpu())
    if bias_hh is not None:
        cell.bias_hh.copy_(bias_hh.double().cpu())
    h, xp, boundary = h.double().cpu(), xp.double().cpu(), boundary.double().cpu()

    def maps(states, before):
        hp = torch.cat([before.unsqueeze(0), states[:-1]], 0)
        f = cell.step(hp, xp)
        J = cell.jacobian(hp, xp, st)
        return f, J, f - st.matvec(J, hp)

    out = None
    if start is not None:
        _, J, b = maps(h, boundary)
        out = affine_scan(J, b, start.double().cpu(), st)
        h, boundary = out, start.double().cpu()
    f, J, b = maps(h, boundary)
    res = ((h - f).abs() / f.abs().clamp_min(1.0)).max() if T else torch.zeros((), dtype=torch.float64)
    n_runs = -(-T // run)
    eye = torch.eye(D, dtype=torch.float64).expand(B, D, D)
    sum_a = torch.zeros((n_runs, B, D, D) if exact else (n_runs, B, D), dtype=torch.float64)
    sum_c = torch.zeros(n_runs, B, D, dtype=torch.float64)
    J = J.reshape(T, B, D, D) if exact else J
    for r in range(n_runs):
        A = eye.clone() if exact else torch.ones(B, D, dtype=torch.float64)
        C = torch.zeros(B, D, dtype=torch.float64)
        for t in range(r * run, min(T, (r + 1) * run)):
            C = ((J[t] @ C.unsqueeze(-1)).squeeze(-1) if exact else J[t] * C) + b[t]
            A = J[t] @ A if exact else J[t] * A
        sum_a[r], sum_c[r] = A, C
    return out, sum_a, sum_c, res
