"""Runs 80-81 (H100, session 13): probe78's whole-row kernel (x truncated to TF32 parts) against
seqpar.kernels.linear's whole-row kernel (rounded parts) in one process.  From the repository root."""
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "benchmarks/probes")
from common import event_ms  # noqa: E402
from gemm_probe_kernel import run  # noqa: E402
from seqpar.kernels.linear import linear  # noqa: E402
dev = "cuda"
M, K, N = 8_000_000, 64, 192
torch.manual_seed(0)
x = torch.randn(M, K, device=dev); w = torch.randn(N, K, device=dev) / 8; b = torch.randn(N, device=dev)
ref = F.linear(x[:200000].double(), w.double(), b.double())
y = torch.empty(M, N, device=dev)
for name, fn in [("probe_mode1", lambda: run(x, w, b, y, 1, 128, 64, 4, 1)), ("library_rows", lambda: linear(x, w, b, out=y)),
                 ("probe_mode1_again", lambda: run(x, w, b, y, 1, 128, 64, 4, 1))]:
    t = event_ms(fn, 7); fn()
    print(name, t, float((y[:200000].double() - ref).abs().max()), flush=True)
