"""Shared helpers of the benchmark scripts: environment record, timing, JSON output.

Timing rule (benchmarks/README.md): every number is the median of several
timed repeats after a warm-up, with the device synchronised around each call.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this checkout's seqpar first, unless PYTHONPATH names a tree holding a seqpar package (a baseline tree timed
# in the same call: `PYTHONPATH=peers/baseline python profile_short_solve.py`; before run 61 this line put the
# checkout first regardless, so runs 57 and 59 timed this tree under both names)
_TREES = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if ROOT not in sys.path and not any(os.path.isdir(os.path.join(p, "seqpar")) for p in _TREES):
    sys.path.insert(0, ROOT)


def env_info() -> Dict:
    """Device, versions and date, recorded beside every result."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "argv": sys.argv,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device"] = "cpu"
    return info


def sync(device=None):
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


def timed(fn: Callable, repeats: int = 5, warmup: int = 1, before: Optional[Callable] = None) -> Dict:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` calls: median/min/all in seconds.  ``before``: called
    (untimed) ahead of each timed call."""
    for _ in range(warmup):
        fn()
    sync()
    times: List[float] = []
    for _ in range(repeats):
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def event_ms(fn: Callable, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` timed with CUDA events, after ``warmup`` calls
    (the first compiles)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_ms(fn: Callable, reps: int, calls: int = 10) -> float:
    """Median device milliseconds per call of ``fn``: ``calls`` back-to-back calls captured in one CUDA
    graph, replayed ``reps`` times between CUDA events.  Unlike :func:`event_ms` no host launch cost
    is in the number (a call whose launches take longer than its kernels is timed by its kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) off the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del graph
    return statistics.median(times)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    print(f"wrote {path}", flush=True)


def out_path(name: str) -> str:
    """Where a script writes its JSON: $OUT on the device machine, else benchmarks/results."""
    base = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    return os.path.join(base, name)


def gru_problem(D: int, T: int, B: int = 16, seed: int = 0):
    """``(cell, x, h0)`` on the GPU: seqpar's GRU with torch.nn.GRU(D, D)'s initialisation (seeded), inputs
    (T, B, D) ~ N(0, 1), zero h0; the graphs of earlier problems dropped (seqpar.graphs.clear)."""
    import seqpar
    import seqpar.graphs

    seqpar.graphs.clear()
    torch.manual_seed(seed)
    cell = seqpar.cells.GRU.from_torch(torch.nn.GRU(D, D).cuda())
    return cell, torch.randn(T, B, D, device="cuda"), torch.zeros(B, D, device="cuda")


def apply_sets(items) -> None:
    """``--set MODULE.NAME=VALUE`` overrides (a Python literal each), applied before anything runs: to time
    a variant of a module constant in the same device call as the default."""
    import ast
    import importlib

    for item in items or ():
        target, value = item.split("=", 1)
        mod, name = target.rsplit(".", 1)
        module = importlib.import_module(mod)
        if not hasattr(module, name):
            raise SystemExit(f"--set {item}: {mod} has no {name}")
        setattr(module, name, ast.literal_eval(value))
