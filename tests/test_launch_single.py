"""launch/solve.py as a user runs it (single process)."""
import json
import re
import os
import subprocess
import sys

import pytest

from seqpar.problems import parse_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("text,value", [("1M", 10**6), ("10M", 10**7), ("1e6", 10**6), ("2.5k", 2500), ("4096", 4096)])
def test_parse_count(text, value):
    assert parse_count(text) == value


def test_parse_count_rejects_garbage():
    with pytest.raises(ValueError, match="cannot parse"):
        parse_count("ten")
    with pytest.raises(ValueError, match="not a non-negative integer"):
        parse_count("1.5")


@pytest.mark.parametrize("cell", ["diag-gru", "gru", "lstm", "diag-lstm", "elman"])
def test_solve_script_verifies(tmp_path, cell):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "solve.py"), "--seq-len", "3k", "--hidden", "6",
                        "--cell", cell, "--device", "cpu", "--dtype", "float64", "--verify", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "iter   0" in r.stdout and "summary:" in r.stdout
    s = json.loads(out.read_text())
    assert s["converged"] is True and s["seq_len"] == 3000
    assert s["verify_rel_error"] < 1e-9


def test_bfloat16_verify_uses_a_dtype_scaled_bound(tmp_path):
    out = tmp_path / "s.json"
    subprocess.run([sys.executable, launch_path("solve.py"), "--seq-len", "3000", "--hidden", "8", "--quiet",
                    "--device", "cpu", "--dtype", "bfloat16", "--verify", "--json", str(out)],
                   check=True, timeout=300, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    s = json.loads(out.read_text())
    assert s["converged"] and s["verify_ok"], s
    assert s["verify_residual_bound"] >= 1e-2 and s["verify_recurrence_residual_all_steps"] > 1e-4


@pytest.mark.parametrize("value,pattern", [
    ("x", "expected RANK:ITER"), ("1", "expected RANK:ITER"), ("1:a", "expected RANK:ITER"),
    ("-1:2", "expected RANK:ITER"), ("0:1:boom", "'hang' or 'raise'"), ("3:1", "rank 3 is out of range"),
])
def test_malformed_inject_failure_is_a_clear_usage_error(value, pattern):
    p = subprocess.run([sys.executable, launch_path("solve.py"), "--seq-len", "100", "--device", "cpu",
                        f"--inject-failure={value}"], timeout=120, cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2, p.stdout
    assert "--inject-failure" in p.stdout and re.search(pattern, p.stdout), p.stdout
    assert "Traceback" not in p.stdout


def launch_path(name):
    return os.path.join(ROOT, "launch", name)


REPO = ROOT
