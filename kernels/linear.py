"""``x W^T + b`` on tensor cores at about fp32 accuracy (3xTF32): the quasi-Newton GRU's recurrent GEMM.

The quasi-Newton dense GRU evaluates ``W_hh h_prev + b_hh`` (T x B rows of D, 3D outputs) once per
Newton iteration, and that product decides f, hence the residual: it must be fp32-accurate, so cuBLAS
runs it as an IEEE fp32 GEMM on CUDA cores (TF32 would leave a 1e-3 error in f).  With K = D <= 64 that
GEMM is short and wide; on CUDA cores it is bound by arithmetic (H200, D = 64, 8M rows: 6.3 ms, about 32
TFLOP/s).  Here each product is split ``a = a_hi + a_lo`` (TF32 parts) and accumulated in fp32 from
three tensor-core products (``tl.dot(..., input_precision="tf32x3")``: only ``a_lo * b_lo`` is dropped,
an error near fp32 rounding), so the GEMM is bound by its memory traffic instead.

Two kernels:

* ``K <= ROWS_MAX_K`` and ``N <= ROWS_MAX_N`` (the recurrent GEMM, K = D, N = 3D; most input
  projections): one program holds ``ROWS_BM`` whole rows of x (all of K), splits them once, and walks the
  output's column tiles of ``ROWS_BN``.  With "tf32x3" W comes split on the host (``tf32_split``), and each
  product is three TF32 ``tl.dot``s of the parts, small terms first.  H100, (8M x 64) @ (64 x 192): 3.5 ms
  against 4.8 ms for the tiled kernel, 6.4-6.6 ms for cuBLAS's fp32 and 2.9 ms for one TF32 product
  (benchmarks/bench_quasi_gemms.py, runs 82-84);
* otherwise, and where ``tiles`` are given: one program computes a ``BM x BN`` tile of the output, walking K
  in steps of ``BK``.

Both are masked: any M, N, K >= 1; K and N need not be multiples of anything.  Reference:
``torch.nn.functional.linear`` (tests/test_linear.py compares in float64).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISIONS, dot, split_dot, tf32_parts

# rows from which fp32_linear takes the kernel (fewer: cuBLAS's fp32 GEMM is short anyway)
FP32_LINEAR_MIN_ROWS = 1 << 16
# tile (rows x outputs x reduction), warps; benchmarks/bench_gru_quasi.py (H200, 8M-16M rows, K = D)
BM, BN, BK, WARPS = 128, 64, 32, 4
# whole-row kernel: widest K and N, rows per program, outputs per column tile, warps (run 78,
# benchmarks/probes/probe78.py: best of 64/128/256 rows, 32/64/128 outputs, 4/8 warps, 1-3 stages at K = 64,
# N = 192)
ROWS_MAX_K, ROWS_MAX_N = 64, 512  # (the column tiles are unrolled: N / ROWS_BN of them at most)
ROWS_BM, ROWS_BN, ROWS_WARPS = 128, 64, 4


@triton.jit
def _linear_rows_kernel(X, W, W2, Bias, Y, M, N, K: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr):
    """Rows ``pid * BM ..`` of Y = X W^T (+ Bias): X (M, K) with K <= KP, the NB column tiles of BN in turn
    (unrolled: K and NB compile-time, so the loads are vectorised and the tiles' stores overlap the next
    products).  PREC 2: W = W + W2 in TF32 parts (``tf32_split``), X split here, three TF32 products; else
    one product at PREC (W2 unused)."""
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    mm = rm < M
    rk = tl.arange(0, KP)
    km = rk < K
    if KP == K:  # (no mask along K: vectorised loads)
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=mm[:, None], other=0.0).to(tl.float32)
    else:
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0).to(tl.float32)
    if PREC == 2:
        x_hi, x_lo = tf32_parts(x)
    else:
        x_hi, x_lo = x, x
    for nb in tl.static_range(NB):
        rn = nb * BN + tl.arange(0, BN)
        nm = rn < N
        wm = (km[:, None] & nm[None, :]) if KP != K else nm[None, :]
        acc = split_dot(x, x_hi, x_lo, W, W2, rn[None, :] * K + rk[:, None], wm, PREC)
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def tf32_split(w: torch.Tensor):
    """``(hi, lo)`` float32: ``w`` rounded to TF32 (to nearest, by the bits) and the rest rounded to TF32, so
    ``hi + lo`` is ``w`` to about 2^-22 relative; what :func:`_linear_rows_kernel` multiplies at "tf32x3"."""
    def round_tf32(t):  # to nearest, by the bits (as _common.tf32_parts)
        return ((t.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
    w = w.float().contiguous()
    hi = round_tf32(w)
    return hi, round_tf32((w - hi).contiguous())


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
    ``tiles``: ``(BM, BN, BK, warps)``: the tiled kernel at these tiles (powers of two, >= 16) instead of the
    module's choice (the whole-row kernel for K <= ``ROWS_MAX_K``, else the tiled one at its defaults)."""
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
    x, weight = x.contiguous(), weight.contiguous()
    prec = DOT_PRECISIONS[precision]
    if tiles is None and K <= ROWS_MAX_K and N <= ROWS_MAX_N:
        w_hi, w_lo = tf32_split(weight) if prec == 2 else (weight, weight)
        bn = min(ROWS_BN, max(16, triton.next_power_of_2(N)))
        _linear_rows_kernel[(triton.cdiv(M, ROWS_BM),)](
            x, w_hi, w_lo, weight if bias is None else bias.contiguous(), out, M, N, K, HAS_BIAS=bias is not None,
            PREC=prec, BM=ROWS_BM, BN=bn, KP=max(16, triton.next_power_of_2(K)), NB=triton.cdiv(N, bn),
            num_warps=ROWS_WARPS)
        return out
    bm, bn, bk, warps = tiles or (BM, BN, BK, WARPS)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _linear_kernel[grid](x, weight, weight if bias is None else bias.contiguous(), out, M, N, K,
                         HAS_BIAS=bias is not None, PREC=prec, BM=bm, BN=bn, BK=bk,
                         num_warps=warps)
    return out


def uses_tensor_cores(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`fp32_linear` takes :func:`linear` (3xTF32) for these arguments: CUDA float32 tensors,
    at least ``FP32_LINEAR_MIN_ROWS`` rows, the whole-row kernel's shapes (K <= ``ROWS_MAX_K``, N <=
    ``ROWS_MAX_N``: where it was measured faster than cuBLAS), no autograd graph to record (grad disabled,
    or nothing requires grad: the kernel has no backward), and torch's fp32 matmuls at full precision (with
    ``torch.backends.cuda.matmul.allow_tf32`` on, cuBLAS's TF32 is faster and the caller chose its accuracy)."""
    ts = [t for t in (x, weight, bias) if t is not None]
    if not all(t.is_cuda and t.dtype == torch.float32 for t in ts) or x.dim() < 1 or x.shape[-1] == 0:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False
    if x.shape[-1] > ROWS_MAX_K or weight.shape[0] > ROWS_MAX_N:  # the whole-row kernel's shapes only (measured)
        return False
    return x.numel() // x.shape[-1] >= FP32_LINEAR_MIN_ROWS and not torch.backends.cuda.matmul.allow_tf32


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)`` at fp32 accuracy, on tensor cores where
    :func:`uses_tensor_cores` says so (cuBLAS runs an fp32 GEMM on CUDA cores: H100, (8M x 64) @ (64 x 192),
    6.4 ms against 3.5 ms here, module docstring), else
    ``F.linear``.  ``x`` (..., K), ``weight`` (N, K), ``bias`` (N,) or None; returns (..., N)."""
    if not uses_tensor_cores(x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)
    K = x.shape[-1]
    y = linear(x.reshape(-1, K), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
