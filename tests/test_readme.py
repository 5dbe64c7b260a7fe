"""Every ```python block of README.md runs as written (each on its own, in a fresh interpreter).

A block preceded by ``<!-- readme-test: skip (REASON) -->`` is skipped (for blocks that genuinely need a
launcher or a GPU; none at the moment).  A block that calls ``seqpar.distributed.init_from_env()`` runs
in a 1-process torchrun-like environment (gloo group of one rank), so its sharded code path runs.
"""
import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\(([^)]*)\)\s*-->\s*$")


def python_blocks(text):
    """[(line number, code, skip reason or None)] of the ```python blocks."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = SKIP.search(prev)
            blocks.append((start + 1, "\n".join(lines[start:j]) + "\n", m.group(1) if m else None))
            i = j
        i += 1
    return blocks


BLOCKS = python_blocks(open(os.path.join(ROOT, "README.md")).read())


def test_blocks_found():
    assert len(BLOCKS) >= 5
    skipped = [b for b in BLOCKS if b[2]]
    assert len(skipped) <= 1, "skip README blocks only when they need a launcher: " + repr(skipped)


def test_extractor_sees_skip_tags():
    text = "x\n<!-- readme-test: skip (needs torchrun) -->\n```python\nraise SystemExit(1)\n```\n```python\npass\n```\n"
    assert [(b[1], b[2]) for b in python_blocks(text)] == [("raise SystemExit(1)\n", "needs torchrun"), ("pass\n", None)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("line,code,skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(tmp_path, line, code, skip):
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "2")
    if "init_from_env" in code:  # a 1-process gloo group, as torchrun --nproc-per-node 1 would set up
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    script = tmp_path / "block.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, f"README.md:{line} failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"
