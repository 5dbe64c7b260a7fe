"""launch/ray_solve.py: a local 2-worker Ray Train job gives the same states as torchrun/gloo; failures fail the run."""

import numpy as np
import pytest

from dist_helpers import launch_path, load_states, run_cmd, torchrun_cmd

pytestmark = pytest.mark.slow  # multi-process: CI runs the slow tests too (README)

pytest.importorskip("ray.train.torch")
ARGS = ["--seq-len", "40001", "--cell", "diag-lstm", "--hidden", "4", "--batch", "2", "--quiet"]
ENV = {"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _ray(*args):
    import sys

    return [sys.executable, launch_path("ray_solve.py"), "--num-workers", "2", *args]


def test_ray_same_states_as_gloo(tmp_path):
    env = dict(ENV, SEQPAR_RAY_STORAGE=str(tmp_path / "ray_results"))
    rc, out, dt = run_cmd(_ray(*ARGS, "--out", str(tmp_path / "ray"), "--json", str(tmp_path / "r.json")),
                          timeout=400, env=env)
    run_cmd(torchrun_cmd(2, "solve.py", *ARGS, "--device", "cpu", "--out", str(tmp_path / "gloo")), timeout=300)
    a, man_a = load_states(tmp_path / "ray")
    b, _ = load_states(tmp_path / "gloo")
    assert man_a["summary"]["converged"] and man_a["world_size"] == 2
    assert (tmp_path / "r.json").exists() and "ray_solve summary" in out
    np.testing.assert_array_equal(a, b)
    print(f"ray job: {dt:.1f} s end to end")


def test_ray_worker_failure_fails_the_run(tmp_path):
    env = dict(ENV, SEQPAR_RAY_STORAGE=str(tmp_path / "ray_results"))
    rc, out, dt = run_cmd(_ray("--seq-len", "200k", "--hidden", "4", "--inject-failure", "1:1", "--timeout", "60",
                               "--job-timeout", "300"), timeout=400, env=env, check=False)
    assert rc != 0 and "injected failure on rank 1" in out
