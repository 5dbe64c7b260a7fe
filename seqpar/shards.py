"""Where each rank's time shard sits in the whole sequence, and the states at shard boundaries.

Shard lengths travel as int64 (exact for any length; float32 metadata rounds
above 2^24 steps).  A rank may hold an empty shard: it passes the state it
receives straight through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

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


def gather_boundary(comm: Communicator, states: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The state before this rank's first step: the last state of the nearest non-empty rank before
    it, or ``h0``.  ``states`` (n, B, D) this rank's states (n may be 0); one all-gather of each
    rank's last state and a non-empty flag (0 or 1: exact in any float dtype).  Returned in h0's dtype."""
    if comm.world_size == 1:
        return h0
    n = states.shape[0]
    last = states[-1].to(h0.dtype) if n else torch.zeros_like(h0)
    rows = comm.all_gather(torch.cat([last.reshape(-1), last.new_tensor([1.0 if n else 0.0])]))
    boundary = h0
    for q in range(comm.rank):
        if float(rows[q, -1]) > 0:
            boundary = rows[q, :-1].reshape(h0.shape)
    return boundary
