#!/usr/bin/env python
"""Neural ODE on long fixed grids: seqpar.odeint against torchdiffeq (forward, and one training step).

Vector field: ``MLP(y) - damping * y`` with MLP = Linear(D, 64) -> tanh -> Linear(64, D)
(autonomous), batch 16, state sizes 4, 16, 64, fixed grids of 10k, 100k and 1M
steps of size --dt, method rk4 (torchdiffeq's 3/8 rule, identical formula in both).
For every (D, T) it times, as the median of --repeats calls after one warm-up
call, with the device synchronised around each call:

* ``fwd_s``: the trajectory under ``torch.no_grad()``;
* ``train_s``: ``loss = out.square().mean(); loss.backward()`` w.r.t. the MLP's parameters;

for ``seqpar-dense`` (seqpar.odeint, exact Newton), ``seqpar-diag`` (quasi-Newton),
``torchdiffeq`` (torchdiffeq.odeint, backprop through the solver) and
``torchdiffeq-adjoint`` (torchdiffeq.odeint_adjoint).  A configuration whose
estimated time per call (from the previous, smaller T: linear in T) exceeds
--max-call-s is not run: the sequential baselines get the linear extrapolation,
flagged ``*_extrapolated``; seqpar gets ``null`` and ``skipped``.  Out-of-memory is
recorded as ``oom``.  ``max_rel_diff`` is seqpar's trajectory against torchdiffeq's
(max |a - b| / max(1, max |b|)) where both ran.

    python benchmarks/bench_odeint.py                    # GPU: the full sweep
    python benchmarks/bench_odeint.py --quick            # CPU smoke test, tiny sizes
    python benchmarks/bench_odeint.py --steps 10k,100k --dims 16 --solvers seqpar-dense,torchdiffeq
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import common  # noqa: F401  (puts the repo root on sys.path)
import seqpar
from common import env_info, out_path, sync, timed, write_json
from seqpar.problems import parse_count

SOLVERS = ("seqpar-dense", "seqpar-diag", "torchdiffeq", "torchdiffeq-adjoint")
SEQUENTIAL = ("torchdiffeq", "torchdiffeq-adjoint")


class Field(nn.Module):
    def __init__(self, D, hidden, damping):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, D))
        self.damping = damping

    def forward(self, t, y):
        return self.net(y) - self.damping * y


def integrate(solver, func, y0, t, method, info_box):
    if solver.startswith("seqpar"):
        out, info = seqpar.odeint(func, y0, t, method=method, jacobian=solver.split("-")[1], return_info=True)
        info_box["info"] = info
        return out
    import torchdiffeq

    fn = torchdiffeq.odeint_adjoint if solver == "torchdiffeq-adjoint" else torchdiffeq.odeint
    return fn(func, y0, t, method=method)


def train_step(solver, func, y0, t, method, info_box):
    func.zero_grad(set_to_none=True)
    out = integrate(solver, func, y0, t, method, info_box)
    loss = out.square().mean()
    loss.backward()
    return loss


def parse_list(text, conv):
    return [conv(x) for x in str(text).split(",") if x.strip()]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="10k,100k,1M", help="grid sizes T (comma-separated counts)")
    p.add_argument("--dims", default="4,16,64", help="state sizes D")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--method", default="rk4", choices=["rk4", "euler", "midpoint"])
    p.add_argument("--dt", type=float, default=1e-3, help="grid spacing (the horizon is T * dt)")
    p.add_argument("--damping", type=float, default=0.5)
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-call-s", type=float, default=60.0,
                   help="skip (baselines: extrapolate) a configuration estimated above this per call")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized sweep (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/odeint.json, or $OUT)")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.dims, a.batch, a.max_call_s = "200,1000", "4", 4, 20.0
    try:
        Ts = parse_list(a.steps, parse_count)
        dims = parse_list(a.dims, int)
    except ValueError as e:
        p.error(str(e))
    solvers = parse_list(a.solvers, str)
    bad = [s for s in solvers if s not in SOLVERS]
    if bad:
        p.error(f"--solvers: unknown {bad}; choose from {','.join(SOLVERS)}")
    if any(T < 1 for T in Ts) or any(D < 1 for D in dims) or a.batch < 1 or a.hidden < 1:
        p.error("--steps, --dims, --batch and --hidden must be positive")
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    if any(s in SEQUENTIAL for s in solvers):
        try:
            import torchdiffeq  # noqa: F401
        except ImportError:
            p.error("the torchdiffeq baselines need torchdiffeq (pip install torchdiffeq), or pass --solvers")
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float64 if a.dtype == "float64" else torch.float32
    env = env_info()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = []
    print(f"bench_odeint: device={gpu} torch={torch.__version__} dtype={a.dtype} B={a.batch} hidden={a.hidden} "
          f"method={a.method} dt={a.dt}", flush=True)
    for D in dims:
        per_step = {}  # solver -> (kind -> seconds per step) at the largest T measured so far
        for T in sorted(Ts):
            torch.manual_seed(a.seed)
            func = Field(D, a.hidden, a.damping).to(device=dev, dtype=dtype)
            y0 = torch.randn(a.batch, D, device=dev, dtype=dtype)
            t = torch.arange(T + 1, device=dev, dtype=torch.float64) * a.dt  # float64 times: exact spacing
            outs = {}
            for solver in solvers:
                row = dict(gpu=gpu, torch=torch.__version__, solver=solver, method=a.method, T=T, B=a.batch, D=D,
                           hidden=a.hidden, dtype=a.dtype, dt=a.dt, fwd_s=None, train_s=None,
                           fwd_extrapolated=False, train_extrapolated=False, skipped=None, oom=[],
                           iterations=None, backward_iterations=None, converged=None, fallback=None,
                           max_rel_diff=None)
                for kind in ("fwd", "train"):
                    est = per_step.get(solver, {}).get(kind)
                    est = est * T if est is not None else None
                    if est is not None and est > a.max_call_s:
                        if solver in SEQUENTIAL:
                            row[f"{kind}_s"], row[f"{kind}_extrapolated"] = est, True
                        else:
                            row["skipped"] = (row["skipped"] or "") + f"{kind}: estimated {est:.0f} s > --max-call-s; "
                        continue
                    box = {}
                    try:
                        if kind == "fwd":
                            def call():
                                with torch.no_grad():
                                    return integrate(solver, func, y0, t, a.method, box)
                        else:
                            def call():
                                return train_step(solver, func, y0, t, a.method, box)
                        r = timed(call, repeats=a.repeats, warmup=1)
                        row[f"{kind}_s"] = r["median_s"]
                        row[f"{kind}_times_s"] = r["times_s"]
                        per_step.setdefault(solver, {})[kind] = r["median_s"] / T
                        if kind == "fwd" and solver in ("seqpar-dense", "torchdiffeq"):
                            with torch.no_grad():
                                outs[solver] = integrate(solver, func, y0, t, a.method, {}).float()
                    except torch.OutOfMemoryError:
                        row["oom"].append(kind)
                        box.clear()
                        per_step.setdefault(solver, {})[kind] = float("inf")  # larger T: skip too
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                    info = box.get("info")
                    if info is not None:
                        if kind == "fwd":
                            row.update(iterations=info.iterations, converged=info.converged, fallback=info.fallback)
                        else:
                            row["backward_iterations"] = info.backward_iterations
                        row[f"{kind}_iterations"] = info.iterations
                    func.zero_grad(set_to_none=True)
                rows.append(row)
                print(_line(row), flush=True)
            if "seqpar-dense" in outs and "torchdiffeq" in outs:
                ref = outs["torchdiffeq"]
                diff = float((outs["seqpar-dense"] - ref).abs().max() / ref.abs().max().clamp_min(1.0))
                for row in rows:
                    if row["D"] == D and row["T"] == T and row["solver"] == "seqpar-dense":
                        row["max_rel_diff"] = diff
                print(f"  D={D} T={T:,}: seqpar-dense vs torchdiffeq trajectory max rel diff {diff:.2e}", flush=True)
            del outs, func, y0, t
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            sync()
    write_json(a.out or out_path("odeint.json"), {"env": env, "args": vars(a), "rows": rows})
    return 0


def _fmt(row, kind):
    v = row[f"{kind}_s"]
    if kind in row["oom"]:
        return "OOM"
    if v is None:
        return "skipped"
    return f"{v * 1e3:.1f} ms" + (" (extrap.)" if row[f"{kind}_extrapolated"] else "")


def _line(row):
    it = f" iters {row['iterations']}/{row['backward_iterations']}" if row["iterations"] is not None else ""
    return (f"D={row['D']:3d} T={row['T']:>9,d} {row['solver']:20s} fwd {_fmt(row, 'fwd'):>22s}  "
            f"train {_fmt(row, 'train'):>22s}{it}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)
    raise SystemExit(rc)
