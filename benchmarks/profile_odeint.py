#!/usr/bin/env python
"""Where the time of a dense-Newton ``seqpar.odeint`` goes (GPU): the whole solve, its parts, a profile.

    python benchmarks/profile_odeint.py --steps 100k --dim 16 --out $OUT/profile_odeint.json

Times (median of --repeats after a warm-up): the full forward; one RK step over the
whole grid (f); the Jacobian of one chunk (vmapped JVPs); the dense scan of one chunk;
the chunk's Jacobian product; then the forward under other settings (the CPU-sized chunk
budgets, TF32 matmuls).  Prints the top CUDA kernels of one forward under torch.profiler.
"""
from __future__ import annotations

import argparse

import torch

import common  # noqa: F401
import seqpar
import seqpar.cells as cells
import seqpar.newton as newton
from bench_odeint import Field
from common import env_info, out_path, timed, write_json
from seqpar.odeint import ODEStepCell
from seqpar.problems import parse_count
from seqpar.structure import DENSE


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", default="100k")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    T, D, B = parse_count(a.steps), a.dim, a.batch
    dev = torch.device(a.device)
    torch.manual_seed(0)
    func = Field(D, a.hidden, 0.5).to(dev)
    y0 = torch.randn(B, D, device=dev)
    t = torch.arange(T + 1, device=dev, dtype=torch.float64) * 1e-3
    res = {"env": env_info(), "T": T, "D": D, "B": B, "hidden": a.hidden, "parts_ms": {}, "variants_ms": {}}

    def fwd():
        with torch.no_grad():
            return seqpar.odeint(func, y0, t, return_info=True)

    out, info = fwd()
    res["iterations"] = info.iterations
    res["residuals"] = info.residuals
    r = timed(fwd, repeats=a.repeats)
    res["variants_ms"]["default"] = r["median_s"] * 1e3
    print(f"odeint T={T} D={D} B={B}: {r['median_s'] * 1e3:.1f} ms, iterations {info.iterations} "
          f"{info.residuals}", flush=True)

    cell = ODEStepCell(func, D)
    n = T + 1
    xp = torch.stack([t[:-1].float(), (t[1:] - t[:-1]).float()], -1)[:, None, :].expand(T, B, 2).contiguous()
    h_prev = out[:-1].reshape(T, B, D).contiguous()
    chunk = min(T, newton.auto_chunk(DENSE, B, D, torch.float32, device=dev))
    res["chunk"] = chunk
    with torch.no_grad():
        parts = {
            "f_whole_grid": lambda: cell.step(h_prev, xp),
            f"jacobian_chunk{chunk}": lambda: cell.jacobian(h_prev[:chunk], xp[:chunk], DENSE),
        }
        J = cell.jacobian(h_prev[:chunk], xp[:chunk], DENSE)
        bb = torch.randn(chunk, B, D, device=dev)
        from seqpar.backend import kernel_scan
        from seqpar.scan import jacobian_product
        from seqpar.scan import affine_scan
        scan = kernel_scan if dev.type == "cuda" else affine_scan
        parts[f"scan_dense_chunk{chunk}"] = lambda: scan(J, bb, y0, DENSE)
        parts[f"jacobian_product_chunk{chunk}"] = lambda: jacobian_product(J, DENSE)
        for k, fn in parts.items():
            ms = timed(fn, repeats=a.repeats)["median_s"] * 1e3
            res["parts_ms"][k] = ms
            print(f"  {k}: {ms:.2f} ms (x{-(-n // chunk)} chunks per pass)", flush=True)

    def variant(name, budget=None, jac_budget=None, tf32=False):
        """The forward with the GPU chunk budgets (seqpar.newton / seqpar.cells) set to the given bytes."""
        old_d, old_j = newton.JACOBIAN_MEMORY_BUDGET_CUDA, cells.GENERIC_JACOBIAN_BUDGET_CUDA
        old_tf = torch.backends.cuda.matmul.allow_tf32
        try:
            if budget:
                newton.JACOBIAN_MEMORY_BUDGET_CUDA = budget
            if jac_budget:
                cells.GENERIC_JACOBIAN_BUDGET_CUDA = jac_budget
            torch.backends.cuda.matmul.allow_tf32 = tf32
            _, inf = fwd()
            ms = timed(fwd, repeats=a.repeats)["median_s"] * 1e3
            res["variants_ms"][name] = ms
            print(f"  variant {name}: {ms:.1f} ms iterations {inf.iterations} {inf.residuals}", flush=True)
        finally:
            newton.JACOBIAN_MEMORY_BUDGET_CUDA, cells.GENERIC_JACOBIAN_BUDGET_CUDA = old_d, old_j
            torch.backends.cuda.matmul.allow_tf32 = old_tf

    # run 18 measured the other way round: the CPU-sized budgets were then the GPU default
    variant("CPU-sized chunks", budget=newton.JACOBIAN_MEMORY_BUDGET, jac_budget=cells.GENERIC_JACOBIAN_BUDGET)
    variant("tf32", tf32=True)

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])) as prof:
        fwd()
        common.sync()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total", row_limit=25)
    print(table, flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20), flush=True)
    res["profile_top"] = table
    write_json(a.out or out_path("profile_odeint.json"), res)


if __name__ == "__main__":
    main()
