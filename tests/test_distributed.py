"""The sharded solve on real processes (gloo, CPU): states and every gradient equal the single-process result.

Each ``run_ranks`` call spawns the ranks once and runs all cases inside them
(process start-up dominates the cost).  Layouts include uneven shards, a
1-step shard and empty shards.
"""

import pytest
import torch

import seqpar
from dist_helpers import run_ranks
from seqpar.problems import make_cell

pytestmark = pytest.mark.slow  # multi-process: CI runs the slow tests too (README)

CELL_NAMES = ["elman", "gru", "lstm", "diag-gru", "diag-lstm"]
MODES = ["auto", "dense", "diag", "block", "block:4"]
LAYOUTS = {1: [[23]], 2: [[15, 8], [1, 22]], 3: [[10, 1, 12], [0, 1, 22]]}
B, I, H = 2, 3, 4


def _problem(cell_name, T):
    cell = make_cell(cell_name, I, H, seed=7, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    h0 = 0.5 * torch.randn(B, cell.state_size, generator=g, dtype=torch.float64)
    w = torch.randn(T, B, cell.state_size, generator=g, dtype=torch.float64)
    return cell, x, h0, w


def run_case(cell_name, mode, lengths, rank, group, **solve_kw):
    """Forward + backward of rank ``rank``'s shard; everything the test compares."""
    T = sum(lengths)
    cell, x, h0, w = _problem(cell_name, T)
    start, n = sum(lengths[:rank]), lengths[rank]
    xl = x[start:start + n].clone().requires_grad_(True)
    h0l = h0.clone().requires_grad_(True)
    states, info = seqpar.solve(cell, xl, h0l, jacobian=mode, return_info=True, group=group, chunk_size=4,
                                **solve_kw)
    loss = (states * w[start:start + n]).sum()
    loss.backward()
    return {"states": states.detach(), "dx": xl.grad, "dh0": h0l.grad,
            "dparams": {k: p.grad.clone() for k, p in cell.named_parameters()},
            "iterations": info.iterations, "converged": info.converged, "fallback": info.fallback,
            "residuals": info.residuals, "seq_len": info.seq_len}


def _all_cases(rank, world_size, group):
    out = {}
    for lengths in LAYOUTS[world_size]:
        for cell_name in CELL_NAMES:
            for mode in MODES:
                out[(tuple(lengths), cell_name, mode)] = run_case(cell_name, mode, lengths, rank, group)
    return out


_REF_CACHE = {}


def reference(cell_name, mode, T):
    key = (cell_name, mode, T)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = run_case(cell_name, mode, [T], 0, None)
    return _REF_CACHE[key]


def _close(a, b, what, atol=1e-9):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= atol * max(1.0, b.abs().max().item() if b.numel() else 1.0), f"{what}: max abs error {err:.3e}"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_equals_single_process_every_cell_and_mode(world_size):
    results = run_ranks(_all_cases, world_size)
    for lengths in LAYOUTS[world_size]:
        T = sum(lengths)
        for cell_name in CELL_NAMES:
            for mode in MODES:
                key = (tuple(lengths), cell_name, mode)
                ref = reference(cell_name, mode, T)
                seqref = seqpar.solve(*_problem(cell_name, T)[:3], method="sequential").detach()
                for r in range(world_size):
                    got = results[r][key]
                    tag = f"{key} rank {r}"
                    s, n = sum(lengths[:r]), lengths[r]
                    assert got["converged"], tag
                    _close(got["states"], ref["states"][s:s + n], tag + " states")
                    _close(got["states"], seqref[s:s + n], tag + " states vs sequential")
                    _close(got["dx"], ref["dx"][s:s + n], tag + " dx")
                    _close(got["dh0"], ref["dh0"], tag + " dh0")
                    for k, g in ref["dparams"].items():
                        _close(got["dparams"][k], g, tag + f" d{k}")
                    # same iteration count everywhere (the sharded iteration is the same algorithm)
                    assert got["iterations"] == results[0][key]["iterations"], tag
                    assert got["seq_len"] == sum(lengths), tag  # the whole sequence, not the shard


def _nonconvergence(rank, world_size, group):
    lengths = [9, 1, 14]
    out = {}
    # max_iter=2 cannot converge 24 steps of a GRU from zeros: the tail is finished sequentially, in rank order
    out["sequential"] = run_case("gru", "auto", lengths, rank, group, max_iter=2)
    with torch.no_grad():
        cell, x, h0, _ = _problem("gru", sum(lengths))
        s, n = sum(lengths[:rank]), lengths[rank]
        states, info = seqpar.solve(cell, x[s:s + n], h0, jacobian="diag", max_iter=2, fallback="none",
                                    return_info=True, group=group)
        out["none"] = (info.converged, info.first_unconverged)
        try:
            seqpar.solve(cell, x[s:s + n], h0, jacobian="diag", max_iter=2, fallback="raise", group=group)
            out["raise"] = None
        except seqpar.NotConvergedError as e:
            out["raise"] = str(e)
    return out


def test_non_convergence_handled_consistently_across_ranks():
    results = run_ranks(_nonconvergence, 3)
    lengths = [9, 1, 14]
    ref = reference("gru", "auto", 24)
    for r, res in enumerate(results):
        s, n = sum(lengths[:r]), lengths[r]
        seq = res["sequential"]
        assert seq["converged"] and seq["fallback"] is not None  # tail repaired in rank order
        _close(seq["states"], ref["states"][s:s + n], f"rank {r} fallback states")
        _close(seq["dx"], ref["dx"][s:s + n], f"rank {r} fallback dx")
        for k, g in ref["dparams"].items():
            _close(seq["dparams"][k], g, f"rank {r} fallback d{k}")
        assert res["none"][0] is False and res["none"][1] is not None
        assert res["raise"] is not None and "did not converge" in res["raise"]
    assert len({res["none"][1] for res in results}) == 1  # the same global first unconverged step


def _nn_layer_and_mesh(rank, world_size, group):
    from torch.distributed.device_mesh import init_device_mesh

    import seqpar.nn as snn

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("seq",))
    lengths = [7, 12]
    T = sum(lengths)
    torch.manual_seed(3)
    layer = snn.DiagGRU(I, H, batch_first=True, dtype=torch.float64, sequence_group=mesh)
    x = torch.randn(B, T, I, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    s, n = sum(lengths[:rank]), lengths[rank]
    xl = x[:, s:s + n].clone().requires_grad_(True)
    out, h_n = layer(xl)
    (out.pow(2).sum() + h_n.sum()).backward()
    res = {"out": out.detach(), "h_n": h_n.detach(), "dx": xl.grad,
           "grads": {k: p.grad.clone() for k, p in layer.named_parameters()}}
    # the communicator also accepts (mesh, dim) and mesh[dim]
    from seqpar.distributed import get_communicator

    res["comm_sizes"] = (get_communicator((mesh, "seq")).world_size, get_communicator(mesh["seq"]).world_size)
    return res


def test_nn_layer_with_device_mesh_sequence_group():
    results = run_ranks(_nn_layer_and_mesh, 2)
    import seqpar.nn as snn

    torch.manual_seed(3)
    layer = snn.DiagGRU(I, H, batch_first=True, dtype=torch.float64)
    x = torch.randn(B, 19, I, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    out, h_n = layer(x)
    # h_n on a sharded layer is the state at the end of each rank's shard: rank r's loss term uses its own h_n
    lengths = [7, 12]
    loss = out.pow(2).sum() + out[:, lengths[0] - 1].sum() + h_n.sum()
    loss.backward()
    for r, res in enumerate(results):
        s, n = sum(lengths[:r]), lengths[r]
        _close(res["out"], out[:, s:s + n].detach(), f"rank {r} out")
        _close(res["dx"], x.grad[:, s:s + n], f"rank {r} dx")
        for k, p in layer.named_parameters():
            _close(res["grads"][k], p.grad, f"rank {r} d{k}")
        assert res["comm_sizes"] == (2, 2)


def _bad_argument_on_one_rank(rank, world_size, group):
    cell, x, h0, _ = _problem("diag-gru", 12)
    if rank == 1:
        h0 = h0[:, :2]  # wrong shape on one rank only
    try:
        seqpar.solve(cell, x[rank * 6:(rank + 1) * 6], h0, group=group)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def test_bad_argument_on_one_rank_fails_every_rank():
    res = run_ranks(_bad_argument_on_one_rank, 2)
    assert res[1].startswith("ValueError") and "h0" in res[1]
    assert res[0].startswith("RemoteRankError") and "[1]" in res[0]


class _Boom(RuntimeError):
    pass


def _raise_mid_solve(rank, world_size, group):
    import time

    cell, x, h0, _ = _problem("gru", 300)

    def callback(it, res):
        if rank == 1 and it == 2:
            raise _Boom("injected failure on rank 1 at Newton iteration 2")

    s, n = seqpar.problems.shard_range(300, world_size, rank)
    t0 = time.monotonic()
    try:
        seqpar.solve(cell, x[s:s + n], h0, group=group, callback=callback, chunk_size=16)
    except BaseException as e:  # noqa: BLE001
        raise RuntimeError(f"rank {rank} failed after {time.monotonic() - t0:.1f} s: {type(e).__name__}: {e}") from e
    return "finished"


def test_rank_raising_mid_solve_fails_every_rank_quickly():
    import time

    t0 = time.monotonic()
    results, codes = run_ranks(_raise_mid_solve, 3, timeout=120, coll_timeout=30, expect_fail=True)
    elapsed = time.monotonic() - t0
    assert all(c != 0 for c in codes), (codes, results)
    assert "injected failure" in results[1][1]
    # the healthy ranks did not wait for the 30 s collective timeout: the dead peer's closed connection woke them
    assert elapsed < 60, elapsed


# ------------------------------------------------- issue #9: ranks must agree on the call
def _mismatch_cases(rank, world_size, group):
    """Each case makes rank 1's call differ in one thing; returns every rank's error per case."""
    def problem(seed=7, dtype=torch.float64, B=2, H=4):
        cell = make_cell("gru", I, H, seed=seed, dtype=dtype)
        g = torch.Generator().manual_seed(11)
        x = torch.randn(12, B, I, generator=g, dtype=dtype)[rank * 6:(rank + 1) * 6]
        h0 = 0.5 * torch.randn(B, cell.state_size, generator=g, dtype=dtype)
        return cell, x, h0

    odd = rank == 1
    cases = {
        "h0": lambda: (lambda c, x, h: seqpar.solve(c, x, h + (1e-3 if odd else 0.0), group=group))(*problem()),
        "cell parameters": lambda: seqpar.solve(*problem(seed=8 if odd else 7), group=group),
        "dtype": lambda: seqpar.solve(*problem(dtype=torch.float32 if odd else torch.float64), group=group),
        "batch size": lambda: seqpar.solve(*problem(B=3 if odd else 2)[:2], group=group),
        "state size": lambda: seqpar.solve(*problem(H=5 if odd else 4)[:2], group=group),
        "jacobian": lambda: seqpar.solve(*problem(), group=group, jacobian="diag" if odd else "auto"),
        "method": lambda: seqpar.solve(*problem(), group=group, method="sequential" if odd else "newton"),
        "tol": lambda: seqpar.solve(*problem(), group=group, tol=1e-8 if odd else None),
        "max_iter": lambda: seqpar.solve(*problem(), group=group, max_iter=7 if odd else 8),
        "fallback": lambda: seqpar.solve(*problem(), group=group, fallback="none" if odd else "sequential"),
        "T=0 time steps on every rank": lambda: (lambda c, x, h: seqpar.solve(c, x[:0], h, group=group))(*problem()),
    }
    out = {}
    for name, call in cases.items():
        with torch.no_grad():
            try:
                call()
                out[name] = None
            except Exception as e:  # noqa: BLE001
                out[name] = f"{type(e).__name__}: {e}"
    cell, x, h0 = problem()
    try:  # gradients would not cross ranks: refused under grad
        seqpar.solve(cell, x, h0, group=group, method="sequential")
        out["sequential with grad"] = None
    except ValueError as e:
        out["sequential with grad"] = str(e)
    with torch.no_grad():  # forward-only sequential reference under a group still works
        out["sequential no_grad"] = seqpar.solve(cell, x, h0, group=group, method="sequential")
    out["ok"] = seqpar.solve(cell, x, h0, group=group).detach()  # the group is still usable
    return out


def test_ranks_must_agree_on_the_call():
    results = run_ranks(_mismatch_cases, 2, timeout=150, coll_timeout=20)
    for name in ("h0", "cell parameters", "dtype", "batch size", "state size", "jacobian", "method", "tol",
                 "max_iter", "fallback", "T=0 time steps on every rank"):
        for r in range(2):
            msg = results[r][name]
            assert msg is not None and msg.startswith("ValueError") and name in msg, (name, r, msg)
            assert "differ" in msg or name.startswith("T=0"), (name, r, msg)
        assert results[0][name] == results[1][name], name  # the same error on every rank
    for r in range(2):
        assert "method='newton'" in results[r]["sequential with grad"]
    cell, x, h0 = _problem("gru", 12)[:3]
    ref = seqpar.solve(cell, x, h0, method="sequential").detach()
    for r in range(2):
        _close(results[r]["sequential no_grad"], ref[r * 6:(r + 1) * 6], f"rank {r} sequential")
        _close(results[r]["ok"], ref[r * 6:(r + 1) * 6], f"rank {r} newton")


def test_sharded_nn_layer_job_exits_cleanly_every_time():
    """Issue #9 item 7: a torchrun job with a sharded DiagGRU layer (graph alive at exit) must exit 0 every
    time, and seqpar must not keep the destroyed process group alive (the job exits 3 if it does)."""
    import os
    import sys

    from dist_helpers import REPO, run_cmd

    job = os.path.join(REPO, "tests", "dist_nn_exit_job.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", job]
    codes, outs = [], []
    for _ in range(6):
        rc, out, _ = run_cmd(cmd, timeout=120, env={"PYTHONPATH": REPO}, check=False)
        codes.append(rc)
        outs.append(out)
    bad = [(i, out[-1500:]) for i, (rc, out) in enumerate(zip(codes, outs)) if rc != 0 or "terminate called" in out]
    assert not bad, f"exit codes {codes}:\n" + "\n".join(f"--- run {i}:\n{o}" for i, o in bad)
