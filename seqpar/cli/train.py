"""Train a small model with a sequence-sharded seqpar layer on a long-range task (``seqpar-train``).

    seqpar-train --seq-len 2048                                                  # one process, CPU
    torchrun --nproc-per-node 2 -m seqpar.cli.train --device cpu                 # CPU, 2 sequence ranks
    torchrun --nproc-per-node 4 -m seqpar.cli.train --device cpu --data-parallel 2   # 2-D mesh: data x sequence
    torchrun --nproc-per-node 1 -m seqpar.cli.train --device cuda --seq-len 1M --hidden 256 --input-size 16 \\
        --batch 8 --steps 30 --json train_1M.json --plot train_1M.png           # one GPU, T = 1M
    seqpar-train --steps 2 --save ck.pt && seqpar-train --steps 4 --resume ck.pt
    (from a checkout without installing: python launch/train.py ..., torchrun ... launch/train.py ...)

Task ("marker recall"): at t = 0 input channel 0 carries a flag and channel 1
a random sign s = +-1 per sequence; later inputs are noise (channels 2..),
channels 0 and 1 are zero.  The target at every step t >= 1 is s (loss: mean
squared error over all B * (T - 1) targets).  Late steps need memory across
the whole sequence -- across every rank's shard, so the gradient must flow
backwards through all of them (the adjoint scan).  The recall accuracy at the
last step (sign of the read-out at t = T - 1) measures the long range.

Model: a seqpar layer (``--cell``, default DiagGRU) then a linear read-out.
The world is a 2-D mesh data x sequence: ``--data-parallel`` ranks hold
different batches (DistributedDataParallel over the data group), the rest
shard the time axis (``sequence_group``).  Parameters of the seqpar layer are
reduced over the sequence group inside its backward; the read-out's gradients
are summed over it here (``seqpar.distributed.sum_grads``); then the gradient
(identical on every rank) is clipped (``--clip``) and Adam steps.

Why training failed at T = 1M (issue #11) and what fixed it
-----------------------------------------------------------
The old model used a chrono initialisation of the update-gate bias,
b_z = log(U(1, T)), and Adam with lr 0.1.  A DiagGRU lane keeps its state
with factor z = sigmoid(b_z) per step: h' = (1 - z) n + z h, so a value
written at t = 0 survives T steps as z^T = exp(-T (1 - z)).  Two things break
at T = 1M:

* **Retention is not representable.**  Keeping the marker over 1M steps needs
  1 - z <~ 1e-7.  In float32 the largest sigmoid below 1 is 1 - 6e-8 and the
  next value is exactly 1.0 (pre-activation >~ 17); chrono's largest bias
  log(T) = 13.8 gives 1 - z = 1e-6, i.e. z^T = e^-1 for the single best lane
  and e^-10 .. e^-1000 for the others: the marker is (nearly) gone at the end.
* **The marker is never written.**  A lane that retains (z ~ 1) also ignores
  its input: at t = 0, h_1 = (1 - z) n ~ 1e-6 n.  To write, the flag must
  drive the z pre-activation from ~+14 to below 0, i.e. W_ih[z, flag] ~ -4
  -- at initialisation it is U(+-1/sqrt(H)) = +-0.06, its gradient is
  proportional to z (1 - z) ~ 1e-6, and Adam at lr 0.1 meanwhile throws the
  read-out around (loss 1.00 -> 6.25 -> 2.78 in the issue; recall at chance).
  At short T the old init still learns (1 - z ~ 1/T writes something):
  T = 2k, H = 32: recall 1.0 from step ~6; T = 20k, H = 16: from step 15;
  T = 20k, H = 8, B = 16: loss 1.00 -> 0.92 and recall at chance (0.31-0.75)
  over 12 steps -- and at T = 1M it does not learn at all.

Fix (``--init memory``, the default; ``--init chrono`` is the old behaviour):

* a fraction ``--memory-frac`` (default 1/4) of the lanes are *memory lanes*:
  update-gate bias +24 (forget bias +24 for LSTMs) and no recurrent or noise
  input into that gate, so the gate is exactly 1.0 in float32: the Jacobian
  is exactly 1 and the lane keeps its value (up to the rounding of the
  cell's n + z (h - n), ~1 ulp per step, a random walk), so both the forward
  state and the adjoint (the gradient from the loss at t = 1M back to t = 0)
  cross 1M steps without decay -- on any number of ranks;
* input gating: the write-gate weight from the flag channel is set so that
  the flag drives the gate pre-activation to -6 at t = 0 (every lane writes
  its candidate n(x_0) once, when the marker appears), and nothing else in
  the inputs touches that gate on memory lanes;
* the other lanes keep chrono time scales log(U(1, T)) (with the same
  write-on-flag gating), so the model still has short and medium memories;
* what is written (the candidate weights from the sign channel) and the
  read-out are *learnt*: their gradient comes from losses up to 1M steps
  later through the adjoint scan;
* Adam lr 1e-2 (was 0.1) with global gradient-norm clipping 1.0; the loss is
  a mean over B * (T - 1), so its gradient does not grow with T.

With this the task is the same problem at every T (the memory lanes do not
depend on T).  Measured on CPU (H = 8, I = 4; recall on each step's batch):
T = 20k, B = 16, 12 steps: loss 0.59 -> 0.087, recall 0.38 then 1.0 at every
step from step 1; T = 100k, B = 8, 10 steps: loss 0.64 -> 0.105, recall 0.25
then 1.0 from step 1 (old init, T = 20k, same sizes: loss 1.00 -> 0.92,
recall never above 0.75).  Elman cells have no gate: their memory lanes
are an identity recurrence h' = tanh(h), whose decay is polynomial
(~1/sqrt(2t)), so the sign survives but the amplitude is small.

Options shared with the other entry points: ``--cell``, ``--jacobian``,
``--dtype``, ``--verify [--verify-window N]`` (after training, compare the
trained layer's Newton solve with step-by-step evaluation on the first N
steps of a batch), ``--json PATH``, ``--out DIR`` (checkpoint, summary and
plot), ``--plot PATH`` (PNG of loss and recall per step).  Checkpoints:
``--save PATH`` writes model, optimizer state, step, history and args
(``torch.save``); ``--resume PATH`` continues from one (``--steps`` is the
total count: resuming a 2-step checkpoint with ``--steps 4`` gives the same
model as 4 steps straight).  Rank 0 prints loss, recall and time per step
and a final summary line.
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

import seqpar
import seqpar.nn as snn
from seqpar import distributed as sd
from seqpar.problems import make_inputs, parse_count, shard_range

LAYERS = {"diag-gru": snn.DiagGRU, "gru": snn.GRU, "lstm": snn.LSTM, "diag-lstm": snn.DiagLSTM, "elman": snn.RNN}
MARKER, NOISE = 4.0, 0.2  # amplitude of the sign pulse at t = 0, of the distractor inputs
KEEP_BIAS = 24.0   # gate pre-activation of memory lanes: sigmoid(24) == 1.0 exactly in float32 (and in float64 to 4e-11)
WRITE_PRE = -6.0   # keep-gate pre-activation at the flag (t = 0): the lane writes its candidate
FLAG, SIGN = 0, 1  # input channels of the marker


class Model(nn.Module):
    """seqpar recurrent layer + linear read-out; time-major (T, B, I) -> (T, B, 1)."""

    def __init__(self, input_size, hidden, cell="diag-gru", sequence_group=None, chrono_max=1000.0,
                 jacobian="auto", dtype=torch.float32, device="cpu", init="memory", memory_frac=0.25):
        super().__init__()
        self.rnn = LAYERS[cell](input_size, hidden, sequence_group=sequence_group, jacobian=jacobian,
                                dtype=dtype, device=device)
        self.readout = nn.Linear(hidden, 1, dtype=dtype, device=device)
        if init == "memory":
            memory_init(self.rnn, cell, hidden, chrono_max or 1000.0, memory_frac)
        elif init == "chrono" and chrono_max and chrono_max > 1 and cell in ("diag-gru", "gru"):
            chrono_init(self.rnn, hidden, chrono_max)
        elif init not in ("memory", "chrono", "default"):
            raise ValueError(f"init must be memory, chrono or default; got {init!r}")

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.readout(out)


def chrono_init(rnn, hidden, t_max):
    """Update-gate biases log(U(1, t_max - 1)): memory time scales up to ~t_max steps (Tallec & Ollivier 2018).

    The old initialisation (``--init chrono``): fails to learn at T = 1M (see the module docstring)."""
    g = torch.Generator().manual_seed(12345)
    b = torch.log(1 + (t_max - 2) * torch.rand(hidden, generator=g))
    with torch.no_grad():
        rnn.bias_hh_l0[hidden:2 * hidden] = b.to(rnn.bias_hh_l0)
        rnn.bias_ih_l0[hidden:2 * hidden] = 0


def n_memory_lanes(hidden, frac):
    return max(1, min(hidden, int(round(frac * hidden))))


def memory_init(rnn, cell, hidden, t_max, frac):
    """Memory lanes with a keep gate of exactly 1.0, written once at the flag; chrono time scales elsewhere.

    GRU / DiagGRU: keep gate z (rows H:2H); LSTM / DiagLSTM: forget gate f (rows H:2H) kept, input
    gate i (rows 0:H) opened by the flag.  Elman: memory lanes are h' = tanh(h) (identity Jacobian at 0).
    """
    H = hidden
    m = n_memory_lanes(H, frac)
    g = torch.Generator().manual_seed(12345)
    keep = torch.log(1 + max(t_max - 2, 0.0) * torch.rand(H, generator=g)).clamp(min=0.0)
    keep[:m] = KEEP_BIAS
    W_ih, b_ih, b_hh, W_hh = rnn.weight_ih_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, rnn.weight_hh_l0
    keep = keep.to(W_ih)
    with torch.no_grad():
        if cell in ("diag-gru", "gru"):
            z = slice(H, 2 * H)
            b_ih[z] = 0
            b_hh[z] = keep
            W_ih[z, FLAG] = (WRITE_PRE - keep) / MARKER  # the flag opens the write gate (z -> 0) at t = 0
            W_ih[z, SIGN] = 0                            # ... whatever the sign
            W_ih[H:H + m, 2:] = 0                        # noise never touches memory lanes' z
            W_hh[H:H + m] = 0                            # nor does the recurrence (diag (3H,) or dense rows)
        elif cell in ("lstm", "diag-lstm"):
            i, f = slice(0, H), slice(H, 2 * H)
            b_ih[i] = 0
            b_ih[f] = 0
            b_hh[f] = keep
            b_hh[i] = -keep                              # write gate closed ...
            W_ih[i, FLAG] = (keep - WRITE_PRE) / MARKER  # ... except at the flag
            W_ih[i, SIGN] = 0
            W_ih[f, FLAG] = 0
            W_ih[f, SIGN] = 0
            for rows in (slice(0, m), slice(H, H + m)):
                W_ih[rows, 2:] = 0
                W_hh[rows] = 0
        elif cell == "elman":
            W_ih[:m] = 0
            W_ih[:m, SIGN] = 0.25                        # h_1 = tanh(+-1) on memory lanes
            b_ih[:m] = 0
            b_hh[:m] = 0
            W_hh[:m] = 0
            W_hh[torch.arange(m), torch.arange(m)] = 1.0
        else:
            raise ValueError(f"no memory init for cell {cell!r}")


def seqpar_params(model):
    return {id(p) for m in model.modules() if isinstance(m, snn._SeqparRNNBase) for p in m.parameters()}


def other_params(model):
    """Parameters outside the seqpar layers: their gradients need a sum over the sequence group."""
    inside = seqpar_params(model)
    return [p for p in model.parameters() if id(p) not in inside]


def make_batch(step, data_rank, batch, T, start, length, input_size, seed=0, dtype=torch.float32, device="cpu"):
    """This rank's shard [start, start + length) of batch ``step`` of data rank ``data_rank``.

    Returns x (length, batch, input_size), target (length, batch, 1), mask (length, batch, 1).
    Any sharding of the time axis gives the same global batch (on one kind of device: the noise is
    drawn on ``device``, block by block).
    """
    s_seed = (seed * 7919 + step) * 104729 + data_rank
    g = torch.Generator().manual_seed(s_seed)
    s = torch.randint(0, 2, (batch,), generator=g).to(torch.float32) * 2 - 1
    x = make_inputs(start, length, batch, input_size, seed=s_seed % (2**31), dtype=torch.float32, device=device)
    x.mul_(NOISE)
    x[..., :2] = 0
    s = s.to(device)
    if start == 0 and length > 0:
        x[0, :, FLAG] = MARKER       # "write now" flag
        x[0, :, SIGN] = MARKER * s   # the sign to remember
    target = s.reshape(1, batch, 1).expand(length, batch, 1)
    t = torch.arange(start, start + length, device=device).reshape(length, 1, 1)
    mask = (t >= 1).to(torch.float32).expand(length, batch, 1)
    return x.to(dtype=dtype), target.to(dtype=dtype), mask.to(dtype=dtype)


def local_loss(model, x, target, mask, T, batch):
    """This rank's share of the data rank's mean loss: sum over the shard / (B * (T - 1))."""
    y = model(x)
    return ((y - target) ** 2 * mask).sum() / (batch * max(1, T - 1)), y


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=parse_count, default=parse_count("4096"), help="T: 4096, 20k, 1M, ...")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--input-size", type=int, default=4, help="input channels (>= 2: flag, sign, noise...)")
    p.add_argument("--batch", type=int, default=8, help="sequences per data-parallel rank")
    p.add_argument("--cell", choices=sorted(LAYERS), default="diag-gru")
    p.add_argument("--jacobian", default="auto", help="auto | dense | diag | block | block:k")
    p.add_argument("--steps", type=int, default=30, help="total optimizer steps (including resumed ones)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--init", choices=["memory", "chrono", "default"], default="memory",
                   help="memory (default): exact-retention memory lanes written at the flag; chrono: the old "
                        "init (fails at T=1M); default: torch's uniform init")
    p.add_argument("--memory-frac", type=float, default=0.25, help="fraction of memory lanes (--init memory)")
    p.add_argument("--chrono-max", type=float, default=None, help="chrono init time scale (default: seq-len)")
    p.add_argument("--data-parallel", type=int, default=1, help="data-parallel ranks (the rest shard the sequence)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["auto", "nccl", "gloo", "mpi", "none"], default="auto")
    p.add_argument("--timeout", type=float, default=sd.DEFAULT_TIMEOUT_S)
    p.add_argument("--verify", action="store_true",
                   help="after training, compare the layer's solve with step-by-step evaluation")
    p.add_argument("--verify-window", type=parse_count, default=None,
                   help="steps compared by --verify (default min(T, 10k))")
    p.add_argument("--save", default=None, metavar="PATH", help="checkpoint at the end (model, optimizer, step, args)")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint to --save every N steps")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue training from a --save checkpoint")
    p.add_argument("--json", default=None, metavar="PATH", help="rank 0 writes the summary (curves) here")
    p.add_argument("--plot", default=None, metavar="PATH", help="rank 0 writes a PNG of loss and recall per step")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory: checkpoint.pt, summary.json and curve.png (rank 0)")
    return p


# arguments that must match a checkpoint being resumed (the model and the data it was trained on)
RESUME_MUST_MATCH = ("seq_len", "hidden", "input_size", "batch", "cell", "dtype", "seed", "data_parallel")


def check_args(parser, args):
    """One-line parser.error for options that cannot work."""
    if args.seq_len < 2:
        parser.error(f"argument --seq-len: must be >= 2 (targets start at t = 1); got {args.seq_len}")
    for name in ("hidden", "batch", "data_parallel"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1; got {getattr(args, name)}")
    if args.input_size < 2:
        parser.error(f"argument --input-size: must be >= 2 (channel 0 the flag, channel 1 the sign); "
                     f"got {args.input_size}")
    if args.steps < 0:
        parser.error(f"argument --steps: must be >= 0; got {args.steps}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"argument --lr: must be a positive number; got {args.lr}")
    if not (args.clip >= 0 and math.isfinite(args.clip)):
        parser.error(f"argument --clip: must be >= 0 (0: no clipping); got {args.clip}")
    if not 0 < args.memory_frac <= 1:
        parser.error(f"argument --memory-frac: must be in (0, 1]; got {args.memory_frac}")
    if args.chrono_max is not None and not args.chrono_max > 1:
        parser.error(f"argument --chrono-max: must be > 1; got {args.chrono_max}")
    if args.verify_window is not None and args.verify_window < 1:
        parser.error(f"argument --verify-window: must be >= 1; got {args.verify_window}")
    if args.verify_window is not None and not args.verify:
        parser.error("argument --verify-window: only with --verify")
    if args.save_every < 0:
        parser.error(f"argument --save-every: must be >= 0; got {args.save_every}")
    if args.save_every and not args.save:
        parser.error("argument --save-every: needs --save PATH")
    if args.timeout <= 0:
        parser.error(f"argument --timeout: must be > 0 seconds; got {args.timeout}")
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"argument --device: must be cuda or cpu; got {args.device!r}")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested but no CUDA device is available")
    if args.jacobian not in ("auto", "dense", "diag", "block") and not args.jacobian.startswith("block:"):
        parser.error(f"argument --jacobian: must be auto, dense, diag, block or block:k; got {args.jacobian!r}")
    for name in ("json", "plot", "save"):
        path = getattr(args, name)
        if path and os.path.dirname(os.path.abspath(path)) and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"argument --{name}: directory of {path!r} does not exist")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"argument --out: {args.out!r} exists and is not a directory")
    if args.resume:
        if not os.path.isfile(args.resume):
            parser.error(f"argument --resume: no such file {args.resume!r}")
        try:
            ck = torch.load(args.resume, map_location="cpu", weights_only=False)
            saved = ck["args"]
        except Exception as e:  # noqa: BLE001
            parser.error(f"argument --resume: {args.resume!r} is not a seqpar-train checkpoint ({type(e).__name__}: {e})")
        bad = [f"--{k.replace('_', '-')} {saved.get(k)!r} (checkpoint) != {getattr(args, k)!r}"
               for k in RESUME_MUST_MATCH if saved.get(k) != getattr(args, k)]
        if bad:
            parser.error("argument --resume: checkpoint was trained with different options: " + "; ".join(bad))


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


def save_checkpoint(path, model, opt, step, args, history):
    """model + optimizer state + the number of steps done + args + the curves so far (rank 0 only)."""
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "args": vars(args),
                "history": history, "format": "seqpar-train-1"}, tmp)
    os.replace(tmp, path)


def _stays_from(accs, level=0.99):
    """First step from which the last-step recall stays >= level to the end (None if it never does)."""
    k = None
    for i in range(len(accs) - 1, -1, -1):
        if accs[i] >= level:
            k = i
        else:
            break
    return k


def write_plot(path, summary):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(len(summary["losses"])))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].semilogy(steps, summary["losses"], "o-", ms=3)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss (MSE, mean over t >= 1)")
    ax[0].grid(alpha=0.3)
    ax[1].plot(steps, summary["last_step_recall"], "o-", ms=3, color="C2")
    ax[1].axhline(0.5, color="gray", ls=":", lw=1, label="chance")
    ax[1].axhline(0.99, color="C3", ls="--", lw=1, label="0.99")
    ax[1].set_ylim(-0.02, 1.02)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("recall at t = T-1")
    ax[1].legend(loc="lower right", fontsize=8)
    ax[1].grid(alpha=0.3)
    fig.suptitle(f"marker recall, {summary['cell']} H={summary['hidden']} T={summary['seq_len']:,} "
                 f"B={summary['batch_per_data_rank']} ({summary['data_parallel']}x{summary['sequence_parallel']} "
                 f"ranks, {summary['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verify(model, args, x, seq_group, comm, start, T):
    """Trained layer: Newton solve vs step-by-step evaluation on the first ``--verify-window`` steps."""
    n_win = min(T, args.verify_window or 10_000)
    cell = model.rnn.cells()[0]
    m = max(0, min(x.shape[0], n_win - start))
    B = x.shape[1]
    h0 = x.new_zeros(B, cell.state_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        states = seqpar.solve(cell, x, h0, jacobian=args.jacobian, group=seq_group)
        ref = seqpar.sequential_solve(cell, x[:m], h0, comm if comm.world_size > 1 else None)
    err = (states[:m].double() - ref.double()).abs().max() if m else torch.zeros((), dtype=torch.float64)
    scale = ref.double().abs().max() if m else torch.zeros((), dtype=torch.float64)
    row = torch.stack([err.cpu(), scale.cpu()]).to(torch.float64)
    rows = comm.all_gather(row).reshape(-1, 2) if comm.world_size > 1 else row.reshape(1, 2)
    err, scale = float(rows[:, 0].max()), max(1.0, float(rows[:, 1].max()))
    eps = torch.finfo(x.dtype).eps
    bound = max(1e-9 if x.dtype == torch.float64 else 1e-5, 50 * eps * n_win ** 0.5)
    return {"verify_window": f"[0, {n_win})", "verify_steps": n_win, "verify_max_abs_error": err,
            "verify_rel_error": err / scale, "verify_bound": bound, "verify_ok": bool(err / scale <= bound),
            "verify_time_s": time.perf_counter() - t0}


def train(args, ctx):
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    device = ctx.device
    T, B, H, I = args.seq_len, args.batch, args.hidden, args.input_size
    dp = args.data_parallel
    seq_group, data_group, drank, srank, sp = setup_mesh(ctx, dp)
    start, length = shard_range(T, sp, srank)
    torch.manual_seed(args.seed)
    model = Model(I, H, args.cell, sequence_group=seq_group, chrono_max=args.chrono_max or T,
                  jacobian=args.jacobian, dtype=dtype, device=device, init=args.init, memory_frac=args.memory_frac)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = {"losses": [], "last_step_recall": [], "step_times_s": [], "grad_norms": [], "newton_iters": []}
    first = 0
    if args.resume:
        ck = torch.load(args.resume, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        first = int(ck["step"])
        history = {k: list(v) for k, v in ck["history"].items()}
    net = model
    if data_group is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, process_group=data_group, device_ids=[device.index] if device.type == "cuda" else None)
    outside = other_params(model)
    comm = ctx.comm
    save_path = args.save or (os.path.join(args.out, "checkpoint.pt") if args.out else None)
    if ctx.rank == 0:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
        print(f"seqpar train: cell={args.cell} T={T:,} B={B}/data-rank H={H} I={I} init={args.init} "
              f"(memory lanes {n_memory_lanes(H, args.memory_frac) if args.init == 'memory' else 0}) lr={args.lr} "
              f"clip={args.clip} mesh data={dp} x seq={sp} device={device.type} dtype={args.dtype} "
              f"shard={length:,} steps" + (f"; resumed at step {first} from {args.resume}" if args.resume else ""),
              flush=True)
    x = y = target = None
    t_start = time.perf_counter()
    for step in range(first, args.steps):
        x, target, mask = make_batch(step, drank, B, T, start, length, I, seed=args.seed, dtype=dtype, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, y = local_loss(net, x, target, mask, T, B)
        loss.backward()
        sd.sum_grads(outside, seq_group)
        params = [p for p in model.parameters() if p.grad is not None]
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf"))
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        # global mean loss and last-step recall accuracy (of this step's forward pass, before the update)
        last = start + length == T and length > 0
        acc = (torch.sign(y[-1, :, 0]) == target[-1, :, 0]).sum() if last else torch.zeros((), device=y.device)
        stats = torch.stack([loss.detach().double().cpu(), acc.double().cpu(), torch.tensor(dt, dtype=torch.float64)])
        tot = comm.all_reduce_sum(stats) if ctx.world_size > 1 else stats
        g_loss, g_acc = float(tot[0]) / dp, float(tot[1]) / (B * dp)
        step_time = float(tot[2]) / ctx.world_size
        info = model.rnn.last_info[0] if model.rnn.last_info else None
        history["losses"].append(g_loss)
        history["last_step_recall"].append(g_acc)
        history["step_times_s"].append(step_time)
        history["grad_norms"].append(float(gnorm))
        history["newton_iters"].append(info.iterations if info else None)
        if ctx.rank == 0:
            print(f"step {step:4d}  loss {g_loss:.5f}  last-step recall {g_acc:.3f}  grad-norm {float(gnorm):.3g}  "
                  f"newton iters {info.iterations if info else '-'}  time/step {step_time * 1e3:.1f} ms", flush=True)
            if args.save_every and save_path and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save_checkpoint(save_path, model, opt, step + 1, args, history)
    train_s = time.perf_counter() - t_start
    if ctx.rank == 0 and save_path:
        save_checkpoint(save_path, model, opt, max(first, args.steps), args, history)
    losses, accs, times = history["losses"], history["last_step_recall"], history["step_times_s"]
    stays = _stays_from(accs)
    summary = {"seq_len": T, "batch_per_data_rank": B, "hidden": H, "input_size": I, "cell": args.cell,
               "init": args.init, "memory_frac": args.memory_frac, "lr": args.lr, "clip": args.clip,
               "data_parallel": dp, "sequence_parallel": sp, "world_size": ctx.world_size, "device": device.type,
               "dtype": args.dtype, "steps": len(losses), "resumed_from_step": first if args.resume else None,
               **history,
               "mean_step_time_s": (sum(times[1:]) / (len(times) - 1) if len(times) > 1 else (times[0] if times else None)),
               "train_wall_s": train_s,
               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "recall_last": accs[-1] if accs else None, "recall_ge_0.99_from_step": stays}
    if args.verify:
        if x is None:
            x, target, mask = make_batch(max(0, args.steps - 1), drank, B, T, start, length, I, seed=args.seed,
                                         dtype=dtype, device=device)
        summary.update(verify(model, args, x, seq_group, comm, start, T))
    if ctx.rank == 0:
        if losses:
            print(f"summary: loss {losses[0]:.5f} -> {losses[-1]:.5f} over {len(losses)} steps; last-step recall "
                  f"{accs[0]:.3f} -> {accs[-1]:.3f} (>= 0.99 from step {stays}); mean time/step "
                  f"{summary['mean_step_time_s'] * 1e3:.1f} ms (T={T:,}, {dp}x{sp} ranks)", flush=True)
        else:
            print(f"summary: no steps to run (checkpoint at step {first}, --steps {args.steps})", flush=True)
        if args.verify:
            print(f"verify: window {summary['verify_window']}: max abs error {summary['verify_max_abs_error']:.3e} "
                  f"(rel {summary['verify_rel_error']:.3e}, bound {summary['verify_bound']:.1e}) -> "
                  f"{'OK' if summary['verify_ok'] else 'FAILED'}", flush=True)
        outs = [(args.json, None), (os.path.join(args.out, "summary.json") if args.out else None, None)]
        for path, _ in outs:
            if path:
                with open(path, "w") as f:
                    json.dump(summary, f, indent=2)
        for path in (args.plot, os.path.join(args.out, "curve.png") if args.out else None):
            if path and losses:
                write_plot(path, summary)
    return summary


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    ctx = None
    try:
        ctx = sd.init_from_env(args.backend, args.device, args.timeout)
        if ctx.world_size % args.data_parallel:
            raise ValueError(f"--data-parallel {args.data_parallel} does not divide the world size {ctx.world_size}")
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
    ok = summary["loss_last"] is None or math.isfinite(summary["loss_last"])
    return 0 if ok and summary.get("verify_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
