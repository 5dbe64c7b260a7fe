"""launch/solve.py as a user runs it (single process)."""
import json
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
