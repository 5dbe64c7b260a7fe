"""launch/train.py: the loss falls under torchrun, and sharded (and DDP x sequence) gradients equal unsharded ones."""
import json
import os
import sys

import pytest
import torch

from dist_helpers import REPO, run_cmd, run_ranks, torchrun_cmd

sys.path.insert(0, os.path.join(REPO, "launch"))
T, B, I, H = 61, 3, 4, 6


def _grads(model, x, target, mask, T_total, batch):
    import train

    model.zero_grad(set_to_none=True)
    loss, _ = train.local_loss(model, x, target, mask, T_total, batch)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _sharded_grads(rank, world_size, group, dp, cell):
    """One training step's gradients on a dp x (world/dp) mesh, DDP over the data group."""
    import train
    from seqpar import distributed as sd

    ctx = sd.init_from_env("auto", "cpu")
    seq_group, data_group, drank, srank, sp = train.setup_mesh(ctx, dp)
    lengths = {1: [T], 2: [40, 21], 4: [1, 30, 0, 30]}[sp]
    start, n = sum(lengths[:srank]), lengths[srank]
    torch.manual_seed(0)
    model = train.Model(I, H, cell, sequence_group=seq_group, chrono_max=T, dtype=torch.float64)
    net = model
    if data_group is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, process_group=data_group)
    x, target, mask = train.make_batch(0, drank, B, T, start, n, I, dtype=torch.float64)
    net.zero_grad(set_to_none=True)
    loss, _ = train.local_loss(net, x, target, mask, T, B)
    loss.backward()
    sd.sum_grads(train.other_params(model), seq_group)
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _reference(dp, cell):
    import train

    torch.manual_seed(0)
    model = train.Model(I, H, cell, chrono_max=T, dtype=torch.float64)
    total = None
    for d in range(dp):  # DDP averages over the data ranks
        x, target, mask = train.make_batch(0, d, B, T, 0, T, I, dtype=torch.float64)
        _, g = _grads(model, x, target, mask, T, B)
        total = g if total is None else {k: total[k] + g[k] for k in g}
    return {k: v / dp for k, v in total.items()}


@pytest.mark.parametrize("world_size,dp,cell", [(2, 1, "diag-gru"), (4, 2, "diag-gru"), (4, 1, "gru")])
def test_sharded_gradients_equal_unsharded(world_size, dp, cell):
    results = run_ranks(_sharded_grads, world_size, dp, cell)
    ref = _reference(dp, cell)
    for r, got in enumerate(results):
        for k, g in ref.items():
            err = (got[k] - g).abs().max().item()
            assert err < 1e-9 * max(1.0, g.abs().max().item()), f"rank {r} d{k}: {err:.3e}"


def test_training_loss_decreases_under_torchrun(tmp_path):
    js = tmp_path / "t.json"
    rc, out, dt = run_cmd(torchrun_cmd(2, "train.py", "--device", "cpu", "--seq-len", "1024", "--batch", "8",
                                       "--steps", "20", "--json", str(js)), timeout=300)
    s = json.loads(js.read_text())
    assert s["sequence_parallel"] == 2 and len(s["losses"]) == 20
    assert s["loss_last"] < 0.5 * s["loss_first"], s["losses"]
    assert "time/step" in out
