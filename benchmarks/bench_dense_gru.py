#!/usr/bin/env python
"""Exact (dense-Jacobian) Newton for the dense GRU: the fused kernel against the old torch path and cuDNN.

``seqpar.solve(GRU(I, D), x, h0, jacobian="dense")`` on batch 16, D in {2, 4, 16, 64},
T in {100k, 1M} (input size I = D unless --input-size), float32.  For every (D, T) it
times, as the median of --repeats calls after one warm-up call, with the device
synchronised around each call (the input projection is included: the solve does it):

* ``fused-ieee``: the fused kernel (kernels/fused_dense_gru.py), chunk summaries in IEEE fp32;
* ``fused-tf32`` / ``fused-tf32x3``: the same with TF32 / 3xTF32 tensor-core products for the chunk summaries
  (``seqpar.cells.DENSE_KERNEL_PRECISION``; D > 8 only);
* ``torch-path``: the previous path (J per chunk in torch, ``GRU.jacobian``, scanned by
  kernels/scan_dense.py), forced with a GRU subclass that redefines ``jacobian`` (the
  backend then refuses the kernel);
* ``cudnn``: torch.nn.GRU (cuDNN, float32) over T steps in pieces of 65,000 steps carrying h.

plus iterations / converged / residual history per solve, and ``max_rel_diff``: the
trajectory against torch.nn.GRU in float64 on the GPU (max |a - b| / max(1, max |b|)), on
the whole sequence or, if the float64 run is estimated above --max-call-s, on a prefix
(``ref_steps``).  ``step_s`` times one Newton iteration of the fused kernel alone.  A
configuration estimated (linearly in T from the previous T) above --max-call-s is
skipped (``skipped``, with the estimate); once --total-budget-s is spent the rest is
skipped.  Writes JSON (default $OUT/dense_gru.json or benchmarks/results/dense_gru.json)
and prints a table.

    python benchmarks/bench_dense_gru.py --out $OUT/dense_gru.json           # GPU: ~3-4 min
    python benchmarks/bench_dense_gru.py --sweep --dims 4,64 --steps 1M --precisions ieee   # tunables, ~2 min
    python benchmarks/bench_dense_gru.py --quick                             # CPU smoke test (interpreter)
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import common  # noqa: F401  (puts the repo root on sys.path)
import seqpar
import seqpar.cells as cells
from common import env_info, out_path, sync, write_json
from seqpar.cells import GRU
from seqpar.problems import parse_count

SOLVERS = ("fused", "torch-path", "cudnn")
PIECE = 65_000  # cuDNN refuses T >= 65536 per call


class TorchPathGRU(GRU):
    """The same cell; redefining ``jacobian`` makes the backend refuse the fused kernel (old path)."""

    def jacobian(self, h_prev, xp, structure):
        return super().jacobian(h_prev, xp, structure)


def parse_list(text, conv):
    return [conv(x) for x in str(text).split(",") if x.strip()]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="100k,1M", help="sequence lengths T (comma-separated counts)")
    p.add_argument("--dims", default="64,16,4,2", help="state sizes D (<= 64), in run order: the costly first")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-size", type=int, default=0, help="input size I (0: I = D)")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--precisions", default="ieee,tf32,tf32x3", help="fused kernel summary products: ieee,tf32,tf32x3")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-call-s", type=float, default=20.0, help="skip a configuration estimated above this per call")
    p.add_argument("--total-budget-s", type=float, default=240.0, help="skip everything after this much wall time")
    p.add_argument("--no-check", action="store_true", help="skip the float64 cuDNN comparison")
    p.add_argument("--sweep", action="store_true",
                   help="instead: time one fused Newton iteration over num_warps / w_in_loop / programs / precision")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test under TRITON_INTERPRET=1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/dense_gru.json or benchmarks/results/)")
    return p


def _median_timed(fn, repeats):
    """(median s, all times, last result) of ``repeats`` calls after one warm-up call."""
    fn()
    sync()
    times, res = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        res = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, res


def _torch_gru(cell, dtype):
    m = torch.nn.GRU(cell.input_size, cell.hidden_size, bias=cell.bias).to(cell.weight_ih.device, dtype)
    with torch.no_grad():
        m.weight_ih_l0.copy_(cell.weight_ih)
        m.weight_hh_l0.copy_(cell.weight_hh)
        m.bias_ih_l0.copy_(cell.bias_ih)
        m.bias_hh_l0.copy_(cell.bias_hh)
    return m


def cudnn_run(m, x, h0, steps=None):
    """torch.nn.GRU over ``steps`` (default all) steps in pieces, carrying h: states (steps, B, D)."""
    steps = x.shape[0] if steps is None else steps
    h, outs = h0.to(x.dtype).unsqueeze(0), []
    with torch.no_grad():
        for s in range(0, steps, PIECE):
            o, h = m(x[s:min(steps, s + PIECE)], h)
            outs.append(o)
    return torch.cat(outs, 0)


def max_rel_diff(a, ref):
    """max |a - ref| / max(1, max |ref|) over the first ref.shape[0] steps, chunked (no full float64 copy of a)."""
    num, den = 0.0, 1.0
    for s in range(0, ref.shape[0], PIECE):
        r = ref[s:s + PIECE]
        num = max(num, float((a[s:s + r.shape[0]].double() - r).abs().max()))
        den = max(den, float(r.abs().max()))
    return num / den


def _info_fields(info):
    return dict(iterations=info.iterations, converged=info.converged, newton_converged=info.newton_converged,
                residual=info.residual, residuals=info.residuals, fallback=info.fallback,
                fallback_steps=info.fallback_steps)


def time_step(cell, xp, B, D, repeats, **kw):
    """One fused Newton iteration (kernel pair + summary scan) on a zero iterate."""
    from seqpar.kernels.fused_dense_gru import fused_dense_gru_step

    h = torch.zeros(xp.shape[0], B, D, device=xp.device)
    bnd = torch.zeros(B, D, device=xp.device)
    out = torch.empty_like(h)
    t, _, _ = _median_timed(lambda: fused_dense_gru_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, out=out, **kw),
                            repeats)
    return t


def sweep(a, Ts, dims, dev, env):
    rows = []
    for D in dims:
        for T in Ts:
            torch.manual_seed(a.seed)
            cell = GRU(a.input_size or D, D).to(dev)
            with torch.no_grad():
                xp = cell.project_inputs(torch.randn(T, a.batch, cell.input_size, device=dev))
            for prec in parse_list(a.precisions, str) if D > 8 else ["ieee"]:
                for nw in ((1, 2, 4) if D <= 16 else (4, 8)):
                    for wil in ((False,) if D <= 16 else (False, True)):
                        for programs in (2048, 4096, 8192, 16384):
                            for pf in (True, False):
                                try:
                                    t = time_step(cell, xp, a.batch, D, a.repeats, precision=prec, num_warps=nw,
                                                  w_in_loop=wil, programs=programs, prefetch=pf)
                                except Exception as e:  # noqa: BLE001  (e.g. out of shared memory / registers)
                                    t = None
                                    print(f"  D={D} T={T} {prec} nw={nw} wil={wil} programs={programs} "
                                          f"prefetch={pf}: {e!r}"[:200])
                                row = dict(D=D, T=T, B=a.batch, precision=prec, num_warps=nw, w_in_loop=wil,
                                           programs=programs, prefetch=pf, step_s=t)
                                rows.append(row)
                                if t is not None:
                                    print(f"D={D:3d} T={T:>9,d} {prec:6s} nw={nw} w_in_loop={wil!s:5s} "
                                          f"programs={programs:5d} prefetch={pf!s:5s}: {t * 1e3:8.2f} ms / iteration",
                                          flush=True)
            del xp
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    write_json(a.out or out_path("dense_gru_sweep.json"), {"env": env, "args": vars(a), "rows": rows})


def main(argv=None):
    default_precision = cells.DENSE_KERNEL_PRECISION
    p = build_parser()
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.dims, a.batch, a.repeats, a.max_call_s, a.total_budget_s = "16", "2,17", 2, 1, 600.0, 1200.0
    try:
        Ts = sorted(parse_list(a.steps, parse_count))
        dims = parse_list(a.dims, int)
    except ValueError as e:
        p.error(str(e))
    solvers = parse_list(a.solvers, str)
    precisions = parse_list(a.precisions, str)
    if [s for s in solvers if s not in SOLVERS] or [q for q in precisions if q not in ("ieee", "tf32", "tf32x3")]:
        p.error(f"--solvers from {SOLVERS}; --precisions from ieee,tf32,tf32x3")
    if any(T < 1 for T in Ts) or any(not 1 <= D <= 64 for D in dims) or a.batch < 1 or a.repeats < 1:
        p.error("--steps, --batch, --repeats must be positive and --dims within 1..64")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        p.error("no CUDA device: run on a GPU, or set TRITON_INTERPRET=1 with --quick")
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch path and cuDNN in true fp32
    torch.backends.cudnn.allow_tf32 = False
    env = env_info()
    env["torch_allow_tf32"] = False  # matmul and cuDNN TF32 off: the torch path and cuDNN in IEEE fp32
    if a.sweep:
        return sweep(a, Ts, dims, dev, env) or 0
    t_begin = time.perf_counter()
    gpu = env["device"]
    variants = [(s, q) for s in solvers for q in (precisions if s == "fused" else [None])]
    names = {v: (f"fused-{v[1]}" if v[0] == "fused" else v[0]) for v in variants}
    print(f"bench_dense_gru: device={gpu} torch={torch.__version__} triton={env.get('triton')} B={a.batch} "
          f"variants={','.join(names.values())}", flush=True)
    rows = []
    for D in dims:
        per_step = {}  # variant name -> seconds per step at the last T measured
        for T in Ts:
            torch.manual_seed(a.seed)
            I = a.input_size or D
            cell = GRU(I, D).to(dev)
            slow = TorchPathGRU(I, D).to(dev)
            slow.load_state_dict(cell.state_dict())
            x = torch.randn(T, a.batch, I, device=dev)
            h0 = 0.5 * torch.randn(a.batch, D, device=dev)
            ref, ref_steps = None, None
            if not a.no_check:
                est = per_step.get("ref64")
                ref_steps = T if est is None or est * T <= a.max_call_s else max(PIECE, int(a.max_call_s / est))
                ref_steps = min(T, ref_steps)
                try:
                    t0 = time.perf_counter()
                    ref = cudnn_run(_torch_gru(cell, torch.float64), x.double(), h0.double(), ref_steps)
                    sync()
                    per_step["ref64"] = (time.perf_counter() - t0) / ref_steps
                except Exception as e:  # noqa: BLE001  (no float64 RNN on this stack: no check)
                    print(f"  float64 reference failed: {e!r}"[:300], flush=True)
                    ref, ref_steps = None, None
            for v in variants:
                name = names[v]
                row = dict(gpu=gpu, torch=torch.__version__, solver=name, T=T, B=a.batch, D=D, I=I, median_s=None,
                           times_s=None, skipped=None, oom=False, step_s=None, max_rel_diff=None,
                           ref_steps=ref_steps)
                est = per_step.get(name)
                est = est * T if est is not None else None
                spent = time.perf_counter() - t_begin
                if v[0] == "fused" and v[1] != "ieee" and D <= 8:
                    row["skipped"] = "D <= 8: no tl.dot, precision does not apply"
                elif est is not None and est > a.max_call_s:
                    row["skipped"] = f"estimated {est:.1f} s per call > --max-call-s"
                elif spent > a.total_budget_s:
                    row["skipped"] = f"--total-budget-s spent ({spent:.0f} s)"
                else:
                    box = {}
                    try:
                        if v[0] == "cudnn":
                            m = _torch_gru(cell, torch.float32)
                            call = lambda: cudnn_run(m, x, h0)  # noqa: E731
                        else:
                            if v[0] == "fused":
                                cells.DENSE_KERNEL_PRECISION = v[1]
                            c = cell if v[0] == "fused" else slow

                            def call(c=c):
                                with torch.no_grad():
                                    out, info = seqpar.solve(c, x, h0, jacobian="dense", backend="triton",
                                                             return_info=True)
                                box["info"] = info
                                return out
                        t, times, out = _median_timed(call, a.repeats)
                        row.update(median_s=t, times_s=times)
                        per_step[name] = t / T
                        if "info" in box:
                            row.update(_info_fields(box["info"]))
                        if ref is not None:
                            row["max_rel_diff"] = max_rel_diff(out, ref)
                        del out
                        if v[0] == "fused":
                            with torch.no_grad():
                                xp = cell.project_inputs(x)
                            row["step_s"] = time_step(cell, xp, a.batch, D, a.repeats, precision=v[1])
                            del xp
                    except torch.OutOfMemoryError:
                        row["oom"] = True
                        per_step[name] = float("inf")
                    finally:
                        cells.DENSE_KERNEL_PRECISION = default_precision
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                rows.append(row)
                print(_line(row), flush=True)
            x = ref = None  # free before the next configuration
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    write_json(a.out or out_path("dense_gru.json"), {"env": env, "args": vars(a), "rows": rows})
    _table(rows, [names[v] for v in variants])
    return 0


def _fmt_s(row):
    if row is None:
        return "-"
    if row["oom"]:
        return "OOM"
    if row["median_s"] is None:
        return "skipped"
    s = f"{row['median_s'] * 1e3:.1f} ms"
    if row.get("iterations") is not None:
        s += f" ({row['iterations']}{'' if row['newton_converged'] else '!'})"
    return s


def _line(row):
    extra = ""
    if row.get("residual") is not None:
        extra += f" residual {row['residual']:.2e}"
    if row.get("step_s") is not None:
        extra += f" step {row['step_s'] * 1e3:.2f} ms"
    if row.get("max_rel_diff") is not None:
        extra += f" diff {row['max_rel_diff']:.1e}"
    if row.get("fallback"):
        extra += f" fallback {row['fallback']}({row['fallback_steps']})"
    if row["skipped"]:
        extra += f" [{row['skipped']}]"
    return f"D={row['D']:3d} T={row['T']:>9,d} {row['solver']:12s} {_fmt_s(row):>20s}{extra}"


def _table(rows, names):
    print("\nmedian time per solve (Newton iterations; ! = Newton did not converge), input projection included")
    print(f"{'D':>3s} {'T':>9s} " + " ".join(f"{n:>18s}" for n in names) + "  fused-ieee vs torch-path / cudnn")
    keys = sorted({(r["D"], r["T"]) for r in rows})
    for D, T in keys:
        by = {r["solver"]: r for r in rows if r["D"] == D and r["T"] == T}
        line = f"{D:3d} {T:9,d} " + " ".join(f"{_fmt_s(by.get(n)):>18s}" for n in names)
        f, old, cu = by.get("fused-ieee"), by.get("torch-path"), by.get("cudnn")
        if f and f["median_s"]:
            sp = [f"{o['median_s'] / f['median_s']:.1f}x" if o and o["median_s"] else "-" for o in (old, cu)]
            line += f"  {sp[0]} / {sp[1]}"
        print(line)


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)
    raise SystemExit(rc)
