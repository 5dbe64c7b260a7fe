#!/usr/bin/env python
"""Pipelined DiagGRU passes at a narrow width: device time per pass, and a target for ncu.

    python benchmarks/profile_pipelined.py --batch 16 --dim 1 [--row-major] [--run 32 --prefetch 2 ...]
    ncu --clock-control none --section SpeedOfLight --section WarpStateStats \\
        -k regex:_pipelined_diag_gru -s 2 -c 1 python benchmarks/profile_pipelined.py --repeats 3

The projected inputs come from ``DiagGRU(--inputs, D).project_inputs`` (gate-major at one input feature and
D = 1); ``--row-major`` copies them to the row-major layout.  The table's launch shape
(``kernels.pipelined_diag_gru.run_config``) unless --run/--block-n/--runs-per-program/--warps/--prefetch
override it.  Prints the median device time of one pass and of one iteration (pass + group scan), ten
back-to-back calls replayed from a CUDA graph (``common.graph_ms``), against the minimum-bytes time at
--gbps (20 bytes per state; ``--gbps 0`` measures the copy bandwidth first).  ``--configs`` times other launch
shapes in the same process (e.g. ``--configs 64:16:2:0,64:32:4:1``).
"""
import argparse

import torch

import common  # noqa: F401
from common import apply_sets, graph_ms
from seqpar.cells import DiagGRU
from seqpar.kernels import pipelined_diag_gru as k
from seqpar.problems import parse_count

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--dim", type=int, default=1)
p.add_argument("--inputs", type=int, default=1)
p.add_argument("--steps", default="1M")
p.add_argument("--row-major", action="store_true")
p.add_argument("--run", type=int, default=None)
p.add_argument("--block-n", type=int, default=None)
p.add_argument("--runs-per-program", type=int, default=None)
p.add_argument("--warps", type=int, default=None)
p.add_argument("--prefetch", type=int, default=None)
p.add_argument("--repeats", type=int, default=11)
p.add_argument("--gbps", type=float, default=4230.0, help="bandwidth of the minimum-bytes time; 0: measure the "
               "device's copy bandwidth here (bench_pipeline.copy_gbps: a 2 GiB copy_, read + write)")
p.add_argument("--configs", default="", help="launch shapes to time in turn, comma-separated R:S:WARPS:PF (runs of "
               "R steps, S runs per program, warps, prefetch; '-' keeps the table's value), after the table's own")
p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
               help="override a module constant first (common.apply_sets)")
a = p.parse_args()
apply_sets(a.set)
T, B, D = parse_count(a.steps), a.batch, a.dim
gbps = a.gbps
if gbps <= 0:
    from bench_pipeline import copy_gbps

    gbps = copy_gbps()
    print(f"copy bandwidth {gbps:.0f} GB/s", flush=True)
min_ms = 20 * T * B * D / gbps / 1e6


def parsed(spec: str) -> dict:
    fields = [None if v == "-" else int(v) for v in spec.split(":")]
    if len(fields) != 4:
        raise SystemExit(f"--configs: {spec!r} is not R:S:WARPS:PF")
    return dict(zip(("run", "runs_per_program", "num_warps", "prefetch"), fields))


torch.manual_seed(0)
cell = DiagGRU(a.inputs, D).cuda()
table = dict(run=a.run, block_n=a.block_n, runs_per_program=a.runs_per_program, num_warps=a.warps,
             prefetch=a.prefetch)
shapes = [table] + [{**table, **parsed(c)} for c in a.configs.split(",") if c]
with torch.no_grad():
    xp = cell.project_inputs(torch.randn(T, B, a.inputs, device="cuda"))
    if a.row_major:
        xp = xp.contiguous()
    h = torch.randn(T, B, D, device="cuda") * 0.3
    bnd = torch.zeros(B, D, device="cuda")
    w, b = k.prepare_weights(cell.weight_hh, cell.bias_hh)
    out = torch.empty_like(h)
    reference = None
    for shape in shapes:
        cfg = k.run_config(T, B * D, **shape)
        res = k.first_pass(h, xp, w, b, bnd, cfg)
        carry = k.scan_groups(res, bnd)
        one_pass = lambda: k.pipelined_step(h, xp, w, b, bnd, res, carry, bnd, out=out, cfg=cfg)  # noqa: E731
        one_pass()
        if reference is None:
            reference = out.clone()
        diff = float((out - reference).abs().max())  # every shape computes the same iterate (a broken one can't win)
        pass_ms = graph_ms(one_pass, a.repeats)
        it_ms = graph_ms(lambda: k.scan_groups(one_pass(), bnd), a.repeats)
        print(f"B={B} D={D} T={T} xp strides {tuple(xp.stride())} cfg={tuple(cfg)}: pass {pass_ms:.4f} ms, "
              f"iteration {it_ms:.4f} ms = {it_ms / min_ms:.2f}x min bytes ({min_ms:.4f} ms); "
              f"max |diff| to the first shape {diff:.1e}", flush=True)
