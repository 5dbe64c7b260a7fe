"""The device-side stopping rule (seqpar/kernels/stopping.py) against the host's (newton._Stopping).

Random residual sequences (decaying, stalling, growing, NaN / inf, values at and next to the tolerance
in float32) go through the kernel (interpreted on CPU, compiled under ``-m gpu``), through its Python
reference and through ``_Stopping.record``: the same residual history, the same stopping iterate and the
same converged flag.  A guarded pipelined pass (``stop=``) leaves its output untouched once stopped.
"""
import math
import os

import pytest
import torch

pytest.importorskip("triton")

from seqpar.kernels import stopping  # noqa: E402
from seqpar.newton import NewtonOptions, SolveInfo, _Stopping  # noqa: E402
from seqpar.structure import DIAG  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICES = ["cpu"] if INTERPRET else []
if CUDA and not INTERPRET:
    DEVICES.append(pytest.param("cuda", marks=pytest.mark.gpu))


def _sequences(gen: torch.Generator, tol: float):
    """Residual sequences (float32 values) exercising every branch of the rule."""
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    yield [0.9, 0.2, 0.01, 1e-4, 3e-6]                                   # converges
    yield [0.5] * 30                                                      # stalls: patience
    yield [0.5 * 1.5 ** i for i in range(30)]                             # grows
    yield [0.9, 0.3, math.nan, 0.1]                                       # NaN stops
    yield [0.9, math.inf, 0.1]                                            # inf stops
    yield [math.nan]                                                      # at the first iterate
    yield [0.9, f32(tol), 0.1]                                            # float32(tol) vs tol
    yield [0.9, math.nextafter(f32(tol), 1.0), f32(tol) * 0.5]
    yield [0.4, 0.3, 0.25, 0.19, 0.1, 0.09, 0.06, 0.049, 0.04, 0.03, 0.02]   # halving, slowly
    for _ in range(6):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        yield [f32(v) for v in (torch.rand(n, generator=gen) ** 3).tolist()]


def _host(seq, tol, max_iter, patience):
    info = SolveInfo(converged=False, iterations=0, residual=math.nan)
    rule = _Stopping(NewtonOptions(structure=DIAG, tol=tol, max_iter=max_iter, patience=patience), info)
    for k, r in enumerate(seq):
        if rule.record(k, float(torch.tensor(r, dtype=torch.float32))):
            return info.residuals, True, info.converged
    return info.residuals, False, info.converged


@pytest.mark.skipif(not DEVICES, reason="interpreted kernels (TRITON_INTERPRET=1) or a GPU")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tol,max_iter,patience", [(4e-6, 50, 10), (1e-3, 7, 3), (4e-6, 0, 10), (0.2, 100, 1)])
def test_device_rule_stops_where_the_host_rule_stops(device, tol, max_iter, patience):
    gen = torch.Generator().manual_seed(int(tol * 1e6) + max_iter + patience)
    for seq in _sequences(gen, tol):
        want, want_stop, want_conv = _host(seq, tol, max_iter, patience)
        state = stopping.new_state(device, tol, max_iter, patience)
        ref = stopping.new_state("cpu", tol, max_iter, patience)
        for r in seq:
            res = torch.tensor([r, 0.0], dtype=torch.float32, device=device)
            stopping.record(res, state)
            stopping.record_reference(ref, float(res[0]))
        values = state.tolist()
        assert values[:stopping.STATE_SIZE] == ref[:stopping.STATE_SIZE].tolist()
        got = stopping.recorded(values, 0)
        assert len(got) == len(want) and all(g == w or (math.isnan(g) and math.isnan(w)) for g, w in zip(got, want))
        assert bool(values[stopping.STOPPED]) == want_stop
        assert bool(values[stopping.CONVERGED]) == want_conv


@pytest.mark.skipif(not DEVICES, reason="interpreted kernels (TRITON_INTERPRET=1) or a GPU")
@pytest.mark.parametrize("device", DEVICES)
def test_history_is_circular(device):
    state = stopping.new_state(device, 1e-30, 10**6, 10**6)
    n = stopping.HISTORY + 5
    for i in range(n):
        stopping.record(torch.tensor([1.0 / (i + 1)], device=device), state)
    values = state.tolist()
    assert int(values[stopping.ITER]) == n and not values[stopping.STOPPED]
    got = stopping.recorded(values, n - stopping.HISTORY)
    assert got == [float(torch.tensor(1.0 / (i + 1))) for i in range(n - stopping.HISTORY, n)]


@pytest.mark.skipif(not DEVICES, reason="interpreted kernels (TRITON_INTERPRET=1) or a GPU")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [1, 3])
def test_guarded_passes_do_nothing_once_stopped(device, D):
    from seqpar.cells import GRU

    torch.manual_seed(D)
    T, B = 37, 2
    cell = GRU(D, D).to(device)
    xp = cell.project_inputs(torch.randn(T, B, D, device=device))
    pipe = cell.pipelined_newton(cell.structure, xp)
    h = torch.randn(T, B, D, device=device) * 0.1
    h0 = torch.zeros(B, D, device=device)
    for stopped in (False, True):
        state = stopping.new_state(device, 4e-6, 50, 10)
        state[stopping.STOPPED] = float(stopped)
        first = pipe.first(h, h0, next_start=h0, stop=state)
        carries = first.carry if first.carry is not None else pipe.carries(first, h0)
        out = torch.full_like(h, 7.0)
        pipe.step(h, h0, first, carries, h0, out=out, next_start=h0, stop=state)
        if stopped:
            assert torch.equal(out, torch.full_like(h, 7.0))
        else:
            ref = pipe.step(h, h0, first, carries, h0, next_start=h0)
            assert torch.equal(out, ref.out)


@pytest.mark.skipif(not DEVICES, reason="interpreted kernels (TRITON_INTERPRET=1) or a GPU")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 7, stopping.RECORD_BLOCK, 2 * stopping.RECORD_BLOCK + 5])
def test_record_reduces_partials_like_amax(device, n):
    """A pass's per-program partials are reduced by the record itself: the largest, NaN if any is."""
    g = torch.Generator().manual_seed(n)
    for poison in (None, math.inf, math.nan):
        vals = torch.rand(n, generator=g)
        if poison is not None:
            vals[int(torch.randint(n, (1,), generator=g))] = poison
        state = stopping.new_state(device, 1e-30, 10, 10)
        stopping.record(vals.to(device), state)
        got = stopping.recorded(state.tolist(), 0)[0]
        want = float(vals.amax())
        assert got == want or (math.isnan(got) and math.isnan(want))


@pytest.mark.skipif(not DEVICES, reason="interpreted kernels (TRITON_INTERPRET=1) or a GPU")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype", [((3,), torch.float32), ((37, 2, 3), torch.float32),
                                         ((stopping.TAKE_BLOCK + 9, 1, 1), torch.float64)])
def test_take_final_copies_the_last_recorded_iterate_once_stopped(device, shape, dtype):
    """take_final against its reference: nothing before the state says stopped; then the iterate of the
    last record (even: h_even, odd: h_odd) in ``out``, and h_even zeroed when asked."""
    g = torch.Generator().manual_seed(len(shape))
    for records, stop in [(1, False), (1, True), (2, True), (3, True), (4, True), (5, False)]:
        for zero in (True, False):
            state = stopping.new_state("cpu", 1e-30, 10**6, 10**6)
            for _ in range(records):
                stopping.record_reference(state, 0.5)
            state[stopping.STOPPED] = float(stop)
            even, odd = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(2))
            out = torch.full(shape, 7.0, dtype=dtype)
            want = [t.clone() for t in (even, odd, out)]
            stopping.take_final_reference(state, *want, zero_even=zero)
            got = [t.clone().to(device) for t in (even, odd, out)]
            stopping.take_final(state.to(device), *got, zero_even=zero)
            for w, t in zip(want, got):
                assert torch.equal(t.cpu(), w)
            if stop:  # the reference itself: the right buffer
                assert torch.equal(want[2], (odd if (records - 1) % 2 else even))
                assert torch.equal(want[0], torch.zeros_like(even) if zero else even)
            else:
                assert torch.equal(want[2], torch.full(shape, 7.0, dtype=dtype))
