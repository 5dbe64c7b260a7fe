"""Communicators for a sharded time axis, and helpers for the launchers.

The solver talks to a :class:`seqpar.comm.Communicator` (docs/design.md section 5).
This module provides the implementations behind ``seqpar.solve(..., group=...)``:

* :class:`TorchDistCommunicator` wraps a ``torch.distributed`` process group
  (or a 1-D ``DeviceMesh``, or one dimension of a larger mesh).  With NCCL the
  exchanged summaries stay on the group's GPU; with gloo they go through host
  memory.  Collective timeouts are those of the process group
  (``init_process_group(timeout=...)``).
* :class:`MPICommunicator` wraps an mpi4py communicator; summaries are staged
  through host numpy buffers.  MPI has no collective timeouts, so every
  collective is non-blocking (``Iallgather`` ...) and polled against a
  deadline: a peer that died or hangs raises :class:`CollectiveTimeout`
  instead of blocking forever.

Launcher helpers: :func:`init_from_env` (torchrun / mpiexec / Ray
environments), :func:`shard_for_rank`, :func:`sum_grads` (reduce the
gradients of parameters *outside* the seqpar layers over the sequence group)
and :func:`abort` (make every process of the job exit non-zero now).
"""
from __future__ import annotations

import datetime
import os
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .comm import SINGLE, Communicator, SingleProcess

DEFAULT_TIMEOUT_S = 300.0


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the communicator's timeout (a peer died or hangs)."""


# --------------------------------------------------------------------- torch.distributed
_EXIT_CLEANUP_REGISTERED = False


def _exit_cleanup():
    """At interpreter exit, while everything is still alive: free unreachable cycles (autograd contexts,
    layers, communicators) so that process groups the user destroyed are released now, in order, rather
    than during finalization."""
    import gc

    gc.collect()


def _register_exit_cleanup():
    global _EXIT_CLEANUP_REGISTERED
    if not _EXIT_CLEANUP_REGISTERED:
        import atexit

        atexit.register(_exit_cleanup)
        _EXIT_CLEANUP_REGISTERED = True


def _resolve_group(group):
    """ProcessGroup for ``group``: a ProcessGroup, a 1-D DeviceMesh, or (mesh, dim)."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - very old torch
        DeviceMesh = ()
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], DeviceMesh):
        mesh, dim = group
        return mesh.get_group(dim)
    if DeviceMesh and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            names = getattr(group, "mesh_dim_names", None)
            raise ValueError(f"group is a {group.ndim}-D DeviceMesh (dims {names}); pass the sequence dimension: "
                             f"mesh['seq'] or (mesh, 'seq')")
        return group.get_group()
    return group


class TorchDistCommunicator(Communicator):
    """Collectives over a ``torch.distributed`` process group (NCCL, gloo, or both)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                               "(or seqpar.distributed.init_from_env) before solving with a process group")
        self.dist = dist
        pg = _resolve_group(group)
        if pg is None:
            pg = dist.group.WORLD
        # Only a weak reference to the process group: a communicator is cached on its group and kept by
        # autograd contexts (SolveFunction) and layers; a strong reference would keep the ProcessGroup (and
        # gloo's threads) alive past destroy_process_group, to be torn down during interpreter shutdown,
        # which intermittently ends the process with "terminate called without an active exception".
        try:
            self._group_ref = weakref.ref(pg)
            self._group_strong = None
        except TypeError:  # not weak-referenceable: keep it
            self._group_ref, self._group_strong = None, pg
        _register_exit_cleanup()
        self.rank = dist.get_rank(pg)
        self.world_size = dist.get_world_size(pg)
        if self.rank < 0:
            raise ValueError("this process is not a member of the sequence group it was given")
        backend = str(dist.get_backend(pg)).lower()
        self.backend = backend
        self._cuda_ok = "nccl" in backend or "cuda" in backend
        self._cpu_ok = "gloo" in backend or "mpi" in backend or "cpu" in backend
        self._gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)

    @property
    def group(self):
        if self._group_strong is not None:
            return self._group_strong
        pg = self._group_ref()
        if pg is None:
            raise RuntimeError("the process group of this seqpar communicator was destroyed "
                               "(torch.distributed.destroy_process_group); create a new group to solve again")
        return pg

    def _device_for(self, t: torch.Tensor) -> torch.device:
        if t.device.type == "cuda" and self._cuda_ok:
            return t.device
        if t.device.type == "cpu" and self._cpu_ok:
            return t.device
        if self._cuda_ok and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _stage(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self._device_for(t)).contiguous()

    def all_gather(self, t):
        x = self._stage(t)
        flat = x.reshape(-1)
        out = x.new_empty(self.world_size * flat.numel())
        if self._gather_single is not None:
            try:
                self._gather_single(out, flat, group=self.group)
                return out.reshape(self.world_size, *x.shape).to(t.device)
            except (RuntimeError, NotImplementedError) as e:  # backend without it: use the list form
                if "not supported" not in str(e).lower() and "not implemented" not in str(e).lower():
                    raise
                self._gather_single = None
        self.dist.all_gather(list(out.view(self.world_size, -1).unbind(0)), flat, group=self.group)
        return out.reshape(self.world_size, *x.shape).to(t.device)

    def all_reduce_sum(self, t):
        x = self._stage(t).clone()
        self.dist.all_reduce(x, op=self.dist.ReduceOp.SUM, group=self.group)
        return x.to(t.device)

    def broadcast(self, t, src):
        x = self._stage(t).clone()
        try:
            self.dist.broadcast(x, group=self.group, group_src=src)
        except TypeError:  # torch without group_src: translate to the global rank
            self.dist.broadcast(x, src=self.dist.get_global_rank(self.group, src), group=self.group)
        return x.to(t.device)

    def __repr__(self):
        return f"TorchDistCommunicator(rank={self.rank}, world_size={self.world_size}, backend={self.backend})"


# ------------------------------------------------------------------------------ MPI
class MPICommunicator(Communicator):
    """Collectives over an mpi4py communicator, staged through host memory.

    Every collective is non-blocking and polled against ``timeout`` seconds, so
    a dead or hung peer gives :class:`CollectiveTimeout` rather than a hang.
    """

    def __init__(self, comm=None, timeout: float = DEFAULT_TIMEOUT_S):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.timeout = float(timeout)

    @staticmethod
    def _host(t: torch.Tensor):
        x = t.detach()
        if x.dtype not in (torch.float64, torch.float32, torch.int64, torch.int32):
            x = x.to(torch.float32)
        return x.cpu().contiguous().numpy()

    def _wait(self, req, what: str):
        deadline = time.monotonic() + self.timeout
        pause = 0.0
        while not req.Test():
            if time.monotonic() > deadline:
                raise CollectiveTimeout(f"MPI {what} on rank {self.rank} did not complete within {self.timeout:.0f} s "
                                        f"(a peer rank failed or hangs)")
            if pause:
                time.sleep(pause)
            pause = min(1e-3, pause * 2 if pause else 1e-6)

    def all_gather(self, t):
        import numpy as np

        send = self._host(t)
        recv = np.empty((self.world_size, *send.shape), dtype=send.dtype)
        self._wait(self.comm.Iallgather(send, recv), "all_gather")
        return torch.from_numpy(recv).to(device=t.device, dtype=t.dtype)

    def all_reduce_sum(self, t):
        import numpy as np

        send = self._host(t)
        recv = np.empty_like(send)
        self._wait(self.comm.Iallreduce(send, recv, op=self.MPI.SUM), "all_reduce")
        return torch.from_numpy(recv).to(device=t.device, dtype=t.dtype)

    def broadcast(self, t, src):
        buf = self._host(t).copy()
        self._wait(self.comm.Ibcast(buf, root=src), "broadcast")
        return torch.from_numpy(buf).to(device=t.device, dtype=t.dtype)

    def __repr__(self):
        return f"MPICommunicator(rank={self.rank}, world_size={self.world_size})"


def _is_mpi_comm(group) -> bool:
    mod = type(group).__module__ or ""
    return mod.startswith("mpi4py")


def get_communicator(group=None) -> Communicator:
    """Communicator for ``group``: None -> single process; a Communicator -> itself;
    a torch ProcessGroup / DeviceMesh (1-D) -> torch.distributed; an mpi4py
    communicator -> MPI."""
    if group is None:
        return SINGLE
    if isinstance(group, Communicator):
        return group
    return communicator_for(group)


def communicator_for(group) -> Communicator:
    """The communicator for ``group`` (see :func:`get_communicator`).

    ``group``: a torch ProcessGroup, a 1-D DeviceMesh, ``(mesh, dim)``, an mpi4py
    communicator, ``"world"`` (the default torch group), or a Communicator.
    """
    if group is None:
        return SingleProcess()
    if isinstance(group, Communicator):
        return group
    if _is_mpi_comm(group):
        return MPICommunicator(group)
    if isinstance(group, str):
        if group != "world":
            raise ValueError(f"group must be a process group, a DeviceMesh, an mpi4py communicator or 'world'; "
                             f"got {group!r}")
        import torch.distributed as dist

        return TorchDistCommunicator(dist.group.WORLD)
    cache = getattr(group, "_seqpar_communicator", None)
    if cache is not None:
        return cache
    comm = TorchDistCommunicator(group)
    try:  # cache on the group object (ProcessGroup allows attributes; meshes too)
        setattr(group, "_seqpar_communicator", comm)
    except (AttributeError, TypeError):
        pass
    return comm


# ---------------------------------------------------------------------- launch helpers
@dataclass
class DistContext:
    """What :func:`init_from_env` set up."""

    kind: str                 # "single", "torch", "mpi"
    backend: str              # "none", "gloo", "nccl", "mpi"
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    comm: Communicator
    group: object = None      # what to pass as ``group=`` (ProcessGroup / mpi4py comm / None)

    def shutdown(self):
        if self.kind == "torch":
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _mpi_local_rank(comm) -> int:
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    try:
        from mpi4py import MPI

        return comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    except Exception:  # noqa: BLE001
        return 0


def _pick_device(device, local_rank: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def in_torchrun_env() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def in_mpi_env() -> bool:
    return any(v in os.environ for v in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID"))


def init_from_env(backend: str = "auto", device=None, timeout: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Set up the job's sequence group from the launcher's environment.

    ``backend``: "auto" (torchrun env -> NCCL on CUDA / gloo on CPU; mpiexec
    env -> MPI; otherwise one process), "nccl", "gloo", "mpi" or "none".
    ``timeout``: seconds every collective may take before failing.
    If torch.distributed is already initialised (e.g. by Ray Train), that
    default group is used.
    """
    if backend not in ("auto", "nccl", "gloo", "mpi", "none"):
        raise ValueError(f"backend must be auto, nccl, gloo, mpi or none; got {backend!r}")
    import torch.distributed as dist

    if backend == "mpi" or (backend == "auto" and not in_torchrun_env() and not dist.is_initialized()
                            and in_mpi_env()):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = _mpi_local_rank(comm)
        dev = _pick_device(device, local)
        return DistContext("mpi", "mpi", comm.Get_rank(), comm.Get_size(), local, dev,
                           MPICommunicator(comm, timeout=timeout), comm)

    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        dev = _pick_device(device, local)
        comm = TorchDistCommunicator(dist.group.WORLD)
        return DistContext("torch", comm.backend, comm.rank, comm.world_size, local, dev, comm, dist.group.WORLD)

    if backend == "none" or (backend == "auto" and not in_torchrun_env()):
        if backend in ("nccl", "gloo"):
            raise RuntimeError(f"--backend {backend} needs a torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR)")
        dev = _pick_device(device, 0)
        return DistContext("single", "none", 0, 1, 0, dev, SingleProcess(), None)

    if not in_torchrun_env():
        raise RuntimeError(f"--backend {backend} needs a torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, "
                           f"MASTER_PORT); launch with: torchrun --nproc-per-node N ...")
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = _pick_device(device, local)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("backend nccl needs --device cuda")
    kw = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    if backend == "nccl":
        kw["device_id"] = dev
    try:
        dist.init_process_group(**kw)
    except TypeError:  # torch without device_id
        kw.pop("device_id", None)
        dist.init_process_group(**kw)
    comm = TorchDistCommunicator(dist.group.WORLD)
    return DistContext("torch", backend, comm.rank, comm.world_size, local, dev, comm, dist.group.WORLD)


def shard_for_rank(total: int, world_size: int, rank: int):
    """Contiguous near-equal shard ``(start, length)`` of ``total`` steps (see seqpar.problems.shard_range)."""
    from .problems import shard_range

    return shard_range(total, world_size, rank)


def shard_tensor(x: torch.Tensor, world_size: int, rank: int, dim: int = 0) -> torch.Tensor:
    """This rank's contiguous near-equal slice of ``x`` along ``dim`` (for data already in memory)."""
    start, length = shard_for_rank(x.shape[dim], world_size, rank)
    return x.narrow(dim, start, length)


def sum_grads(params: Iterable[torch.nn.Parameter], group) -> None:
    """Sum the ``.grad`` of ``params`` over the sequence ``group`` in one flat collective.

    For parameters used *outside* the seqpar layers (embeddings, read-outs):
    each rank only saw its time shard, so their gradients must be summed over
    the sequence group.  (seqpar layers already do this inside backward.)
    """
    comm = get_communicator(group)
    params = [p for p in params if p.grad is not None]
    if comm.world_size == 1 or not params:
        return
    flat = torch.cat([p.grad.reshape(-1).to(torch.float64 if p.grad.dtype == torch.float64 else torch.float32)
                      for p in params])
    flat = comm.all_reduce_sum(flat)
    off = 0
    for p in params:
        k = p.grad.numel()
        p.grad.copy_(flat[off:off + k].reshape(p.grad.shape).to(p.grad.dtype))
        off += k


def abort(ctx: Optional[DistContext] = None, code: int = 1) -> None:
    """Make this process exit with ``code`` now, taking the job down with it.

    Under MPI this calls ``MPI_Abort`` (mpiexec kills every rank); under
    torch.distributed the process exits without waiting in any collective:
    its peers' pending collectives then fail (gloo: connection closed; NCCL:
    watchdog / timeout) and torchrun tears the rest of the job down.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if ctx is not None and ctx.kind == "mpi":
        time.sleep(0.5)  # let mpiexec forward this rank's last output (the error) before it kills the job
        try:
            ctx.group.Abort(code)
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


__all__ = ["TorchDistCommunicator", "MPICommunicator", "CollectiveTimeout", "communicator_for", "init_from_env",
           "DistContext", "shard_for_rank", "shard_tensor", "sum_grads", "abort", "DEFAULT_TIMEOUT_S"]
