"""Argument checks with errors that name the offending argument."""
from __future__ import annotations

import torch

from .structure import Structure, parse_structure

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)
METHODS = ("newton", "sequential")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scans and Newton run in float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, ndim: int, shape_doc: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}; got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float64, float32, bfloat16, float16); got {t.dtype}")


def check_finite(name: str, t: torch.Tensor):
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_solve_args(cell, inputs, h0, initial_guess, *, allow_empty: bool):
    """Validate ``solve``'s tensors against ``cell``; returns h0 (zeros if None)."""
    from .cells import Cell

    if not isinstance(cell, Cell):
        raise TypeError(f"cell must be a seqpar.cells.Cell; got {type(cell).__name__} "
                        "(wrap a plain function with seqpar.cells.FunctionCell)")
    check_tensor("inputs", inputs, 3, "(T, B, D_in)")
    T, B, D_in = inputs.shape
    if T == 0 and not allow_empty:
        raise ValueError("inputs has T=0 time steps; the sequence must not be empty")
    if B == 0:
        raise ValueError("inputs has batch size B=0")
    if cell.input_size is not None and D_in != cell.input_size:
        raise ValueError(f"inputs has D_in={D_in} features but the cell expects input_size={cell.input_size}")
    D = cell.state_size
    for p_name, p in cell.named_parameters():
        if p.device != inputs.device:
            raise ValueError(f"device mismatch: inputs on {inputs.device}, cell parameter {p_name!r} on {p.device}")
        ok = p.dtype == inputs.dtype or (inputs.dtype in HALF_DTYPES and p.dtype in (torch.float32,) + HALF_DTYPES)
        if not ok:
            raise TypeError(f"dtype mismatch: inputs are {inputs.dtype}, cell parameter {p_name!r} is {p.dtype}")
    if h0 is None:
        h0 = inputs.new_zeros(B, D)
    else:
        check_tensor("h0", h0, 2, f"(B, D) = ({B}, {D})")
        if tuple(h0.shape) != (B, D):
            raise ValueError(f"h0 must have shape (B, D) = ({B}, {D}); got {tuple(h0.shape)}")
        if h0.dtype != inputs.dtype:
            raise TypeError(f"dtype mismatch: inputs are {inputs.dtype}, h0 is {h0.dtype}")
        if h0.device != inputs.device:
            raise ValueError(f"device mismatch: inputs on {inputs.device}, h0 on {h0.device}")
        check_finite("h0", h0)
    check_finite("inputs", inputs)
    if initial_guess is not None:
        check_tensor("initial_guess", initial_guess, 3, f"(T, B, D) = ({T}, {B}, {D})")
        if tuple(initial_guess.shape) != (T, B, D):
            raise ValueError(f"initial_guess must have shape (T, B, D) = ({T}, {B}, {D}); "
                             f"got {tuple(initial_guess.shape)}")
        if initial_guess.device != inputs.device:
            raise ValueError(f"device mismatch: inputs on {inputs.device}, initial_guess on {initial_guess.device}")
        check_finite("initial_guess", initial_guess)
    return h0


def resolve_jacobian(jacobian, cell) -> Structure:
    """Map the ``jacobian`` argument to a Structure for Newton's linearisation."""
    exact = cell.structure
    if jacobian == "auto":
        return exact
    if jacobian == "block":
        k = exact.block if exact.kind == "block" else 2
        if cell.state_size % k:
            raise ValueError(f"jacobian='block' uses block size {k}, which does not divide the state size "
                             f"{cell.state_size}; pass jacobian='block:k'")
        return Structure("block", k)
    try:
        st = parse_structure(jacobian, name="jacobian")
    except (ValueError, TypeError) as e:
        raise ValueError(f"jacobian must be 'auto', 'dense', 'diag', 'block' or 'block:k'; got {jacobian!r}") from e
    if st.kind == "block" and cell.state_size % st.block:
        raise ValueError(f"jacobian={jacobian!r}: block size {st.block} does not divide the state size {cell.state_size}")
    return st


def is_exact(newton: Structure, exact: Structure, D: int) -> bool:
    """Whether linearising with ``newton`` keeps the cell's whole Jacobian (true Newton)."""
    if newton.kind == "dense" or exact.kind == "diag":
        return True
    if exact.kind == "dense":
        return False
    if newton.kind == "diag":
        return False
    return newton.block_size(D) % exact.block_size(D) == 0
