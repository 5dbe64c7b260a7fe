#!/usr/bin/env python
"""DEER and seqpar side by side, same GPU, same run, on DEER's headline benchmark.

DEER (github machine-discovery/deer, BSD-3, JAX) is a peer, never part of seqpar: this script
imports DEER's public ``deer.seq1d`` from a checkout given by ``--deer-path`` (or ``$DEER_PATH``,
default ``peers/deer``) and calls it the way DEER's own benchmark does
(``experiments/01_speed_benchmark/seq1d.py``).  DEER's package ``__init__`` imports optimistix
(hence equinox, lineax, jaxtyping, wadler_lindig): when they are not installed, ``--deer-site``
(or ``$DEER_SITE``) names a folder of unpacked pure-Python wheels appended to the JAX process's
``sys.path``; without them only ``deer.fseq1d`` is loaded (all that ``seq1d`` needs), and the JSON
says so.  ``benchmarks/run_vs_deer.sh`` sets this up from ``peers/`` on the device machine.

Problem (mirrors DEER's benchmark): a GRU with D hidden units and input size D, batch B, float32,
inputs x ~ N(0, 1) of shape (T, B, D), h0 = 0; weights initialised like DEER's flax
``GRUCell`` (``--init flax``: input kernels lecun-normal, i.e. truncated normal with std
1/sqrt(D), recurrent kernels orthogonal per gate, biases zero) and stored in torch.nn.GRU's layout;
``--init torch`` uses torch.nn.GRU's uniform init instead.  JAX runs with ``jax_enable_x64`` on as
DEER's script does (arrays stay float32; ``--no-jax-x64`` turns it off) and "highest" (true fp32)
matmul precision (``--jax-matmul-precision``: with JAX's TF32-like default DEER needs ~10x more
iterations).  The same weights and inputs go to every solver (the inputs are drawn from the same
seeded torch generator in both processes, checked by a checksum).  The input projection is
part of every timed call.  Solvers (``--solvers``):

* ``seqpar-dense`` / ``seqpar-diag``: ``seqpar.solve(seqpar.GRU.from_torch(m), x, h0,
  jacobian="dense"|"diag")`` (exact Newton, DEER's scheme / quasi-Newton), ``fallback="none"``
  (``--seqpar-fallback``) so an unconverged solve is reported, not finished sequentially;
* ``deer``: ``jax.jit(jax.vmap(deer.seq1d, over the batch))`` with DEER's defaults (method DEER(),
  float32 tolerances atol 1e-4, rtol 1e-3 on successive iterates; seqpar's default is a residual
  tolerance of 4e-6), compiled ahead of time (``deer_compile_s``);
* ``scan``: ``jax.jit(jax.lax.scan)`` of the same cell (``sequential_ms``), as DEER's baseline;
* ``cudnn``: ``torch.nn.GRU`` (cuDNN on CUDA) called on chunks of 65,535 steps, carrying h.

Timing: median of ``--repeats`` calls after at least three warm-up calls (two where the second takes over a
second), and for calls under 50 ms after at least 0.5 s of such short warm-up calls (``time_calls``), device
synchronised around each call (``torch.cuda.synchronize`` / ``jax.block_until_ready``).  A call whose warm-up alone took more
than ``--max-call-s`` is reported from that single call (``*_warmup_only``).  All JAX work runs
in one helper process (``XLA_PYTHON_CLIENT_PREALLOCATE=false``, so torch and JAX share the GPU),
restarted after an error, so DEER running out of memory cannot take the torch side down; a JAX
request that exceeds its time limit is killed and recorded as a timeout.  Configurations predicted
(linearly in T*B from a smaller run of the same D; across D as D^3 for exact Newton) to exceed
``--max-call-s``, dense Newton above ``--dense-max-d``, and shapes at least as large as one that
ran out of memory are skipped and recorded with the reason; ``--max-total-s`` stops launching work
once spent, and the JSON (rewritten after every configuration) holds what ran.

Agreement: every trajectory is compared with a float64 cuDNN run of the same GRU
(``--reference``): ``*_max_rel_diff = max |a - ref| / max(1, max |ref|)`` over all steps for the
torch solvers, over ``--samples`` evenly spaced steps (and the last) for the JAX ones, plus DEER
against lax.scan over all steps (``deer_vs_scan_max_rel_diff``).  DEER's iteration count is not
returned by its API: ``deer_iterations`` is counted in a separate, untimed run whose cell makes a
host callback per evaluation (only where DEER's call is under ``--deer-count-max-s``).

Output: ``benchmarks/results/vs_deer.json`` (or ``$OUT/vs_deer.json``, or ``--out``): ``env``
(GPU, torch, triton, jax, DEER commit and source hash, argv), ``note`` and ``rows``, one row per
(D, T, B, jacobian) with ``seqpar_ms``, ``iterations``, ``deer_ms`` or ``deer_error``,
``sequential_ms``, ``cudnn_ms``, the agreement columns, and DEER's numbers quoted in issue 10
(H200) as ``deer_reference_ms``.

    python benchmarks/bench_vs_deer.py --deer-path peers/deer           # GPU: the full table
    bash benchmarks/run_vs_deer.sh                                      # same, on the device machine
    python benchmarks/bench_vs_deer.py --quick                          # CPU smoke test, tiny sizes
    python benchmarks/bench_vs_deer.py --dims 1,4 --steps 100k --solvers seqpar-diag,deer,cudnn
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before anything imports jax

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import select  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402,F401  (puts the repo root on sys.path)
from common import env_info, out_path, write_json  # noqa: E402
from seqpar.problems import parse_count  # noqa: E402

SOLVERS = ("seqpar-dense", "seqpar-diag", "deer", "scan", "cudnn")
JAX_SOLVERS = ("scan", "deer")
CUDNN_MAX_CALL = 65535  # cuDNN refuses calls of 65,536 steps or more
PROTO = "@@"  # prefix of the helper process's protocol lines on its stdout

# DEER's numbers as quoted in issue 10 (H200, batch 16, fp32): the reference where DEER cannot run.
DEER_REFERENCE_H200 = {  # (D, T) -> ms, or "OOM"
    (1, 100_000): 0.96, (1, 1_000_000): 4.9, (4, 100_000): 8.0, (4, 1_000_000): 65.0,
    (16, 100_000): 9200.0, (16, 1_000_000): "OOM", (64, 100_000): "OOM", (64, 1_000_000): "OOM",
}
SCAN_REFERENCE_H200 = {
    (1, 100_000): 501.0, (1, 1_000_000): 5100.0, (4, 100_000): 681.0, (4, 1_000_000): 7000.0,
    (16, 100_000): 743.0, (16, 1_000_000): 7400.0, (64, 100_000): 800.0, (64, 1_000_000): 8000.0,
}


# ----------------------------------------------------------------------------------------------
# The problem: identical in both processes
# ----------------------------------------------------------------------------------------------

def make_weights(D: int, input_size: int, init: str, seed: int) -> dict:
    """GRU weights in torch.nn.GRU's layout (gates r, z, n), float32 numpy arrays, from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    w_ih = torch.empty(3 * D, input_size)
    w_hh = torch.empty(3 * D, D)
    b_ih = torch.zeros(3 * D)
    b_hh = torch.zeros(3 * D)
    if init == "flax":  # flax.linen.GRUCell: lecun_normal input kernels, orthogonal recurrent kernels, zero biases
        std = math.sqrt(1.0 / input_size) / 0.87962566103423978  # variance_scaling(1, fan_in, truncated_normal)
        for k in range(3):
            torch.nn.init.trunc_normal_(w_ih[k * D:(k + 1) * D], 0.0, std, -2 * std, 2 * std, generator=g)
            torch.nn.init.orthogonal_(w_hh[k * D:(k + 1) * D], generator=g)
    else:  # torch.nn.GRU's default
        bound = 1.0 / math.sqrt(D)
        for t in (w_ih, w_hh, b_ih, b_hh):
            t.uniform_(-bound, bound, generator=g)
    return {k: v.numpy().astype(np.float32) for k, v in
            dict(w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh).items()}


def make_inputs(T: int, B: int, input_size: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.randn(T, B, input_size, generator=g, device=device, dtype=torch.float32)


def input_checksum(x: torch.Tensor) -> list:
    return [float(x.sum(dtype=torch.float64)), [float(v) for v in x.reshape(-1)[:4]]]


def sample_index(T: int, n: int) -> list:
    idx = np.unique(np.round(np.linspace(0, T - 1, max(2, min(n, T)))).astype(np.int64))
    return [int(i) for i in idx]


def max_rel_diff(a: torch.Tensor, ref: torch.Tensor, chunk: int = 65536) -> float:
    """max |a - ref| / max(1, max |ref|), in float64, chunked over the leading axis."""
    num, den = 0.0, 0.0
    for s in range(0, ref.shape[0], chunk):
        r = ref[s:s + chunk].to(torch.float64)
        num = max(num, float((a[s:s + chunk].to(torch.float64) - r).abs().max()))
        den = max(den, float(r.abs().max()))
    return num / max(1.0, den)


def is_oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def describe_error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return ("out of memory: " if is_oom(e) else f"{type(e).__name__}: ") + first


WARMUPS = 3  # warm-up calls of a solver under a second (the first compiles; run 36's single warm-up left
# seqpar's first timed calls 20-60 % slow: 1.83, 1.52, 1.18 ms for one solve, GPU clocks and allocator warming)
WARMUP_MIN_S = 0.5  # ... and further warm-up calls (of calls under WARMUP_MAX_CALL_S) until they have run this
WARMUP_MAX_CALL_S = 0.05  # long, counted from the first short call (a compile or a graph capture does not warm
# the host up): run 61 (H100, profile_harness.py) timed GRU(1, 1), T = 100k at 572 us per call in the first 30
# calls after four warm-ups and 401-414 us from then on (a sub-millisecond call after three warm-ups is timed
# while the host and GPU are still ramping up).  The same rule for every solver.  (Run 63's rule counted the
# 0.5 s from the first call, whose compile alone took longer: seqpar's D = 1 row had three warm-ups, DEER,
# compiled beforehand, 0.5 s of them.)


def time_calls(call, repeats: int, max_call_s: float, deadline: float = math.inf) -> dict:
    """Warm-up calls (``WARMUPS``, or two if the second takes over a second; calls under ``WARMUP_MAX_CALL_S`` go on
    until ``WARMUP_MIN_S`` has passed), then ``repeats`` timed calls (``call`` synchronises the device
    itself).  A warm-up longer than ``max_call_s`` is the only measurement (``warmup_only``); repeats that
    would run past ``deadline`` (perf_counter seconds) are left out."""
    k = 0
    t_warm = None  # when the current run of short warm-up calls began (a slow call, e.g. a compile, restarts it)
    while True:
        t0 = time.perf_counter()
        call()
        warm = time.perf_counter() - t0
        k += 1
        if warm > max_call_s:
            return dict(median_s=warm, times_s=[warm], warmup_s=warm, warmup_only=True)
        if warm > 1.0 and k >= 2:  # (the first call may be compiling: a second one always warms up)
            break
        if warm > WARMUP_MAX_CALL_S:
            t_warm = None
            if k >= WARMUPS:
                break
        elif t_warm is None:
            t_warm = t0
        if k >= WARMUPS and t_warm is not None and time.perf_counter() - t_warm >= WARMUP_MIN_S:
            break
    times = []
    for _ in range(repeats):
        if times and time.perf_counter() + max(times) > deadline:
            break
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    if not times:
        return dict(median_s=warm, times_s=[warm], warmup_s=warm, warmup_only=True)
    return dict(median_s=statistics.median(times), times_s=times, warmup_s=warm, warmup_only=False)


# ----------------------------------------------------------------------------------------------
# The JAX helper process (lax.scan and DEER)
# ----------------------------------------------------------------------------------------------

def _jax_compat_shims():
    """DEER's maths.associative_scan uses private JAX helpers; restore any a newer JAX dropped."""
    import importlib
    import operator

    def canonicalize_axis(axis, ndim):
        axis = operator.index(axis)
        if not -ndim <= axis < ndim:
            raise ValueError(f"axis {axis} is out of bounds for array of dimension {ndim}")
        return axis + ndim if axis < 0 else axis

    def safe_map(f, *args):
        args = [list(x) for x in args]
        if any(len(x) != len(args[0]) for x in args):
            raise ValueError("safe_map: length mismatch")
        return list(map(f, *args))

    def is_constant_dim(d):
        try:
            operator.index(d)
            return True
        except TypeError:
            return False

    def _const(example, val):
        return np.array(val, dtype=getattr(example, "dtype", None) or np.asarray(example).dtype)

    added = []
    for module, name, shim in (("jax._src.util", "canonicalize_axis", canonicalize_axis),
                               ("jax._src.util", "safe_map", safe_map),
                               ("jax._src.core", "is_constant_dim", is_constant_dim),
                               ("jax._src.lax.lax", "_const", _const)):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # DEER's import of it fails too; its error will say so
            added.append(f"{module} missing ({e})")
            continue
        if not hasattr(mod, name):
            setattr(mod, name, shim)
            added.append(f"{module}.{name}")
    return added


def _import_deer(deer_path: str):
    """(seq1d, DEER method class, how it was imported).  ``import deer`` needs optimistix (for DEER's
    fsolve_idae, not used here); without it, load only the package's submodules."""
    import types

    if not os.path.isfile(os.path.join(deer_path, "deer", "fseq1d.py")):
        raise FileNotFoundError(f"no DEER checkout at {deer_path!r} (expected deer/fseq1d.py there)")
    sys.path.insert(0, os.path.abspath(deer_path))
    try:
        import deer
        from deer.fseq1d import DEER, seq1d
        how = "import deer"
    except ImportError as e:
        for name in [m for m in sys.modules if m == "deer" or m.startswith("deer.")]:
            del sys.modules[name]
        pkg = types.ModuleType("deer")
        pkg.__path__ = [os.path.join(os.path.abspath(deer_path), "deer")]
        sys.modules["deer"] = pkg
        from deer.fseq1d import DEER, seq1d
        how = f"deer.fseq1d only (import deer failed: {type(e).__name__}: {e})"
    import deer as deer_mod
    assert os.path.abspath(deer_mod.__path__[0]).startswith(os.path.abspath(deer_path))
    return seq1d, DEER, how


def _jax_cfg(jax, name):
    try:
        return jax.config.read(name)
    except Exception:  # noqa: BLE001
        return getattr(jax.config, name, None)


def worker_main(a) -> int:
    proto = sys.stdout
    sys.stdout = sys.stderr  # everything but protocol lines goes to stderr

    def send(obj):
        proto.write(PROTO + json.dumps(obj, default=str) + "\n")
        proto.flush()

    try:
        if a.deer_site:
            for p in a.deer_site.split(os.pathsep):
                if p and p not in sys.path:
                    sys.path.append(os.path.abspath(p))  # after site-packages: installed versions win
        import jax
        import jax.numpy as jnp

        if a.jax_x64:
            jax.config.update("jax_enable_x64", True)
        if a.jax_matmul_precision:
            jax.config.update("jax_default_matmul_precision", a.jax_matmul_precision)
        dev = jax.devices()[0]
    except Exception as e:  # noqa: BLE001
        send({"fatal": describe_error(e)})
        return 1
    info = dict(jax=jax.__version__, jax_backend=jax.default_backend(),
                jax_device=str(getattr(dev, "device_kind", dev)),
                jax_x64=bool(_jax_cfg(jax, "jax_enable_x64")),
                jax_default_matmul_precision=str(_jax_cfg(jax, "jax_default_matmul_precision")),
                xla_preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
    for name in ("jaxlib", "equinox", "optimistix", "lineax", "jaxtyping"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001
            info[name] = None
    deer = None
    try:
        info["deer_jax_shims"] = _jax_compat_shims()
        seq1d, DEERMethod, how = _import_deer(a.deer_path)
        deer = (seq1d, DEERMethod)
        info["deer_import"] = how
    except Exception as e:  # noqa: BLE001
        info["deer_error"] = describe_error(e)
    send({"ready": True, "info": info})

    def gru(h, x, p):  # torch.nn.GRU's cell on (..., D) states; the input projection is inside (as in DEER's benchmark)
        w_ih, w_hh, b_ih, b_hh = p
        D = h.shape[-1]
        gi = x @ w_ih.T + b_ih
        gh = h @ w_hh.T + b_hh
        r = jax.nn.sigmoid(gi[..., :D] + gh[..., :D])
        z = jax.nn.sigmoid(gi[..., D:2 * D] + gh[..., D:2 * D])
        n = jnp.tanh(gi[..., 2 * D:] + r * gh[..., 2 * D:])
        return (1.0 - z) * n + z * h

    def scan_fn(h0, x, p):
        def step(h, xt):
            h = gru(h, xt, p)
            return h, h
        return jax.lax.scan(step, h0, x)[1]

    def deer_fn_of(cell, method=None):
        seq1d = deer[0]

        def fn(h0, x, p):  # DEER's benchmark: jax.vmap(seq1d, in_axes=(None, 0, 1, None), out_axes=1)
            res = jax.vmap(lambda c, xx, pp: seq1d(cell, c, xx, pp, method=method),
                           in_axes=(0, 1, None), out_axes=1)(h0, x, p)
            return res.value, jnp.all(res.success)
        return fn

    calls = [0]

    def bump():
        calls[0] += 1

    def counting_gru(h, x, p):
        jax.debug.callback(bump)
        return gru(h, x, p)

    cache = {}
    torch_dev = "cuda" if torch.cuda.is_available() else "cpu"

    def problem(req):
        key = (req["D"], req["T"], req["B"], req["input_size"], req["seed"], req["weights"])
        if cache.get("key") != key:
            cache.clear()
            if torch_dev == "cuda":
                torch.cuda.empty_cache()
            w = np.load(req["weights"])
            p = tuple(jnp.asarray(w[k]) for k in ("w_ih", "w_hh", "b_ih", "b_hh"))
            xt = make_inputs(req["T"], req["B"], req["input_size"], req["seed"], torch_dev)
            check = input_checksum(xt)
            if not np.allclose(check[0], req["x_check"][0], rtol=1e-9, atol=1e-6) or check[1] != req["x_check"][1]:
                raise RuntimeError(f"inputs differ between the processes: {check} vs {req['x_check']}")
            try:
                x = jax.dlpack.from_dlpack(xt)
                zero_copy = True
            except Exception:  # noqa: BLE001
                x = jnp.asarray(xt.cpu().numpy())
                zero_copy = False
            cache.update(key=key, p=p, x=x, xt=xt, zero_copy=zero_copy,
                         h0=jnp.zeros((req["B"], req["D"]), jnp.float32))
        return cache

    def run(req):
        c = problem(req)
        x, h0, p = c["x"], c["h0"], c["p"]
        solver = req["solver"]
        deadline = time.perf_counter() + req["budget_s"]
        out = {"solver": solver, "dlpack": c["zero_copy"]}
        if solver == "deer" and deer is None:
            return {"solver": solver, "error": "DEER not importable: " + info.get("deer_error", "?")}
        fn = scan_fn if solver == "scan" else deer_fn_of(gru)
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(h0, x, p).compile()
        out["compile_s"] = time.perf_counter() - t0
        box = {}

        def call():
            box.clear()
            box["r"] = jax.block_until_ready(compiled(h0, x, p))

        out.update(time_calls(call, req["repeats"], req["max_call_s"], deadline))
        traj = box["r"] if solver == "scan" else box["r"][0]
        if solver == "deer":
            out["converged"] = bool(box["r"][1])
        box.clear()
        idx = jnp.asarray(np.asarray(req["idx"], dtype=np.int32))
        np.save(req["samples_out"], np.asarray(traj[idx]))
        out["finite"] = bool(jnp.all(jnp.isfinite(traj)))
        if solver == "scan":
            if req.get("keep_scan"):
                c["scan"] = traj
        else:
            ref = c.get("scan")
            if ref is not None:
                out["vs_scan_max_rel_diff"] = float(jnp.max(jnp.abs(traj - ref))
                                                    / jnp.maximum(1.0, jnp.max(jnp.abs(ref))))
            del traj
            c.pop("scan", None)
            if req.get("count_iterations") and out["median_s"] <= req["count_max_s"] and time.perf_counter() < deadline:
                out["iterations"] = count_deer_iterations(req, x, h0, p)
        return out

    def count_deer_iterations(req, x, h0, p):
        """Host callbacks per cell evaluation: 2 per DEER iteration (its Jacobian and its f), calibrated on
        a 1-iteration run of a tiny problem; the count of the full run divided by that."""
        DEERMethod = deer[1]
        tiny = deer_fn_of(counting_gru, DEERMethod(max_iter=1))
        calls[0] = 0
        jax.block_until_ready(jax.jit(tiny)(h0[:1], x[:8, :1], p))
        jax.effects_barrier()
        per_iter = calls[0]
        calls[0] = 0
        jax.block_until_ready(jax.jit(deer_fn_of(counting_gru))(h0, x, p))
        jax.effects_barrier()
        return calls[0] // per_iter if per_iter else None

    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            res = run(req)
        except Exception as e:  # noqa: BLE001
            res = {"solver": req.get("solver"), "error": describe_error(e), "oom": is_oom(e)}
            cache.clear()
        try:
            stats = dev.memory_stats() or {}
            res["jax_pool_bytes"] = stats.get("pool_bytes", stats.get("bytes_reserved"))
            res["jax_peak_bytes"] = stats.get("peak_bytes_in_use")
        except Exception:  # noqa: BLE001
            pass
        send(res)
    return 0


class JaxWorker:
    """The JAX helper process, started on first use and again after an error or a timeout."""

    def __init__(self, a):
        self.a, self.proc, self.info, self.fatal, self._buf = a, None, None, None, b""
        self.unavailable = False  # set when the process could not start: not tried again

    def _argv(self):
        a = self.a
        argv = [a.jax_python or sys.executable, os.path.abspath(__file__), "--worker", "--deer-path", a.deer_path,
                "--jax-matmul-precision", a.jax_matmul_precision or ""]
        if a.deer_site:
            argv += ["--deer-site", a.deer_site]
        if not a.jax_x64:
            argv.append("--no-jax-x64")
        return argv

    def start(self):
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        env["PYTHONPATH"] = os.pathsep.join([common.ROOT, os.path.dirname(os.path.abspath(__file__))]
                                            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self._buf = b""
        self.proc = subprocess.Popen(self._argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        t0 = time.perf_counter()
        msg = self._read(self.a.worker_start_s)
        self.start_s = time.perf_counter() - t0
        if msg is None or "fatal" in msg or not msg.get("ready"):
            self.fatal = (msg or {}).get("fatal") or "JAX helper process did not start"
            self.unavailable = True
            self.stop(kill=True)
            return False
        self.info = msg["info"]
        return True

    def _read(self, timeout):
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(PROTO):
                    return json.loads(text[len(PROTO):])
                print(text, flush=True)
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None  # EOF: the process ended
                self._buf += chunk

    def request(self, req, timeout):
        if self.unavailable or (self.proc is None and not self.start()):
            return {"error": f"JAX helper unavailable: {self.fatal}", "unavailable": True}
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as e:
            self.stop()
            return {"error": f"JAX helper died: {e}"}
        res = self._read(timeout)
        if res is None:
            code = self.proc.poll()
            self.stop(kill=True)
            return {"error": f"timeout after {timeout:.0f} s (killed)" if code is None else
                    f"JAX helper died (exit code {code}; out of memory or a crash)", "timeout": code is None}
        if "error" in res:
            self.stop()  # a clean process (and memory pool) for what follows
        elif (res.get("jax_pool_bytes") or 0) > self.a.worker_max_pool_gb * 2**30:
            self.stop()
        return res

    def stop(self, kill=False):
        p, self.proc = self.proc, None
        if p is None:
            return
        try:
            if kill:
                raise TimeoutError
            p.stdin.close()  # the helper's loop ends at EOF
            p.wait(timeout=20)
        except Exception:  # noqa: BLE001
            p.kill()  # our own child, by its handle
            p.wait()


# ----------------------------------------------------------------------------------------------
# The driver (torch side)
# ----------------------------------------------------------------------------------------------

def parse_list(text, conv):
    return [conv(x) for x in str(text).split(",") if x.strip()]


def parse_extra(text):
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"--extra {text!r}: expected D:T:B or D:T:B:solver+solver")
    D, T, B = int(parts[0]), parse_count(parts[1]), int(parts[2])
    solvers = parts[3].split("+") if len(parts) == 4 else None
    return D, T, B, solvers


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default=None, help="state sizes D, input size = D (default 1,4,16,64; --quick: 1,4)")
    p.add_argument("--steps", default=None, help="sequence lengths T (default 100k,1M; --quick: 300,2000)")
    p.add_argument("--batch", default=None, help="batch sizes B, comma-separated (default 16; --quick: 4)")
    p.add_argument("--extra", action="append", default=None,
                   help="extra configuration D:T:B[:solver+solver] (repeatable); default 64:1M:8 with "
                        "seqpar-diag, seqpar-dense, deer and cudnn (the cuDNN target at D=64, B=8); 'none': no extra")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up (default 3; --quick: 1)")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="override a seqpar module constant first (benchmarks/common.apply_sets)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, in turn (seqpar, then DEER, then the next "
                        "configuration, then again): each *_ms is the median of the rounds' medians, so a slow "
                        "spell of the machine does not fall on one solver only")
    p.add_argument("--max-call-s", type=float, default=15.0,
                   help="skip a solver predicted above this per call; a warm-up above it is the only timed call")
    p.add_argument("--max-total-s", type=float, default=480.0, help="launch no new work after this many seconds")
    p.add_argument("--compile-allow-s", type=float, default=90.0, help="JAX compile time allowed per request")
    p.add_argument("--dense-max-d", type=int, default=64, help="exact dense Newton (seqpar) only up to this D")
    p.add_argument("--init", choices=["flax", "torch"], default="flax")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seqpar-fallback", default="none", choices=["none", "sequential"])
    p.add_argument("--reference", choices=["cudnn64", "cudnn", "none"], default="cudnn64",
                   help="trajectory the agreement columns compare with (cudnn64: float64 torch.nn.GRU)")
    p.add_argument("--samples", type=int, default=None,
                   help="steps of the JAX trajectories compared with the reference (default 4096; --quick: 256)")
    p.add_argument("--deer-path", default=None, help="DEER checkout (default $DEER_PATH, else peers/deer)")
    p.add_argument("--deer-site", default=None,
                   help="folder(s) of unpacked pure-Python wheels for DEER (equinox, ...), default $DEER_SITE")
    p.add_argument("--deer-probe-s", type=float, default=60.0,
                   help="DEER predicted above --max-call-s: run it this long anyway (compile included) to see "
                        "whether it runs out of memory, as it does at large D*T; 0: just skip")
    p.add_argument("--deer-count-max-s", type=float, default=2.0,
                   help="count DEER's iterations (one extra untimed run) where its call is under this")
    p.add_argument("--jax-python", default=None, help="Python for the JAX process (default: this one)")
    p.add_argument("--jax-x64", action=argparse.BooleanOptionalAction, default=True,
                   help="jax_enable_x64, as DEER's benchmark sets it (arrays stay float32)")
    p.add_argument("--jax-matmul-precision", default="highest",
                   help="jax_default_matmul_precision (default 'highest': true fp32; with JAX's default TF32-like "
                        "matmuls DEER's fixed-point test stalls at float32 (48 iterations at D=4, T=100k on an "
                        "H200, run 20), which would make the comparison unfair to DEER); '' for JAX's default")
    p.add_argument("--worker-start-s", type=float, default=180.0)
    p.add_argument("--worker-max-pool-gb", type=float, default=24.0,
                   help="restart the JAX process when its memory pool grew beyond this")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized sweep (smoke test)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/vs_deer.json, or $OUT)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


class Estimates:
    """Seconds per (step x sequence) of each solver, from what ran, and the smallest T*B out of memory."""

    def __init__(self):
        self.per_step = {}  # (solver, D) -> s per T*B
        self.oom = {}       # (solver, D) -> smallest T*B that ran out of memory
        self.timeouts = {}  # (solver, D) -> smallest T*B that was killed for time

    def record(self, solver, D, T, B, seconds):
        self.per_step[(solver, D)] = seconds / (T * B)

    def record_oom(self, solver, D, T, B):
        self.oom[(solver, D)] = min(self.oom.get((solver, D), math.inf), T * B)

    def record_timeout(self, solver, D, T, B):
        self.timeouts[(solver, D)] = min(self.timeouts.get((solver, D), math.inf), T * B)

    def timeout_at(self, solver, D, T, B):
        n = self.timeouts.get((solver, D))
        return n is not None and T * B >= n

    def predict(self, solver, D, T, B):
        s = self.per_step.get((solver, D))
        if s is not None:
            return s * T * B
        if solver in ("seqpar-dense", "deer"):  # D^3 per step: from the largest smaller D measured
            smaller = [d for (sv, d) in self.per_step if sv == solver and d < D]
            if smaller:
                d = max(smaller)
                return self.per_step[(solver, d)] * T * B * (D / d) ** 3
        return None

    def oom_at(self, solver, D, T, B):
        n = self.oom.get((solver, D))
        return n is not None and T * B >= n


def configs_of(a, dims, Ts, batches, solvers):
    out = []
    for D, T, B, sv in a.extras:  # first: cheap, and the cuDNN target at D=64, B=8 must not fall to the budget
        out.append((D, T, B, [s for s in (sv or solvers) if s in solvers]))
    for T in sorted(Ts):  # all shorter sequences first: a spent budget loses the longest runs
        for D in dims:
            for B in batches:
                out.append((D, T, B, list(solvers)))
    return out


def source_hash(deer_path):
    h = hashlib.sha256()
    pkg = os.path.join(deer_path, "deer")
    if not os.path.isdir(pkg):
        return None
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            with open(os.path.join(pkg, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def deer_commit(deer_path):
    for name in ("DEER_COMMIT",):
        f = os.path.join(deer_path, name)
        if os.path.isfile(f):
            return open(f).read().strip()
    try:
        return subprocess.run(["git", "-C", deer_path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    a.deer_path = a.deer_path or os.environ.get("DEER_PATH") or os.path.join(common.ROOT, "peers", "deer")
    a.deer_site = a.deer_site or os.environ.get("DEER_SITE") or None
    if a.worker:
        return worker_main(a)
    defaults = dict(dims="1,4,16,64", steps="100k,1M", batch="16", repeats=3, samples=4096)
    if a.quick:
        defaults = dict(dims="1,4", steps="300,2000", batch="4", repeats=1, samples=256)
        a.max_total_s = min(a.max_total_s, 300.0)
        a.extra = a.extra or []
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    try:
        Ts = parse_list(a.steps, parse_count)
        dims = parse_list(a.dims, int)
        batches = parse_list(a.batch, int)
        a.extras = [parse_extra(e) for e in (a.extra if a.extra is not None else
                                              ["64:1M:8:seqpar-diag+seqpar-dense+deer+cudnn"]) if e != "none"]
    except ValueError as e:
        p.error(str(e))
    solvers = parse_list(a.solvers, str)
    bad = [s for s in solvers + [s for e in a.extras for s in (e[3] or [])] if s not in SOLVERS]
    if bad:
        p.error(f"unknown solver(s) {bad}; choose from {','.join(SOLVERS)}")
    if any(v < 1 for v in Ts + dims + batches) or a.repeats < 1 or a.rounds < 1:
        p.error("--steps, --dims, --batch, --repeats and --rounds must be positive")

    t_start = time.perf_counter()
    deadline = t_start + a.max_total_s
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def free():
        sync()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    import seqpar

    common.apply_sets(a.set)
    env = env_info()
    env.update(deer_path=os.path.abspath(a.deer_path), deer_commit=deer_commit(a.deer_path),
               deer_source_sha256=source_hash(a.deer_path), deer_site=a.deer_site,
               cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
               torch_matmul_precision=torch.get_float32_matmul_precision())
    try:
        import importlib.metadata as md
        env["jax_installed"] = md.version("jax")
    except Exception:  # noqa: BLE001
        env["jax_installed"] = None
    out_file = a.out or out_path("vs_deer.json")
    rows = []
    est = Estimates()
    worker = JaxWorker(a)
    tmp = tempfile.mkdtemp(prefix="vs_deer_")
    print(f"bench_vs_deer: device={gpu} torch={torch.__version__} B={batches} init={a.init} solvers={solvers} "
          f"deer={a.deer_path} budget={a.max_total_s:.0f}s", flush=True)

    def save():
        note = []
        if worker.info:
            env["jax_process"] = worker.info
            if "deer_error" in worker.info:
                note.append(f"DEER import failed: {worker.info['deer_error']}.")
            elif worker.info.get("deer_import", "").startswith("deer.fseq1d only"):
                note.append("DEER's package __init__ could not be imported (optimistix missing): only deer.fseq1d "
                            "(seq1d, all that is used here) was loaded.")
            if worker.info.get("deer_jax_shims"):
                note.append(f"JAX lacked private helpers DEER uses; shims added: {worker.info['deer_jax_shims']}.")
        elif worker.fatal:
            env["jax_process"] = {"fatal": worker.fatal}
            note.append(f"The JAX process could not start ({worker.fatal}).")
        if "deer" in solvers and rows and not any(r.get("deer_ms") is not None for r in rows):
            note.append("DEER could not be run here (see deer_error); deer_reference_ms holds DEER's numbers quoted "
                        "in issue 10 (H200), the reference for this table.")
        write_json(out_file, {"env": env, "args": {k: v for k, v in vars(a).items() if k != "extras"},
                              "note": " ".join(note), "deer_reference_h200_ms": {f"{d}:{t}": v for (d, t), v in
                                                                                   DEER_REFERENCE_H200.items()},
                              "rows": rows})

    try:
        for rnd, (D, T, B, cfg_solvers) in [(r, c) for r in range(a.rounds) for c in configs_of(a, dims, Ts, batches,
                                                                                             solvers)]:
            res = run_config(a, seqpar, D, T, B, cfg_solvers, dev, est, worker, tmp, deadline, sync, free)
            res["gpu"] = gpu
            jac_rows = [j for j in ("dense", "diag") if f"seqpar-{j}" in cfg_solvers] or [None]
            for jac in jac_rows:
                row = dict(D=D, T=T, B=B, jacobian=jac, gpu=gpu)
                sp = res.get(f"seqpar-{jac}", {}) if jac else {}
                row.update(seqpar_ms=sp.get("ms"), seqpar_times_ms=sp.get("times_ms"),
                           seqpar_solve_wall_ms=sp.get("solve_wall_ms"),
                           seqpar_warmup_only=sp.get("warmup_only"), seqpar_error=sp.get("error"),
                           seqpar_skipped=sp.get("skipped"), iterations=sp.get("iterations"),
                           converged=sp.get("converged"), residual=sp.get("residual"), fallback=sp.get("fallback"),
                           seqpar_max_rel_diff=sp.get("max_rel_diff"))
                dr, sc, cu = res.get("deer", {}), res.get("scan", {}), res.get("cudnn", {})
                row.update(deer_ms=dr.get("ms"), deer_times_ms=dr.get("times_ms"),
                           deer_warmup_only=dr.get("warmup_only"),
                           deer_error=dr.get("error") or dr.get("skipped"), deer_compile_s=dr.get("compile_s"),
                           deer_iterations=dr.get("iterations"), deer_converged=dr.get("converged"),
                           deer_max_rel_diff=dr.get("max_rel_diff"),
                           deer_vs_scan_max_rel_diff=dr.get("vs_scan_max_rel_diff"),
                           sequential_ms=sc.get("ms"), sequential_times_ms=sc.get("times_ms"),
                           sequential_warmup_only=sc.get("warmup_only"),
                           sequential_error=sc.get("error") or sc.get("skipped"),
                           sequential_compile_s=sc.get("compile_s"),
                           sequential_max_rel_diff=sc.get("max_rel_diff"),
                           cudnn_ms=cu.get("ms"), cudnn_times_ms=cu.get("times_ms"),
                           cudnn_error=cu.get("error") or cu.get("skipped"), cudnn_max_rel_diff=cu.get("max_rel_diff"),
                           reference=res.get("reference"), jax_samples=res.get("samples"),
                           deer_reference_ms=DEER_REFERENCE_H200.get((D, T)) if B == 16 else None,
                           sequential_reference_ms=SCAN_REFERENCE_H200.get((D, T)) if B == 16 else None)
                row = merge_round(rows, row, rnd)
                for name, col in (("deer", "deer_ms"), ("cudnn", "cudnn_ms"), ("sequential", "sequential_ms")):
                    row[f"speedup_vs_{name}"] = (row[col] / row["seqpar_ms"]
                                                 if row.get(col) and row.get("seqpar_ms") else None)
                print(("" if a.rounds == 1 else f"round {rnd + 1}/{a.rounds}: ") + _line(row), flush=True)
            save()
    finally:
        worker.stop()
    save()
    return 0


TIMED = ("seqpar", "deer", "sequential", "cudnn")


def merge_round(rows: list, row: dict, rnd: int) -> dict:
    """Add ``row`` (one round of one configuration) to ``rows``: the first round appends it; later rounds
    fold into the row of the same (D, T, B, jacobian): ``<solver>_round_ms`` lists each round's median,
    ``<solver>_ms`` becomes their median, ``<solver>_times_ms`` holds every timed call.  Returns the row."""
    for k in TIMED:
        row[f"{k}_round_ms"] = [row[f"{k}_ms"]] if row.get(f"{k}_ms") is not None else []
    old = next((r for r in rows if rnd > 0 and all(r[k] == row[k] for k in ("D", "T", "B", "jacobian"))), None)
    if old is None:
        rows.append(row)
        return row
    for k in TIMED:
        if row.get(f"{k}_ms") is None:
            continue
        old[f"{k}_round_ms"].append(row[f"{k}_ms"])
        old[f"{k}_ms"] = statistics.median(old[f"{k}_round_ms"])
        old[f"{k}_times_ms"] = (old.get(f"{k}_times_ms") or []) + (row.get(f"{k}_times_ms") or [])
    return old


def run_config(a, seqpar, D, T, B, solvers, dev, est, worker, tmp, deadline, sync, free):
    """All solvers on one (D, T, B): torch ones here, JAX ones in the helper process."""
    res = {}
    I = D
    now = time.perf_counter

    def skip_reason(solver, probe=False):
        """Why ``solver`` is not run here (None: run it).  With ``probe``, a prediction above --max-call-s is no
        reason (DEER: a short run shows whether it runs out of memory)."""
        if now() > deadline:
            return "skipped: --max-total-s spent"
        if solver == "seqpar-dense" and D > a.dense_max_d:
            return f"skipped: D={D} > --dense-max-d={a.dense_max_d} (exact dense Newton costs O(D^3) per step)"
        if est.oom_at(solver, D, T, B):
            return "out of memory (not run: a smaller T*B ran out of memory)"
        if est.timeout_at(solver, D, T, B):
            return "skipped: a smaller T*B did not finish in time"
        e = est.predict(solver, D, T, B)
        if e is not None and e > a.max_call_s and not probe:
            return f"skipped: predicted {e:.1f} s per call > --max-call-s"
        if e is not None and e <= a.max_call_s and now() + e * (1 + a.repeats) > deadline:
            return f"skipped: predicted {e * (1 + a.repeats):.0f} s > what is left of --max-total-s"
        return None

    def report(solver, r):
        bits = [f"{r['ms']:.2f} ms" if r.get("ms") is not None else (r.get("error") or r.get("skipped") or "-")]
        for k in ("iterations", "max_rel_diff", "compile_s", "solve_wall_ms"):
            if r.get(k) is not None:
                bits.append(f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}")
        print(f"  D={D} T={T:,} B={B} {solver:12s} " + " ".join(bits), flush=True)

    weights = make_weights(D, I, a.init, a.seed)
    wpath = os.path.join(tmp, f"w_{D}_{a.init}_{a.seed}.npz")
    np.savez(wpath, **weights)
    m = torch.nn.GRU(I, D).to(dev)
    with torch.no_grad():
        for name, key in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"), ("bias_ih_l0", "b_ih"),
                          ("bias_hh_l0", "b_hh")):
            getattr(m, name).copy_(torch.from_numpy(weights[key]))
    x = make_inputs(T, B, I, a.seed, dev)
    x_check = input_checksum(x)
    h0 = torch.zeros(B, D, device=dev)
    idx = sample_index(T, a.samples)
    res["samples"] = len(idx)

    def gru_run(mod, xx, out):
        h = torch.zeros(1, B, D, device=dev, dtype=xx.dtype)
        for s in range(0, T, CUDNN_MAX_CALL):
            y, h = mod(xx[s:s + CUDNN_MAX_CALL], h)
            out[s:s + CUDNN_MAX_CALL].copy_(y)
        return out

    ref = None
    with torch.no_grad():
        if a.reference != "none" and now() < deadline:
            try:
                t0 = now()
                if a.reference == "cudnn64":
                    m64 = torch.nn.GRU(I, D).to(dev, torch.float64)
                    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
                    ref = gru_run(m64, x.double(), torch.empty(T, B, D, device=dev, dtype=torch.float64))
                    del m64
                else:
                    ref = gru_run(m, x, torch.empty(T, B, D, device=dev))
                sync()
                res["reference"] = f"{'float64' if a.reference == 'cudnn64' else 'float32'} torch.nn.GRU " \
                                   f"({'cuDNN' if dev.type == 'cuda' else 'CPU'}), {now() - t0:.2f} s"
            except Exception as e:  # noqa: BLE001
                ref = None
                res["reference"] = f"none ({describe_error(e)})"
                free()
        free()

        # --- torch solvers ---
        for solver in [s for s in ("cudnn", "seqpar-dense", "seqpar-diag") if s in solvers]:
            r = res[solver] = {}
            why = skip_reason(solver)
            if why:
                r["skipped" if not why.startswith("out of memory") else "error"] = why
                report(solver, r)
                continue
            box = {}
            try:
                if solver == "cudnn":
                    box["out"] = torch.empty(T, B, D, device=dev)

                    def call():
                        gru_run(m, x, box["out"])
                        sync()
                else:
                    cell = seqpar.GRU.from_torch(m)
                    jac = solver.split("-")[1]

                    walls = box["walls"] = []

                    def call():
                        box.pop("out", None)
                        box["out"], box["info"] = seqpar.solve(cell, x, h0, jacobian=jac, return_info=True,
                                                               fallback=a.seqpar_fallback)
                        sync()
                        walls.append(box["info"].wall_time_s)
                t = time_calls(call, a.repeats, a.max_call_s, deadline)
                est.record(solver, D, T, B, t["median_s"])
                r.update(ms=t["median_s"] * 1e3, times_ms=[v * 1e3 for v in t["times_s"]], warmup_only=t["warmup_only"])
                info = box.get("info")
                if info is not None:
                    # the timed calls' own account (solve's entry to its return, host clock, no sync after):
                    # where it is far below ms, the time went outside seqpar.solve
                    r.update(iterations=info.iterations, converged=info.converged, residual=info.residual,
                             fallback=info.fallback,
                             solve_wall_ms=statistics.median(box["walls"][-len(t["times_s"]):]) * 1e3)
                if ref is not None:
                    r["max_rel_diff"] = max_rel_diff(box["out"], ref)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                r["error"] = describe_error(e)
                est.record_oom(solver, D, T, B)
            box.clear()
            free()
            report(solver, r)

    ref_samples = ref[idx].cpu().double() if ref is not None else None
    ref = x = None  # free the GPU for the JAX process
    free()

    # --- JAX solvers (helper process) ---
    jax_solvers = [s for s in JAX_SOLVERS if s in solvers]
    for solver in jax_solvers:
        r = res[solver] = {}
        why = skip_reason(solver)
        probe = None
        if (why and why.startswith("skipped: predicted") and "per call" in why and solver == "deer"
                and a.deer_probe_s > 0 and skip_reason(solver, probe=True) is None
                and now() + a.deer_probe_s < deadline):
            probe, why = why[len("skipped: "):], None  # DEER's failure is memory: a short run shows it
        if why:
            r["skipped" if not why.startswith("out of memory") else "error"] = why
            report(solver, r)
            continue
        samples_out = os.path.join(tmp, f"samples_{solver}.npy")
        if os.path.exists(samples_out):
            os.remove(samples_out)
        left = deadline - now()
        timeout = min(a.compile_allow_s + a.max_call_s * (2 + a.repeats) + 30, left + 60)
        if probe:
            timeout = a.deer_probe_s
            print(f"  D={D} T={T:,} B={B} {solver:12s} {probe}: probing for {timeout:.0f} s (out of memory?)",
                  flush=True)
        req = dict(solver=solver, D=D, T=T, B=B, input_size=I, seed=a.seed, weights=wpath, x_check=x_check,
                   idx=idx, samples_out=samples_out, repeats=a.repeats, max_call_s=a.max_call_s,
                   budget_s=max(left, 1.0), keep_scan="deer" in jax_solvers,
                   count_iterations=solver == "deer", count_max_s=a.deer_count_max_s)
        got = worker.request(req, timeout)
        if "error" in got:
            r["error"] = got["error"]
            if got.get("oom") or "out of memory" in got["error"] or "died" in got["error"]:
                est.record_oom(solver, D, T, B)
            if got.get("timeout"):
                est.record_timeout(solver, D, T, B)
                if probe:
                    r["error"] = f"skipped: {probe}; a {timeout:.0f} s probe (compile included) ran without failing"
        else:
            est.record(solver, D, T, B, got["median_s"])
            r.update(ms=got["median_s"] * 1e3, times_ms=[v * 1e3 for v in got["times_s"]],
                     warmup_only=got["warmup_only"], compile_s=got.get("compile_s"),
                     iterations=got.get("iterations"), converged=got.get("converged"),
                     vs_scan_max_rel_diff=got.get("vs_scan_max_rel_diff"), finite=got.get("finite"))
            if ref_samples is not None and os.path.exists(samples_out):
                s = torch.from_numpy(np.load(samples_out)).double()
                r["max_rel_diff"] = float((s - ref_samples).abs().max() / max(1.0, float(ref_samples.abs().max())))
        report(solver, r)
    return res


def _fmt_ms(v, err=None):
    if v is None:
        if not err:
            return "-"
        return "OOM" if "out of memory" in err else ("skipped" if err.startswith("skipped") else "error")
    return f"{v / 1e3:.2f} s" if v >= 1e4 else f"{v:.2f} ms"


def _line(row):
    jac = row["jacobian"] or "-"
    it = f" it={row['iterations']}" if row.get("iterations") is not None else ""
    diff = f" diff={row['seqpar_max_rel_diff']:.1e}" if row.get("seqpar_max_rel_diff") is not None else ""
    dit = f" it={row['deer_iterations']}" if row.get("deer_iterations") is not None else ""
    return (f"D={row['D']:3d} T={row['T']:>9,d} B={row['B']:2d} {jac:5s} "
            f"seqpar {_fmt_ms(row['seqpar_ms'], row.get('seqpar_error') or row.get('seqpar_skipped')):>10s}"
            f"{it}{diff} | "
            f"DEER {_fmt_ms(row['deer_ms'], row.get('deer_error')):>10s}{dit} | "
            f"lax.scan {_fmt_ms(row['sequential_ms'], row.get('sequential_error')):>10s} | "
            f"cuDNN {_fmt_ms(row['cudnn_ms'], row.get('cudnn_error')):>10s}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    if "--worker" not in sys.argv:
        print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)
    raise SystemExit(rc)
