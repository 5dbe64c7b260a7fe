"""Jacobian structures and the algebra of affine maps ``h -> J h + b``.

A Newton step over the whole sequence is the linear recurrence
``h_t = J_t h_{t-1} + b_t``.  Every scan in seqpar composes affine maps
``(J, b)``; how a Jacobian is stored, applied and composed depends on its
structure:

====== ================================ =================================
kind   storage of J for leading dims L  apply / compose
====== ================================ =================================
diag   ``(*L, D)``                      elementwise
block  ``(*L, D // k, k, k)``           batched k x k matmul
dense  ``(*L, D, D)``                   batched D x D matmul
====== ================================ =================================

``dense`` is stored as a single D x D block, so ``block`` and ``dense`` share
all code paths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("diag", "block", "dense")


@dataclass(frozen=True)
class Structure:
    """Shape of a Jacobian: ``kind`` in {"diag", "block", "dense"}, ``block`` = k."""

    kind: str
    block: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"structure kind must be one of {KINDS}; got {self.kind!r}")
        if self.kind == "block" and self.block < 1:
            raise ValueError(f"block size must be >= 1; got {self.block}")

    # ------------------------------------------------------------------ shapes
    def block_size(self, D: int) -> int:
        """Edge length of the stored square blocks for state size ``D``."""
        if self.kind == "diag":
            return 1
        if self.kind == "dense":
            return D
        if D % self.block:
            raise ValueError(f"state size {D} is not a multiple of the block size {self.block}")
        return self.block

    def jac_shape(self, lead: tuple, D: int) -> tuple:
        if self.kind == "diag":
            return (*lead, D)
        k = self.block_size(D)
        return (*lead, D // k, k, k)

    def describe(self) -> str:
        return f"block{self.block}" if self.kind == "block" else self.kind

    # --------------------------------------------------------------- algebra
    def matvec(self, J: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``J x`` for x of shape (*L, D)."""
        if self.kind == "diag":
            return J * x
        nb, k = J.shape[-3], J.shape[-1]
        xv = x.reshape(*x.shape[:-1], nb, k, 1)
        return torch.matmul(J, xv).reshape(x.shape)

    def matmul(self, J2: torch.Tensor, J1: torch.Tensor) -> torch.Tensor:
        """``J2 J1`` (apply J1 first)."""
        if self.kind == "diag":
            return J2 * J1
        return torch.matmul(J2, J1)

    def transpose(self, J: torch.Tensor) -> torch.Tensor:
        if self.kind == "diag":
            return J
        return J.transpose(-1, -2)

    def identity(self, lead: tuple, D: int, dtype, device) -> torch.Tensor:
        if self.kind == "diag":
            return torch.ones(*lead, D, dtype=dtype, device=device)
        k = self.block_size(D)
        eye = torch.eye(k, dtype=dtype, device=device)
        return eye.expand(*lead, D // k, k, k).clone()

    def combine(self, later, earlier):
        """Composition ``later o earlier`` of affine maps (J, b)."""
        J2, b2 = later
        J1, b1 = earlier
        return self.matmul(J2, J1), self.matvec(J2, b1) + b2

    # ------------------------------------------------ conversion and building
    def from_dense(self, Jd: torch.Tensor) -> torch.Tensor:
        """Restrict a dense (*L, D, D) Jacobian to this structure (drops the rest)."""
        D = Jd.shape[-1]
        if self.kind == "diag":
            return Jd.diagonal(dim1=-2, dim2=-1).clone()
        if self.kind == "dense":
            return Jd.unsqueeze(-3)
        k = self.block_size(D)
        nb = D // k
        lead = Jd.shape[:-2]
        Jv = Jd.reshape(*lead, nb, k, nb, k)
        idx = torch.arange(nb, device=Jd.device)
        blocks = Jv[..., idx, :, idx, :]  # advanced indexing moves nb to front
        nlead = len(lead)
        perm = list(range(1, nlead + 1)) + [0, nlead + 1, nlead + 2]
        return blocks.permute(perm).contiguous()

    def to_dense(self, J: torch.Tensor, D: int) -> torch.Tensor:
        """Expand a stored Jacobian to dense (*L, D, D) (tests and debugging)."""
        if self.kind == "diag":
            return torch.diag_embed(J)
        nb, k = J.shape[-3], J.shape[-1]
        if nb == 1:
            return J.squeeze(-3)
        out = J.new_zeros(*J.shape[:-3], D, D)
        for i in range(nb):
            out[..., i * k:(i + 1) * k, i * k:(i + 1) * k] = J[..., i, :, :]
        return out

    def restrict_weight(self, W: torch.Tensor) -> torch.Tensor:
        """The part of a square (D, D) weight matrix this structure keeps."""
        return self.from_dense(W)

    def row_scale(self, s: torch.Tensor, Wr: torch.Tensor) -> torch.Tensor:
        """``diag(s) W`` for s (*L, D) and W restricted by :meth:`restrict_weight`."""
        if self.kind == "diag":
            return s * Wr
        nb, k = Wr.shape[-3], Wr.shape[-1]
        return s.reshape(*s.shape[:-1], nb, k, 1) * Wr

    def diag_matrix(self, d: torch.Tensor) -> torch.Tensor:
        """``diag(d)`` stored in this structure, for d (*L, D)."""
        if self.kind == "diag":
            return d
        D = d.shape[-1]
        k = self.block_size(D)
        return torch.diag_embed(d.reshape(*d.shape[:-1], D // k, k))


DIAG = Structure("diag")
DENSE = Structure("dense")


def parse_structure(spec, *, name: str = "structure") -> Structure:
    """Accept a Structure, "diag", "dense", "block" (k=2), "block:k" or ("block", k)."""
    if isinstance(spec, Structure):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        return Structure(spec[0], int(spec[1]))
    if isinstance(spec, str):
        if spec.startswith("block"):
            rest = spec[5:].lstrip(":")
            return Structure("block", int(rest) if rest else 2)
        if spec in ("diag", "dense"):
            return DIAG if spec == "diag" else DENSE  # frozen: the shared instances
    raise ValueError(
        f"{name} must be 'diag', 'dense', 'block', 'block:k', ('block', k) or a Structure; got {spec!r}"
    )
