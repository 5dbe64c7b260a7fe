"""The multi-rank Newton iteration on the fused kernels (TRITON_INTERPRET=1 on CPU) and its corrections.

Every rank runs the same fused pass as one rank, from a guessed incoming state,
and corrects it after one all-gather (DiagGRU: the pipelined loop, which scans its
carries from the exchanged incoming state instead).  These tests check, on 1, 2 and 3 gloo
ranks with uneven, 1-step and empty shards, that states, input / h0 /
parameter gradients, iteration counts and residual histories equal the
single-process solve, on the kernels and on the torch path with the
correction forced to rerun the pass.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (inherited by the spawned ranks)

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # interpreted kernels on spawned ranks: minutes; CI runs the slow tests too

import seqpar  # noqa: E402
from dist_helpers import run_ranks  # noqa: E402
from seqpar.kernels import pipelined_quasi_gru as pq  # noqa: E402
from seqpar.problems import make_cell  # noqa: E402

# (cell, jacobian): the cells with fused kernels (DiagGRU exact, GRU quasi-Newton and exact dense, DiagLSTM 2x2
# blocks); "gru@12": hidden size 12, the pipelined quasi-Newton kernel of kernels/pipelined_quasi_gru.py;
# "gru@20": the same kernel with two programs per tile splitting the channels (two maps buffers; see _run)
FUSED = [("diag-gru", "auto"), ("gru", "diag"), ("gru", "dense"), ("diag-lstm", "auto"), ("gru@12", "diag"),
         ("gru@20", "diag")]
LAYOUTS = {1: [[41]], 2: [[26, 15], [1, 40]], 3: [[20, 0, 21], [0, 1, 40]]}
B, I, H = 2, 3, 5


def _problem(cell_name, T, dtype):
    name, _, width = cell_name.partition("@")  # "name@width": another hidden size than H
    cell = make_cell(name, I, int(width) if width else H, seed=3, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    h0 = 0.5 * torch.randn(B, cell.state_size, generator=g, dtype=dtype)
    w = torch.randn(T, B, cell.state_size, generator=g, dtype=dtype)
    return cell, x, h0, w


def _run(cell_name, mode, lengths, rank, group, dtype, backend, patch_cap=False):
    import seqpar.newton as nt

    nt.PIPELINE_MIN_ELEMENTS = 0  # tiny sequences: DiagGRU takes the pipelined loop (seqpar/pipeline.py)
    pq.TILES[32] = (16, 1, 16)  # widths 17 .. 32 (gru@20): 16 channels per program, two per tile
    if patch_cap:  # force the correction past its cap after two steps: the rerun path
        import seqpar.autograd as ag

        nt.CORRECTION_FIRST = nt.CORRECTION_MIN_CAP = 2
        ag.CORRECTION_FIRST = ag.CORRECTION_MIN_CAP = 2
    T = sum(lengths)
    cell, x, h0, w = _problem(cell_name, T, dtype)
    start, n = sum(lengths[:rank]), lengths[rank]
    xl = x[start:start + n].clone().requires_grad_(True)
    h0l = h0.clone().requires_grad_(True)
    states, info = seqpar.solve(cell, xl, h0l, jacobian=mode, return_info=True, group=group, backend=backend)
    (states * w[start:start + n]).sum().backward()
    return {"states": states.detach(), "dx": xl.grad, "dh0": h0l.grad,
            "dparams": {k: p.grad.clone() for k, p in cell.named_parameters()},
            "iterations": info.iterations, "residuals": info.residuals, "converged": info.converged,
            "newton_converged": info.newton_converged, "reruns": info.reruns}


def _fused_cases(rank, world_size, group):
    return {(tuple(lay), c, m): _run(c, m, lay, rank, group, torch.float32, "triton")
            for lay in LAYOUTS[world_size] for c, m in FUSED}


def _rerun_cases(rank, world_size, group):
    return {(tuple(lay), c, m): _run(c, m, lay, rank, group, torch.float64, "torch", patch_cap=True)
            for lay in LAYOUTS[world_size] for c, m in [("diag-gru", "auto"), ("lstm", "auto"), ("gru", "diag")]}


def _check(results, world_size, dtype, backend, cases, atol):
    for lay in LAYOUTS[world_size]:
        for c, m in cases:
            key = (tuple(lay), c, m)
            ref = _run(c, m, [sum(lay)], 0, None, dtype, backend)
            got = [results[r][key] for r in range(world_size)]
            states = torch.cat([g["states"] for g in got], 0)
            dx = torch.cat([g["dx"] for g in got], 0)
            scale = max(1.0, ref["states"].abs().max().item())
            assert (states - ref["states"]).abs().max().item() <= atol * scale, key
            assert (dx - ref["dx"]).abs().max().item() <= atol * max(1.0, ref["dx"].abs().max().item()), key
            for g in got:
                assert g["converged"] and g["newton_converged"], key
                assert g["iterations"] == ref["iterations"], (key, g["iterations"], ref["iterations"])
                assert len(g["residuals"]) == len(ref["residuals"]), key
                for a, b in zip(g["residuals"], ref["residuals"]):  # same Newton iterates, to rounding
                    assert abs(a - b) <= 1e-3 * max(a, b) + 50 * torch.finfo(dtype).eps, (key, a, b)
                assert (g["dh0"] - ref["dh0"]).abs().max().item() <= atol * max(1.0, ref["dh0"].abs().max().item())
                for k, v in ref["dparams"].items():
                    assert (g["dparams"][k] - v).abs().max().item() <= atol * max(1.0, v.abs().max().item()), (key, k)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_fused_multi_rank_equals_single_process(world_size):
    results = run_ranks(_fused_cases, world_size, timeout=600)
    _check(results, world_size, torch.float32, "triton", FUSED, atol=2e-5)


@pytest.mark.parametrize("world_size", [2, 3])
def test_correction_rerun_path_is_exact(world_size):
    results = run_ranks(_rerun_cases, world_size, timeout=600)
    _check(results, world_size, torch.float64, "torch", [("diag-gru", "auto"), ("lstm", "auto"), ("gru", "diag")],
           atol=1e-9)
    assert any(results[r][k]["reruns"] > 0 for r in range(world_size) for k in results[r]), "rerun path not taken"
