#!/usr/bin/env python
"""Train a small model with a sequence-sharded seqpar layer on a long-range task.

    torchrun --nproc-per-node 2 launch/train.py --device cpu                     # CPU, small (2 sequence ranks)
    torchrun --nproc-per-node 4 launch/train.py --device cpu --data-parallel 2   # 2-D mesh: data x sequence
    torchrun --nproc-per-node 8 launch/train.py --seq-len 1M --hidden 256 --batch 16   # GPUs, large
    python launch/train.py --seq-len 2048                                        # one process

Task ("marker recall"): at t = 0 input channel 0 carries a flag and channel 1
a random sign s = +-1 per sequence; later inputs are noise; the target at every
step t >= 1 is s.  Early steps are easy, late steps need memory across the
whole sequence -- across every rank's shard, so the gradient must flow
backwards through all of them (the adjoint scan).  The recall accuracy at
the last step measures the long range.

Model: seqpar.nn.DiagGRU (or GRU, ``--cell``) with chrono-initialised update
gates, then a linear read-out.  The world is a 2-D mesh data x sequence:
``--data-parallel`` ranks hold different batches (DistributedDataParallel
over the data group), the rest shard the time axis (``sequence_group``).
Parameters of the seqpar layer are reduced over the sequence group inside
its backward; the read-out's gradients are summed over it here
(``seqpar.distributed.sum_grads``).  Rank 0 prints loss and time per step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import seqpar  # noqa: E402
import seqpar.nn as snn  # noqa: E402
from seqpar import distributed as sd  # noqa: E402
from seqpar.problems import make_inputs, parse_count, shard_range  # noqa: E402

LAYERS = {"diag-gru": snn.DiagGRU, "gru": snn.GRU}
MARKER, NOISE = 4.0, 0.2  # amplitude of the sign pulse at t = 0, of the distractor inputs


class Model(nn.Module):
    """seqpar recurrent layer + linear read-out; time-major (T, B, I) -> (T, B, 1)."""

    def __init__(self, input_size, hidden, cell="diag-gru", sequence_group=None, chrono_max=1000.0,
                 jacobian="auto", dtype=torch.float32, device="cpu"):
        super().__init__()
        self.rnn = LAYERS[cell](input_size, hidden, sequence_group=sequence_group, jacobian=jacobian,
                                dtype=dtype, device=device)
        self.readout = nn.Linear(hidden, 1, dtype=dtype, device=device)
        if chrono_max and chrono_max > 1:
            chrono_init(self.rnn, hidden, chrono_max)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.readout(out)


def chrono_init(rnn, hidden, t_max):
    """Update-gate biases log(U(1, t_max - 1)): memory time scales up to ~t_max steps (Tallec & Ollivier 2018)."""
    g = torch.Generator().manual_seed(12345)
    b = torch.log(1 + (t_max - 2) * torch.rand(hidden, generator=g))
    with torch.no_grad():
        rnn.bias_hh_l0[hidden:2 * hidden] = b.to(rnn.bias_hh_l0)
        rnn.bias_ih_l0[hidden:2 * hidden] = 0


def seqpar_params(model):
    return {id(p) for m in model.modules() if isinstance(m, snn._SeqparRNNBase) for p in m.parameters()}


def other_params(model):
    """Parameters outside the seqpar layers: their gradients need a sum over the sequence group."""
    inside = seqpar_params(model)
    return [p for p in model.parameters() if id(p) not in inside]


def make_batch(step, data_rank, batch, T, start, length, input_size, seed=0, dtype=torch.float32, device="cpu"):
    """This rank's shard [start, start + length) of batch ``step`` of data rank ``data_rank``.

    Returns x (length, batch, input_size), target (length, batch, 1), mask (length, batch, 1).
    Any sharding of the time axis gives the same global batch.
    """
    s_seed = (seed * 7919 + step) * 104729 + data_rank
    g = torch.Generator().manual_seed(s_seed)
    s = torch.randint(0, 2, (batch,), generator=g).to(torch.float32) * 2 - 1
    x = NOISE * make_inputs(start, length, batch, input_size, seed=s_seed % (2**31), dtype=torch.float32)
    x[..., :2] = 0
    if start == 0 and length > 0:
        x[0, :, 0] = MARKER       # "write now" flag
        x[0, :, 1] = MARKER * s   # the sign to remember
    target = s.reshape(1, batch, 1).expand(length, batch, 1)
    t = torch.arange(start, start + length).reshape(length, 1, 1)
    mask = (t >= 1).to(torch.float32).expand(length, batch, 1)
    return (x.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype),
            mask.to(device=device, dtype=dtype))


def local_loss(model, x, target, mask, T, batch):
    """This rank's share of the data rank's mean loss: sum over the shard / (B * (T - 1))."""
    y = model(x)
    return ((y - target) ** 2 * mask).sum() / (batch * max(1, T - 1)), y


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=parse_count, default=parse_count("4096"))
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--input-size", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="sequences per data-parallel rank")
    p.add_argument("--cell", choices=sorted(LAYERS), default="diag-gru")
    p.add_argument("--jacobian", default="auto")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--chrono-max", type=float, default=None, help="chrono init time scale (default: seq-len)")
    p.add_argument("--data-parallel", type=int, default=1, help="data-parallel ranks (the rest shard the sequence)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["auto", "nccl", "gloo", "mpi", "none"], default="auto")
    p.add_argument("--timeout", type=float, default=sd.DEFAULT_TIMEOUT_S)
    p.add_argument("--json", default=None)
    return p


def setup_mesh(ctx, dp):
    """(sequence group, data group, data rank, sequence rank) of this process on a dp x (world/dp) mesh."""
    P = ctx.world_size
    if P % dp:
        raise ValueError(f"--data-parallel {dp} does not divide the world size {P}")
    sp = P // dp
    if ctx.kind == "single":
        return None, None, 0, 0, 1
    if ctx.kind == "mpi":
        if dp != 1:
            raise ValueError("--data-parallel > 1 needs torch.distributed (torchrun), not --backend mpi")
        return ctx.comm, None, 0, ctx.rank, sp
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ctx.device.type, (dp, sp), mesh_dim_names=("data", "seq"))
    seq_group = mesh["seq"]
    data_group = mesh.get_group("data") if dp > 1 else None
    return seq_group, data_group, mesh.get_local_rank("data"), mesh.get_local_rank("seq"), sp


def train(args, ctx):
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    device = ctx.device
    T, B, H, I = args.seq_len, args.batch, args.hidden, args.input_size
    dp = args.data_parallel
    seq_group, data_group, drank, srank, sp = setup_mesh(ctx, dp)
    start, length = shard_range(T, sp, srank)
    torch.manual_seed(args.seed)
    model = Model(I, H, args.cell, sequence_group=seq_group, chrono_max=args.chrono_max or T,
                  jacobian=args.jacobian, dtype=dtype, device=device)
    net = model
    if data_group is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, process_group=data_group, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    outside = other_params(model)
    comm = ctx.comm
    if ctx.rank == 0:
        print(f"seqpar train: cell={args.cell} T={T:,} B={B}/data-rank H={H} mesh data={dp} x seq={sp} "
              f"device={device.type} dtype={args.dtype} shard={length:,} steps", flush=True)
    losses, times, accs = [], [], []
    for step in range(args.steps):
        x, target, mask = make_batch(step, drank, B, T, start, length, I, seed=args.seed, dtype=dtype, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, y = local_loss(net, x, target, mask, T, B)
        loss.backward()
        sd.sum_grads(outside, seq_group)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        # global mean loss and last-step recall accuracy, for printing
        last = start + length == T and length > 0
        acc = (torch.sign(y[-1, :, 0]) == target[-1, :, 0]).sum() if last else torch.zeros(())
        stats = torch.stack([loss.detach().double().cpu(), acc.double().cpu(), torch.tensor(dt, dtype=torch.float64)])
        tot = comm.all_reduce_sum(stats) if ctx.world_size > 1 else stats
        g_loss, g_acc = float(tot[0]) / dp, float(tot[1]) / (B * dp)
        step_time = float(tot[2]) / ctx.world_size
        losses.append(g_loss)
        accs.append(g_acc)
        times.append(step_time)
        info = model.rnn.last_info[0] if model.rnn.last_info else None
        if ctx.rank == 0:
            print(f"step {step:4d}  loss {g_loss:.5f}  last-step recall {g_acc:.2f}  "
                  f"newton iters {info.iterations if info else '-'}  time/step {step_time * 1e3:.1f} ms", flush=True)
    summary = {"seq_len": T, "batch_per_data_rank": B, "hidden": H, "cell": args.cell, "data_parallel": dp,
               "sequence_parallel": sp, "world_size": ctx.world_size, "device": device.type,
               "losses": losses, "last_step_recall": accs, "step_times_s": times,
               "mean_step_time_s": sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0],
               "loss_first": losses[0], "loss_last": losses[-1]}
    if ctx.rank == 0:
        print(f"summary: loss {losses[0]:.5f} -> {losses[-1]:.5f} over {len(losses)} steps; last-step recall "
              f"{accs[0]:.2f} -> {accs[-1]:.2f}; mean time/step {summary['mean_step_time_s'] * 1e3:.1f} ms "
              f"(T={T:,}, {dp}x{sp} ranks)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    ctx = None
    try:
        ctx = sd.init_from_env(args.backend, args.device, args.timeout)
        if ctx.device.type == "cpu" and ctx.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
        summary = train(args, ctx)
    except BaseException as e:  # noqa: BLE001
        print(f"[rank {ctx.rank if ctx else '?'}] seqpar train failed: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc()
        if ctx is None or ctx.kind == "single":
            raise
        sd.abort(ctx, 1)
    ctx.shutdown()
    return 0 if math.isfinite(summary["loss_last"]) else 1


if __name__ == "__main__":
    sys.exit(main())
