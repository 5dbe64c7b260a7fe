"""What `converged` promises, exact shard metadata, the fallback's heartbeats and cost, generic-cell memory.

Each test stands for a class of failure: a scale that hides an error, a
convergence claim above tol, float metadata that rounds, a slow repair killed
by a collective timeout, a repair far costlier than sequential evaluation, a
Jacobian chunk that materialises the whole sequence, a silently dropped
second-order gradient.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import seqpar
from dist_helpers import run_ranks
from seqpar.comm import Communicator
from seqpar.newton import NewtonOptions, default_tol, shift, step_residuals
from seqpar.shards import ShardLayout
from seqpar.structure import DIAG


def _residual(cell, h, x, h0):
    return float(step_residuals(h, cell.step(shift(h, h0), cell.project_inputs(x))).max())


# ---------------------------------------------------------------- 1. one scale must not hide another
def test_large_component_does_not_hide_a_small_ones_error():
    f = lambda s, u: torch.cat([s[..., :1] + 1000 * u[..., :1].abs(),  # noqa: E731
                                torch.tanh(0.9 * s[..., 1:] + u[..., 1:])], -1)
    cell = seqpar.FunctionCell(f, 2, structure="diag")
    torch.manual_seed(0)
    x = torch.randn(5000, 1, 2)
    h, info = seqpar.solve(cell, x, return_info=True)
    ref = seqpar.solve(cell, x, method="sequential")
    assert info.converged
    assert (h[..., 1] - ref[..., 1]).abs().max().item() < 1e-4  # was 0.134 with a per-step scale
    assert (h[..., 0] - ref[..., 0]).abs().max().item() < 1e-4 * ref[..., 0].abs().max().item()


def test_large_sequence_in_the_batch_does_not_hide_a_small_ones_error():
    scale = torch.tensor([[1.0], [1e4]])  # batch row 1 is row 0's dynamics at 10^4 times the size
    f = lambda s, u: scale * torch.tanh(0.9 * s / scale + u)  # noqa: E731
    cell = seqpar.FunctionCell(f, 3, structure="diag")
    torch.manual_seed(1)
    x = torch.randn(3000, 2, 3)
    for it in (1, 2, 3):  # whatever the iteration reached, the reported residual is the elementwise one
        h, info = seqpar.solve(cell, x, return_info=True, max_iter=it, fallback="none")
        assert info.residual == pytest.approx(_residual(cell, h, x, x.new_zeros(2, 3)), rel=1e-5, abs=1e-12)
    h, info = seqpar.solve(cell, x, return_info=True)
    ref = seqpar.solve(cell, x, method="sequential")
    assert info.converged and (h[:, 0] - ref[:, 0]).abs().max().item() < 1e-4


# ------------------------------------------------------------------ 5. converged means residual <= tol
@pytest.mark.parametrize("seed", range(6))
def test_converged_means_residual_at_most_tol(seed):
    torch.manual_seed(seed)
    cell = seqpar.GRU(3, 12)
    x = torch.randn(700, 2, 3)
    for fallback in ("none", "sequential"):
        h, info = seqpar.solve(cell, x, jacobian="diag", return_info=True, fallback=fallback, max_iter=25)
        independent = _residual(cell, h, x, x.new_zeros(2, 12))
        if info.converged:
            assert info.residual <= info.tol and independent <= info.tol, (info.residual, independent)
        else:
            assert info.residual > info.tol or info.residual != info.residual


def test_tol_below_the_dtype_reach_is_refused():
    cell = seqpar.DiagGRU(2, 4)
    with pytest.raises(ValueError, match="tol"):
        seqpar.solve(cell, torch.randn(10, 1, 2), tol=1e-9)  # float32 cannot reach 1e-9
    seqpar.solve(cell.double(), torch.randn(10, 1, 2, dtype=torch.float64), tol=1e-9)  # float64 can


# ------------------------------------------------------------------ 8. exact integer shard metadata
class _StackComm(Communicator):
    """Pretends to be rank 1 of 2; the other rank's tensor is given."""

    rank, world_size = 1, 2

    def __init__(self, other):
        self.other = other

    def all_gather(self, t):
        return torch.stack([self.other.to(t.dtype), t])


def test_shard_lengths_stay_exact_above_float32_precision():
    big = 2**24 + 3  # 16,777,219 rounds to 16,777,220 in float32
    layout = ShardLayout.exchange(_StackComm(torch.tensor([big])), 5, "cpu")
    assert layout.lengths == [big, 5] and layout.total == big + 5 and layout.offset == big


# ---------------------------------------------------------------- 9. heartbeats during a slow repair
def _slow_chaotic_ranks(rank, world_size, group):
    import time

    def f(h, u):
        if h.dim() == 2:  # one step at a time (the repair): slow on purpose
            time.sleep(0.002)
        return 3.9 * h * (1 - h) + 1e-3 * u

    cell = seqpar.FunctionCell(f, 1, structure="diag")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3000, 1, 1, dtype=torch.float64, generator=g)
    h0 = torch.full((1, 1), 0.3, dtype=torch.float64)
    n = 1500
    states, info = seqpar.solve(cell, x[rank * n:(rank + 1) * n], h0, return_info=True, group=group)
    return info.converged, info.fallback


def test_slow_fallback_is_not_killed_by_the_collective_timeout():
    # each rank's repair takes ~3 s (1500 steps x 2 ms); the collective timeout is 2 s: the waiting
    # rank must be kept alive by heartbeats, not time out
    results = run_ranks(_slow_chaotic_ranks, 2, coll_timeout=2, timeout=300)
    assert all(conv and fb for conv, fb in results), results


# ---------------------------------------------------------------- 12. the repair's cost is bounded
def test_repair_cost_is_a_small_multiple_of_sequential_evaluation():
    from seqpar.fallback import repair_tail

    evaluated = [0]

    def f(h, u):  # cost model: one unit per step evaluated, whether alone or inside a Newton window
        evaluated[0] += h.shape[0] if h.dim() == 3 else 1
        return 3.9 * h * (1 - h) + 1e-3 * u

    cell = seqpar.FunctionCell(f, 1, structure="diag")
    n = 4000
    xp = torch.rand(n, 2, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = torch.empty(n, 2, 1, dtype=torch.float64)
    opts = NewtonOptions(structure=DIAG, tol=1e-12, max_iter=50, backend="torch")
    repair_tail(cell, xp, torch.full((2, 1), 0.3, dtype=torch.float64), opts, out, clock=lambda: float(evaluated[0]))
    assert evaluated[0] <= 3 * n + 2 * 256 * 50, evaluated[0]  # within ~3x sequential (plus one window attempt)
    assert _residual(cell, out, xp, torch.full((2, 1), 0.3, dtype=torch.float64)) <= 1e-12


# ---------------------------------------------------------- 13. generic Jacobians stay chunk-sized
def test_generic_jacobian_of_a_chunk_does_not_touch_the_whole_sequence():
    code = textwrap.dedent("""
        import resource, torch, seqpar
        from seqpar.structure import DENSE
        W = torch.randn(32, 32, dtype=torch.float64) * 0.1
        cell = seqpar.FunctionCell(lambda h, u: torch.tanh(h @ W.T + u), 32, structure="dense")
        small = torch.randn(64, 1, 32, dtype=torch.float64)
        cell.jacobian(small, small, DENSE)  # warm-up
        base = torch.randn(200000, 1, 32, dtype=torch.float64)  # the whole sequence: 51 MB
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        J = cell.jacobian(base[1000:1064], base[1000:1064], DENSE)
        J = cell.jacobian(base[5000:9000], base[5000:9000], DENSE)  # 4000 steps: 33 MB of J
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    grew_mib = float(out.stdout.strip().splitlines()[-1])
    assert grew_mib < 300, grew_mib  # a whole-sequence tangent set would be 32 x 51 MB = 1.6 GB


# ------------------------------------------------------------------------- 3. double backward
def test_double_backward_is_refused_not_silently_wrong():
    cell = seqpar.DiagGRU(2, 3).double()
    x = torch.randn(20, 1, 2, dtype=torch.float64, requires_grad=True)
    h = seqpar.solve(cell, x)
    (g,) = torch.autograd.grad(h.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable"):
        g.square().sum().backward()


def test_default_tol_is_reachable():
    assert default_tol(torch.float32) >= 8 * torch.finfo(torch.float32).eps


# -------------------------------------------- 1x1 Jacobians run as the diagonal (its kernels apply)
@pytest.mark.parametrize("jac", ["auto", "dense", "block:1"])
def test_one_by_one_jacobian_is_the_diagonal_and_exact(jac):
    torch.manual_seed(0)
    cell = seqpar.GRU(2, 1).double()
    x = torch.randn(301, 5, 2, dtype=torch.float64, requires_grad=True)
    h, info = seqpar.solve(cell, x, jacobian=jac, return_info=True)
    ref = seqpar.solve(cell, x, method="sequential")
    assert info.jacobian == "diag" and info.converged and info.iterations <= 12  # exact Newton, not quasi
    assert (h - ref).abs().max().item() < 1e-12
    g, gr = torch.autograd.grad(h.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0]
    assert (g - gr).abs().max().item() < 1e-10
