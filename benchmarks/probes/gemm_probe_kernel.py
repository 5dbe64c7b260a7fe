"""The kernel of probe78.py / probe80.py (run 78, session 13): x (M, K) @ W^T by whole-row programs walking the
column tiles; MODE 0 Triton's tf32x3, 1 W split on the host and x truncated to TF32 parts in the kernel (three
TF32 dots), 2 one TF32 dot.  The design kernels/linear.py's whole-row kernel took."""
import torch
import triton
import triton.language as tl


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


