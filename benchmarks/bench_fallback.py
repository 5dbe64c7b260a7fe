#!/usr/bin/env python
"""Cost of the exact fallback against plain sequential evaluation, on systems where Newton fails.

Cases (float64, CPU by default): an unstable Elman cell (recurrent weights x1.5),
van der Pol (dt = 0.01, rk4), Lorenz (dt = 0.01, rk4) and the chaotic logistic
map.  For each: ``seqpar.solve`` (Newton, then the exact repair of the tail)
against ``method="sequential"``: wall time (median of 3 after a warm-up), the
ratio, the number of repaired steps, and the recurrence residual of the result.
Target: the solve costs at most 3x sequential evaluation.

    python benchmarks/bench_fallback.py [--out benchmarks/results/fallback.json]
"""
from __future__ import annotations

import argparse

import torch

import common  # noqa: F401  (puts the repo on sys.path)
import seqpar
from common import env_info, out_path, timed, write_json
from seqpar.newton import shift, step_residuals


def elman(T):
    torch.manual_seed(0)
    cell = seqpar.Elman(4, 8, dtype=torch.float64)
    with torch.no_grad():
        cell.weight_hh.copy_(torch.randn(8, 8, dtype=torch.float64) * 1.5)
    return cell, torch.randn(T, 2, 4, dtype=torch.float64), None


def van_der_pol(T, mu=5.0):
    def g(y, u):
        x, v = y[..., :1], y[..., 1:]
        return torch.cat([v, mu * (1 - x * x) * v - x + u[..., :1]], -1)

    cell = seqpar.ODECell(g, 2, dt=0.01, method="rk4", input_size=1)
    h0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    return cell, 0.01 * torch.randn(T, 1, 1, dtype=torch.float64), h0


def lorenz(T):
    def g(y, u):
        x, yy, z = y[..., :1], y[..., 1:2], y[..., 2:]
        return torch.cat([10 * (yy - x), x * (28 - z) - yy, x * yy - 8 / 3 * z], -1) + u

    cell = seqpar.ODECell(g, 3, dt=0.01, method="rk4", input_size=3)
    h0 = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    return cell, torch.zeros(T, 1, 3, dtype=torch.float64), h0


def logistic(T):
    cell = seqpar.FunctionCell(lambda h, u: 3.9 * h * (1 - h) + 1e-3 * u, 1, structure="diag")
    g = torch.Generator().manual_seed(0)
    return cell, torch.rand(T, 4, 1, dtype=torch.float64, generator=g), torch.full((4, 1), 0.3, dtype=torch.float64)


CASES = {"elman x1.5 T=5000": (elman, 5000), "van der Pol T=5000": (van_der_pol, 5000),
         "lorenz T=2000": (lorenz, 2000), "logistic T=20000": (logistic, 20000)}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rows = []
    for name, (make, T) in CASES.items():
        cell, x, h0 = make(T)
        with torch.no_grad():
            info = {}

            def newton():
                info["h"], info["info"] = seqpar.solve(cell, x, h0, return_info=True)

            t_newton = timed(newton, repeats=a.repeats)
            t_seq = timed(lambda: seqpar.solve(cell, x, h0, method="sequential"), repeats=a.repeats)
            h, inf = info["h"], info["info"]
            hz = h0 if h0 is not None else x.new_zeros(x.shape[1], cell.state_size)
            res = float(step_residuals(h, cell.step(shift(h, hz), cell.project_inputs(x))).max())
        row = dict(case=name, T=T, newton_s=t_newton["median_s"], sequential_s=t_seq["median_s"],
                   ratio=t_newton["median_s"] / t_seq["median_s"], converged=inf.converged,
                   newton_converged=inf.newton_converged, iterations=inf.iterations, fallback=inf.fallback,
                   fallback_steps=inf.fallback_steps, residual=res, device="cpu")
        rows.append(row)
        print(f"{name:22s} solve {row['newton_s']:.3f}s  sequential {row['sequential_s']:.3f}s  "
              f"ratio {row['ratio']:.2f}  repaired {inf.fallback_steps}  residual {res:.1e}  "
              f"converged={inf.converged}", flush=True)
    write_json(a.out or out_path("fallback.json"), {"env": env_info(), "rows": rows})


if __name__ == "__main__":
    main()
