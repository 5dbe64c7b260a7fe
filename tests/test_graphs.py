"""CUDA-graph replay of one rank's Newton iterations (seqpar/graphs.py).

On CPU the graphs are replaced by an eager stand-in that reruns the captured function and copies
its outputs into the captured ones (what fixed addresses give a real graph), so the static
buffers, the ping-pong of iterates and the first/odd/even bookkeeping run here through the
interpreted kernels.  Every graphed solve is compared with the eager loop on the same inputs:
states, iterations and the residual history.  ``-m gpu`` repeats the comparison with real CUDA graphs.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

import seqpar  # noqa: E402
import seqpar.graphs as graphs  # noqa: E402
import seqpar.newton as newton  # noqa: E402
from seqpar.cells import GRU, DiagGRU  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class EagerGraph:
    """CPU stand-in for :class:`seqpar.graphs.CudaGraph`: replay reruns the function and copies its
    outputs into those of the capture."""

    replays = 0

    def __init__(self, pool):
        self.fn = self.out = None

    def capture(self, fn):
        self.fn, self.out = fn, fn()
        return self.out

    def replay(self):
        EagerGraph.replays += 1
        new = self.fn()
        if self.out is not None:
            graphs._copy_into(self.out if isinstance(self.out, tuple) else (self.out,),
                              new if isinstance(new, tuple) else (new,))


class FailingGraph(EagerGraph):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture
def cpu_graphs(monkeypatch):
    monkeypatch.setattr(graphs, "Graph", EagerGraph)
    monkeypatch.setattr(graphs, "new_pool", lambda: None)
    monkeypatch.setattr(graphs, "DEVICE_TYPES", ("cpu", "cuda"))
    monkeypatch.setattr(graphs, "CHAIN_MAX_FRACTION", 100.0)  # tiny test shapes: chain every first queue
    graphs.clear()
    EagerGraph.replays = 0
    yield
    graphs.clear()


def _solve(cell, x, enabled, **kw):
    old = graphs.ENABLED
    graphs.ENABLED = enabled
    try:
        log = []
        states, info = seqpar.solve(cell, x, backend="triton", return_info=True,
                                    callback=lambda it, r: log.append((it, r)), **kw)
    finally:
        graphs.ENABLED = old
    return states, info, log


def _assert_same(got, want):
    (s1, i1, l1), (s0, i0, l0) = got, want
    assert i1.converged == i0.converged and i1.iterations == i0.iterations
    assert [it for it, _ in l1] == [it for it, _ in l0]
    assert i1.residuals == pytest.approx(i0.residuals, rel=1e-6, abs=1e-9)
    assert torch.equal(s1, s0)


CASES = [  # cell, T, B, input size, jacobian, pipelined
    (lambda: DiagGRU(2, 3), 57, 2, 2, "diag", True),
    (lambda: DiagGRU(2, 3), 57, 2, 2, "diag", False),
    (lambda: GRU(1, 1), 40, 5, 1, "dense", True),   # one feature: the passes project the raw inputs
    (lambda: DiagGRU(1, 4), 23, 3, 1, "diag", True),
    (lambda: GRU(1, 1), 33, 3, 1, "dense", False),
    (lambda: GRU(2, 3), 29, 2, 2, "dense", True),   # small-D dense pipelined kernel
    (lambda: GRU(2, 3), 1, 1, 2, "diag", False),    # T = 1, B = 1
    (lambda: GRU(2, 12), 21, 2, 2, "diag", True),   # quasi-Newton, maps kept between passes (pipelined_quasi_gru)
    (lambda: GRU(2, 20), 21, 2, 2, "diag", True),   # the same, channels split: two maps buffers (_split_quasi)
]


def _split_quasi(monkeypatch):
    """The pipelined quasi-Newton kernel at widths 17 .. 32 with 16 channels per program (two per tile)."""
    from seqpar.kernels import pipelined_quasi_gru as pq

    monkeypatch.setitem(pq.TILES, 32, (16, 1, 16))



@pytest.mark.skipif(not INTERPRET, reason="interpreted kernels (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("make,T,B,I,jacobian,pipelined", CASES)
def test_graphed_solves_equal_eager(cpu_graphs, monkeypatch, make, T, B, I, jacobian, pipelined):
    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0 if pipelined else 10**9)
    _split_quasi(monkeypatch)
    torch.manual_seed(T + I)
    cell = make()
    for call in range(5):  # eager (seen), capture + replay, replays: fresh inputs every time; a guess at call 3
        x = torch.randn(T, B, I)
        guess = 0.1 * torch.randn(T, B, cell.hidden_size) if call == 3 else None
        got = _solve(cell, x, True, jacobian=jacobian, initial_guess=guess)
        _assert_same(got, _solve(cell, x, False, jacobian=jacobian, initial_guess=guess))
        assert got[1].converged
    loop = next(iter(graphs._graphs.values()))
    assert loop is not None and len(loop.graphs) == (3 if pipelined and T * B > 0 else 2)
    chained = any(c is not None for c in getattr(loop, "chains", {}).values())
    assert chained == (pipelined and T * B > 0)  # pipelined: the first queue is one chained graph
    assert EagerGraph.replays >= 3 * (1 if chained else got[1].iterations + 1)  # calls 1-3 replayed


@pytest.mark.skipif(not INTERPRET, reason="interpreted kernels (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("make,I,jacobian,chain,record", [(lambda: DiagGRU(2, 3), 2, "diag", True, False),
                                                          (lambda: GRU(2, 3), 2, "dense", True, False),
                                                          (lambda: DiagGRU(2, 3), 2, "diag", False, False),
                                                          (lambda: DiagGRU(2, 3), 2, "diag", True, True),
                                                          (lambda: GRU(1, 1), 1, "dense", False, True),
                                                          (lambda: GRU(2, 12), 2, "diag", False, False),
                                                          (lambda: GRU(2, 20), 2, "diag", True, False)])
def test_queued_iterations_stop_where_eager_stops(cpu_graphs, monkeypatch, make, I, jacobian, chain, record):
    """The pipelined graphs queue as many iterations as the previous solve took and stop on the device:
    solves of one key needing more, fewer and as many iterations (tolerance, max_iter, patience vary
    per call) give the eager loop's states, residual histories, callbacks and stopping iterate.  ``record``:
    the diagonal passes record their residuals in their last program (pipelined_diag_gru.RECORD_IN_PASS)."""
    from seqpar.kernels import pipelined_diag_gru as pk

    monkeypatch.setattr(pk, "RECORD_IN_PASS", record)
    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0)
    _split_quasi(monkeypatch)
    monkeypatch.setattr(graphs, "QUEUE_MORE", 1)
    if not chain:  # results too large for a chain: the single-pass graphs only
        monkeypatch.setattr(graphs, "CHAIN_MAX_FRACTION", 0.0)
    torch.manual_seed(5)
    cell = make()
    calls = [dict(), dict(), dict(tol=1e-1), dict(), dict(tol=3e-2, max_iter=1, fallback="none"), dict(tol=1e-5),
             dict(max_iter=0, fallback="none"), dict(tol=1e-3), dict()]
    counts = set()
    for kw in calls:
        x = torch.randn(47, 3, I) * 2
        got = _solve(cell, x, True, jacobian=jacobian, **kw)
        _assert_same(got, _solve(cell, x, False, jacobian=jacobian, **kw))
        counts.add(got[1].iterations)
    loop = next(iter(graphs._graphs.values()))
    assert loop is not None and loop.state is not None
    assert len(counts) >= 3  # the queue was too long and too short
    assert any(c is not None for c in loop.chains.values()) == chain  # first queues replayed as chained graphs
    assert all(r.recorded == record for r, _ in loop._handoff)  # the passes recorded themselves, or not


@pytest.mark.skipif(not INTERPRET, reason="interpreted kernels (TRITON_INTERPRET=1)")
def test_in_place_weight_change_is_not_replayed_stale(cpu_graphs, monkeypatch):
    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0)
    torch.manual_seed(1)
    cell = DiagGRU(2, 3)
    x = torch.randn(41, 2, 2)
    for _ in range(2):
        _solve(cell, x, True)
    assert list(graphs._graphs.values())[0] is not None
    with torch.no_grad():
        cell.weight_hh.mul_(0.5)  # an optimizer step: same storage, new version
    for _ in range(3):
        _assert_same(_solve(cell, x, True), _solve(cell, x, False))


@pytest.mark.skipif(not INTERPRET, reason="interpreted kernels (TRITON_INTERPRET=1)")
def test_unconverged_graphed_solve_is_reported_unconverged(cpu_graphs, monkeypatch):
    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0)
    torch.manual_seed(2)
    cell = GRU(1, 1)
    for _ in range(3):
        x = torch.randn(64, 4, 1) * 3
        got = _solve(cell, x, True, max_iter=1, fallback="none")
        want = _solve(cell, x, False, max_iter=1, fallback="none")
        _assert_same(got, want)
        assert not got[1].converged and got[1].residual > got[1].tol


@pytest.mark.skipif(not INTERPRET, reason="interpreted kernels (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("pipelined,I,D", [(True, 2, 3), (False, 2, 3), (True, 1, 1)])
def test_projection_inside_the_graphs(cpu_graphs, monkeypatch, pipelined, I, D):
    """The graphs project the inputs themselves (one feature, pipelined: the passes do, no projection graph):
    batch-first (strided) inputs, bfloat16 inputs, and an unconverged solve finished by the sequential
    fallback (which projects again) equal the eager solve."""
    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0 if pipelined else 10**9)
    torch.manual_seed(6)
    cell = GRU(I, D)
    for kw, dtype in ((dict(batch_first=True), torch.float32), (dict(), torch.bfloat16),
                      (dict(max_iter=1, fallback="sequential"), torch.float32)):
        graphs.clear()
        for _ in range(3):
            x = torch.randn(3, 31, I) if kw.get("batch_first") else torch.randn(31, 3, I)
            x = x.to(dtype)
            got = _solve(cell, x, True, jacobian="dense", **kw)
            _assert_same(got, _solve(cell, x, False, jacobian="dense", **kw))
        loop = next(iter(graphs._graphs.values()))
        raw = pipelined and I == 1
        assert loop is not None and (loop.project is None) == raw and (loop.xp is None) == raw
        assert got[1].converged and (got[1].fallback is not None) == ("fallback" in kw)


@pytest.mark.skipif(not INTERPRET, reason="interpreted kernels (TRITON_INTERPRET=1)")
def test_replayed_solve_checks_its_tensors_for_nan(cpu_graphs, monkeypatch):
    """A replayed solve's NaN / Inf check of inputs, h0 and initial_guess comes from the first graph's sums
    (no reduction of its own) and names the argument; a finite input whose sum overflows passes; the next
    clean solve replays and equals the eager one."""
    from seqpar.validation import PendingFinite

    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0)
    torch.manual_seed(7)
    cell = DiagGRU(2, 3)
    T, B = 40, 2
    for _ in range(2):  # seen, captured
        _solve(cell, torch.randn(T, B, 2), True)
    loop = next(iter(graphs._graphs.values()))
    assert loop is not None and loop.project is not None and loop.state is not None
    own = []
    call = PendingFinite.__call__
    monkeypatch.setattr(PendingFinite, "__call__", lambda self: own.append(1) or call(self))
    bad = torch.randn(T, B, 2)
    bad[17, 1, 0] = float("nan")
    h0_inf = torch.zeros(B, 3)
    h0_inf[1, 2] = -float("inf")
    guess = torch.zeros(T, B, 3)
    guess[T - 1, 0, 1] = float("nan")
    for name, x, kw in (("inputs", bad, {}), ("h0", torch.randn(T, B, 2), dict(h0=h0_inf)),
                        ("initial_guess", torch.randn(T, B, 2), dict(initial_guess=guess))):
        replays = EagerGraph.replays
        with pytest.raises(ValueError, match=f"^{name} contains NaN or Inf"):
            _solve(cell, x, True, **kw)
        assert EagerGraph.replays > replays  # it was the replayed loop that raised
    assert not own  # the graph's sums decided every time
    for x in (torch.full((T, B, 2), 3e38), torch.randn(T, B, 2)):  # finite (the first one's sum overflows)
        got = _solve(cell, x, True)
        assert not own
        _assert_same(got, _solve(cell, x, False))
        assert len(own) == 1  # the eager solve's check reduces on its own
        own.clear()


@pytest.mark.skipif(not INTERPRET, reason="interpreted kernels (TRITON_INTERPRET=1)")
def test_failed_capture_keeps_the_eager_loop(cpu_graphs, monkeypatch):
    monkeypatch.setattr(graphs, "Graph", FailingGraph)
    cell = DiagGRU(2, 3)
    x = torch.randn(30, 2, 2)
    for _ in range(3):
        _assert_same(_solve(cell, x, True), _solve(cell, x, False))
    assert list(graphs._graphs.values()) == [None]


def test_cpu_tensors_and_large_solves_are_never_graphed():
    graphs.clear()
    cell = DiagGRU(2, 3)
    opts = newton.NewtonOptions(structure=cell.structure, tol=1e-5, max_iter=5, backend="triton")
    xp, h0 = torch.zeros(10, 2, 9), torch.zeros(2, 3)
    for _ in range(3):
        assert graphs.graphed_loop(cell, cell.structure, xp, h0, opts, 10, False) is None  # CPU
    assert not graphs._seen and not graphs._graphs


def test_cache_keeps_the_most_recent_keys(cpu_graphs, monkeypatch):
    monkeypatch.setattr(graphs, "GraphedLoop", lambda *a, **k: object())
    cell = DiagGRU(2, 3)
    opts = newton.NewtonOptions(structure=cell.structure, tol=1e-5, max_iter=5, backend="triton")
    h0 = torch.zeros(2, 3)
    for T in (5, 6, 7):
        xp = torch.zeros(T, 2, 9)
        assert graphs.graphed_loop(cell, cell.structure, xp, h0, opts, 10, False) is None  # seen once
        assert graphs.graphed_loop(cell, cell.structure, xp, h0, opts, 10, False) is not None
    assert len(graphs._graphs) == graphs.GRAPH_CACHE_SIZE
    big = torch.zeros(graphs.GRAPH_MAX_ELEMENTS // 6 + 1, 2, 9)
    assert graphs.graphed_loop(cell, cell.structure, big, h0, opts, 10, False) is None
    assert graphs.graphed_loop(cell, cell.structure, big, h0, opts, 10, False) is None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("make,T,B,I,jacobian,pipelined", [
    (lambda: GRU(1, 1), 100_000, 16, 1, "dense", False), (lambda: GRU(4, 4), 100_000, 16, 4, "dense", True),
    (lambda: DiagGRU(4, 4), 100_003, 3, 4, "diag", True), (lambda: GRU(16, 16), 20_011, 4, 16, "diag", False),
])
def test_gpu_graphed_solves_equal_eager(monkeypatch, make, T, B, I, jacobian, pipelined):
    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0 if pipelined else 10**12)
    graphs.clear()
    torch.manual_seed(T)
    cell = make().cuda()
    for call in range(4):
        x = torch.randn(T, B, I, device="cuda")
        got = _solve(cell, x, True, jacobian=jacobian)
        _assert_same(got, _solve(cell, x, False, jacobian=jacobian))
        assert got[1].converged
    assert list(graphs._graphs.values())[0] is not None
    graphs.clear()


@pytest.mark.skipif(not INTERPRET, reason="interpreted kernels (TRITON_INTERPRET=1)")
def test_raw_input_loop_keeps_the_projected_loops_chain_budget(cpu_graphs, monkeypatch):
    """GRU(1, 1)'s passes project the raw inputs (no xp buffer); the chained first queue's memory budget is
    still that of the loop with projected inputs, so the same chains are captured (session 9's measurements)."""
    import seqpar.backend as backend

    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0)
    torch.manual_seed(8)
    cell = GRU(1, 1)
    x = torch.randn(40, 4, 1)
    budgets = {}
    for raw in (True, False):
        monkeypatch.setattr(backend, "PROJECT_IN_PASS", raw)
        graphs.clear()
        for _ in range(2):
            _solve(cell, x, True, jacobian="dense")
        loop = next(iter(graphs._graphs.values()))
        assert loop is not None and (loop.xp is None) == raw
        budgets[raw] = (loop._static_bytes, loop._pass_bytes)
    assert budgets[True] == budgets[False]
