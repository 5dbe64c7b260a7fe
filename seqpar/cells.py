"""Built-in recurrent cells and the cell protocol.

A cell is a ``torch.nn.Module`` describing one step ``h_t = f(h_{t-1}, u_t)``:

* ``project_inputs(inputs)``: the part of f that depends on the input only,
  done for all T at once (one GEMM), (T, B, D_in) -> (T, B, P);
* ``step(h_prev, xp)``: f itself on projected inputs, batched over any
  leading dims, (..., D), (..., P) -> (..., D);
* ``jacobian(h_prev, xp, structure)``: dJ = df/dh_prev stored as
  ``structure`` dictates (see :mod:`seqpar.structure`); the exact one when
  ``structure`` equals ``self.structure``, a restriction of it otherwise
  (quasi-Newton).  The base class computes it with ``torch.func`` forward-mode
  AD; built-in cells give it analytically;
* ``structure``: the structure of the exact Jacobian;
* ``output(states)``: the layer output carried by the state (LSTM: h of [h, c]).

Weights are cast to the compute dtype of ``h_prev`` inside ``step`` so that
bfloat16 storage with float32 parameters (mixed precision) works.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .structure import DENSE, DIAG, Structure, parse_structure


def _cast(t: Optional[torch.Tensor], like: torch.Tensor):
    return None if t is None else t.to(like.dtype)


class Cell(nn.Module):
    """Base class: subclasses set ``input_size``, ``hidden_size`` (state size D),
    ``structure`` and implement ``step``; override ``jacobian`` for speed."""

    input_size: int
    hidden_size: int
    structure: Structure = DENSE

    @property
    def state_size(self) -> int:
        return self.hidden_size

    @property
    def output_size(self) -> int:
        return self.state_size

    def project_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs

    def step(self, h_prev: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def output(self, states: torch.Tensor) -> torch.Tensor:
        return states

    def forward(self, h_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One step on raw inputs: ``f(h_prev, x)``."""
        return self.step(h_prev, self.project_inputs(x))

    # ---------------------------------------------------------------- Jacobian
    def jacobian(self, h_prev: torch.Tensor, xp: torch.Tensor, structure: Structure) -> torch.Tensor:
        return generic_jacobian(self.step, h_prev, xp, self.structure, structure)

    # ---------------------------------------------------------- fused kernels
    def fused_newton_step(self, structure: Structure, xp: torch.Tensor) -> Optional[Callable]:
        """The cell's fused Newton iteration for linearisation ``structure``, or None.

        A cell with a kernel returns ``step(h, boundary, start, out=None,
        want_summary=False) -> (out, stats[, Phi])``: from the iterate ``h``
        (n, B, D) with ``boundary`` (B, D) the state before step 0, it evaluates
        f, J (``structure``), the elementwise relative residual ``stats[0]`` and
        scans the linearised recurrence from ``start`` into ``out``; with
        ``want_summary`` also the product of all J (leading dim B).  Its J must
        equal ``self.jacobian(.., structure)`` (the incoming-state correction of
        a sharded solve uses that).  Called only for CUDA (or interpreted) tensors
        of a kernel dtype; ``xp`` = ``project_inputs(inputs)``.  The step may carry
        ``step.from_zeros``, the same call for an ``h`` that is zero at every step
        (the solver's first iterate without an initial guess), where that is
        cheaper (the dense GRU: no recurrent GEMM).
        """
        return None

    def pipelined_newton(self, structure: Structure, xp: torch.Tensor):
        """The cell's pipelined Newton kernel for linearisation ``structure`` (a
        :class:`seqpar.pipeline.Pipeline`), or None.  Preferred over
        :meth:`fused_newton_step` where both exist: no look-back inside a pass (see
        :mod:`seqpar.pipeline`).  Same conditions of use as :meth:`fused_newton_step`."""
        return None

    def pipelined_newton_raw(self, structure: Structure, inputs: torch.Tensor):
        """As :meth:`pipelined_newton`, bound to the raw ``inputs`` (T, B, I) instead of their projection:
        for cells whose kernel projects the inputs itself (one input feature); None otherwise."""
        return None

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, structure={self.structure.describe()}"


GENERIC_JACOBIAN_BUDGET = 32 * 2**20  # bytes of JVP tangents alive at once (dense: D tangents per step), CPU
GENERIC_JACOBIAN_BUDGET_CUDA = 256 * 2**20  # on a GPU: fewer, larger vmapped probes (launch-bound otherwise)


def generic_jacobian(step, h_prev, xp, exact: Structure, want: Structure) -> torch.Tensor:
    """df/dh by forward-mode AD, probing only the columns the exact structure needs.

    diag cells: one JVP with a ones tangent; k-block cells: k JVPs; dense: D JVPs
    (vmapped).  The result is restricted to ``want``.  Memory is bounded by the
    chunk it is given: the inputs are copied out of any larger tensor they view
    (forward-mode AD would otherwise build tangents the size of the base), and
    dense cells are probed on sub-chunks of at most ``GENERIC_JACOBIAN_BUDGET``
    (``GENERIC_JACOBIAN_BUDGET_CUDA`` on a GPU) bytes of tangents.
    """
    from torch.func import jvp, vmap

    h_prev, xp = h_prev.clone(), xp.clone()  # detach from a whole-sequence base
    D = h_prev.shape[-1]
    lead = h_prev.shape[:-1]
    if exact.kind == "diag":
        _, d = jvp(lambda h: step(h, xp), (h_prev,), (torch.ones_like(h_prev),))
        return DIAG.diag_matrix(d) if want.kind == "diag" else want.from_dense(torch.diag_embed(d))
    k = exact.block_size(D)
    if exact.kind == "block":
        nb = D // k
        cols = []
        for j in range(k):
            v = torch.zeros(nb, k, dtype=h_prev.dtype, device=h_prev.device)
            v[:, j] = 1
            _, cj = jvp(lambda h: step(h, xp), (h_prev,), (v.reshape(D).expand_as(h_prev).contiguous(),))
            cols.append(cj.reshape(*lead, nb, k))
        blocks = torch.stack(cols, -1)  # (*lead, nb, k_out, k_in)
        if want.kind == "block" and want.block_size(D) == k:
            return blocks
        return want.from_dense(exact.to_dense(blocks, D))
    if h_prev.dim() >= 2 and h_prev.shape[0] > 1:  # time-major chunk: sub-chunks bound the D tangents per step
        per_step = D * h_prev[0].numel() * h_prev.element_size()
        budget = GENERIC_JACOBIAN_BUDGET_CUDA if h_prev.is_cuda else GENERIC_JACOBIAN_BUDGET
        sub = max(1, budget // max(1, per_step))
        if sub < h_prev.shape[0]:
            return torch.cat([generic_jacobian(step, h_prev[s:s + sub], xp[s:s + sub], exact, want)
                              for s in range(0, h_prev.shape[0], sub)], 0)
    eye = torch.eye(D, dtype=h_prev.dtype, device=h_prev.device)
    tangents = eye.reshape(D, *([1] * len(lead)), D).expand(D, *lead, D).contiguous()
    cols = vmap(lambda v: jvp(lambda h: step(h, xp), (h_prev,), (v,))[1])(tangents)  # (D_in, *lead, D_out)
    Jd = cols.movedim(0, -1)  # (*lead, D_out, D_in)
    return want.from_dense(Jd)


def _uniform_(params, hidden_size):
    bound = 1.0 / math.sqrt(hidden_size)
    for p in params:
        if p is not None:
            nn.init.uniform_(p, -bound, bound)


def _torch_layer(m, kind, layer=0):
    """(weight_ih, weight_hh, bias_ih, bias_hh) of layer ``layer`` of a torch RNN module, or of a cell."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{kind}.from_torch: layer must be an int; got {type(layer).__name__}")
    if isinstance(m, nn.RNNBase):
        if m.bidirectional:
            raise ValueError(f"{kind}.from_torch: bidirectional modules are not supported; got {m}")
        if getattr(m, "proj_size", 0):
            raise ValueError(f"{kind}.from_torch: proj_size is not supported; got {m}")
        if not 0 <= layer < m.num_layers:
            raise ValueError(f"{kind}.from_torch: layer={layer} is out of range for a module with "
                             f"num_layers={m.num_layers} (valid: 0..{m.num_layers - 1})")
        sfx = f"_l{layer}"
    elif isinstance(m, nn.RNNCellBase):
        if layer != 0:
            raise ValueError(f"{kind}.from_torch: a torch cell ({type(m).__name__}) has one layer; got layer={layer}")
        sfx = ""
    else:
        raise TypeError(f"{kind}.from_torch expects a torch.nn RNN/GRU/LSTM module or cell; got {type(m).__name__}")
    get = lambda n: getattr(m, n + sfx, None)  # noqa: E731
    return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")


class _TorchWeightsCell(Cell):
    """Shared parameter layout of torch.nn's RNN/GRU/LSTM: weight_ih (G*H, I),
    weight_hh (G*H, H) (or (G*H,) for diagonal cells), bias_ih, bias_hh (G*H,)."""

    gates = 1
    diagonal_recurrence = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be >= 1; got {input_size}, {hidden_size}")
        self.input_size, self.hidden_size, self.bias = int(input_size), int(hidden_size), bool(bias)
        G, H = self.gates, self.hidden_size
        kw = dict(device=device, dtype=dtype)
        self.weight_ih = nn.Parameter(torch.empty(G * H, input_size, **kw))
        hh_shape = (G * H,) if self.diagonal_recurrence else (G * H, H)
        self.weight_hh = nn.Parameter(torch.empty(*hh_shape, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G * H, **kw))
            self.bias_hh = nn.Parameter(torch.empty(G * H, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self):
        _uniform_(self.parameters(), self.hidden_size)

    @classmethod
    def from_torch(cls, m, layer: int = 0):
        """A cell with copies of the weights of torch module or cell ``m``.

        For a multi-layer ``torch.nn.RNN/GRU/LSTM``, ``layer`` picks which layer's weights
        (``weight_ih_l{layer}`` ...; default 0); an out-of-range layer raises ``ValueError``.
        To convert every layer at once, load the module's ``state_dict`` into a
        ``seqpar.nn`` layer with the same ``num_layers`` instead.
        """
        w_ih, w_hh, b_ih, b_hh = _torch_layer(m, cls.__name__, layer)
        expect_gates = cls.gates
        if w_hh.shape[0] != expect_gates * w_hh.shape[1]:
            raise ValueError(f"{cls.__name__}.from_torch: weight_hh has shape {tuple(w_hh.shape)}, "
                             f"expected ({expect_gates}*H, H) for a {cls.__name__}")
        cell = cls(w_ih.shape[1], w_hh.shape[1], bias=b_ih is not None, device=w_ih.device, dtype=w_ih.dtype,
                   **cls._from_torch_kwargs(m))
        with torch.no_grad():
            cell.weight_ih.copy_(w_ih)
            cell.weight_hh.copy_(w_hh)
            if b_ih is not None:
                cell.bias_ih.copy_(b_ih)
                cell.bias_hh.copy_(b_hh)
        return cell

    @staticmethod
    def _from_torch_kwargs(m):
        return {}

    fold_bias_hh = False  # cells whose b_hh only adds to the input projection fold it in there
    # one unit, one input feature: project into a gate-major layout, (T, G, B) in memory viewed as
    # (T, B, G), so the kernels' per-gate loads are contiguous across the batch (the row-major (T, B, G)
    # layout strides them by G); for cells whose kernels take xp of any strides
    gate_major_inputs = False

    def project_inputs(self, inputs):
        w = self.weight_ih.to(inputs.dtype)
        if w.shape[1] == 1:  # one input feature: a broadcast multiply-add, not a K=1 GEMM
            b = _cast(self.bias_ih, inputs)   # (cuBLAS takes ~60-160 us for (1.6M x 1) @ (1 x 3) on an H200)
            if self.gate_major_inputs and self.hidden_size == 1 and inputs.dim() == 3:
                x, wg = inputs.transpose(-1, -2), w  # (T, 1, B) against (G, 1): (T, G, B)
                xp = (x * wg if b is None else torch.addcmul(b[:, None], x, wg)).transpose(-1, -2)
            else:
                xp = inputs * w[:, 0] if b is None else torch.addcmul(b, inputs, w[:, 0])
        else:  # (the 3xTF32 tensor-core GEMM on CUDA at fp32 where no autograd graph is recorded)
            from .kernels.linear import fp32_linear

            xp = fp32_linear(inputs, w, _cast(self.bias_ih, inputs))
        if self.fold_bias_hh and self.bias_hh is not None:
            xp = xp + self.bias_hh.to(inputs.dtype)
        return xp

    def _hh(self, h):
        """Recurrent pre-activations (..., G*H) without bias, in h's dtype."""
        return F.linear(h, self.weight_hh.to(h.dtype))

    def _bias_hh(self, like):
        if self.bias_hh is None:
            return like.new_zeros(self.gates * self.hidden_size)
        return self.bias_hh.to(like.dtype)

    def _w_hh_blocks(self, structure: Structure, like):
        """Per-gate recurrent matrices restricted to ``structure``."""
        H = self.hidden_size
        W = self.weight_hh.to(like.dtype)
        return [structure.restrict_weight(W[g * H:(g + 1) * H]) for g in range(self.gates)]


class Elman(_TorchWeightsCell):
    """``h' = act(W_ih x + b_ih + W_hh h + b_hh)`` (= torch.nn.RNN / RNNCell), act tanh or relu."""

    gates = 1
    fold_bias_hh = True

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu'; got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device, dtype)

    @staticmethod
    def _from_torch_kwargs(m):
        return {"nonlinearity": m.nonlinearity}

    def step(self, h_prev, xp):
        pre = xp.to(h_prev.dtype) + self._hh(h_prev)
        return torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)

    def jacobian(self, h_prev, xp, structure):
        h = self.step(h_prev, xp)
        s = 1 - h * h if self.nonlinearity == "tanh" else (h > 0).to(h.dtype)
        (Wr,) = self._w_hh_blocks(structure, h_prev)
        return structure.row_scale(s, Wr)


DENSE_KERNEL_MAX_D = 64          # GRU, jacobian="dense": the fused exact-Newton kernel up to this state size
# Its chunk-summary products J_t A (D > 8: tensor cores): "tf32" | "tf32x3" | "ieee".  TF32 is the default: on an
# H200 (run 25, B=16) it converged in the same iterations to the same residual as IEEE (D=16, 64), and IEEE fp32
# tl.dot at D=64 is 17x slower (3.79 s vs 0.22 s per solve at T=100k).  Only the summaries (hence the carries) see
# TF32; f, J and the residual are fp32, so a TF32 error can cost iterations, never a false "converged".
DENSE_KERNEL_PRECISION = "tf32"


class GRU(_TorchWeightsCell):
    """torch.nn.GRU's cell: gates (r, z, n), ``h' = (1 - z) n + z h``."""

    gates = 3
    gate_major_inputs = True  # GRU(1, 1): the pipelined kernel reads xp of any strides

    def _gates(self, h_prev, xp):
        H = self.hidden_size
        xp = xp.to(h_prev.dtype)
        hh = self._hh(h_prev) + self._bias_hh(h_prev)
        xr, xz, xn = xp[..., :H], xp[..., H:2 * H], xp[..., 2 * H:]
        hr, hz, hn = hh[..., :H], hh[..., H:2 * H], hh[..., 2 * H:]
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return r, z, n, hn

    def step(self, h_prev, xp):
        r, z, n, _ = self._gates(h_prev, xp)
        return n + z * (h_prev - n)

    def jacobian(self, h_prev, xp, structure):
        r, z, n, hn = self._gates(h_prev, xp)
        dn = (1 - z) * (1 - n * n)
        a_r = dn * hn * r * (1 - r)
        a_n = dn * r
        a_z = (h_prev - n) * z * (1 - z)
        Wr, Wz, Wn = self._w_hh_blocks(structure, h_prev)
        return (structure.row_scale(a_r, Wr) + structure.row_scale(a_z, Wz)
                + structure.row_scale(a_n, Wn) + structure.diag_matrix(z))

    def fused_newton_step(self, structure, xp):
        w, b = self.weight_hh, self.bias_hh
        xp = xp.contiguous()  # the look-back kernels read row-major xp: one copy per solve, not per pass
        if structure.kind == "dense" and self.hidden_size <= DENSE_KERNEL_MAX_D:
            # exact Newton: gates, J (in registers), residual and the chunked scan in one kernel pair
            from .kernels.fused_dense_gru import fused_dense_gru_step

            return lambda h, bnd, start, out=None, want_summary=False: fused_dense_gru_step(
                h, xp, w, b, bnd, out=out, start=start, want_summary=want_summary,
                precision=DENSE_KERNEL_PRECISION)
        if structure.kind != "diag":  # quasi-Newton on the diagonal of J: fused gates + scan after one GEMM
            return None
        from .kernels.fused_diag_gru import fused_diag_gru_step, fused_gru_quasi_step

        if self.hidden_size == 1:  # W_hh is its own diagonal: the DiagGRU kernel, exact, no per-iteration GEMM
            return lambda h, bnd, start, out=None, want_summary=False: fused_diag_gru_step(
                h, xp, w.reshape(3), b, bnd, out=out, start=start, want_summary=want_summary)
        def step(h, bnd, start, out=None, want_summary=False, zero_iterate=False):
            return fused_gru_quasi_step(h, xp, w, b, bnd, out=out, start=start, want_summary=want_summary,
                                        zero_iterate=zero_iterate)

        # the pass from the zero iterate (the solver's first without an initial guess): no recurrent GEMM
        step.from_zeros = functools.partial(step, zero_iterate=True)
        return step

    def pipelined_newton_raw(self, structure, inputs):
        if self.hidden_size != 1 or structure.kind == "block":
            return None
        return _diag_gru_pipeline_raw(self, inputs)

    def pipelined_newton(self, structure, xp):
        D = self.hidden_size
        if D == 1:  # W_hh (3, 1) is its own diagonal: the 1 x 1 Jacobian is exact under any structure
            return None if structure.kind == "block" else _diag_gru_pipeline(xp, self.weight_hh.reshape(3),
                                                                             self.bias_hh, 1)
        from .kernels import pipelined_dense_gru as k

        if structure.kind == "diag" and D > k.MAX_D:
            return _quasi_gru_pipeline(self, xp)
        if D > k.MAX_D or structure.kind == "block":
            return None
        # small D: a walker holds a batch row's whole state and J; exact Newton (dense) or quasi (diag)
        from .pipeline import Pipeline, scan_runs, shard_summary

        exact = structure.kind == "dense"
        cfg = k.run_config(xp.shape[0], xp.shape[1])
        w, b = k.prepare_weights(self.weight_hh, self.bias_hh)
        B = xp.shape[1]
        return Pipeline(
            first=lambda h, bnd, next_start=None, stop=None: k.first_pass(h, xp, w, b, bnd, exact, cfg, stop),
            carries=lambda res, start: scan_runs(res.sum_a, res.sum_c, start, structure),
            step=lambda h, bnd, res, incl, start, out=None, next_start=None, stop=None: k.pipelined_step(
                h, xp, w, b, bnd, incl, start, out, exact, cfg, stop),
            compose=lambda res: shard_summary(res.sum_a, res.sum_c, structure, B, D),
            structure=structure)


class LSTM(_TorchWeightsCell):
    """torch.nn.LSTM's cell.  State is ``[h, c]`` concatenated: D = 2 * hidden_size."""

    gates = 4
    fold_bias_hh = True

    @property
    def state_size(self):
        return 2 * self.hidden_size

    @property
    def output_size(self):
        return self.hidden_size

    def output(self, states):
        return states[..., :self.hidden_size]

    def _gates(self, h_prev, xp):
        H = self.hidden_size
        h, c = h_prev[..., :H], h_prev[..., H:]
        g = xp.to(h_prev.dtype) + F.linear(h, self.weight_hh.to(h_prev.dtype))
        i, f, gg, o = (torch.sigmoid(g[..., :H]), torch.sigmoid(g[..., H:2 * H]),
                       torch.tanh(g[..., 2 * H:3 * H]), torch.sigmoid(g[..., 3 * H:]))
        c_new = f * c + i * gg
        return i, f, gg, o, c, c_new, torch.tanh(c_new)

    def step(self, h_prev, xp):
        i, f, gg, o, c, c_new, tc = self._gates(h_prev, xp)
        return torch.cat([o * tc, c_new], -1)

    def _dense_parts(self, h_prev, xp):
        H = self.hidden_size
        i, f, gg, o, c, c_new, tc = self._gates(h_prev, xp)
        W = self.weight_hh.to(h_prev.dtype)
        Wi, Wf, Wg, Wo = W[:H], W[H:2 * H], W[2 * H:3 * H], W[3 * H:]
        dc_dh = ((c * f * (1 - f))[..., None] * Wf + (gg * i * (1 - i))[..., None] * Wi
                 + (i * (1 - gg * gg))[..., None] * Wg)
        k = o * (1 - tc * tc)
        dh_dh = (tc * o * (1 - o))[..., None] * Wo + k[..., None] * dc_dh
        return dh_dh, torch.diag_embed(k * f), dc_dh, torch.diag_embed(f)

    def jacobian(self, h_prev, xp, structure):
        if structure.kind == "diag":
            H = self.hidden_size
            i, f, gg, o, c, c_new, tc = self._gates(h_prev, xp)
            W = self.weight_hh.to(h_prev.dtype)
            di, df, dg, do = (W[g * H:(g + 1) * H].diagonal() for g in range(4))
            dc_dh = c * f * (1 - f) * df + gg * i * (1 - i) * di + i * (1 - gg * gg) * dg
            dh_dh = tc * o * (1 - o) * do + o * (1 - tc * tc) * dc_dh
            return torch.cat([dh_dh, f], -1)
        hh, hc, ch, cc = self._dense_parts(h_prev, xp)
        Jd = torch.cat([torch.cat([hh, hc], -1), torch.cat([ch, cc], -1)], -2)
        return structure.from_dense(Jd)


class DiagGRU(_TorchWeightsCell):
    """ParaRNN-style GRU with diagonal recurrent weights: weight_hh is (3H,), one
    weight per unit and gate, so dh'/dh is diagonal.  Gates as in torch.nn.GRU with
    ``W_h* h`` replaced by ``w_h* * h``."""

    gates = 3
    diagonal_recurrence = True
    structure = DIAG
    gate_major_inputs = True  # D = 1: the pipelined kernel reads xp of any strides

    @classmethod
    def from_torch(cls, m, layer: int = 0):  # pragma: no cover - no torch counterpart
        raise TypeError("DiagGRU has no torch.nn counterpart")

    def _gates(self, h_prev, xp):
        H = self.hidden_size
        xp = xp.to(h_prev.dtype)
        w = self.weight_hh.to(h_prev.dtype)
        b = self._bias_hh(h_prev)
        hr = w[:H] * h_prev + b[:H]
        hz = w[H:2 * H] * h_prev + b[H:2 * H]
        hn = w[2 * H:] * h_prev + b[2 * H:]
        r = torch.sigmoid(xp[..., :H] + hr)
        z = torch.sigmoid(xp[..., H:2 * H] + hz)
        n = torch.tanh(xp[..., 2 * H:] + r * hn)
        return r, z, n, hn, w

    def step(self, h_prev, xp):
        r, z, n, _, _ = self._gates(h_prev, xp)
        return n + z * (h_prev - n)

    def jacobian(self, h_prev, xp, structure):
        H = self.hidden_size
        r, z, n, hn, w = self._gates(h_prev, xp)
        dn = (1 - z) * (1 - n * n)
        d = dn * (hn * r * (1 - r) * w[:H] + r * w[2 * H:]) + z + (h_prev - n) * z * (1 - z) * w[H:2 * H]
        return structure.diag_matrix(d)

    def fused_newton_step(self, structure, xp):
        if structure.kind != "diag":
            return None
        from .kernels.fused_diag_gru import fused_diag_gru_step

        w, b = self.weight_hh, self.bias_hh
        xp = xp.contiguous()  # the look-back kernel reads row-major xp: one copy per solve, not per pass
        return lambda h, bnd, start, out=None, want_summary=False: fused_diag_gru_step(
            h, xp, w, b, bnd, out=out, start=start, want_summary=want_summary)

    def pipelined_newton_raw(self, structure, inputs):
        if structure.kind != "diag":
            return None
        return _diag_gru_pipeline_raw(self, inputs)

    def pipelined_newton(self, structure, xp):
        if structure.kind != "diag":
            return None
        return _diag_gru_pipeline(xp, self.weight_hh, self.bias_hh, self.hidden_size)


def _quasi_gru_pipeline(cell, xp):
    """The pipelined quasi-Newton kernel of a dense GRU of width 9 .. ``USE_MAX_D`` (where it was measured
    faster than the look-back path; :mod:`seqpar.kernels.pipelined_quasi_gru`) bound to ``xp`` (T, B, 3D), or
    None at other widths.  Its passes keep the linearised maps (2, T, B, D) between them: allocated here, once
    per solve; two buffers where the kernel's programs split the channels (a pass reads the maps at its
    iterate from one and writes those at the new iterate to the other)."""
    from .kernels import pipelined_quasi_gru as k
    from .pipeline import Pipeline, scan_runs, shard_summary
    from .structure import DIAG

    T, B = xp.shape[:2]
    D = cell.hidden_size
    if not (k.ENABLED and k.MIN_D <= D <= k.USE_MAX_D):
        return None
    cfg = k.run_config(T, B, D)
    w, b = k.prepare_weights(cell.weight_hh, cell.bias_hh)
    maps = [k.new_maps(T, B, D, xp.device) for _ in range(2 if cfg.splits(D) else 1)]
    # which buffer holds the maps at an iterate, by the iterate's storage: passes alternate between two iterate
    # buffers (eagerly and in CUDA graphs alike), so this is fixed at capture and right at every replay
    holder = {}

    def first(h, bnd, next_start=None, stop=None):
        holder[h.data_ptr()] = 0
        return k.first_pass(h, xp, w, b, bnd, maps[0], cfg, stop)

    def step(h, bnd, res, incl, start, out=None, next_start=None, stop=None):
        src = holder.get(h.data_ptr())
        if src is None:
            raise RuntimeError("pipelined quasi-Newton GRU: a pass's iterate is not one this pipeline produced")
        dst = (src + 1) % len(maps)
        new = k.pipelined_step(xp, w, b, maps[src], incl, start, out, cfg, stop,
                               maps_out=maps[dst] if dst != src else None)
        holder[new.out.data_ptr()] = dst
        return new

    return Pipeline(
        first=first,
        carries=lambda res, start: scan_runs(res.sum_a, res.sum_c, start, DIAG),
        step=step,
        compose=lambda res: shard_summary(res.sum_a, res.sum_c, DIAG, B, D),
        structure=DIAG)


def _diag_gru_pipeline_raw(cell, inputs):
    """The pipelined DiagGRU kernel (``cell``'s recurrent weights, diagonal: (3H,) or GRU(1, 1)'s (3, 1)) bound
    to the raw ``inputs`` (T, B, 1) of a one-feature cell, which its passes project themselves
    (``xp = b_ih + W_ih x``, as ``project_inputs`` without folded b_hh); None for more input features."""
    from .kernels import pipelined_diag_gru as k

    if inputs.dim() != 3 or inputs.shape[2] != 1 or cell.weight_ih.shape[1] != 1 or cell.fold_bias_hh:
        return None
    proj = k.prepare_projection(cell.weight_ih, cell.bias_ih)
    return _diag_gru_pipeline(inputs, cell.weight_hh.reshape(-1), cell.bias_hh, cell.hidden_size, proj)


def _diag_gru_pipeline(xp, weight_hh, bias_hh, hidden_size: int, proj=None):
    """The pipelined DiagGRU kernel bound to ``xp`` (T, B, 3H) and the recurrent weights (3H,); with ``proj``
    (``kernels.pipelined_diag_gru.prepare_projection``) ``xp`` is the raw inputs (T, B, 1)."""
    from .kernels import pipelined_diag_gru as k
    from .pipeline import Pipeline
    from .structure import DIAG

    B = xp.shape[1]
    cfg = k.run_config(xp.shape[0], B * hidden_size)
    weight_hh, bias_hh = k.prepare_weights(weight_hh, bias_hh)
    counter = torch.zeros(1, dtype=torch.int32, device=xp.device)  # the fused passes' completion count
    return Pipeline(
        first=lambda h, bnd, next_start=None, stop=None: k.first_pass(h, xp, weight_hh, bias_hh, bnd, cfg,
                                                                      next_start, counter, stop, proj),
        carries=k.scan_groups,
        step=lambda h, bnd, res, carry, start, out=None, next_start=None, stop=None: k.pipelined_step(
            h, xp, weight_hh, bias_hh, bnd, res, carry, start, out, cfg, next_start, counter, stop, proj),
        compose=lambda res: k.compose(res, B, hidden_size),
        structure=DIAG)


class DiagLSTM(_TorchWeightsCell):
    """ParaRNN-style LSTM with diagonal recurrent weights (weight_hh (4H,)).

    The state interleaves each unit's pair: ``[h_0, c_0, h_1, c_1, ...]`` (D = 2H),
    so the exact Jacobian is block-diagonal with 2 x 2 blocks (structure block:2);
    ``jacobian="diag"`` drops the h/c coupling (quasi-Newton).
    """

    gates = 4
    fold_bias_hh = True
    diagonal_recurrence = True
    structure = Structure("block", 2)

    @classmethod
    def from_torch(cls, m, layer: int = 0):  # pragma: no cover - no torch counterpart
        raise TypeError("DiagLSTM has no torch.nn counterpart")

    @property
    def state_size(self):
        return 2 * self.hidden_size

    @property
    def output_size(self):
        return self.hidden_size

    def output(self, states):
        return states[..., 0::2]

    def _gates(self, h_prev, xp):
        H = self.hidden_size
        h, c = h_prev[..., 0::2], h_prev[..., 1::2]
        w = self.weight_hh.to(h_prev.dtype)
        g = xp.to(h_prev.dtype) + h.repeat(*([1] * (h.dim() - 1)), 4) * w
        i, f, gg, o = (torch.sigmoid(g[..., :H]), torch.sigmoid(g[..., H:2 * H]),
                       torch.tanh(g[..., 2 * H:3 * H]), torch.sigmoid(g[..., 3 * H:]))
        c_new = f * c + i * gg
        return i, f, gg, o, c, c_new, torch.tanh(c_new), w

    def step(self, h_prev, xp):
        i, f, gg, o, c, c_new, tc, _ = self._gates(h_prev, xp)
        return torch.stack([o * tc, c_new], -1).flatten(-2)

    def jacobian(self, h_prev, xp, structure):
        H = self.hidden_size
        i, f, gg, o, c, c_new, tc, w = self._gates(h_prev, xp)
        wi, wf, wg, wo = w[:H], w[H:2 * H], w[2 * H:3 * H], w[3 * H:]
        dc_dh = c * f * (1 - f) * wf + gg * i * (1 - i) * wi + i * (1 - gg * gg) * wg
        k = o * (1 - tc * tc)
        dh_dh = tc * o * (1 - o) * wo + k * dc_dh
        dh_dc = k * f
        if structure.kind == "diag":
            return torch.stack([dh_dh, f], -1).flatten(-2)
        blocks = torch.stack([torch.stack([dh_dh, dh_dc], -1), torch.stack([dc_dh, f], -1)], -2)  # (*, H, 2, 2)
        if structure.kind == "block" and structure.block_size(2 * H) == 2:
            return blocks
        return structure.from_dense(self.structure.to_dense(blocks, 2 * H))

    def fused_newton_step(self, structure, xp):
        if structure.kind != "block" or structure.block_size(self.state_size) != 2:
            return None
        from .kernels.fused_diag_lstm import fused_diag_lstm_step

        w = self.weight_hh
        return lambda h, bnd, start, out=None, want_summary=False: fused_diag_lstm_step(
            h, xp, w, bnd, out=out, start=start, want_summary=want_summary)


def _check_size(name: str, value) -> int:
    """A positive int (bools and non-integers refused)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int; got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return int(value)


def _check_dt(dt) -> float:
    import numbers

    if isinstance(dt, torch.Tensor) and dt.numel() == 1 and not dt.requires_grad:
        dt = dt.item()
    if isinstance(dt, bool) or not isinstance(dt, numbers.Real):
        raise TypeError(f"dt must be a finite positive real number; got {dt!r} ({type(dt).__name__})")
    if not (math.isfinite(float(dt)) and float(dt) > 0):
        raise ValueError(f"dt must be a finite positive real number; got {dt!r}")
    return float(dt)


class _UserFunctionCell(Cell):
    """Cells wrapping user callables: an ``nn.Module`` (or a bound method of one) is a
    submodule, ``params`` are extra tensors that get gradients (like torchdiffeq's
    ``adjoint_params``), and tensors requiring grad that the callable captures but the
    cell does not know are refused at ``solve`` (their gradient would silently be lost)."""

    _fn_attr = "fn"

    def _register_callable(self, fn, params):
        owner = getattr(fn, "__self__", None)
        if isinstance(fn, nn.Module):
            pass  # nn.Module.__setattr__ registers it as a submodule
        elif isinstance(owner, nn.Module):
            self.fn_owner = owner  # a bound method of a module: its parameters are the cell's
        extra = []
        if params is not None:
            if isinstance(params, torch.Tensor):
                params = [params]
            try:
                params = list(params)
            except TypeError:
                raise TypeError(f"params must be an iterable of tensors; got {type(params).__name__}") from None
            for i, t in enumerate(params):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"params[{i}] must be a torch.Tensor; got {type(t).__name__}")
                if not t.is_floating_point():
                    raise TypeError(f"params[{i}] must be a floating tensor; got {t.dtype}")
                extra.append(t)
        object.__setattr__(self, "_extra_params", extra)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        seen = set()
        for name, p in super().named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate):
            seen.add(id(p))
            yield name, p
        for i, t in enumerate(getattr(self, "_extra_params", ())):
            if remove_duplicate and id(t) in seen:
                continue
            seen.add(id(t))
            yield (prefix + "." if prefix else "") + f"params.{i}", t

    def uncovered_captured_tensors(self):
        """(name, tensor) of tensors requiring grad that the callable captures (closure,
        defaults, globals, bound ``self``, also inside captured modules and functions)
        but that are not among ``self.parameters()``."""
        known = {id(p) for p in self.parameters()}
        out = []
        for name, t in _captured_tensors(getattr(self, self._fn_attr)):
            if t.requires_grad and id(t) not in known and id(t) not in {id(x) for _, x in out}:
                out.append((name, t))
        return out

    def check_captured(self):
        bad = self.uncovered_captured_tensors()
        if bad:
            names = ", ".join(repr(n) for n, _ in bad)
            what = self._fn_attr
            raise ValueError(
                f"{type(self).__name__}: {what} captures tensor(s) requiring grad that the cell does not know: "
                f"{names}; their gradients would be silently lost (the adjoint backward only differentiates the "
                f"cell's parameters). Pass them as {type(self).__name__}(..., params=[...]), or make {what} an "
                f"nn.Module holding them as parameters")


def _captured_tensors(fn, depth: int = 3, _seen=None):
    """(name, tensor) pairs a callable can reach: closure cells, defaults, referenced
    globals, a bound method's ``self``; nn.Modules contribute their parameters and tensor
    attributes; nested functions are followed ``depth`` levels deep."""
    _seen = set() if _seen is None else _seen
    if id(fn) in _seen or depth < 0:
        return []
    _seen.add(id(fn))
    found = []

    def visit(name, obj, d):
        if isinstance(obj, torch.Tensor):
            found.append((name, obj))
        elif isinstance(obj, nn.Module):
            if id(obj) in _seen:
                return
            _seen.add(id(obj))
            for pn, p in obj.named_parameters():
                found.append((f"{name}.{pn}", p))
            for mn, m in obj.named_modules():
                for an, av in vars(m).items():
                    if isinstance(av, torch.Tensor) and not an.startswith("_"):
                        found.append((f"{name}.{mn + '.' if mn else ''}{an}", av))
        elif isinstance(obj, (list, tuple)) and len(obj) <= 64:
            for i, v in enumerate(obj):
                if isinstance(v, (torch.Tensor, nn.Module)):
                    visit(f"{name}[{i}]", v, d)
        elif isinstance(obj, dict) and len(obj) <= 64:
            for k, v in obj.items():
                if isinstance(v, (torch.Tensor, nn.Module)):
                    visit(f"{name}[{k!r}]", v, d)
        elif callable(obj) and d > 0:
            found.extend(_captured_tensors(obj, d - 1, _seen))

    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, type) and type(owner).__module__ != "builtins":
        visit("self", owner, depth)
        if not isinstance(owner, nn.Module):
            for an, av in getattr(owner, "__dict__", {}).items():
                visit(f"self.{an}", av, depth)
        fn = getattr(fn, "__func__", fn)
    if isinstance(fn, nn.Module):
        visit(type(fn).__name__, fn, depth)
        fn = getattr(type(fn), "forward", None)
        if fn is None:
            return found
    code = getattr(fn, "__code__", None)
    if code is None:  # a callable object: its attributes
        if not isinstance(fn, nn.Module):
            for an, av in getattr(fn, "__dict__", {}).items():
                visit(an, av, depth)
        return found
    for var, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
        try:
            visit(var, cell.cell_contents, depth)
        except ValueError:  # empty cell
            pass
    defaults = getattr(fn, "__defaults__", None) or ()
    argnames = code.co_varnames[:code.co_argcount]
    for var, v in zip(argnames[len(argnames) - len(defaults):], defaults):
        visit(var, v, depth)
    for var, v in (getattr(fn, "__kwdefaults__", None) or {}).items():
        visit(var, v, depth)
    g = getattr(fn, "__globals__", {})
    names = set(code.co_names)
    stack = [c for c in code.co_consts if hasattr(c, "co_names")]
    while stack:  # lambdas / comprehensions nested in fn
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    for var in sorted(names):
        if var in g:
            v = g[var]
            if isinstance(v, (torch.Tensor, nn.Module)) or (callable(v) and getattr(v, "__globals__", None) is g):
                visit(var, v, depth)
    return found


class FunctionCell(_UserFunctionCell):
    """Any user function ``fn(h_prev, u) -> h`` (batched over leading dims).

    ``structure`` declares the exact Jacobian structure of ``fn`` in h ("dense",
    "diag", "block:k"); the Jacobian comes from ``torch.func`` forward-mode AD
    (``seqpar.solve`` checks the declaration on a few steps).
    If ``fn`` is an ``nn.Module`` (or a bound method of one) its parameters belong
    to the cell and get gradients; ``params`` (an iterable of tensors, e.g. weights
    a plain function closes over) are treated as the cell's parameters too.  A plain
    function capturing tensors that require grad and are not in ``params`` is refused
    at ``solve`` (their gradients would be lost).  ``input_size`` is only used for
    input validation (None: any).
    """

    def __init__(self, fn: Callable, hidden_size: int, structure="dense", input_size: Optional[int] = None,
                 params=None):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.fn = fn
        self.input_size = None if input_size is None else _check_size("input_size", input_size)
        self.structure = parse_structure(structure)
        self.structure.block_size(self.hidden_size)  # validates divisibility
        self._register_callable(fn, params)

    def step(self, h_prev, xp):
        return self.fn(h_prev, xp)


class ODECell(_UserFunctionCell):
    """One fixed step of an explicit integrator for ``dy/dt = g(y, u)``.

    ``method="euler"``: ``y + dt g(y, u)``; ``method="rk4"``: classical Runge-Kutta
    with u held constant over the step.  ``g`` may be an ``nn.Module`` (a neural
    ODE); ``params`` as for :class:`FunctionCell`; ``structure`` is that of dg/dy
    ("dense" unless declared).
    """

    _fn_attr = "g"

    def __init__(self, g: Callable, hidden_size: int, dt: float, method: str = "euler",
                 structure="dense", input_size: Optional[int] = None, params=None):
        super().__init__()
        if method not in ("euler", "rk4"):
            raise ValueError(f"method must be 'euler' or 'rk4'; got {method!r}")
        if not callable(g):
            raise TypeError(f"g must be callable; got {type(g).__name__}")
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.g, self.dt, self.method = g, _check_dt(dt), method
        self.input_size = None if input_size is None else _check_size("input_size", input_size)
        self.structure = parse_structure(structure)
        self.structure.block_size(self.hidden_size)
        self._register_callable(g, params)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dt={self.dt:g}, method={self.method!r}"

    def step(self, h_prev, xp):
        g, dt = self.g, self.dt
        if self.method == "euler":
            return h_prev + dt * g(h_prev, xp)
        k1 = g(h_prev, xp)
        k2 = g(h_prev + 0.5 * dt * k1, xp)
        k3 = g(h_prev + 0.5 * dt * k2, xp)
        k4 = g(h_prev + dt * k3, xp)
        return h_prev + (dt / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)


__all__ = ["Cell", "Elman", "GRU", "LSTM", "DiagGRU", "DiagLSTM", "FunctionCell", "ODECell", "generic_jacobian"]
