"""GEMM variants for x (M, 64) @ W^T (64 -> 192) at M = 8M: 3xTF32 as Triton lowers it, 3xTF32 with W split on
the host and x split in the kernel (three TF32 dots), whole-K programs walking the column tiles, 1xTF32.
Run 78 (H100, session 13), from the repository root: the design that kernels/linear.py's whole-row kernel took."""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "benchmarks/probes")
from common import event_ms  # noqa: E402
from gemm_probe_kernel import run  # noqa: E402  (the kernel: Triton needs its source in a file)
from seqpar.kernels.linear import linear  # noqa: E402


dev = "cuda"
M, K, N = 8_000_000, 64, 192
torch.manual_seed(0)
x = torch.randn(M, K, device=dev)
w = torch.randn(N, K, device=dev) / 8
b = torch.randn(N, device=dev)
ref = F.linear(x[:200000].double(), w.double(), b.double())
y = torch.empty(M, N, device=dev)
res = {"F.linear": event_ms(lambda: F.linear(x, w, b), 5), "linear": event_ms(lambda: linear(x, w, b, out=y), 5)}
res["linear_err"] = float((y[:200000].double() - ref).abs().max())
print(res, flush=True)
for mode in (1, 0, 2):
    for bm, bn, warps, stages in [(128, 64, 4, 1), (128, 64, 8, 1), (64, 64, 4, 1), (128, 64, 4, 2), (256, 64, 8, 1),
                                  (128, 32, 4, 1), (64, 32, 4, 1), (128, 128, 8, 1), (64, 64, 4, 3)]:
        key = f"mode{mode}_{bm}x{bn}_w{warps}_s{stages}"
        try:
            y.zero_()
            res[key] = event_ms(lambda: run(x, w, b, y, mode, bm, bn, warps, stages), 5)
            res[key + "_err"] = float((y[:200000].double() - ref).abs().max())
        except Exception as e:  # noqa: BLE001
            res[key] = f"{type(e).__name__}: {str(e)[:120]}"
        print(key, res[key], res.get(key + "_err"), flush=True)
json.dump(res, open(os.environ.get("OUT", ".") + "/probe78.json", "w"), indent=1)
