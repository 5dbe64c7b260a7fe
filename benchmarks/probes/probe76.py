"""Run 76 (H100, session 13): the input projection (8M x 64) @ (64 x 192) by cuBLAS fp32, TF32 and seqpar's
tiled 3xTF32 kernel at several tiles.  Run from the repository root; then benchmarks/profile_solve.py profiled the
D = 64, B = 8 solve (results/profile_solve_d64_run76.json).  Kept as the command behind COMMANDS.md's run 76."""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks")
from common import event_ms
from seqpar.kernels.linear import linear
dev = "cuda"
T, B, D = 1_000_000, 8, 64
torch.manual_seed(0)
m = torch.nn.GRU(D, D).to(dev)
x = torch.randn(T * B, D, device=dev)
w, b = m.weight_ih_l0.detach(), m.bias_ih_l0.detach()
ref = F.linear(x.double(), w.double(), b.double())
print("F.linear", event_ms(lambda: F.linear(x, w, b), 5), float((F.linear(x, w, b) - ref).abs().max()))
for tiles in [None, (128, 64, 32, 4), (128, 64, 64, 4), (128, 192, 64, 8), (64, 192, 64, 4), (256, 64, 64, 8), (128, 128, 64, 4), (64, 64, 64, 4)]:
    try:
        print("linear", tiles, event_ms(lambda: linear(x, w, b, tiles=tiles), 5), float((linear(x, w, b, tiles=tiles) - ref).abs().max()))
    except Exception as e:
        print("linear", tiles, "error", str(e)[:200])
torch.backends.cuda.matmul.allow_tf32 = True
print("F.linear tf32", event_ms(lambda: F.linear(x, w, b), 5), float((F.linear(x, w, b) - ref).abs().max()))
torch.backends.cuda.matmul.allow_tf32 = False
