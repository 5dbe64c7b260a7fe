"""Run a function on N real processes joined by a gloo process group (CPU), with a hard timeout.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes; rank r calls
``fn(rank, world_size, group, *args)`` with torch.distributed initialised (gloo,
file store) and returns what it returned (any picklable object), one per rank.
A rank that raises fails the call with its traceback; a run that exceeds
``timeout`` is killed and fails -- never a hang.
"""
from __future__ import annotations

import datetime
import os
import pickle
import sys
import tempfile
import time
import traceback

import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(rank, world_size, store_path, out_dir, fn, args, coll_timeout, backend="gloo"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result = None
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=coll_timeout))
        result = ("ok", fn(rank, world_size, dist.group.WORLD, *args))
    except BaseException as e:  # noqa: BLE001
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    # skip destroy_process_group / atexit: a failed peer must not make us wait
    os._exit(0 if result[0] == "ok" else 1)


def run_ranks(fn, world_size, *args, timeout=240, coll_timeout=60, expect_fail=False, backend="gloo"):
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, store, tmp, fn, args, coll_timeout, backend))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results = []
        for r in range(world_size):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    results.append(pickle.load(f))
            else:
                results.append(("missing", f"rank {r} wrote no result (exit code {procs[r].exitcode})"))
        if hung:
            raise AssertionError(f"ranks {hung} still running after {timeout} s (hang); results: {results}")
        if expect_fail:
            return results, [p.exitcode for p in procs]
        bad = [(r, res[1]) for r, res in enumerate(results) if res[0] != "ok"]
        if bad:
            raise AssertionError("rank(s) failed:\n" + "\n".join(f"--- rank {r}:\n{msg}" for r, msg in bad))
        return [res[1] for res in results]


# ------------------------------------------------------------------ launcher subprocesses
import shutil  # noqa: E402
import subprocess  # noqa: E402


def launch_path(name):
    return os.path.join(REPO, "launch", name)


def torchrun_cmd(nproc, script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            launch_path(script), *args]


def mpiexec_path():
    """mpiexec of the environment's MPI (the mpich wheel puts it next to python), or None."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


def run_cmd(cmd, timeout, env=None, check=True):
    """Run a launcher; returns (returncode, output, seconds). A timeout is a test failure (a hang)."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                           env=full_env, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s (hang):\n{out[-4000:]}")
    dt = time.monotonic() - t0
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-6000:]}")
    return p.returncode, p.stdout, dt


def load_states(out_dir):
    """Concatenate the states shards written by ``--out`` in rank order (checks the manifest)."""
    import json

    import numpy as np

    with open(os.path.join(out_dir, "manifest.json")) as f:
        man = json.load(f)
    parts, expect = [], 0
    for sh in man["shards"]:
        assert sh["start"] == expect
        a = np.load(os.path.join(out_dir, sh["file"]))
        assert a.shape[0] == sh["length"]
        parts.append(a)
        expect += sh["length"]
    assert expect == man["seq_len"]
    return np.concatenate(parts, 0), man
