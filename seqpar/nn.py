"""``torch.nn``-compatible recurrent layers solved by seqpar.

``seqpar.nn.GRU``, ``LSTM`` and ``RNN`` take torch.nn's constructor arguments,
hold parameters under torch.nn's names (``weight_ih_l0``, ``bias_hh_l1_reverse``,
...), so a torch.nn module's ``state_dict`` loads unchanged, and return what
torch.nn returns.  ``DiagGRU`` / ``DiagLSTM`` are the same layers with
ParaRNN-style diagonal recurrent weights (``weight_hh_lk`` of shape (G*H,)).

seqpar-specific keyword arguments: ``jacobian``, ``tol``, ``max_iter``,
``fallback``, ``method`` (see :func:`seqpar.solve`) and ``sequence_group``:
a process group over which the time axis is sharded (each rank passes its own
time shard; ``h_n`` is then the state at the end of this rank's shard).
``last_info`` holds the :class:`seqpar.SolveInfo` of each (layer, direction)
of the last forward call.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
import torch.nn.functional as F

from . import cells as C
from .solver import solve

_PARAM_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


_SEQPAR_ARGS_DOC = """
    seqpar-specific keyword-only arguments (after torch.nn's):

    * ``jacobian``: ``"auto"`` (default: the cell's exact structure -- Newton),
      ``"dense"``, ``"diag"`` (quasi-Newton for dense cells), ``"block"`` or ``"block:k"``;
    * ``tol``, ``max_iter``: Newton tolerance and iteration cap (``None``: :func:`seqpar.solve`'s defaults);
    * ``fallback`` (default ``"sequential"``: step-by-step evaluation where Newton does not converge)
      and ``method`` (``"newton"``, or ``"sequential"``: the step-by-step reference): passed, with
      ``jacobian``, ``tol`` and ``max_iter``, to :func:`seqpar.solve` (its docstring has the details);
    * ``sequence_group``: a process group over which the time axis is sharded; each rank passes
      its own contiguous time shard and gets its shard of ``output``; ``h_n`` is the state at the
      end of this rank's shard (not with ``bidirectional=True``).

    Attribute ``last_info``: a list with the :class:`seqpar.SolveInfo` (iterations, residual,
    converged, ...) of each (layer, direction) of the last forward call.
"""  # appended to each layer's docstring below


class _SeqparRNNBase(nn.Module):
    cell_cls = None  # set by subclasses
    is_lstm = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, jacobian="auto", tol: Optional[float] = None,
                 max_iter: Optional[int] = None, fallback: str = "sequential", method: str = "newton",
                 sequence_group=None, **cell_kwargs):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1; got {num_layers}")
        if not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be in [0, 1]; got {dropout}")
        if bidirectional and sequence_group is not None:
            raise NotImplementedError("bidirectional layers cannot be sharded over a sequence_group yet")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout, self.bidirectional = bias, batch_first, float(dropout), bidirectional
        self.solve_kwargs = dict(jacobian=jacobian, tol=tol, max_iter=max_iter, fallback=fallback, method=method)
        self.sequence_group = sequence_group
        self.last_info: List = []
        dirs = 2 if bidirectional else 1
        cell_list, bindings = [], []
        for layer in range(num_layers):
            for d in range(dirs):
                in_size = input_size if layer == 0 else hidden_size * dirs
                cell = self.cell_cls(in_size, hidden_size, bias=bias, device=device, dtype=dtype, **cell_kwargs)
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                for name in _PARAM_NAMES:
                    p = getattr(cell, name)
                    if p is not None:
                        self.register_parameter(name + sfx, p)
                        bindings.append((cell, name, name + sfx))
                cell_list.append(cell)
        # cells share the layer's Parameter objects but are not submodules: the
        # state_dict keeps torch.nn's flat names.
        object.__setattr__(self, "_cells", cell_list)
        object.__setattr__(self, "_bindings", bindings)

    @property
    def sequence_group(self):
        ref, strong = self.__dict__.get("_sequence_group_ref"), self.__dict__.get("_sequence_group_strong")
        if strong is not None or ref is None:
            return strong
        group = ref()
        if group is None:
            raise RuntimeError("this layer's sequence_group was destroyed (destroy_process_group)")
        return group

    @sequence_group.setter
    def sequence_group(self, group):
        # a weak reference when possible: the layer must not keep a destroyed process group (and gloo's
        # threads) alive until interpreter shutdown (intermittent SIGABRT at exit)
        import weakref

        try:
            ref, strong = (weakref.ref(group), None) if group is not None else (None, None)
        except TypeError:
            ref, strong = None, group
        self.__dict__["_sequence_group_ref"], self.__dict__["_sequence_group_strong"] = ref, strong

    def cells(self) -> List[C.Cell]:
        """The per-(layer, direction) cells, bound to this layer's current parameters."""
        for cell, attr, name in self._bindings:
            cell._parameters[attr] = getattr(self, name)
        return self._cells

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout:g}"
        if self.bidirectional:
            s += ", bidirectional=True"
        kw = self.solve_kwargs
        jac = kw["jacobian"]
        s += f", jacobian={jac if isinstance(jac, str) else getattr(jac, 'describe', jac.__str__)()!r}"
        if kw["tol"] is not None:
            s += f", tol={kw['tol']:g}"
        if kw["max_iter"] is not None:
            s += f", max_iter={kw['max_iter']}"
        if kw["fallback"] != "sequential":
            s += f", fallback={kw['fallback']!r}"
        if kw["method"] != "newton":
            s += f", method={kw['method']!r}"
        if self.__dict__.get("_sequence_group_ref") is not None or self.__dict__.get("_sequence_group_strong") is not None:
            s += ", sequence_group=<set>"
        return s

    # --- state packing (overridden for LSTMs)
    def _initial_states(self, hx, B, like):
        """Per-(layer, direction) initial cell states (B, D) from torch-style hx."""
        n = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            return [None] * n
        if self.is_lstm:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise ValueError("hx for an LSTM must be a tuple (h_0, c_0)")
            h, c = hx
            self._check_hx("h_0", h, n, B)
            self._check_hx("c_0", c, n, B)
            return [self._pack_lstm(h[i], c[i]) for i in range(n)]
        self._check_hx("hx", hx, n, B)
        return [hx[i] for i in range(n)]

    def _check_hx(self, name, h, n, B):
        if not isinstance(h, torch.Tensor) or tuple(h.shape) != (n, B, self.hidden_size):
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"{name} must have shape (num_layers * num_directions, B, hidden_size) = "
                             f"({n}, {B}, {self.hidden_size}); got {got}")

    def _pack_lstm(self, h, c):
        return torch.cat([h, c], -1)

    def _unpack_lstm(self, state):
        H = self.hidden_size
        return state[..., :H], state[..., H:]

    def _final_state(self, states, h_init, cell, B):
        """State at the end of this rank's shard.  Under a sequence group a rank may hold an empty
        shard: its final state is then the last state of the nearest non-empty rank before it (or
        h_0), fetched with one small all-gather (that value carries no gradient back to its rank)."""
        if self.sequence_group is None:
            return states[-1]
        from .distributed import get_communicator

        from .shards import gather_boundary

        comm = get_communicator(self.sequence_group)
        h0 = h_init.detach() if h_init is not None else states.new_zeros(B, cell.state_size)
        boundary = gather_boundary(comm, states.detach(), h0)  # every rank takes part, empty or not
        return states[-1] if states.shape[0] else boundary.to(states.dtype)

    def forward(self, input: torch.Tensor, hx=None):
        if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
            got = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"input must be 2-D (L, H_in) or 3-D (L, B, H_in) / (B, L, H_in); got {got}")
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if self.is_lstm else hx.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        B = input.shape[1]
        cells = self.cells()
        dirs = 2 if self.bidirectional else 1
        h_init = self._initial_states(hx, B, input)
        self.last_info = []
        x = input
        finals = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                i = layer * dirs + d
                cell = cells[i]
                xin = x.flip(0) if d else x
                states, info = solve(cell, xin, h_init[i], return_info=True, group=self.sequence_group,
                                     **self.solve_kwargs)
                self.last_info.append(info)
                if d:
                    states = states.flip(0)
                outs.append(cell.output(states))
                finals.append(states[0] if d else self._final_state(states, h_init[i], cell, B))
            x = outs[0] if dirs == 1 else torch.cat(outs, -1)
            if self.dropout and self.training and layer + 1 < self.num_layers:
                x = F.dropout(x, self.dropout, True)
        output = x
        if self.is_lstm:
            hs, cs = zip(*(self._unpack_lstm(s) for s in finals))
            h_n = (torch.stack(hs, 0), torch.stack(cs, 0))
        else:
            h_n = torch.stack(finals, 0)
        if not batched:
            output = output.squeeze(1)
            h_n = tuple(h.squeeze(1) for h in h_n) if self.is_lstm else h_n.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, h_n


class RNN(_SeqparRNNBase):
    """Elman RNN (= torch.nn.RNN); ``nonlinearity`` "tanh" or "relu".

    torch.nn.RNN's arguments and parameter names (``weight_ih_l0`` ...); forward returns ``output, h_n``.
    """

    cell_cls = C.Elman

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, **kw):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype, nonlinearity=nonlinearity, **kw)
        self.nonlinearity = nonlinearity


class GRU(_SeqparRNNBase):
    """GRU (= torch.nn.GRU).

    torch.nn.GRU's arguments and parameter names (``weight_ih_l0`` ...); forward returns ``output, h_n``.
    """

    cell_cls = C.GRU


class LSTM(_SeqparRNNBase):
    """LSTM (= torch.nn.LSTM, without proj_size); forward returns ``output, (h_n, c_n)``.

    torch.nn.LSTM's arguments (``proj_size`` must be 0) and parameter names (``weight_ih_l0`` ...).
    """

    cell_cls = C.LSTM
    is_lstm = True

    def __init__(self, *args, proj_size: int = 0, **kw):
        if proj_size:
            raise ValueError(f"proj_size is not supported by seqpar.nn.LSTM; got proj_size={proj_size}")
        super().__init__(*args, **kw)


class DiagGRU(_SeqparRNNBase):
    """GRU with diagonal recurrent weights (ParaRNN-style); exact Newton costs O(D) per step.

    torch.nn.GRU's arguments; ``weight_hh_lk`` has shape (3*H,) (one recurrent weight per gate
    and unit).  The default ``jacobian="auto"`` is the exact diagonal Jacobian.
    """

    cell_cls = C.DiagGRU


class DiagLSTM(_SeqparRNNBase):
    """LSTM with diagonal recurrent weights; the cell state interleaves (h, c) per unit (2 x 2 blocks).

    torch.nn.LSTM's arguments (no ``proj_size``); ``weight_hh_lk`` has shape (4*H,); forward
    returns ``output, (h_n, c_n)``.  The default ``jacobian="auto"`` is the exact 2 x 2 block Jacobian.
    """

    cell_cls = C.DiagLSTM
    is_lstm = True

    def _pack_lstm(self, h, c):
        return torch.stack([h, c], -1).flatten(-2)

    def _unpack_lstm(self, state):
        return state[..., 0::2], state[..., 1::2]


__all__ = ["RNN", "GRU", "LSTM", "DiagGRU", "DiagLSTM"]


for _layer in (RNN, GRU, LSTM, DiagGRU, DiagLSTM):
    _layer.__doc__ = _layer.__doc__.rstrip() + "\n\n" + _SEQPAR_ARGS_DOC.lstrip("\n")
