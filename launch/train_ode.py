#!/usr/bin/env python
"""Fit a neural ODE to a long trajectory of a damped oscillator with seqpar.odeint.

    python launch/train_ode.py                                    # CPU: 2000-step grid, small
    python launch/train_ode.py --device cuda                      # GPU: 100k-step grid
    python launch/train_ode.py --steps-grid 1M --compare-torchdiffeq --out ode.json --plot ode.png

Data: ``x'' + 2 zeta omega x' + omega^2 x = 0`` as the state y = (x, x'), for
--batch initial conditions, sampled exactly (matrix exponential) at the
--steps-grid + 1 points of a uniform grid on [0, --t-end].  Model: dy/dt =
W y + MLP(y) (MLP 2 -> hidden -> 2, tanh; W starts at 0), integrated over the
whole grid from the true y0 by ``seqpar.odeint`` (rk4, Newton over all steps at
once, adjoint backward).  Loss: mean squared error over the whole trajectory.
Each epoch prints one line (loss, Newton iterations forward/backward, time);
a summary line ends the run.  ``--compare-torchdiffeq`` times one training
step of ``torchdiffeq.odeint`` (backprop through the solver) on the same
problem and model.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import seqpar  # noqa: E402
from seqpar.odeint import METHODS as ODE_METHODS  # noqa: E402
from seqpar.problems import parse_count  # noqa: E402


class NeuralODE(nn.Module):
    """dy/dt = W y + MLP(y)."""

    def __init__(self, dim=2, hidden=32):
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.lin.weight)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t, y):
        return self.lin(y) + self.mlp(y)


def oscillator_data(n_steps, t_end, batch, omega, zeta, seed, dtype, device):
    """Times (n+1,) float64 and exact states (n+1, batch, 2) of the damped oscillator."""
    A = torch.tensor([[0.0, 1.0], [-omega ** 2, -2.0 * zeta * omega]], dtype=torch.float64)
    t = torch.linspace(0.0, t_end, n_steps + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randn(batch, 2, generator=g, dtype=torch.float64)
    ys = []
    for s in range(0, n_steps + 1, 1 << 16):  # matrix exponentials in blocks (memory)
        E = torch.linalg.matrix_exp(A * t[s:s + (1 << 16), None, None])  # (n, 2, 2)
        ys.append(torch.einsum("nij,bj->nbi", E, y0))
    y = torch.cat(ys, 0)
    return t.to(device), y.to(device=device, dtype=dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps-grid", type=str, default=None,
                   help="grid steps (e.g. 2000, 100k, 1M); default 100k on cuda, 2000 on cpu")
    p.add_argument("--t-end", type=float, default=20.0, help="length of the time interval")
    p.add_argument("--omega", type=float, default=1.0)
    p.add_argument("--zeta", type=float, default=0.1, help="damping ratio")
    p.add_argument("--batch", type=int, default=16, help="initial conditions (trajectories)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--epochs", type=int, default=None, help="default 40 (cpu) / 100 (cuda)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--method", choices=list(ODE_METHODS), default="rk4")
    p.add_argument("--jacobian", default="dense", help="dense (exact Newton) or diag (quasi-Newton)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-torchdiffeq", action="store_true",
                   help="also time one training step of torchdiffeq.odeint on the same problem")
    p.add_argument("--out", default=None, help="write the loss curve and timings as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of the loss curve here")
    return p


def parse_args(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(a.device)
    except RuntimeError as e:
        p.error(f"--device {a.device!r}: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available here (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda[:N]; got {a.device!r}")
    if a.steps_grid is None:
        a.steps_grid = "100k" if dev.type == "cuda" else "2000"
    try:
        a.steps_grid = parse_count(a.steps_grid)
    except ValueError as e:
        p.error(f"--steps-grid: {e}")
    if a.steps_grid < 1:
        p.error("--steps-grid must be >= 1")
    if a.epochs is None:
        a.epochs = 100 if dev.type == "cuda" else 40
    for name in ("epochs", "batch", "hidden"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(a, name)}")
    for name in ("lr", "t_end", "omega"):
        v = getattr(a, name)
        if not (v > 0 and math.isfinite(v)):
            p.error(f"--{name.replace('_', '-')} must be a positive number; got {v}")
    if not (a.zeta >= 0 and math.isfinite(a.zeta)):
        p.error(f"--zeta must be >= 0; got {a.zeta}")
    if a.jacobian not in ("dense", "diag", "auto") and not str(a.jacobian).startswith("block"):
        p.error(f"--jacobian must be dense, diag or block:k; got {a.jacobian!r}")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib (pip install matplotlib)")
    if a.compare_torchdiffeq:
        try:
            import torchdiffeq  # noqa: F401
        except ImportError:
            p.error("--compare-torchdiffeq needs torchdiffeq (pip install torchdiffeq)")
    for name in ("out", "plot"):
        path = getattr(a, name)
        if path and os.path.dirname(os.path.abspath(path)) and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"--{name} {path}: directory does not exist")
    return a


def train_step(model, opt, y_true, t, a, integrator):
    opt.zero_grad(set_to_none=True)
    pred, info = integrator(model, y_true[0], t)
    loss = (pred - y_true).square().mean()
    loss.backward()
    opt.step()
    return float(loss.detach()), info


def seqpar_integrator(a):
    def run(model, y0, t):
        return seqpar.odeint(model, y0, t, method=a.method, jacobian=a.jacobian, return_info=True)
    return run


def torchdiffeq_integrator(a):
    import torchdiffeq

    def run(model, y0, t):
        return torchdiffeq.odeint(model, y0, t, method=a.method), None
    return run


def main(argv=None):
    a = parse_args(argv)
    dev = torch.device(a.device)
    dtype = torch.float64 if a.dtype == "float64" else torch.float32
    torch.manual_seed(a.seed)
    t, y_true = oscillator_data(a.steps_grid, a.t_end, a.batch, a.omega, a.zeta, a.seed, dtype, dev)
    model = NeuralODE(2, a.hidden).to(device=dev, dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    init_state = copy.deepcopy(model.state_dict())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"train_ode: damped oscillator (omega={a.omega}, zeta={a.zeta}), grid {a.steps_grid:,} steps on "
          f"[0, {a.t_end}] (dt={a.t_end / a.steps_grid:.2e}), batch {a.batch}, {a.method}, jacobian={a.jacobian}, "
          f"{a.dtype}, device {name}", flush=True)
    run = seqpar_integrator(a)
    losses, times, iters = [], [], []
    for epoch in range(a.epochs):
        sync(dev)
        t0 = time.perf_counter()
        loss, info = train_step(model, opt, y_true, t, a, run)
        sync(dev)
        dt = time.perf_counter() - t0
        losses.append(loss)
        times.append(dt)
        iters.append([info.iterations, info.backward_iterations])
        print(f"epoch {epoch:4d}  loss {loss:.4e}  newton iters fwd {info.iterations} bwd {info.backward_iterations}"
              f"{'' if info.converged and not info.fallback else f' (fallback {info.fallback})'}  "
              f"time {dt:.3f} s", flush=True)
        if not math.isfinite(loss):
            print("loss is not finite: stopping", flush=True)
            break
    steady = times[1:] if len(times) > 1 else times
    mean_t = sum(steady) / len(steady)
    result = {"device": name, "torch": torch.__version__, "args": vars(a), "losses": losses, "epoch_times_s": times,
              "newton_iterations_fwd_bwd": iters, "mean_epoch_time_s": mean_t,
              "loss_first": losses[0], "loss_last": losses[-1], "loss_min": min(losses)}
    if a.compare_torchdiffeq:
        ref = NeuralODE(2, a.hidden).to(device=dev, dtype=dtype)
        ref.load_state_dict(init_state)
        ropt = torch.optim.Adam(ref.parameters(), lr=a.lr)
        sync(dev)
        t0 = time.perf_counter()
        ref_loss, _ = train_step(ref, ropt, y_true, t, a, torchdiffeq_integrator(a))
        sync(dev)
        tdq = time.perf_counter() - t0
        result["torchdiffeq_step_s"] = tdq
        result["torchdiffeq_first_loss"] = ref_loss
        print(f"torchdiffeq.odeint, one training step on the same problem: {tdq:.3f} s (first-step loss "
              f"{ref_loss:.4e} vs seqpar {losses[0]:.4e}); seqpar mean step {mean_t:.3f} s: "
              f"{tdq / mean_t:.1f}x", flush=True)
    print(f"summary: loss {losses[0]:.4e} -> {losses[-1]:.4e} (min {min(losses):.4e}, {losses[0] / max(losses[-1], 1e-300):.1f}x "
          f"lower) over {len(losses)} epochs; mean time/epoch {mean_t:.3f} s; grid {a.steps_grid:,} steps x "
          f"batch {a.batch}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.out}", flush=True)
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.semilogy(range(len(losses)), losses, marker=".")
        ax.set_xlabel("epoch")
        ax.set_ylabel("trajectory MSE")
        ax.set_title(f"neural ODE, damped oscillator, {a.steps_grid:,}-step grid ({name})")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}", flush=True)
    return 0 if math.isfinite(losses[-1]) and losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
