"""``x W^T + b`` on tensor cores at about fp32 accuracy (3xTF32): the quasi-Newton GRU's recurrent GEMM.

The quasi-Newton dense GRU evaluates ``W_hh h_prev + b_hh`` (T x B rows of D, 3D outputs) once per
Newton iteration, and that product decides f, hence the residual: it must be fp32-accurate, so cuBLAS
runs it as an IEEE fp32 GEMM on CUDA cores (TF32 would leave a 1e-3 error in f).  With K = D <= 64 that
GEMM is short and wide; on CUDA cores it is bound by arithmetic (H200, D = 64, 8M rows: 6.3 ms, about 32
TFLOP/s).  Here each product is split ``a = a_hi + a_lo`` (TF32 parts) and accumulated in fp32 from
three tensor-core products (``tl.dot(..., input_precision="tf32x3")``: only ``a_lo * b_lo`` is dropped,
an error near fp32 rounding), so the GEMM is bound by its memory traffic instead.

One program computes a ``BM x BN`` tile of the output, walking K in steps of ``BK`` (masked: any M, N,
K >= 1; K and N need not be multiples of anything).  Reference: ``torch.nn.functional.linear``
(tests/test_linear.py compares in float64).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISIONS, dot

# tile (rows x outputs x reduction), warps; benchmarks/bench_gru_quasi.py (H200, 8M-16M rows, K = D)
BM, BN, BK, WARPS = 128, 64, 32, 4


@triton.jit
def _linear_kernel(X, W, Bias, Y, M, N, K, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Y[m, n] = sum_k X[m, k] W[n, k] (+ Bias[n]) for the tile (pid_m, pid_n); X (M, K), W (N, K),
    Y (M, N), all row-major."""
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mm = rm < M
    nm = rn < N
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        km = rk < K
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        w = tl.load(W + rn[None, :] * K + rk[:, None], mask=km[:, None] & nm[None, :], other=0.0)
        acc += dot(x.to(tl.float32), w.to(tl.float32), PREC)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           out: Optional[torch.Tensor] = None, precision: str = "tf32x3",
           tiles: Optional[tuple] = None) -> torch.Tensor:
    """``x W^T + bias`` (as ``torch.nn.functional.linear``) for ``x`` (M, K), ``weight`` (N, K),
    ``bias`` (N,) or None (any float dtypes; fp32 accumulation), into ``out`` (M, N) if given
    (contiguous; a view into a larger tensor is fine), else a new tensor of x's dtype.
    ``precision``: "tf32x3" (default: about fp32 accuracy on tensor cores), "ieee" or "tf32".
    ``tiles``: ``(BM, BN, BK, warps)`` instead of the module's defaults (powers of two, >= 16)."""
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(DOT_PRECISIONS)}; got {precision!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x (M, K) and weight (N, K) must share K; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    M, K = x.shape
    N = weight.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},); got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    elif out.shape != (M, N) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({M}, {N}) tensor; got {tuple(out.shape)}")
    if M == 0:
        return out
    bm, bn, bk, warps = tiles or (BM, BN, BK, WARPS)
    x, weight = x.contiguous(), weight.contiguous()
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _linear_kernel[grid](x, weight, weight if bias is None else bias.contiguous(), out, M, N, K,
                         HAS_BIAS=bias is not None, PREC=DOT_PRECISIONS[precision], BM=bm, BN=bn, BK=bk,
                         num_warps=warps)
    return out
