"""Backend dispatch: pure-PyTorch reference scans or the Triton kernels of ``seqpar.kernels``.

``backend="auto"`` picks Triton for CUDA tensors when triton imports, the
reference otherwise (always on CPU); ``"torch"`` forces the reference;
``"triton"`` forces the kernels and fails clearly if they cannot run (no
triton, or CPU tensors without ``TRITON_INTERPRET=1``).  Cases the kernels do
not cover (float64, blocks other than 2 x 2, dense D > 64) use the reference.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .scan import affine_scan
from .structure import Structure

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device) -> str:
    """"triton" or "torch" for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); got device {device}")
    return "triton"


def _kernel_ok(structure: Structure, b: torch.Tensor) -> bool:
    if b.dtype not in KERNEL_DTYPES:
        return False
    D = b.shape[-1]
    if structure.kind == "diag":
        return True
    if structure.kind == "block":
        return structure.block_size(D) == 2
    return D <= 64


def kernel_scan(J, b, h_in, structure: Structure, reverse: bool = False):
    """Drop-in for :func:`seqpar.scan.affine_scan` (same shapes) on the Triton kernels.
    ``reverse=True`` runs ``h_t = J_t h_{t+1} + b_t`` from the end (h_in = h_n)."""
    if not _kernel_ok(structure, b):
        if reverse:
            return affine_scan(J.flip(0), b.flip(0), h_in, structure).flip(0)
        return affine_scan(J, b, h_in, structure)
    n, B, D = b.shape
    h_in = h_in.to(torch.float32)
    if structure.kind == "diag":
        from .kernels.scan_diag import scan_diag
        return scan_diag(J, b, h_in, reverse=reverse)
    if structure.kind == "block":
        from .kernels.scan_block import scan_block2
        out = scan_block2(J.reshape(n, B, D // 2, 2, 2), b.reshape(n, B, D // 2, 2),
                          h_in.reshape(B, D // 2, 2), reverse=reverse)
        return out.reshape(n, B, D)
    from .kernels.scan_dense import scan_dense
    return scan_dense(J, b, h_in, reverse=reverse)


def scan_function(backend: str) -> Callable:
    """The ``scan=`` argument for :func:`seqpar.scan.chunked_scan`."""
    return kernel_scan if backend == "triton" else affine_scan


def fused_stepper(cell, structure: Structure, xp: torch.Tensor, backend: str) -> Optional[Callable]:
    """The cell's fused Newton iteration (see :meth:`seqpar.cells.Cell.fused_newton_step`) when the
    kernels can run it: triton backend, a kernel dtype; else None (the torch reference runs)."""
    if backend != "triton" or xp.dtype not in KERNEL_DTYPES or not _kernel_matches(cell, "fused_newton_step"):
        return None
    return cell.fused_newton_step(structure, xp)


# a cell with a pipelined kernel that projects its one input feature itself (Cell.pipelined_newton_raw) gets
# the raw inputs: no projected-inputs tensor, no projection before the solve (off: the projected path)
PROJECT_IN_PASS = True


def pipelined_stepper(cell, structure: Structure, xp: torch.Tensor, backend: str, raw_inputs: bool = False):
    """The cell's pipelined Newton kernel (see :meth:`seqpar.cells.Cell.pipelined_newton` and
    :mod:`seqpar.pipeline`) when the kernels can run it, else None.  ``raw_inputs``: ``xp`` is the raw
    inputs (T, B, I), for :meth:`seqpar.cells.Cell.pipelined_newton_raw` (None where the cell has no such
    kernel, or ``PROJECT_IN_PASS`` is off: project them and ask again)."""
    if backend != "triton" or xp.dtype not in KERNEL_DTYPES:
        return None
    if raw_inputs:
        if not PROJECT_IN_PASS or not _kernel_matches(cell, "pipelined_newton_raw", also=("project_inputs",)):
            return None
        return cell.pipelined_newton_raw(structure, xp)
    if not _kernel_matches(cell, "pipelined_newton"):
        return None
    return cell.pipelined_newton(structure, xp)


def _kernel_matches(cell, method: str, also: tuple = ()) -> bool:
    """False if a subclass redefines ``step`` or ``jacobian`` (or a method named in ``also``) below the
    class that provides the kernel ``method``: the kernel would compute the parent's function, not this
    cell's."""
    mro = type(cell).__mro__
    owner = next(i for i, k in enumerate(mro) if method in vars(k))
    names = ("step", "jacobian", *also)
    return not any(name in vars(k) for k in mro[:owner] for name in names)
