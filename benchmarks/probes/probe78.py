"""GEMM variants for x (M, 64) @ W^T (64 -> 192) at M = 8M: 3xTF32 as Triton lowers it, 3xTF32 with W split on
the host and x split in the kernel (three TF32 dots), whole-K programs walking the column tiles, 1xTF32.
Run 78 (H100, session 13), from the repository root: the design that kernels/linear.py's whole-row kernel took."""
import sys, os, json, torch, torch.nn.functional as F
import triton, triton.language as tl
sys.path.insert(0, "benchmarks")
from common import event_ms
from seqpar.kernels.linear import linear


@triton.jit
def _k(X, W1, W2, Bias, Y, M, N, K: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
       NB: tl.constexpr):
    """one program: BM rows, all K at once, NB column tiles of BN in turn (x split once)"""
    pid = tl.program_id(0).to(tl.int64)
    rm = pid * BM + tl.arange(0, BM)
    mm = rm < M
    rk = tl.arange(0, K)
    x = tl.load(X + rm[:, None] * K + rk[None, :], mask=mm[:, None], other=0.0)
    if MODE == 1:
        x_hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        x_lo = x - x_hi
    for nb in tl.static_range(NB):
        rn = nb * BN + tl.arange(0, BN)
        nm = rn < N
        w1 = tl.load(W1 + rn[None, :] * K + rk[:, None], mask=nm[None, :], other=0.0)
        if MODE == 0:
            acc = tl.dot(x, w1, input_precision="tf32x3")
        elif MODE == 1:
            w2 = tl.load(W2 + rn[None, :] * K + rk[:, None], mask=nm[None, :], other=0.0)
            acc = tl.dot(x_lo, w1, input_precision="tf32")
            acc = tl.dot(x_hi, w2, acc, input_precision="tf32")
            acc = tl.dot(x_hi, w1, acc, input_precision="tf32")
        else:
            acc = tl.dot(x, w1, input_precision="tf32")
        acc += tl.load(Bias + rn, mask=nm, other=0.0)[None, :]
        tl.store(Y + rm[:, None] * N + rn[None, :], acc, mask=mm[:, None] & nm[None, :])


def split_w(w):
    hi = (w.view(torch.int32) & ~0x1FFF).view(torch.float32)
    return hi.contiguous(), (w - hi).contiguous()


def run(x, w, b, y, mode, bm, bn, warps, stages):
    M, K = x.shape
    N = w.shape[0]
    w1, w2 = split_w(w) if mode == 1 else (w, w)
    grid = (triton.cdiv(M, bm),)
    _k[grid](x, w1, w2, b, y, M, N, K, MODE=mode, BM=bm, BN=bn, NB=triton.cdiv(N, bn), num_warps=warps,
             num_stages=stages)
    return y


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
