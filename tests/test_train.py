"""seqpar.cli.train (launch/train.py): sharded (and DDP x sequence) gradients equal unsharded ones; the marker-recall task is
learnt (loss falls, last-step recall reaches 1) in one process and under torchrun; memory lanes keep their
state exactly; checkpoints round-trip; bad options fail with one parser line; --verify/--plot/--out work."""
import json
import os
import sys

import pytest
import torch

from dist_helpers import run_cmd, run_ranks, torchrun_cmd

T, B, I, H = 61, 3, 4, 6


def _grads(model, x, target, mask, T_total, batch):
    from seqpar.cli import train

    model.zero_grad(set_to_none=True)
    loss, _ = train.local_loss(model, x, target, mask, T_total, batch)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _sharded_grads(rank, world_size, group, dp, cell):
    """One training step's gradients on a dp x (world/dp) mesh, DDP over the data group."""
    from seqpar.cli import train
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
    from seqpar.cli import train

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


def test_training_learns_under_torchrun(tmp_path):
    js = tmp_path / "t.json"
    rc, out, dt = run_cmd(torchrun_cmd(2, "train.py", "--device", "cpu", "--seq-len", "1024", "--hidden", "8",
                                       "--batch", "16", "--steps", "12", "--json", str(js)), timeout=300)
    assert rc == 0, out
    s = json.loads(js.read_text())
    assert s["sequence_parallel"] == 2 and len(s["losses"]) == 12
    assert s["loss_last"] < 0.5 * s["loss_first"], s["losses"]
    assert min(s["last_step_recall"][-3:]) >= 0.99, s["last_step_recall"]
    assert "time/step" in out and "summary:" in out
    one = _main(tmp_path, "--seq-len", "1024", "--hidden", "8", "--batch", "16", "--steps", "12")
    assert one["sequence_parallel"] == 1 and one["last_step_recall"] == s["last_step_recall"]
    for a, b in zip(one["losses"], s["losses"]):  # the same curve, sharded or not (to fp tolerance)
        assert abs(a - b) <= 1e-4 * abs(b), (one["losses"], s["losses"])


def _main(tmp_path, *argv):
    from seqpar.cli import train

    js = tmp_path / f"s{len(list(tmp_path.iterdir()))}.json"
    assert train.main(["--device", "cpu", "--backend", "none", "--json", str(js), *argv]) == 0
    return json.loads(js.read_text())


TINY = ("--seq-len", "300", "--hidden", "8", "--input-size", "4", "--batch", "16")


def test_recall_learnt_in_one_process(tmp_path):
    """Fixed seed, tiny problem: from chance to recall 1.0 at the last step, loss more than halved."""
    s = _main(tmp_path, *TINY, "--steps", "12")
    assert s["last_step_recall"][0] <= 0.75, s["last_step_recall"]
    assert min(s["last_step_recall"][-3:]) >= 0.99, s["last_step_recall"]
    assert s["recall_ge_0.99_from_step"] is not None and s["recall_ge_0.99_from_step"] <= 9
    assert s["loss_last"] < 0.5 * s["loss_first"], s["losses"]


@pytest.mark.parametrize("cell", ["diag-gru", "gru", "lstm", "diag-lstm"])
def test_memory_lanes_keep_the_marker_exactly(cell):
    """float32: the keep gate of memory lanes is exactly 1, so the state written at t = 0 is unchanged at
    t = T - 1 whatever the noise (up to the rounding of the cell's n + z (h - n), ~1 ulp per step)."""
    from seqpar.cli import train

    T_, H_ = 1000, 8
    torch.manual_seed(0)
    x, _, _ = train.make_batch(0, 0, 4, T_, 0, T_, 4)
    m = train.n_memory_lanes(H_, 0.25)
    model = train.Model(4, H_, cell, chrono_max=T_)
    with torch.no_grad():
        out, last = model.rnn(x)
        _, first = model.rnn(x[:2])
    if "lstm" in cell:  # the memory is the cell state c (h = o tanh(c) keeps its sign)
        first, last = first[1][0], last[1][0]
        assert torch.equal(torch.sign(out[-1, :, :m]), torch.sign(out[1, :, :m]))
    else:
        first, last = first[0], last[0]
    assert first[:, :m].abs().min() > 1e-3  # something was written at the flag
    drift = (last[:, :m] - first[:, :m]).abs().max()
    assert drift < 2e-5, drift  # a chrono lane with 1 - z = 1/T would have lost e^-1 of it
    if cell == "diag-gru":
        old = train.Model(4, H_, cell, chrono_max=T_, init="chrono")
        with torch.no_grad():
            h_old, _ = old.rnn(x)
        assert h_old[1].abs().max() < 1e-2  # chrono lanes hardly write: h_1 = (1 - z) n


def test_checkpoint_round_trip(tmp_path):
    """2 steps, save, resume to 4 == 4 steps straight (losses and final parameters)."""
    from seqpar.cli import train

    ck, ck4 = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    s2 = _main(tmp_path, *TINY, "--steps", "2", "--save", ck)
    s4 = _main(tmp_path, *TINY, "--steps", "4", "--resume", ck, "--save", ck)
    straight = _main(tmp_path, *TINY, "--steps", "4", "--save", ck4)
    assert s2["losses"] == straight["losses"][:2]
    assert s4["resumed_from_step"] == 2 and len(s4["losses"]) == 4
    assert s4["losses"] == straight["losses"], (s4["losses"], straight["losses"])
    a, b = torch.load(ck, weights_only=False), torch.load(ck4, weights_only=False)
    assert a["step"] == b["step"] == 4 and a["args"]["steps"] == 4
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sb)
    # and resuming really continues: a checkpoint of other options is refused
    with pytest.raises(SystemExit):
        train.main(["--device", "cpu", "--backend", "none", "--seq-len", "301", "--hidden", "8", "--input-size", "4",
                    "--batch", "16", "--steps", "4", "--resume", ck4])


@pytest.mark.parametrize("argv,msg", [
    (["--memory-frac", "0"], "--memory-frac"),
    (["--input-size", "1"], "--input-size"),
    (["--seq-len", "1"], "--seq-len"),
    (["--lr", "-1"], "--lr"),
    (["--verify-window", "10"], "only with --verify"),
    (["--resume", "/nonexistent/ck.pt"], "no such file"),
    (["--save-every", "2"], "needs --save"),
    (["--cell", "transformer"], "--cell"),
    (["--plot", "/nonexistent/dir/c.png"], "--plot"),
])
def test_bad_options_fail_with_one_line(argv, msg, capsys):
    from seqpar.cli import train

    with pytest.raises(SystemExit) as e:
        train.main(["--device", "cpu", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error:") or "error:" in err[-1], err
    assert msg in err[-1], err[-1]


@pytest.mark.parametrize("cell", ["gru", "lstm", "diag-lstm", "elman"])
def test_other_cells_train(tmp_path, cell):
    s = _main(tmp_path, "--seq-len", "200", "--hidden", "6", "--input-size", "4", "--batch", "4", "--steps", "2",
              "--cell", cell, "--verify")
    assert s["cell"] == cell and len(s["losses"]) == 2 and all(map(lambda v: v == v, s["losses"]))
    assert s["verify_ok"], s


def test_verify_plot_out(tmp_path):
    png, out = tmp_path / "c.png", tmp_path / "run"
    s = _main(tmp_path, *TINY, "--steps", "3", "--verify", "--verify-window", "100", "--plot", str(png),
              "--out", str(out))
    assert s["verify_ok"] and s["verify_steps"] == 100 and s["verify_rel_error"] < 1e-5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "curve.png").exists() and (out / "checkpoint.pt").exists()
    assert json.loads((out / "summary.json").read_text())["losses"] == s["losses"]
