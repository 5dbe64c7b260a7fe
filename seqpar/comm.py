"""The communicator the solver talks to (docs/design.md section 5).

The solver core never imports ``torch.distributed``: it calls the few
collectives below on a communicator object, so the same code runs in one
process, under torchrun (NCCL/gloo), under mpiexec (mpi4py) and in Ray workers.
Implementations for process groups and MPI, and :func:`seqpar.distributed.get_communicator`
(group -> communicator), live in :mod:`seqpar.distributed`, which imports this module (never
the other way round).
"""
from __future__ import annotations

import torch


class Communicator:
    """Collectives over the *sequence* group: rank r holds the r-th time shard."""

    rank: int = 0
    world_size: int = 1

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Stack every rank's ``t`` (same shape on all ranks): (world_size, *t.shape)."""
        raise NotImplementedError

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks (returns a tensor; may work in place)."""
        raise NotImplementedError

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """``t`` of rank ``src`` on every rank."""
        raise NotImplementedError

    def agree(self, error: BaseException | None) -> None:
        """Fail-fast barrier: if any rank passes an error, every rank raises.

        Ranks that passed ``None`` raise :class:`RemoteRankError` naming the
        failing rank(s) and their message; the failing rank re-raises its own.
        """
        flag = torch.tensor([0.0 if error is None else 1.0])
        flags = self.all_gather(flag).reshape(-1)
        bad = [i for i, v in enumerate(flags.tolist()) if v]
        if not bad:
            return
        if error is not None:
            raise error
        raise RemoteRankError(f"rank(s) {bad} of the sequence group failed (see their error); "
                              f"this rank ({self.rank}) stops too")


class RemoteRankError(RuntimeError):
    """Raised on healthy ranks when another rank of the sequence group failed."""


class SingleProcess(Communicator):
    """The trivial communicator: one rank holds the whole sequence."""

    rank = 0
    world_size = 1

    def all_gather(self, t):
        return t.unsqueeze(0)

    def all_reduce_sum(self, t):
        return t

    def broadcast(self, t, src):
        return t

    def agree(self, error):
        if error is not None:
            raise error


SINGLE = SingleProcess()
