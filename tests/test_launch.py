"""launch/solve.py under torchrun (gloo, CPU): the 10M-step job, --verify, --out, and fail-fast."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import seqpar
from dist_helpers import REPO, launch_path, load_states, run_cmd, torchrun_cmd
from seqpar.problems import make_cell, make_inputs

pytestmark = pytest.mark.slow  # multi-process: CI runs the slow tests too (README)


@pytest.mark.slow
def test_torchrun_10M_steps_converges(tmp_path):
    js = tmp_path / "s.json"
    rc, out, dt = run_cmd(torchrun_cmd(2, "solve.py", "--seq-len", "10M", "--hidden", "4", "--device", "cpu",
                                       "--json", str(js)), timeout=400)
    s = json.loads(js.read_text())
    assert s["converged"] is True and s["world_size"] == 2 and s["seq_len"] == 10_000_000
    assert s["backend"] == "gloo" and s["shard_lengths"] == [5_000_000, 5_000_000]
    assert len(s["peak_memory_bytes_per_rank"]) == 2 and s["steps_per_s"] > 0
    assert "iter   0" in out and "summary: world_size=2" in out
    print(f"10M steps on 2 gloo ranks: {s['iterations']} iterations, solve {s['wall_time_s']:.1f} s, "
          f"job {dt:.1f} s, peak RSS/rank {[b / 2**30 for b in s['peak_memory_bytes_per_rank']]} GiB")


def test_torchrun_verify_uneven_shards_and_out(tmp_path):
    T = 30001  # 3 ranks: uneven shards
    out_dir, js = tmp_path / "out", tmp_path / "s.json"
    run_cmd(torchrun_cmd(3, "solve.py", "--seq-len", str(T), "--cell", "gru", "--hidden", "8", "--batch", "2",
                         "--device", "cpu", "--verify", "--out", str(out_dir), "--json", str(js)), timeout=300)
    s = json.loads(js.read_text())
    assert s["converged"] and s["verify_ok"] and s["verify_steps"] == T and "whole sequence" in s["verify_window"]
    states, man = load_states(out_dir)
    assert man["world_size"] == 3 and [sh["length"] for sh in man["shards"]] == [10001, 10000, 10000]
    # against step-by-step evaluation here, in one process
    cell = make_cell("gru", 8, 8, seed=0)
    x = make_inputs(0, T, 2, 8, seed=0)
    with torch.no_grad():
        ref = seqpar.sequential_solve(cell, x, torch.zeros(2, 8))
    assert states.shape == tuple(ref.shape)
    assert np.abs(states - ref.numpy()).max() < 1e-4


def test_verify_window_reported_and_safetensors_out(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    rc, out, _ = run_cmd(torchrun_cmd(2, "solve.py", "--seq-len", "200k", "--hidden", "4", "--device", "cpu",
                                      "--verify", "--verify-window", "5000", "--quiet", "--out", str(tmp_path),
                                      "--out-format", "safetensors"), timeout=300)
    assert "window [0, 5000) of T=200000" in out and "-> OK" in out
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["format"] == "safetensors" and man["summary"]["verify_ok"]
    for sh in man["shards"]:
        assert load_file(str(tmp_path / sh["file"]))["states"].shape == (sh["length"], 1, 4)


def test_rank_failure_under_torchrun_fails_fast():
    t0 = time.monotonic()
    rc, out, dt = run_cmd(torchrun_cmd(3, "solve.py", "--seq-len", "300k", "--hidden", "4", "--device", "cpu",
                                       "--inject-failure", "1:1", "--timeout", "60"), timeout=120, check=False)
    assert rc != 0
    assert "injected failure on rank 1" in out
    assert dt < 60, f"took {dt:.1f} s: the healthy ranks waited for the collective timeout"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_failure_every_process_exits_nonzero():
    """Without torchrun's supervision: the ranks themselves notice the failure (no hang, all non-zero)."""
    port = _free_port()
    procs = []
    for r in range(3):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="3", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="3",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, launch_path("solve.py"), "--seq-len", "300k", "--hidden", "4",
                                       "--device", "cpu", "--inject-failure", "2:1", "--timeout", "40"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO))
    t0 = time.monotonic()
    outs, codes = [], []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1, 100 - (time.monotonic() - t0)))
            outs.append(out)
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    dt = time.monotonic() - t0
    assert all(c != 0 for c in codes), (codes, outs)
    assert "injected failure on rank 2" in outs[2]
    assert all("seqpar solve failed" in o for o in outs), outs
    assert dt < 90


def test_default_job_runs_on_two_cpu_ranks(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the default job uses the GPUs here")
    js = tmp_path / "d.json"
    rc, out, _ = run_cmd([sys.executable, launch_path("default_job.py"), "--seq-len", "20k", "--hidden", "4",
                          "--verify-window", "5k", "--json", str(js)], timeout=300)
    s = json.loads(js.read_text())
    assert s["world_size"] == 2 and s["converged"] and s["verify_ok"]


def test_hung_rank_times_out_instead_of_hanging():
    rc, out, dt = run_cmd(torchrun_cmd(2, "solve.py", "--seq-len", "100k", "--hidden", "4", "--device", "cpu",
                                       "--inject-failure", "1:1:hang", "--timeout", "5"), timeout=120, check=False)
    assert rc != 0 and "injected hang" in out and "Timed out" in out
    assert dt < 60
