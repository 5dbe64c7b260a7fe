#!/usr/bin/env python
"""Sweep of the narrow-width single-pass kernels: look-back window W and tile shape per lane count.

    PYTHONUNBUFFERED=1 python benchmarks/sweep_narrow.py --out $OUT/sweep_narrow.json [--budget 400]

One GPU, one run (bounded: configurations are skipped once ``--budget`` seconds have passed;
the JSON is rewritten after every section).  Measures the device copy bandwidth first (a
device-to-device ``copy_`` of 2 GiB, counted as read + write), then for lane counts
N = B * D in {16, 64, 256, 1024} (B = 16, D = 1, 4, 16, 64), T = 2^20:

* one fused DiagGRU Newton iteration (``fused_diag_gru_step``, tile variant): the current
  table tile with W in {1 (old one-at-a-time look-back), 8, 16, 32}, then a few other tile
  shapes with the best window;  min bytes = 20 B per state (read h 4 + xp 12, write 4);
* the user's shapes B = 1, D = 64 / 256 (T = 2^20, and T = 10 * 2^20 for D = 64): W = 1
  at the table tile against the best configuration of its lane-count bucket;
* the diagonal scan ``scan_diag`` alone (min bytes 12 B per state: read J, b, write h) in the
  same way, and its reverse direction (the backward pass's adjoint scan) for W = 1 / best;
* DiagLSTM (2x2 blocks) at M = B * H in {16, 256}: W = 1 against W = 16 (table tile).

Every configuration is checked before it is timed, so a broken one cannot win: against a
float64 torch reference on a short T (about 64 tiles plus a partial one), and at the full T
against the W = 1 output of the same width (max abs difference <= 1e-3; GRU / scan maps here
are contractive).  Timings: CUDA events, median of ``--reps`` calls after two warm-up calls
(the first compiles).  Each row: ``ms``, ``min_bytes_ms`` (at the measured copy bandwidth),
``ratio`` = ms / min_bytes_ms, and ``ratio_nominal`` at ``--nominal-gbps`` (4300: the user's
H200 figure).  At the end the best configuration per lane count is printed as Python dict
literals ready to paste as ``TILES`` in kernels/fused_diag_gru.py and kernels/scan_diag.py.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import common
from common import env_info, write_json
from seqpar.cells import DiagGRU, DiagLSTM
from seqpar.newton import shift
from seqpar.scan import affine_scan
from seqpar.structure import DIAG, Structure
from seqpar.kernels import fused_diag_gru, scan_diag as scan_diag_mod
from seqpar.kernels._common import pick_tiles
from seqpar.kernels.fused_diag_gru import fused_diag_gru_step
from seqpar.kernels.fused_diag_lstm import fused_diag_lstm_step
from seqpar.kernels.scan_diag import scan_diag

BLOCK2 = Structure("block", 2)
WINDOWS = (1, 8, 16, 32)
# other tile shapes (TT, BN, warps) tried per lane count with the best window of the table tile.
# Register use (ptxas, sm_90, fused GRU): 32 elements per thread (TT * BN / (32 * warps), the
# old defaults) -> 255 registers + spills (2 CTAs of 4 warps per SM); 16 -> ~190 (no spill);
# 8 -> ~96-128 (W = 16 / 32): more programs in flight to hide the look-back wait.
GRU_SHAPES = {
    16: [(64, 16, 4), (128, 16, 8), (128, 16, 4), (256, 16, 8), (32, 16, 2)],
    64: [(16, 64, 4), (32, 64, 8), (32, 64, 4), (64, 64, 8), (32, 32, 4)],
    256: [(8, 256, 8), (16, 256, 8), (16, 128, 4), (8, 128, 4), (16, 64, 4)],
    1024: [(8, 256, 8), (16, 256, 8), (16, 128, 4), (8, 128, 4), (16, 64, 4)],
}
SCAN_SHAPES = {  # scan kernel at (64, 64, 2) (64 elements per thread): 255 registers + spills
    16: [(128, 16, 2), (256, 16, 4), (128, 16, 4), (512, 16, 8)],
    64: [(64, 64, 4), (32, 64, 2), (32, 64, 4), (128, 32, 4)],
    256: [(64, 64, 4), (32, 128, 4), (32, 64, 2), (16, 256, 4)],
    1024: [(64, 64, 4), (32, 128, 4), (32, 64, 2), (16, 256, 4)],
}
R = {}
T0 = time.time()
DEV = "cuda"
SHORT_TILES = 64  # tiles of the short float64 check


def elapsed():
    torch.cuda.empty_cache()  # between configs / sections: the previous section's tensors are gone
    return time.time() - T0


def bench(fn, reps):
    fn()  # compile
    fn()
    if DEV == "cpu":  # --dry-run (TRITON_INTERPRET=1): exercises the script's logic only
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return common.event_ms(fn, reps, warmup=0)


def copy_bandwidth():
    n = 1 << (29 if DEV == "cuda" else 20)  # 2 GiB of float32
    src = torch.randn(n, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), 10)
    return 8 * n / (ms * 1e-3) / 1e9  # read + write


def row(ms, nbytes, args):
    mb = nbytes / (R["copy_GBps"] * 1e9) * 1e3
    return {"ms": ms, "min_bytes": nbytes, "min_bytes_ms": mb, "ratio": ms / mb,
            "ratio_nominal": ms / (nbytes / (args.nominal_gbps * 1e9) * 1e3)}


def cfg_key(tt, bn, warps, w):
    return f"tt{tt}_bn{bn}_w{warps}_W{w}"


def close(out, ref, tol):
    """max |out - ref| <= tol * max(1, max |ref|) (float64 when ref is, else in out's dtype: no
    full-size float64 copies of 1M x 1024 outputs)."""
    d = out.double() - ref if ref.dtype == torch.float64 else out - ref
    err = float(d.abs().max())
    scale = max(1.0, float(ref.abs().max()))
    return err <= tol * scale, err


# ------------------------------------------------------------------ fused DiagGRU
def gru_inputs(T, B, D, seed):
    torch.manual_seed(seed)
    cell = DiagGRU(8, D).to(DEV)
    with torch.no_grad():
        xp = torch.randn(T, B, 3 * D, device=DEV)
        h = torch.randn(T, B, D, device=DEV) * 0.5
    bnd = torch.randn(B, D, device=DEV) * 0.5
    return cell, h, xp, bnd


def gru_reference(cell, h, xp, bnd):
    c64 = copy.deepcopy(cell).double()
    with torch.no_grad():
        hp = shift(h.double(), bnd.double())
        f = c64.step(hp, xp.double())
        J = c64.jacobian(hp, xp.double(), DIAG)
        return affine_scan(J, f - J * hp, bnd.double(), DIAG)


def gru_config(cell, h, xp, bnd, out, tt, bn, warps, w):
    def fn():
        with torch.no_grad():
            fused_diag_gru_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, out=out, block_t=tt, block_n=bn,
                                num_warps=warps, lookback_w=w)
    return fn


def gru_check_short(cell, tt, bn, warps, w, B, D):
    """Float64 check on ~64 tiles (+ a partial one)."""
    T = SHORT_TILES * tt + 5
    _, h, xp, bnd = gru_inputs(T, B, D, seed=T)
    with torch.no_grad():
        out, _ = fused_diag_gru_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, block_t=tt, block_n=bn,
                                     num_warps=warps, lookback_w=w)
    return close(out, gru_reference(cell, h, xp, bnd), 1e-4)


def run_gru_config(res, cell, h, xp, bnd, out, base_out, B, D, tt, bn, warps, w, args):
    key = cfg_key(tt, bn, warps, w)
    if key in res["configs"]:
        return res["configs"][key]
    if elapsed() > args.budget:
        res["configs"][key] = {"skipped": "budget"}
        print(f"  {key:28s} skipped (budget)", flush=True)
        return res["configs"][key]
    try:
        ok, err = gru_check_short(cell, tt, bn, warps, w, B, D)
        ms = bench(gru_config(cell, h, xp, bnd, out, tt, bn, warps, w), args.reps)
        r = row(ms, 20 * h.numel(), args)
        r.update(tt=tt, bn=bn, warps=warps, w=w, short_check_ok=ok, short_check_err=err)
        if base_out is not None:
            ok2, err2 = close(out, base_out, 1e-3)
            r.update(full_check_ok=ok2, full_check_err=err2)
            ok = ok and ok2
        r["ok"] = ok
    except Exception as e:  # noqa: BLE001
        r = {"tt": tt, "bn": bn, "warps": warps, "w": w, "ok": False, "error": repr(e)[:400]}
    res["configs"][key] = r
    print(f"  {key:28s} " + (f"{r['ms']:8.3f} ms  ratio {r['ratio']:.2f} (nominal {r['ratio_nominal']:.2f})"
                             f"  ok={r['ok']}" if "ms" in r else str(r)), flush=True)
    return r


def best_of(res):
    good = [(v["ms"], k) for k, v in res["configs"].items() if v.get("ok") and "ms" in v]
    return min(good)[1] if good else None


def open_section(kind, name, shape, args, **meta):
    """Print the section header and return its results dict ``R[kind][name]`` (meta + configs);
    past the time budget it is marked ``skipped`` and the caller returns it untouched."""
    print(f"== {name}{shape}", flush=True)
    res = R.setdefault(kind, {}).setdefault(name, {**meta, "configs": {}})
    if elapsed() > args.budget:
        res["skipped"] = "budget"
        print("  skipped (budget)", flush=True)
    return res


def sweep_gru(B, D, T, args, extra_shapes=(), only=None):
    """``only``: a list of (tt, bn, warps, w) to time (user shapes); else the full sweep."""
    N = B * D
    res = open_section("gru", f"gru_B{B}_D{D}_T{T}", f" (N={N})", args, B=B, D=D, T=T, N=N)
    if "skipped" in res:
        return res
    cell, h, xp, bnd = gru_inputs(T, B, D, seed=N)
    out = torch.empty_like(h)
    tt, bn, warps, _ = pick_tiles(fused_diag_gru.TILES, N)
    base = run_gru_config(res, cell, h, xp, bnd, out, None, B, D, tt, bn, warps, 1, args)
    base_out = out.clone() if base.get("ok") else None
    configs = only if only is not None else [(tt, bn, warps, w) for w in WINDOWS[1:]]
    for c in configs:
        run_gru_config(res, cell, h, xp, bnd, out, base_out, B, D, *c, args)
    if only is None:
        bk = best_of(res)
        w_best = res["configs"][bk]["w"] if bk else 16
        for s in extra_shapes:
            run_gru_config(res, cell, h, xp, bnd, out, base_out, B, D, *s, w_best, args)
    bk = best_of(res)
    res["best"] = bk
    if bk:
        b = res["configs"][bk]
        print(f"  best {bk}: {b['ms']:.3f} ms, ratio {b['ratio']:.2f}; W=1: {base.get('ms', float('nan')):.3f} ms",
              flush=True)
    write_json(args.out, R)
    return res


# ------------------------------------------------------------------ scan_diag
def sweep_scan(N, T, args, extra_shapes=()):
    name = f"scan_N{N}_T{T}"
    res = open_section("scan_diag", name, "", args, N=N, T=T)
    if "skipped" in res:
        return res
    torch.manual_seed(N)
    J = torch.rand(T, N, device=DEV) * 0.5 + 0.45
    b = torch.randn(T, N, device=DEV)
    h0 = torch.randn(N, device=DEV)
    out = torch.empty_like(b)
    Ts = SHORT_TILES * 1024 + 5  # short check: >= 64 tiles of any shape below
    Js, bs = J[:Ts].clone(), b[:Ts].clone()
    ref_s = {rev: (affine_scan(Js.double().flip(0).unsqueeze(1), bs.double().flip(0).unsqueeze(1),
                               h0.double().unsqueeze(0), DIAG).flip(0) if rev else
                   affine_scan(Js.double().unsqueeze(1), bs.double().unsqueeze(1), h0.double().unsqueeze(0), DIAG)
                   ).squeeze(1) for rev in (False, True)}
    base_out = {}

    def one(tt, bn, warps, w, reverse=False):
        key = cfg_key(tt, bn, warps, w) + ("_reverse" if reverse else "")
        if key in res["configs"]:
            return res["configs"][key]
        if elapsed() > args.budget:
            res["configs"][key] = {"skipped": "budget"}
            print(f"  {key:36s} skipped (budget)", flush=True)
            return res["configs"][key]
        kw = dict(reverse=reverse, block_t=tt, block_n=bn, num_warps=warps, lookback_w=w)
        try:
            ok, err = close(scan_diag(Js, bs, h0, **kw), ref_s[reverse], 1e-4)
            ms = bench(lambda: scan_diag(J, b, h0, out=out, **kw), args.reps)
            r = row(ms, 12 * T * N, args)
            r.update(tt=tt, bn=bn, warps=warps, w=w, reverse=reverse, short_check_ok=ok, short_check_err=err)
            if reverse in base_out:
                ok2, err2 = close(out, base_out[reverse], 1e-3)
                r.update(full_check_ok=ok2, full_check_err=err2)
                ok = ok and ok2
            elif w == 1 and ok:
                base_out[reverse] = out.clone()
            r["ok"] = ok
        except Exception as e:  # noqa: BLE001
            r = {"tt": tt, "bn": bn, "warps": warps, "w": w, "reverse": reverse, "ok": False, "error": repr(e)[:400]}
        res["configs"][key] = r
        print(f"  {key:36s} " + (f"{r['ms']:8.3f} ms  ratio {r['ratio']:.2f}  ok={r['ok']}" if "ms" in r else str(r)),
              flush=True)
        return r

    tt, bn, warps, _ = pick_tiles(scan_diag_mod.TILES, N)
    for w in WINDOWS:
        one(tt, bn, warps, w)
    fwd = {k: v for k, v in res["configs"].items() if not v.get("reverse") and v.get("ok") and "ms" in v}
    w_best = min(fwd.values(), key=lambda v: v["ms"])["w"] if fwd else 16
    for s in extra_shapes:
        one(*s, w_best)
    fwd = {k: v for k, v in res["configs"].items() if not v.get("reverse") and v.get("ok") and "ms" in v}
    if fwd:
        bk = min(fwd, key=lambda k: fwd[k]["ms"])
        res["best"] = bk
        b_ = fwd[bk]
        one(tt, bn, warps, 1, reverse=True)
        one(b_["tt"], b_["bn"], b_["warps"], b_["w"], reverse=True)
        print(f"  best {bk}: {b_['ms']:.3f} ms, ratio {b_['ratio']:.2f}", flush=True)
    write_json(args.out, R)


# ------------------------------------------------------------------ DiagLSTM
def sweep_lstm(B, H, T, args):
    M = B * H
    res = open_section("lstm", f"lstm_B{B}_H{H}_T{T}", f" (M={M})", args, B=B, H=H, T=T, M=M)
    if "skipped" in res:
        return res
    torch.manual_seed(M)
    cell = DiagLSTM(8, H).to(DEV)
    Ts = SHORT_TILES * 64 + 3
    for w in (1, 16):
        if elapsed() > args.budget:
            res["configs"][f"W{w}"] = {"skipped": "budget"}
            continue
        try:
            with torch.no_grad():
                xs = torch.randn(Ts, B, 4 * H, device=DEV)
                hs = torch.randn(Ts, B, 2 * H, device=DEV) * 0.5
                bnd = torch.randn(B, 2 * H, device=DEV) * 0.5
                o, _ = fused_diag_lstm_step(hs, xs, cell.weight_hh, bnd, lookback_w=w)
                c64 = copy.deepcopy(cell).double()
                hp = shift(hs.double(), bnd.double())
                f = c64.step(hp, xs.double())
                J = c64.jacobian(hp, xs.double(), BLOCK2)
                ref = affine_scan(J, f - BLOCK2.matvec(J, hp), bnd.double(), BLOCK2)
                ok, err = close(o, ref, 1e-4)
                xp = torch.randn(T, B, 4 * H, device=DEV)
                h = torch.randn(T, B, 2 * H, device=DEV) * 0.5
                out = torch.empty_like(h)
                ms = bench(lambda: fused_diag_lstm_step(h, xp, cell.weight_hh, bnd, out=out, lookback_w=w), args.reps)
            r = row(ms, 32 * T * M, args)
            r.update(w=w, ok=ok, short_check_err=err)
        except Exception as e:  # noqa: BLE001
            r = {"w": w, "ok": False, "error": repr(e)[:400]}
        res["configs"][f"W{w}"] = r
        print(f"  W{w}: " + (f"{r['ms']:8.3f} ms  ratio {r['ratio']:.2f}  ok={r['ok']}" if "ms" in r else str(r)),
              flush=True)
    write_json(args.out, R)


def table_literal(section, key_of):
    """``{16: dict(...), ...}`` from the best configuration of each lane count."""
    lines = ["{"]
    for n in (16, 64, 256, 1024):
        res = key_of(n)
        bk = res.get("best") if res else None
        if not bk:
            lines.append(f"    # {n}: no valid configuration measured")
            continue
        b = res["configs"][bk]
        lines.append(f"    {n}: dict(tt={b['tt']}, bn={b['bn']}, warps={b['warps']}, w={b['w']}),"
                     f"  # {b['ms']:.3f} ms, {b['ratio']:.2f}x min bytes")
    lines.append('    "wide": dict(tt=DEFAULT_TT, bn=DEFAULT_BN, warps=DEFAULT_WARPS, w=1),')
    lines.append("}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=common.out_path("sweep_narrow.json"))
    ap.add_argument("--budget", type=float, default=400.0, help="seconds after which remaining configs are skipped")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--T", type=int, default=1 << 20)
    ap.add_argument("--nominal-gbps", type=float, default=4300.0)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: gru,user,scan,lstm")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU + TRITON_INTERPRET=1, tiny T: checks the script, measures nothing")
    args = ap.parse_args()
    if args.dry_run:
        global DEV, SHORT_TILES
        DEV, SHORT_TILES = "cpu", 2
        for shapes in (GRU_SHAPES, SCAN_SHAPES):
            for n in shapes:
                shapes[n] = shapes[n][:1]
    skip = set(filter(None, args.skip.split(",")))
    R["env"] = env_info()
    R["copy_GBps"] = copy_bandwidth()
    R["nominal_GBps"] = args.nominal_gbps
    print(f"copy bandwidth {R['copy_GBps']:.0f} GB/s (read + write of 2 GiB)", flush=True)
    T = args.T
    gru = {}
    if "gru" not in skip:
        for D in (1, 4, 16, 64):
            gru[16 * D] = sweep_gru(16, D, T, args, extra_shapes=GRU_SHAPES[16 * D])
    if "user" not in skip:  # the user's shapes, W = 1 against the best of the bucket
        for D, TU in ((64, T), (256, T), (64, 10 * T)):
            b = gru.get(D, {}).get("best")
            c = gru[D]["configs"][b] if b else None
            only = [(c["tt"], c["bn"], c["warps"], c["w"])] if c else [
                tuple(pick_tiles(fused_diag_gru.TILES, D)[:3]) + (16,)]
            sweep_gru(1, D, TU, args, only=only)
    if "scan" not in skip:
        for N in (16, 64, 256, 1024):
            sweep_scan(N, T, args, extra_shapes=SCAN_SHAPES[N])
    if "lstm" not in skip:
        for B, H in ((16, 1), (16, 16)):
            sweep_lstm(B, H, T, args)
    R["wall_s"] = elapsed()
    R["tiles_fused_diag_gru"] = table_literal("gru", lambda n: R.get("gru", {}).get(f"gru_B16_D{n // 16}_T{T}"))
    R["tiles_scan_diag"] = table_literal("scan_diag", lambda n: R.get("scan_diag", {}).get(f"scan_N{n}_T{T}"))
    write_json(args.out, R)
    print("\n# kernels/fused_diag_gru.py\nTILES = " + R["tiles_fused_diag_gru"], flush=True)
    print("\n# kernels/scan_diag.py\nTILES = " + R["tiles_scan_diag"], flush=True)
    print(f"\nwall {R['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
