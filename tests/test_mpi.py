"""launch/solve.py under mpiexec (--backend mpi): the same states as torchrun/gloo; fail-fast via MPI_Abort."""
import numpy as np
import pytest

from dist_helpers import launch_path, load_states, mpiexec_path, run_cmd, torchrun_cmd

pytest.importorskip("mpi4py")
MPIEXEC = mpiexec_path()
pytestmark = [pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)"), pytest.mark.slow]  # multi-process: CI runs the slow tests too (README)
ARGS = ["--seq-len", "50001", "--cell", "lstm", "--hidden", "4", "--batch", "2", "--device", "cpu", "--quiet"]


def _mpi(n, *args):
    import sys

    return [MPIEXEC, "-n", str(n), sys.executable, launch_path("solve.py"), "--backend", "mpi", *args]


def test_mpi_same_states_as_gloo(tmp_path):
    run_cmd(_mpi(2, *ARGS, "--out", str(tmp_path / "mpi")), timeout=300)
    run_cmd(torchrun_cmd(2, "solve.py", *ARGS, "--out", str(tmp_path / "gloo")), timeout=300)
    a, man_a = load_states(tmp_path / "mpi")
    b, man_b = load_states(tmp_path / "gloo")
    assert man_a["summary"]["backend"] == "mpi" and man_b["summary"]["backend"] == "gloo"
    assert man_a["summary"]["converged"] and man_b["summary"]["converged"]
    assert man_a["summary"]["iterations"] == man_b["summary"]["iterations"]
    np.testing.assert_array_equal(a, b)  # same arithmetic, only the transport differs


def test_mpi_verify_three_ranks():
    rc, out, _ = run_cmd(_mpi(3, "--seq-len", "20001", "--hidden", "4", "--device", "cpu", "--verify", "--quiet"),
                         timeout=300)
    assert "-> OK" in out and "backend=mpi" in out


def test_mpi_rank_failure_aborts_job():
    rc, out, dt = run_cmd(_mpi(3, "--seq-len", "300k", "--hidden", "4", "--device", "cpu", "--inject-failure", "1:1",
                               "--timeout", "60"), timeout=120, check=False)
    assert rc != 0 and "injected failure on rank 1" in out
    assert dt < 60


def test_mpi_hung_rank_times_out():
    rc, out, dt = run_cmd(_mpi(2, "--seq-len", "100k", "--hidden", "4", "--device", "cpu", "--inject-failure",
                               "1:1:hang", "--timeout", "5"), timeout=120, check=False)
    assert rc != 0 and "CollectiveTimeout" in out
    assert dt < 60
