"""Registers and spill stack per thread of the pipelined quasi-Newton GRU pass, as ptxas builds it for sm_90.

Nothing runs, no GPU is needed: Triton compiles ``kernels/pipelined_quasi_gru._quasi_pass_kernel`` to a cubin
for each launch shape and ``cuobjdump --dump-resource-usage`` (shipped with Triton's NVIDIA backend) reads its
resource usage.  A shape whose thread holds too much spills to local memory (STACK > 0) and, at any count,
registers per thread cap how many programs an SM holds (65536 registers per SM).  Used to choose the launch
shapes that ``run_quasi_split75.sh`` times (benchmarks/README.md, "Channel-split programs").

    python benchmarks/ptxas_quasi_registers.py --width 64 --shapes 16:4:64,16:4:32,32:4:16 [--precision tf32x3]

Shapes are rows:warps:channels (channels per program; the padded width for whole-width programs).  Prints one
line per shape and pass (first / later) and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret

import common  # noqa: E402,F401  (this checkout's seqpar first)
import triton  # noqa: E402
from common import env_info, out_path, write_json  # noqa: E402
from seqpar.kernels import pipelined_quasi_gru as pq  # noqa: E402
from seqpar.kernels._common import DOT_PRECISIONS  # noqa: E402

TYPES = {**{n: "i32" for n in ("T", "B", "D", "n_bb", "NPROG", "map_stride")},
         **{n: "i64" for n in ("sx_t", "sx_b", "sx_c")}, "Stop": "*fp64"}


def cuobjdump() -> str:
    """Path of the cuobjdump that Triton's NVIDIA backend ships (or the one on PATH)."""
    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    return found[0] if found else "cuobjdump"


def usage(r: int, bb: int, dp: int, cb: int, warps: int, first: bool, precision: str, bk: int = pq.BK) -> dict:
    """``{"registers", "stack"}`` per thread of one variant of the pass kernel, built for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = pq._quasi_pass_kernel
    consts = dict(R=r, BB=bb, DP=dp, CB=cb, BK=min(bk, dp), FIRST=first, GUARD=True, PREC=DOT_PRECISIONS[precision])
    sig = {n: "constexpr" if n in consts else TYPES.get(n, "*fp32") for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", text)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[-500:]}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=64, help="state size D (9 .. 64)")
    ap.add_argument("--batch", type=int, default=8, help="batch B (sets the batch rows per program)")
    ap.add_argument("--shapes", default="16:4:64,32:4:64,16:4:32,64:8:32,16:2:32,16:4:16,32:4:16,64:8:16")
    ap.add_argument("--precision", default=pq.PRECISION, choices=sorted(DOT_PRECISIONS))
    ap.add_argument("--out", default=out_path("ptxas_quasi_registers.json"))
    a = ap.parse_args()
    if not pq.supports(a.width):
        sys.exit(f"--width must be in {pq.MIN_D} .. {pq.MAX_D}; got {a.width}")
    rows_out = []
    for shape in a.shapes.split(","):
        rows, warps, channels = (int(v) for v in shape.split(":"))
        cfg = pq.run_config(10**6, a.batch, a.width, rows=rows, num_warps=warps, channels=channels)
        for first in (True, False):
            u = usage(cfg.r, cfg.bb, pq.padded(a.width), cfg.cb, cfg.warps, first, a.precision)
            row = dict(D=a.width, B=a.batch, shape=shape, r=cfg.r, bb=cfg.bb, cb=cfg.cb, warps=cfg.warps,
                       first=first, precision=a.precision, **u)
            print(f"{shape:>10} {'first' if first else 'later'}: {u['registers']} registers, {u['stack']} B stack",
                  flush=True)
            rows_out.append(row)
    write_json(a.out, {"env": env_info(), "rows": rows_out})


if __name__ == "__main__":
    main()
