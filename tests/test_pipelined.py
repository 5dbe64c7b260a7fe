"""The pipelined Newton pass (kernels/pipelined_diag_gru.py) and loop (seqpar/pipeline.py).

Kernel: ``first_pass`` / ``pipelined_step`` against the float64 reference
``pipelined_step_reference`` (DiagGRU step / jacobian + a sequential scan) on odd
shapes: T = 1, B = 1, runs that do not divide T, several unroll factors, no bias,
bfloat16 storage, NaN iterates.  Loop: ``seqpar.solve`` on the pipelined path
equals the reference loop (``seqpar.newton.PIPELINED = False``) and a float64
sequential evaluation, with the same iterations and residual history.  CPU runs
use TRITON_INTERPRET=1 on small shapes; ``-m gpu`` repeats the kernel check on
T = 100k and a full solve at T = 1M on the device (TRITON_INTERPRET=0 there).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

import seqpar  # noqa: E402
import seqpar.newton as newton  # noqa: E402
from seqpar.backend import pipelined_stepper  # noqa: E402
from seqpar.cells import GRU, DiagGRU  # noqa: E402
from seqpar.kernels import pipelined_diag_gru as pk  # noqa: E402
from seqpar.structure import DENSE, DIAG, Structure  # noqa: E402
from solve_helpers import solve_pipelined_and_reference  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
cpu_only = pytest.mark.skipif(not INTERPRET, reason="interpreted kernels (TRITON_INTERPRET=1)")


def _problem(T, B, D, bias=True, seed=0, device="cpu", scale=0.5):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, B, D, generator=g) * scale).to(device)
    xp = torch.randn(T, B, 3 * D, generator=g).to(device)
    w = (torch.randn(3 * D, generator=g) * 0.7).to(device)
    b = (torch.randn(3 * D, generator=g) * 0.2).to(device) if bias else None
    bnd = (torch.randn(B, D, generator=g) * 0.5).to(device)
    start = (torch.randn(B, D, generator=g) * 0.5).to(device)
    return h, xp, w, b, bnd, start


def _check_pass(T, B, D, run, prefetch=None, bias=True, device="cpu", dtype=torch.float32, seed=0, atol=2e-6,
                group=None):
    h, xp, w, b, bnd, start = _problem(T, B, D, bias, seed, device)
    h, xp = h.to(dtype), xp.to(dtype)
    cfg = pk.run_config(T, B * D, run=run, prefetch=prefetch, runs_per_program=group)
    group = cfg.s
    first = pk.first_pass(h, xp, w, b, bnd, cfg)
    assert first.out is None and first.group == group
    _, ra, rc, rres = pk.pipelined_step_reference(h, xp, w, b, bnd, None, run, group)
    assert first.sum_a.shape == (-(-T // run), B * D)
    assert torch.allclose(first.sum_a.double().cpu(), ra, atol=atol, rtol=1e-5)
    assert torch.allclose(first.sum_c.double().cpu(), rc, atol=atol, rtol=1e-5)
    assert abs(float(first.stats[0]) - float(rres)) <= 1e-5 * max(1.0, float(rres))
    carry = pk.scan_groups(first, start)
    step = pk.pipelined_step(h, xp, w, b, bnd, first, carry, start, cfg=cfg)
    ro, ra, rc, rres = pk.pipelined_step_reference(h, xp, w, b, bnd, start, run, group)
    tol = atol if dtype == torch.float32 else 2e-2
    assert step.out.dtype == dtype and step.out.shape == (T, B, D)
    assert (step.out.double().cpu() - ro).abs().max().item() <= tol * max(1.0, ro.abs().max().item())
    if dtype == torch.float32:
        assert torch.allclose(step.sum_a.double().cpu(), ra, atol=atol, rtol=1e-5)
        assert torch.allclose(step.sum_c.double().cpu(), rc, atol=atol, rtol=1e-5)
        assert abs(float(step.stats[0]) - float(rres)) <= 1e-4 * max(1.0, float(rres)) + 1e-6


@cpu_only
@pytest.mark.parametrize("T,B,D,run,prefetch", [
    (1, 1, 1, 4, None), (37, 3, 5, 4, None), (37, 3, 5, 4, 0), (50, 1, 3, 16, 2), (64, 2, 16, 8, 1),
    (23, 2, 2, 32, None), (9, 5, 7, 1, 2), (40, 1, 33, 8, 0),
])
def test_pass_matches_float64_reference(T, B, D, run, prefetch):
    _check_pass(T, B, D, run, prefetch, seed=T + D)


def _strided(xp, layout):
    """``xp`` (T, B, 3D) with the same values in another memory layout."""
    T, B, C = xp.shape
    if layout == "batch_last":  # (T, 3D, B) in memory: GRU.project_inputs' gate-major layout at D = 1
        return xp.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "padded":      # rows of 3D + 5 channels, the first 3D used
        out = torch.full((T, B, C + 5), float("nan"), dtype=xp.dtype, device=xp.device)[..., :C]
        return out.copy_(xp)
    raise ValueError(layout)


@cpu_only
@pytest.mark.parametrize("T,B,D,run,layout", [(37, 5, 1, 4, "batch_last"), (16, 2, 1, 8, "batch_last"),
                                               (29, 3, 4, 4, "batch_last"), (40, 2, 3, 8, "padded")])
def test_pass_reads_xp_of_any_strides(T, B, D, run, layout):
    """Strided projected inputs give the contiguous layout's results, bit for bit."""
    h, xp, w, b, bnd, start = _problem(T, B, D, seed=T)
    xs = _strided(xp, layout)
    assert not xs.is_contiguous() and torch.equal(xs, xp)
    cfg = pk.run_config(T, B * D, run=run)
    got = []
    for x in (xp, xs):
        first = pk.first_pass(h, x, w, b, bnd, cfg)
        step = pk.pipelined_step(h, x, w, b, bnd, first, pk.scan_groups(first, start), start, cfg=cfg)
        got.append((first.sum_a, first.sum_c, first.stats, step.out, step.sum_a, step.sum_c, step.stats))
    for a, s in zip(*got):
        assert torch.equal(a, s)


@pytest.mark.parametrize("cls", [GRU, DiagGRU])
def test_one_unit_one_feature_projects_gate_major(cls):
    """GRU / DiagGRU (1 -> 1): xp is a (T, B, 3) view of (T, 3, B) memory, equal to the linear map."""
    torch.manual_seed(3)
    cell = cls(1, 1)
    x = torch.randn(11, 4, 1)
    xp = cell.project_inputs(x)
    assert xp.shape == (11, 4, 3) and xp.stride() == (12, 1, 4)
    assert torch.allclose(xp, torch.nn.functional.linear(x, cell.weight_ih, cell.bias_ih), atol=1e-6)
    assert cls(1, 2).project_inputs(torch.randn(5, 4, 1)).is_contiguous()  # two units: row-major


@cpu_only
@pytest.mark.parametrize("T,B,D,run,prefetch,bias,layout", [
    (37, 3, 1, 4, 0, True, "time_major"), (50, 2, 3, 8, 1, True, "time_major"), (1, 1, 1, 4, 2, False, "time_major"),
    (29, 5, 2, 4, 2, True, "batch_first"), (64, 4, 1, 8, 1, False, "batch_first"),
])
def test_pass_projecting_raw_inputs_matches_projected_xp(T, B, D, run, prefetch, bias, layout):
    """``proj``: the pass projects one input feature itself (xp = w * x + b per gate and unit) and gives what
    the pass given the projected xp gives (to float32 rounding of the projection), on raw inputs of any
    strides (batch_first: a (B, T, 1) tensor read as (T, B, 1))."""
    _check_raw_pass(T, B, D, run, prefetch, bias, layout)


def _check_raw_pass(T, B, D, run, prefetch, bias, layout, device="cpu"):
    g = torch.Generator().manual_seed(T + D)
    h, _, w, b, bnd, start = _problem(T, B, D, bias, seed=T, device=device)
    w_ih = torch.randn(3 * D, 1, generator=g).to(device)
    b_ih = (torch.randn(3 * D, generator=g) * 0.3).to(device) if bias else None
    x = torch.randn(T, B, 1, generator=g).to(device)
    if layout == "batch_first":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    xp = torch.nn.functional.linear(x, w_ih, b_ih)
    proj = pk.prepare_projection(w_ih, b_ih)
    cfg = pk.run_config(T, B * D, run=run, prefetch=prefetch)
    got = {}
    for raw in (False, True):
        src, pr = (x, proj) if raw else (xp, None)
        first = pk.first_pass(h, src, w, b, bnd, cfg, proj=pr)
        step = pk.pipelined_step(h, src, w, b, bnd, first, pk.scan_groups(first, start), start, cfg=cfg, proj=pr)
        got[raw] = (first.sum_a, first.sum_c, first.stats, step.out, step.sum_a, step.sum_c, step.stats)
    for a, r in zip(got[False], got[True]):
        assert torch.allclose(a, r, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="raw inputs"):
        pk.first_pass(h, xp, w, b, bnd, cfg, proj=proj)


def test_raw_input_kernels_only_for_one_feature_cells_that_keep_the_projection():
    """Which cells get the pass that projects its inputs: one input feature, the built-in projection."""
    x1, x2 = torch.randn(9, 2, 1), torch.randn(9, 2, 2)

    class OwnProjection(DiagGRU):
        def project_inputs(self, inputs):
            return super().project_inputs(2 * inputs)

    assert pipelined_stepper(GRU(1, 1), DENSE, x1, "triton", raw_inputs=True) is not None
    assert pipelined_stepper(DiagGRU(1, 4), DIAG, x1, "triton", raw_inputs=True) is not None
    assert pipelined_stepper(GRU(2, 1), DENSE, x2, "triton", raw_inputs=True) is None
    assert pipelined_stepper(DiagGRU(2, 4), DIAG, x2, "triton", raw_inputs=True) is None
    assert pipelined_stepper(GRU(1, 3), DENSE, x1, "triton", raw_inputs=True) is None  # the dense kernel
    assert pipelined_stepper(OwnProjection(1, 4), DIAG, x1, "triton", raw_inputs=True) is None
    assert pipelined_stepper(DiagGRU(1, 4), DIAG, x1.double(), "triton", raw_inputs=True) is None


@cpu_only
@pytest.mark.parametrize("T,B,D,run,group", [(37, 3, 5, 4, 1), (61, 1, 3, 2, 4), (45, 2, 2, 4, 16), (8, 1, 1, 1, 8)])
def test_pass_with_run_groups_matches_float64_reference(T, B, D, run, group):
    """Groups of several runs per program (partial last group, group longer than the sequence)."""
    _check_pass(T, B, D, run, group=group, seed=T * group)


def _check_fused(T, B, D, run, group, device="cpu", seed=0):
    """A pass given the next start returns the next carries (its last program's scan) and the residual
    stats, equal to the unfused pass + scan_groups; the counter is back at zero after every pass."""
    h, xp, w, b, bnd, start = _problem(T, B, D, True, seed, device)
    cfg = pk.run_config(T, B * D, run=run, runs_per_program=group)
    n_groups = -(-(-(-T // run)) // cfg.s)
    assert pk.fuses(n_groups, B * D)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    plain = pk.first_pass(h, xp, w, b, bnd, cfg)
    fused = pk.first_pass(h, xp, w, b, bnd, cfg, next_start=start, counter=counter)
    assert plain.carry is None and int(counter) == 0
    assert torch.equal(fused.sum_a, plain.sum_a) and torch.equal(fused.sum_c, plain.sum_c)
    assert torch.allclose(fused.carry, pk.scan_groups(plain, start), rtol=1e-6, atol=1e-6)
    assert torch.equal(fused.stats, plain.stats)
    step_plain = pk.pipelined_step(h, xp, w, b, bnd, plain, pk.scan_groups(plain, start), start, cfg=cfg)
    step = pk.pipelined_step(h, xp, w, b, bnd, fused, fused.carry, start, cfg=cfg, next_start=start, counter=counter)
    assert int(counter) == 0
    assert (step.out - step_plain.out).abs().max().item() <= 1e-6
    assert torch.allclose(step.carry, pk.scan_groups(step_plain, start), rtol=1e-5, atol=1e-6)
    assert torch.allclose(step.stats, step_plain.stats, rtol=1e-5, atol=1e-7)


@cpu_only
@pytest.mark.parametrize("T,B,D,run,group", [(37, 3, 5, 4, 2), (1, 1, 1, 4, 1), (130, 2, 40, 4, 4)])
def test_fused_pass_returns_the_next_carries(fused, T, B, D, run, group):
    """Several groups and lane blocks (B * D = 80 > 32 lanes per walk step), T = 1, a partial last group."""
    _check_fused(T, B, D, run, group, seed=T)


def test_fusion_only_for_short_walks(fused):
    assert pk.fuses(1024, 16) and not pk.fuses(8192, 64) and not pk.fuses(0, 16)


@cpu_only
@pytest.mark.parametrize("n_runs,N,group,ch,walk,tile", [
    (37, 5, 4, 16, 1024, 0), (1, 1, 1, 16, 1024, 0), (300, 33, 2, 16, 1024, 0), (64, 16, 8, 256, 1024, 0),
    (300, 33, 2, 16, 16, 0), (257, 3, 1, 16, 8, 0), (40, 2, 3, 16, 13, 0),
    (1563, 16, 2, 256, 1024, 16384), (300, 33, 2, 16, 1024, 16384), (37, 5, 4, 16, 1024, 16384),
    (1563, 16, 2, None, None, None),  # the defaults: 782 groups in 13 chunks of 64 (GRU(1, 1), B = 16, 100k)
])
def test_group_scan_and_compose_match_float64(monkeypatch, n_runs, N, group, ch, walk, tile):
    """scan_groups: states after every group from a start, by one launch (walking chunks of ``ch``
    groups, or one tile of up to ``tile`` totals) or (more than ``walk`` groups) by chunk reduce / walk /
    rescan in chunks of ``ch``, nested where the chunks are many; compose: the map of all runs.  Uneven
    numbers of group totals per associative scan and per chunk.  None: the module's settings."""
    from seqpar.scan import affine_scan

    if ch is None:
        ch, walk, tile = pk.GROUP_SCAN_CH, pk.GROUP_SCAN_WALK, pk.GROUP_SCAN_TILE
        assert walk < -(-n_runs // group) <= pk.GROUP_SCAN_SHORT  # the chunked path, chunks of CH_SHORT
    else:
        monkeypatch.setattr(pk, "GROUP_SCAN_CH_SHORT", ch)
    monkeypatch.setattr(pk, "GROUP_SCAN_CH", ch)
    monkeypatch.setattr(pk, "GROUP_SCAN_WALK", walk)
    monkeypatch.setattr(pk, "GROUP_SCAN_TILE", tile)
    assert (pk.group_scan_tile(-(-n_runs // group), min(32, 2 ** (N - 1).bit_length()))[0]
            > ch) == (tile > 0 and -(-n_runs // group) > ch)  # which path runs
    g = torch.Generator().manual_seed(n_runs + N)
    a, c = torch.rand(n_runs, N, generator=g) * 1.8 - 0.9, torch.randn(n_runs, N, generator=g)
    ia, ic = a.clone().double(), c.clone().double()
    for r in range(n_runs):  # group prefixes, as the pass returns them
        if r % group:
            ia[r], ic[r] = ia[r - 1] * a[r], a[r] * ic[r - 1] + c[r]
    res = pk.PassResult(None, ia.float(), ic.float(), torch.zeros(2), group)
    start = torch.randn(N, generator=g)
    ref = affine_scan(a.double(), c.double(), start.double(), DIAG)  # state after every run
    last = [min(n_runs, k + group) - 1 for k in range(0, n_runs, group)]
    got = pk.scan_groups(res, start)
    assert got.shape == (len(last), N)
    assert (got.double() - ref[last]).abs().max().item() <= 2e-6 * max(1.0, ref.abs().max().item())
    phi, c0 = pk.compose(res, 1, N)
    assert torch.allclose(phi.double().reshape(-1), a.double().prod(0), rtol=1e-5, atol=1e-7)
    ref0 = affine_scan(a.double(), c.double(), torch.zeros(N, dtype=torch.float64), DIAG)[-1]
    assert torch.allclose(c0.double().reshape(-1), ref0, rtol=1e-5, atol=2e-6)


@cpu_only
def test_pass_without_bias_and_in_bfloat16():
    _check_pass(29, 2, 3, 8, bias=False, seed=1)
    _check_pass(29, 2, 3, 8, dtype=torch.bfloat16, seed=2)


@cpu_only
def test_nan_iterate_reports_inf_residual():
    h, xp, w, b, bnd, start = _problem(20, 2, 3)
    h[7, 1, 2] = float("nan")
    first = pk.first_pass(h, xp, w, b, bnd, pk.run_config(20, 6, run=4))
    assert float(first.stats[0]) == float("inf")


@cpu_only
def test_empty_sequence():
    h, xp, w, b, bnd, start = _problem(0, 2, 3)
    first = pk.first_pass(h, xp, w, b, bnd)
    assert first.sum_a.shape == (0, 6) and float(first.stats.abs().sum()) == 0.0


def test_run_config_shortens_runs_for_short_sequences_and_honours_overrides():
    long = pk.run_config(2**20, 16)
    short = pk.run_config(1000, 16)
    assert short.r < long.r and short.r >= pk.MIN_RUN
    assert pk.run_config(10**6, 1024, run=7).r == 7 and pk.run_config(10**6, 1024, prefetch=2).prefetch == 2
    assert pk.run_config(10**6, 8).bn == 16
    with pytest.raises(ValueError, match="run"):
        pk.run_config(100, 16, run=0)
    with pytest.raises(ValueError, match="prefetch"):
        pk.run_config(100, 16, prefetch=3)


def test_pipelined_path_is_chosen_only_where_exact():
    xp = torch.zeros(4, 2, 3)
    assert pipelined_stepper(DiagGRU(2, 1), DIAG, xp, "triton") is not None
    assert pipelined_stepper(GRU(2, 1), DENSE, xp, "triton") is not None
    assert pipelined_stepper(GRU(2, 1), DIAG, xp, "triton") is not None
    assert pipelined_stepper(GRU(2, 3), DIAG, torch.zeros(4, 2, 9), "triton").structure == DIAG  # quasi
    assert pipelined_stepper(GRU(2, 3), DENSE, torch.zeros(4, 2, 9), "triton").structure == DENSE  # exact
    assert pipelined_stepper(GRU(2, 9), DENSE, torch.zeros(4, 2, 27), "triton") is None  # D > MAX_D
    assert pipelined_stepper(DiagGRU(2, 1), DIAG, xp, "torch") is None
    assert pipelined_stepper(DiagGRU(2, 1), DIAG, xp.double(), "triton") is None

    class Custom(DiagGRU):
        def step(self, h_prev, xp):
            return super().step(h_prev, xp) * 0.5

    assert pipelined_stepper(Custom(2, 1), DIAG, xp, "triton") is None  # a redefined step is not the kernel's


@pytest.fixture(autouse=True)
def _pipeline_on_tiny_sequences(monkeypatch):
    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 0)


@pytest.fixture
def fused(monkeypatch):
    """The pass-fused carry scan switched on (off by default: see pipelined_diag_gru.FUSE_MAX_ELEMENTS)."""
    monkeypatch.setattr(pk, "FUSE_MAX_ELEMENTS", 2**16)


@cpu_only
def test_short_sequences_keep_the_lookback_loop(monkeypatch):
    monkeypatch.setattr(newton, "PIPELINE_MIN_ELEMENTS", 10**9)
    calls = []
    monkeypatch.setattr(newton, "pipelined_iterations", lambda *a, **k: calls.append(1))
    states, info = seqpar.solve(DiagGRU(2, 3), torch.randn(9, 2, 2), backend="triton", return_info=True)
    assert not calls and info.converged


@cpu_only
@pytest.mark.parametrize("cell_kind,D,jacobian,T,B,I", [
    ("diag", 5, "auto", 203, 3, 3), ("diag", 1, "diag", 1, 1, 3), ("gru", 1, "dense", 77, 4, 3),
    ("gru", 1, "diag", 130, 1, 3), ("gru", 4, "dense", 150, 3, 3), ("gru", 3, "diag", 97, 2, 3),
    ("gru", 2, "dense", 1, 1, 3),
    # one input feature, one unit: gate-major projected inputs (strided xp into the kernels)
    # (and one feature: the passes project the raw inputs themselves, backend.PROJECT_IN_PASS)
    ("gru", 1, "dense", 83, 5, 1), ("diag", 1, "diag", 61, 3, 1), ("gru", 1, "diag", 1, 1, 1),
    ("diag", 4, "diag", 70, 2, 1),
])
def test_solve_matches_reference_loop_and_sequential(cell_kind, D, jacobian, T, B, I):
    torch.manual_seed(T + D)
    cell = DiagGRU(I, D) if cell_kind == "diag" else GRU(I, D)
    x = torch.randn(T, B, I)
    h0 = 0.3 * torch.randn(B, D)
    got = solve_pipelined_and_reference(cell, x, jacobian, h0)
    (s1, i1, log1), (s0, i0, log0) = got[True], got[False]
    assert i1.converged and i1.iterations == i0.iterations
    assert [it for it, _ in log1] == [it for it, _ in log0]
    for a, b in zip(i1.residuals, i0.residuals):
        assert abs(a - b) <= 1e-3 * max(a, b) + 1e-6
    c64 = type(cell)(I, D).double()
    c64.load_state_dict(cell.state_dict())
    with torch.no_grad():
        ref = newton.sequential_states(c64, c64.project_inputs(x.double()), h0.double())
    assert (s1.double() - ref).abs().max().item() < 2e-5
    assert (s1 - s0).abs().max().item() < 2e-5


@cpu_only
def test_fused_solve_matches_reference_loop(fused):
    torch.manual_seed(5)
    cell = DiagGRU(3, 2)
    x = torch.randn(150, 3, 3)
    got = solve_pipelined_and_reference(cell, x, "diag", 0.3 * torch.randn(3, 2))
    (s1, i1, _), (s0, i0, _) = got[True], got[False]
    assert i1.converged and i1.iterations == i0.iterations
    assert (s1 - s0).abs().max().item() < 2e-5


@cpu_only
def test_non_converged_is_not_reported_converged():
    torch.manual_seed(0)
    cell = DiagGRU(3, 2)
    x = torch.randn(60, 2, 3)
    states, info = seqpar.solve(cell, x, jacobian="diag", backend="triton", max_iter=1, fallback="none",
                                return_info=True)
    assert not info.converged and info.iterations == 1 and info.residual > info.tol
    states, info = seqpar.solve(cell, x, jacobian="diag", backend="triton", max_iter=1, return_info=True)
    assert info.converged and info.fallback  # repaired by the fallback, and said so


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("T,B,D,layout", [(100_003, 16, 1, "time_major"), (20_011, 3, 4, "batch_first")])
def test_gpu_pass_projecting_raw_inputs(T, B, D, layout):
    _check_raw_pass(T, B, D, None, None, True, layout, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("B,D", [(16, 1), (16, 4), (3, 7), (16, 64)])
def test_gpu_pass_matches_reference(B, D):
    T = 5003
    _check_pass(T, B, D, pk.run_config(T, B * D).r, device="cuda", seed=D, atol=5e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("T,B,D", [(1_000_003, 16, 1), (20_011, 3, 7)])
def test_gpu_fused_pass(fused, T, B, D):
    """The fused tail on the device: every program's stores seen by the last one (release / acquire)."""
    cfg = pk.run_config(T, B * D)
    _check_fused(T, B, D, cfg.r, cfg.s, device="cuda", seed=D)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("n_runs,N,group", [(100_003, 64, 4), (16_384, 16, 16), (9_001, 1024, 2),
                                             (12_500, 16, 16), (3_000, 32, 8), (1_000, 5, 2)])  # one tile
def test_gpu_group_scan_matches_float64(n_runs, N, group):
    from seqpar.scan import affine_scan

    g = torch.Generator().manual_seed(n_runs)
    a, c = torch.rand(n_runs, N, generator=g) * 1.8 - 0.9, torch.randn(n_runs, N, generator=g)
    ia, ic = a.double().clone(), c.double().clone()
    for k in range(1, group):  # group prefixes, vectorised over groups
        r = torch.arange(k, n_runs, group)
        ia[r], ic[r] = ia[r - 1] * ia[r], ia[r] * ic[r - 1] + ic[r]
    res = pk.PassResult(None, ia.float().cuda(), ic.float().cuda(), torch.zeros(2), group)
    start = torch.randn(N, generator=g)
    ref = affine_scan(a.double(), c.double(), start.double(), DIAG)
    last = torch.arange(group - 1, n_runs + group - 1, group).clamp(max=n_runs - 1)
    got = pk.scan_groups(res, start.cuda()).cpu().double()
    assert (got - ref[last]).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_gpu_solve_long_sequence_matches_float64_gru():
    """GRU(1, 1) (DEER's benchmark cell) on T = 300k: the pipelined solve against torch.nn.GRU in float64
    (the native implementation: cuDNN has no float64 GRU for this length)."""
    torch.manual_seed(0)
    cell = GRU(1, 1).cuda()
    x = torch.randn(300_000, 16, 1, device="cuda")
    states, info = seqpar.solve(cell, x, jacobian="dense", return_info=True)
    assert info.converged and info.fallback is None
    ref_rnn = torch.nn.GRU(1, 1).cuda().double()
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=False):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref_rnn, name + "_l0").copy_(getattr(cell, name))
        ref, _ = ref_rnn(x.double())
    assert (states.double() - ref).abs().max().item() < 1e-4


def _check_dense_pass(T, B, D, run, exact, bias=True, device="cpu", seed=0, atol=3e-6):
    from seqpar.kernels import pipelined_dense_gru as pd
    from seqpar.pipeline import scan_runs

    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, B, D, generator=g) * 0.5).to(device)
    xp = torch.randn(T, B, 3 * D, generator=g).to(device)
    w = (torch.randn(3 * D, D, generator=g) * 0.5).to(device)
    b = (torch.randn(3 * D, generator=g) * 0.2).to(device) if bias else None
    bnd, start = (torch.randn(2, B, D, generator=g) * 0.5).to(device)
    cfg = pd.run_config(T, B, run=run)
    first = pd.first_pass(h, xp, w, b, bnd, exact, cfg)
    _, ra, rc, rres = pd.pipelined_step_reference(h, xp, w, b, bnd, None, run, exact)
    assert torch.allclose(first.sum_a.double().cpu(), ra, atol=atol, rtol=1e-5)
    assert torch.allclose(first.sum_c.double().cpu(), rc, atol=atol, rtol=1e-5)
    assert abs(float(first.stats[0]) - float(rres)) <= 1e-5 * max(1.0, float(rres))
    incl = scan_runs(first.sum_a, first.sum_c, start, DENSE if exact else DIAG)
    step = pd.pipelined_step(h, xp, w, b, bnd, incl, start, exact=exact, cfg=cfg)
    ro, ra, rc, rres = pd.pipelined_step_reference(h, xp, w, b, bnd, start, run, exact)
    assert (step.out.double().cpu() - ro).abs().max().item() <= atol * max(1.0, ro.abs().max().item())
    assert torch.allclose(step.sum_a.double().cpu(), ra, atol=atol, rtol=1e-5)
    assert torch.allclose(step.sum_c.double().cpu(), rc, atol=atol, rtol=1e-5)
    assert abs(float(step.stats[0]) - float(rres)) <= 1e-4 * max(1.0, float(rres)) + 1e-6


@cpu_only
@pytest.mark.parametrize("T,B,D,run,exact", [
    (37, 3, 4, 8, True), (1, 1, 2, 4, True), (20, 2, 3, 4, False), (33, 2, 5, 8, True), (19, 1, 8, 32, True),
    (26, 3, 7, 3, False),
])
def test_dense_pass_matches_float64_reference(T, B, D, run, exact):
    _check_dense_pass(T, B, D, run, exact, seed=T + D)


@cpu_only
def test_dense_pass_without_bias_and_bad_sizes():
    from seqpar.kernels import pipelined_dense_gru as pd

    _check_dense_pass(15, 2, 3, 4, True, bias=False)
    with pytest.raises(ValueError, match="D="):
        pd.first_pass(torch.zeros(4, 1, 9), torch.zeros(4, 1, 27), torch.zeros(27, 9), None, torch.zeros(1, 9))


@cpu_only
@pytest.mark.parametrize("n,B,D,tile", [(100, 3, 4, (8, 2)), (1, 1, 2, (32, 1)), (37, 5, 3, (4, 4)),
                                        (64, 2, 8, (32, 2)), (33, 1, 5, (2, 1)), (130, 3, 2, None)])
def test_dense_map_scan_matches_float64(n, B, D, tile):
    """Chunk reduce / recursive scan of the chunk maps / rescan, with partial chunks and batch blocks,
    one chunk, and nesting down to chunks of two maps."""
    from seqpar.kernels.pipelined_dense_gru import scan_maps
    from seqpar.scan import affine_scan

    g = torch.Generator().manual_seed(n + D)
    A = torch.randn(n, B, D, D, generator=g) / D ** 0.5 * 0.9
    C = torch.randn(n, B, D, generator=g)
    start = torch.randn(B, D, generator=g)
    got = scan_maps(A, C, start, tile)
    ref = affine_scan(A.double().unsqueeze(2), C.double(), start.double(), DENSE)
    assert (got.double() - ref).abs().max().item() <= 2e-6 * max(1.0, ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_gpu_dense_map_scan():
    from seqpar.kernels.pipelined_dense_gru import scan_maps
    from seqpar.scan import affine_scan

    g = torch.Generator().manual_seed(0)
    A = (torch.randn(40_001, 16, 4, 4, generator=g) / 2 * 0.9).cuda()
    C = torch.randn(40_001, 16, 4, generator=g).cuda()
    start = torch.randn(16, 4, generator=g).cuda()
    ref = affine_scan(A.double().unsqueeze(2), C.double(), start.double(), DENSE)
    assert (scan_maps(A, C, start).double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("B,D,exact", [(16, 4, True), (3, 7, True), (16, 4, False), (16, 8, True)])
def test_gpu_dense_pass_matches_reference(B, D, exact):
    from seqpar.kernels import pipelined_dense_gru as pd

    T = 3001
    _check_dense_pass(T, B, D, pd.run_config(T, B).r, exact, device="cuda", seed=D, atol=5e-6)


def test_structure_guard():
    assert DiagGRU(2, 3).pipelined_newton(Structure("block", 2), torch.zeros(3, 1, 9)) is None
