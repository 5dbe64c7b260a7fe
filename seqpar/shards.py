"""Where each rank's time shard sits in the whole sequence, and the states at shard boundaries.

Shard lengths travel as int64 (exact for any length; float32 metadata rounds
above 2^24 steps).  A rank may hold an empty shard: it passes the state it
receives straight through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .comm import Communicator


@dataclass(frozen=True)
class ShardLayout:
    """Lengths and offsets of every rank's shard (identical on all ranks)."""

    lengths: List[int]
    rank: int

    @staticmethod
    def exchange(comm: Communicator, n: int, device) -> "ShardLayout":
        """One small all-gather of the shard lengths (int64, exact)."""
        if comm.world_size == 1:
            return ShardLayout([int(n)], 0)
        rows = comm.all_gather(torch.tensor([int(n)], dtype=torch.int64, device=device))
        return ShardLayout([int(v) for v in rows.reshape(-1).tolist()], comm.rank)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def offset(self) -> int:
        return sum(self.lengths[:self.rank])

    def offset_of(self, q: int) -> int:
        return sum(self.lengths[:q])

    def previous_nonempty(self, q: Optional[int] = None) -> Optional[int]:
        """The nearest rank before ``q`` (default: this rank) that holds steps, or None."""
        q = self.rank if q is None else q
        return next((p for p in range(q - 1, -1, -1) if self.lengths[p] > 0), None)


def gather_boundary(comm: Communicator, layout: ShardLayout, states: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The state before this rank's first step: the last state of the nearest non-empty
    rank before it, or ``h0``.  ``states`` (n, B, D) this rank's states; one all-gather."""
    if comm.world_size == 1:
        return h0
    last = states[-1] if states.shape[0] else torch.zeros_like(h0)
    lasts = comm.all_gather(last.to(h0.dtype).contiguous())
    q = layout.previous_nonempty()
    return h0 if q is None else lasts[q]


def boundary_from_lasts(lasts, h0, rank, B, D):
    """Boundary of ``rank`` from gathered rows ``[last state (B*D), shard length]``; empty
    shards pass through (only the sign of the length column is read)."""
    boundary = h0
    for q in range(rank):
        if float(lasts[q, -1]) > 0:
            boundary = lasts[q, :-1].reshape(B, D)
    return boundary
