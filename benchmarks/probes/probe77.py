"""Run 77 (H100, session 13): the tiled kernel's tiles on (8M x 64) @ (64 x 192), one look-back quasi-Newton
iteration, and the D = 64, B = 8 solves (torch / flax init) against cuDNN.  `python benchmarks/probes/probe77.py
torch,flax` from the repository root, $OUT set.  Kept as the command behind COMMANDS.md's run 77."""
import sys, json, os, torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks")
from common import event_ms
from seqpar.kernels.linear import linear
import seqpar.kernels.fused_diag_gru as k
from bench_gru_quasi import off_on_solves, pipelined_solve, iteration_inputs
import argparse
dev = "cuda"
T, B, D = 1_000_000, 8, 64
out = {}
torch.manual_seed(0)
m = torch.nn.GRU(D, D).to(dev)
with torch.no_grad():
    x = torch.randn(T * B, D, device=dev)
    w, b = m.weight_ih_l0.detach(), m.bias_ih_l0.detach()
    out["F.linear"] = event_ms(lambda: F.linear(x, w, b), 5)
    for tiles in [(128, 64, 32, 4), (128, 64, 64, 4), (64, 64, 64, 4), (128, 64, 32, 8), (256, 64, 32, 8), (64, 64, 32, 4), (128, 256, 32, 8), (64, 256, 32, 8)]:
        try:
            out[f"linear {tiles}"] = event_ms(lambda: linear(x, w, b, tiles=tiles), 5)
        except Exception as e:
            out[f"linear {tiles}"] = str(e)[:100]
    print(out, flush=True)
    x = None
    cell, xp, h, bnd = iteration_inputs(D, B, T, dev)
    out["iteration_gemm"] = event_ms(lambda: k.fused_gru_quasi_step(h, xp, cell.weight_hh, cell.bias_hh, bnd, recurrent="gemm"), 5)
    cell = xp = h = None
    torch.cuda.empty_cache()
print(out, flush=True)
a = argparse.Namespace(solve_reps=3)
rows = []
for init in sys.argv[1].split(","):
    r = off_on_solves(D, B, T, init, a, dev, lambda cell, x, h0, m, on: pipelined_solve(cell, x, h0, m, on, 3))
    print(init, "off", r["off"]["ms"], r["off"]["iterations"], r["off"]["residual_f64"], "cudnn", r["cudnn_ms"], "x", r["cudnn_ms"] / r["off"]["ms"], flush=True)
    rows.append(r)
    torch.cuda.empty_cache()
json.dump(dict(out=out, solves=rows), open(os.environ["OUT"] + "/probe77.json", "w"), indent=1, default=str)
