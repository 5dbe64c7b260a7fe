"""Argument checks with errors that name the offending argument."""
from __future__ import annotations

import functools
import math

import torch

from .structure import Structure, parse_structure

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16)
HALF_DTYPES = (torch.bfloat16,)
SUPPORTED_DTYPES_DOC = "float64, float32 or bfloat16"
METHODS = ("newton", "sequential")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scans and Newton run in float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, ndim: int, shape_doc: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}; got shape {tuple(t.shape)}")
    if t.dtype == torch.float16:
        raise ValueError(f"{name} is torch.float16, which seqpar does not support (its range overflows in the "
                         f"scans); use {SUPPORTED_DTYPES_DOC} (bfloat16 for half precision)")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({SUPPORTED_DTYPES_DOC}); got {t.dtype}")


def check_finite(name: str, t: torch.Tensor):
    check_all_finite((name, t))


def check_all_finite(*named, defer: bool = False):
    """``(name, tensor)`` pairs: ValueError naming the first that holds NaN or Inf.  One device sync for
    all of them (a short solve's argument checks are host-bound).

    ``defer=True``: return a :class:`PendingFinite` instead (None when there is nothing to check), to be
    called where the caller waits for the device anyway (a solve's first residual), so the check costs
    no sync of its own; it launches nothing before then, so a CUDA-graph replay can check the tensors'
    copies inside its graph instead (:meth:`PendingFinite.settle`)."""
    named = [(n, t) for n, t in named if t is not None and t.numel()]
    if not named:
        return None
    pending = PendingFinite(named)
    if defer:
        return pending
    pending()
    return None


class PendingFinite:
    """A NaN / Inf check of named tensors, run later: ``pending()`` reduces them (one launch per tensor:
    NaN / Inf make its sum NaN / Inf) and reads the sums (one sync); ``settle(all_finite)`` takes the
    verdict of sums made elsewhere (e.g. of static copies, inside a CUDA graph).  A sum that is not
    finite is followed by the exact check (``isfinite``), which tells NaN / Inf from a sum of finite
    values that overflowed and names the tensor."""

    def __init__(self, named):
        self.named = named

    def __call__(self) -> None:
        sums = [t.sum() for _, t in self.named]
        sums = sums[0] if len(sums) == 1 else torch.stack(sums)
        self.settle(all(math.isfinite(v) for v in sums.reshape(-1).tolist()))

    def settle(self, all_finite: bool) -> None:
        if all_finite:
            return
        for name, t in self.named:
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")


def cell_tensors(cell):
    """``(named_parameters, named floating buffers)`` of a cell as lists, read straight from the module's
    own dicts when it has no submodules (a module-tree walk costs host time on every solve)."""
    if not cell._modules and _plain_members(type(cell)):
        # as named_parameters / named_buffers: None skipped, a shared tensor listed once
        seen = set()
        params = [(n, p) for n, p in cell._parameters.items()
                  if p is not None and id(p) not in seen and not seen.add(id(p))]
        buffers = [(n, b) for n, b in cell._buffers.items()
                   if b is not None and b.is_floating_point() and id(b) not in seen and not seen.add(id(b))]
        return params, buffers
    return list(cell.named_parameters()), [(n, b) for n, b in cell.named_buffers() if b.is_floating_point()]


def check_options(tol, max_iter, chunk_size, callback):
    """Scalar options of ``solve``: errors name the argument."""
    import numbers

    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
            raise TypeError(f"tol must be a real number in (0, 1); got {tol!r} ({type(tol).__name__})")
        if not (math.isfinite(float(tol)) and 0 < float(tol) < 1):
            raise ValueError(f"tol must be > 0 and < 1 (a relative residual); got {tol!r}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral)
                                 or max_iter < 0):
        raise ValueError(f"max_iter must be a non-negative int; got {max_iter!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(iteration, residual); got {type(callback).__name__}")


def tensors_key(named_params, named_buffers) -> tuple:
    """What identifies the values of a cell's tensors (:func:`cell_tensors`' lists) between solves: each
    tensor's identity, storage, version counter (bumped by every in-place change), dtype and shape."""
    return tuple((id(t), t.data_ptr(), t._version, t.dtype, t.shape)
                 for named in (named_params, named_buffers) for _, t in named)


@functools.lru_cache(maxsize=256)
def _plain_members(cls) -> bool:
    """Whether a cell class lists its tensors as ``torch.nn.Module`` does (no override of
    ``named_parameters`` / ``named_buffers``, e.g. FunctionCell's ``params=``)."""
    from torch import nn

    return cls.named_parameters is nn.Module.named_parameters and cls.named_buffers is nn.Module.named_buffers


def check_cell_tensors_finite(cell, named_params=None, named_buffers=None):
    """NaN/Inf in any parameter or floating buffer of the cell (one host sync).

    A passing check is remembered with each tensor's storage and version counter (bumped by
    every in-place change, e.g. an optimizer step), so repeated solves with unchanged weights
    (inference, benchmarks) skip the sync; any change re-checks.  Writes through ``tensor.data``
    bypass version counters and are not seen until the next versioned change (a NaN written that way
    still shows as a non-finite residual: the solve is then not reported converged).
    ``named_params`` / ``named_buffers``: :func:`cell_tensors`' lists, where the caller has them.  Returns
    their :func:`tensors_key`."""
    if named_params is None or named_buffers is None:
        named_params, named_buffers = cell_tensors(cell)
    key = tensors_key(named_params, named_buffers)
    if cell.__dict__.get("_seqpar_finite_key") == key:
        return key
    named = [(f"parameter {n!r}", p) for n, p in named_params]
    named += [(f"buffer {n!r}", b) for n, b in named_buffers]
    named = [(n, t) for n, t in named if t.numel() and t.device.type != "meta"]
    if not named:
        cell.__dict__["_seqpar_finite_key"] = key
        return key
    with torch.no_grad():
        ok = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named])
    if not bool(ok.all()):
        bad = [n for (n, _), v in zip(named, ok.tolist()) if not v]
        raise ValueError(f"cell {', '.join(bad)} contains NaN or Inf")
    cell.__dict__["_seqpar_finite_key"] = key
    return key


def trusted_step(cell) -> bool:
    """Whether ``cell.step`` is one of seqpar's own (built-in cells, not wrapping a user function):
    its output shape / dtype need no probe."""
    return _trusted_step_type(type(cell))


@functools.lru_cache(maxsize=256)
def _trusted_step_type(cls) -> bool:
    """:func:`trusted_step` of a cell class (a property of the class: looked up once per class)."""
    from .cells import _UserFunctionCell

    owner = next(k for k in cls.__mro__ if "step" in vars(k))
    return owner.__module__ == "seqpar.cells" and not issubclass(owner, _UserFunctionCell)


def check_step_output(cell, h_prev, xp_t):
    """f's output on one step must have h_prev's shape (..., D) and the compute dtype."""
    with torch.no_grad():
        out = cell.step(h_prev, xp_t)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the cell's step function must return a tensor; got {type(out).__name__}")
    if tuple(out.shape) != tuple(h_prev.shape):
        raise ValueError(f"the cell's step function returned shape {tuple(out.shape)} for a state of shape "
                         f"{tuple(h_prev.shape)}: its output must have the state size D={cell.state_size} "
                         f"(hidden_size) as last dim and keep the batch dims")
    if out.dtype != h_prev.dtype:
        raise TypeError(f"the cell's step function returned {out.dtype} for a state in {h_prev.dtype}: it "
                        f"must return the dtype of h_prev")
    return out


def uses_generic_jacobian(cell) -> bool:
    from .cells import Cell

    return type(cell).jacobian is Cell.jacobian


def _probe_structure(cell, h, xp, D):
    """The finest structure that holds the dense Jacobian at (h, xp) (one row, D JVPs): a string."""
    from .cells import generic_jacobian
    from .structure import DENSE

    Jd = generic_jacobian(cell.step, h, xp, DENSE, DENSE)[..., 0, :, :]  # (1, D, D)
    scale = Jd.abs().max().clamp_min(1e-30)
    tol = torch.finfo(Jd.dtype).eps ** 0.5 * scale
    for k in [1] + [k for k in range(2, D) if D % k == 0]:
        st = Structure("diag") if k == 1 else Structure("block", k)
        rest = Jd - st.to_dense(st.from_dense(Jd), D)
        if bool(rest.abs().max() <= tol):
            return "diag" if k == 1 else f"block:{k}"
    return "dense"


def check_declared_structure(cell, h0, xp, steps: int = 4, rows: int = 2):
    """Compare a random-direction JVP of ``cell.step`` with the declared structure's Jacobian.

    Only for cells whose Jacobian comes from forward-mode AD restricted to the declared
    ``structure`` (FunctionCell, ODECell, custom cells without ``jacobian``): a wrong
    declaration gives quasi-Newton forwards but wrong gradients.  Works on the first
    ``steps`` steps and ``rows`` batch rows only.
    """
    from torch.func import jvp

    st = cell.structure
    if st.kind == "dense" or not uses_generic_jacobian(cell) or xp.shape[0] == 0:
        return
    D = h0.shape[-1]
    n = min(steps, xp.shape[0])
    with torch.no_grad():
        h = h0[:rows]
        hs = []
        for t in range(n):  # points on the trajectory (where f is meant to be evaluated)
            hs.append(h)
            h = cell.step(h, xp[t, :rows])
        h_prev = torch.stack(hs, 0)
        xs = xp[:n, :rows]
    g = torch.Generator(device="cpu").manual_seed(20240917)
    v = torch.randn(h_prev.shape, generator=g, dtype=torch.float64).to(h_prev)
    with torch.no_grad():
        _, jv = jvp(lambda hh: cell.step(hh, xs), (h_prev,), (v,))
        mine = st.matvec(cell.jacobian(h_prev, xs, st), v)
    declared = st.kind if st.kind != "block" else f"block:{st.block}"
    eps = torch.finfo(h_prev.dtype).eps
    scale = max(1.0, float(jv.abs().max()))
    err = float((jv - mine).abs().max())
    if not err <= eps ** 0.5 * 10 * scale:  # NaN fails too
        t, b = [int(i) for i in torch.nonzero((jv - mine).abs().amax(-1) == (jv - mine).abs().amax())[0]]
        right = _probe_structure(cell, h_prev[t, b:b + 1], xs[t, b:b + 1], D) if D <= 256 else "dense"
        raise ValueError(
            f"{type(cell).__name__} declares structure={declared!r}, but its Jacobian df/dh_prev is not "
            f"{declared} (a random-direction JVP differs by {err:.2e} from the declared structure's "
            f"Jacobian at step {t}); newton's forward would still converge but gradients would be wrong. "
            f"Declare structure={right!r}")


def layout_doc(batch_first: bool, last: str = "D_in") -> str:
    """How ``solve`` reads a 3-D tensor, for error messages."""
    if batch_first:
        return f"(B, T, {last}) (batch_first=True)"
    return f"(T, B, {last}) (time-major, the default; pass batch_first=True for (B, T, {last}))"


def check_solve_args(cell, inputs, h0, initial_guess, *, allow_empty: bool, batch_first: bool = False,
                     defer_finite: bool = False, named_params=None):
    """Validate ``solve``'s tensors (in the caller's layout) against ``cell``; returns ``(h0, pending)``:
    h0 (zeros if None) and, with ``defer_finite``, the deferred NaN / Inf check of h0, inputs and
    initial_guess (a :class:`PendingFinite`, see :func:`check_all_finite`; None otherwise: checked here).
    ``named_params``: the cell's ``named_parameters()`` as a list, where the caller has them already."""
    from .cells import Cell

    if not isinstance(cell, Cell):
        raise TypeError(f"cell must be a seqpar.cells.Cell; got {type(cell).__name__} "
                        "(wrap a plain function with seqpar.cells.FunctionCell)")
    check_tensor("inputs", inputs, 3, layout_doc(batch_first))
    if batch_first:
        B, T, D_in = inputs.shape
    else:
        T, B, D_in = inputs.shape
    if T == 0 and not allow_empty:
        raise ValueError("inputs has T=0 time steps; the sequence must not be empty")
    if B == 0:
        raise ValueError("inputs has batch size B=0")
    if cell.input_size is not None and D_in != cell.input_size:
        raise ValueError(f"inputs has D_in={D_in} features but the cell expects input_size={cell.input_size} "
                         f"(inputs of shape {tuple(inputs.shape)} are read as {layout_doc(batch_first)})")
    D = cell.state_size
    device = inputs.device
    for p_name, p in (cell.named_parameters() if named_params is None else named_params):
        if p.device != device:
            raise ValueError(f"device mismatch: inputs on {inputs.device}, cell parameter {p_name!r} on {p.device}")
        ok = p.dtype == inputs.dtype or (inputs.dtype in HALF_DTYPES and p.dtype in (torch.float32,) + HALF_DTYPES)
        if not ok:
            raise TypeError(f"dtype mismatch: inputs are {inputs.dtype}, cell parameter {p_name!r} is {p.dtype}")
    h0_given = h0 is not None
    if h0 is None:
        h0 = inputs.new_zeros(B, D)
    else:
        check_tensor("h0", h0, 2, f"(B, D) = ({B}, {D})")
        if tuple(h0.shape) != (B, D):
            raise ValueError(f"h0 must have shape (B, D) = ({B}, {D}); got {tuple(h0.shape)} (inputs of shape "
                             f"{tuple(inputs.shape)} are read as {layout_doc(batch_first)})")
        if h0.dtype != inputs.dtype:
            raise TypeError(f"dtype mismatch: inputs are {inputs.dtype}, h0 is {h0.dtype}")
        if h0.device != inputs.device:
            raise ValueError(f"device mismatch: inputs on {inputs.device}, h0 on {h0.device}")
    if initial_guess is not None:
        want, names = ((B, T, D), "(B, T, D)") if batch_first else ((T, B, D), "(T, B, D)")
        check_tensor("initial_guess", initial_guess, 3, f"{names} = {want}, the layout of inputs")
        if tuple(initial_guess.shape) != want:
            raise ValueError(f"initial_guess must have shape {names} = {want}, the layout of inputs "
                             f"({layout_doc(batch_first, 'D')}); got {tuple(initial_guess.shape)}")
        if initial_guess.device != inputs.device:
            raise ValueError(f"device mismatch: inputs on {inputs.device}, initial_guess on {initial_guess.device}")
    pending = check_all_finite(("h0", h0 if h0_given else None), ("inputs", inputs), ("initial_guess", initial_guess),
                               defer=defer_finite)
    return h0, pending


def resolve_jacobian(jacobian, cell) -> Structure:
    """Map the ``jacobian`` argument to a Structure for Newton's linearisation."""
    exact = cell.structure
    if jacobian == "auto":
        if exact.kind != "diag" and exact.block_size(cell.state_size) == 1:
            return parse_structure("diag")  # D = 1: the 1x1 Jacobian is its own diagonal
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
    if st.kind != "diag" and st.block_size(cell.state_size) == 1:
        return parse_structure("diag")  # 1x1 blocks (D = 1 dense, block:1) are the diagonal: its kernels apply
    return st


def is_exact(newton: Structure, exact: Structure, D: int) -> bool:
    """Whether linearising with ``newton`` keeps the cell's whole Jacobian (true Newton)."""
    if newton.kind == "dense" or exact.kind == "diag" or D == 1:
        return True
    if exact.kind == "dense":
        return False
    if newton.kind == "diag":
        return False
    return newton.block_size(D) % exact.block_size(D) == 0
