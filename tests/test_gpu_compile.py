"""The Triton kernels compile for a GPU (sm_90), on any machine.  The interpreter (TRITON_INTERPRET=1, how the
CPU tests run the kernels) does not lower them, so a construct it accepts but the compiler refuses would
otherwise show only on the device.  A subprocess with the interpreter off compiles (to PTX and cubin,
through the ptxas that triton ships; nothing runs): the pipelined DiagGRU pass in the variants the solves use
(first / later pass, prefetch depths, raw inputs projected in the pass, the record and the carries' scan in its
last program), the device stopping rule's kernels (record, take_final), the NaN / Inf count and the pipelined
quasi-Newton GRU pass (first / later, guarded, one batch row, channels split between programs), the whole-row
3xTF32 GEMMs (seqpar.kernels.linear, and quasi_gru_gemm's with the GRU epilogue, beside its tiled one) and the
quasi-Newton look-back pass from the zero iterate."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from seqpar.kernels import finite, pipelined_diag_gru as pk, pipelined_quasi_gru as pq, stopping

    TARGET = GPUTarget("cuda", 90, 32)

    def compile_kernel(fn, types, consts):
        sig = {n: "constexpr" if n in consts else types.get(n, "*fp32") for n in fn.arg_names}
        try:
            src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        except TypeError:  # older triton
            src = ASTSource(fn=fn, signature=sig, constants=consts)
        kernel = triton.compile(src, target=TARGET)
        assert kernel.asm.get("cubin"), fn.__name__
        print("compiled", fn.__name__, consts)

    types = {n: "i32" for n in ("T", "D", "N", "n_runs", "NPROG")}
    types.update({n: "i64" for n in ("XT", "XB", "XC")}, Counter="*i32", Stop="*fp64")
    for first, pf, proj, record, fuse in [(True, 0, False, False, False), (False, 1, False, True, False),
                                          (False, 2, True, False, True), (True, 1, True, True, True)]:
        compile_kernel(pk._pipelined_diag_gru_kernel, types,
                       dict(R=8, S=16, BN=16, PF=pf, FIRST=first, FUSE=fuse, TB=16, TCH=256, GUARD=True, PROJ=proj,
                            RECORD=record, HIST=stopping.HISTORY, RBLOCK=stopping.RECORD_BLOCK))
    for zero in (True, False):
        compile_kernel(stopping._take_final_kernel, {"State": "*fp64", "n": "i32"},
                       dict(ZERO=zero, BLOCK=stopping.TAKE_BLOCK))
    compile_kernel(stopping._record_kernel, {"State": "*fp64", "n": "i32"},
                   dict(HIST=stopping.HISTORY, BLOCK=stopping.RECORD_BLOCK))
    compile_kernel(finite._count_nonfinite_kernel, {"n": "i64", "Out": "*fp64"}, dict(BLOCK=1024))
    qtypes = {n: "i32" for n in ("T", "B", "D", "n_bb", "NPROG", "map_stride")}
    qtypes.update({n: "i64" for n in ("sx_t", "sx_b", "sx_c")}, Stop="*fp64")
    for first, guard, r, bb, dp, cb in [(True, False, 16, 1, 16, 16), (False, True, 16, 2, 32, 32),
                                        (False, False, 16, 2, 64, 64), (False, True, 16, 1, 64, 32)]:
        compile_kernel(pq._quasi_pass_kernel, qtypes,
                       dict(R=r, BB=bb, DP=dp, CB=cb, BK=16, FIRST=first, GUARD=guard, PREC=2))
    # the whole-row 3xTF32 GEMMs (plain and with the GRU epilogue) and the look-back pass from the zero iterate
    from seqpar.kernels import fused_diag_gru as fd, linear as lin, quasi_gru_gemm as qg
    for k, kp, nb in [(64, 64, 3), (17, 32, 2)]:
        compile_kernel(lin._linear_rows_kernel, {"M": "i32", "N": "i32"},
                       dict(K=k, HAS_BIAS=True, PREC=2, BM=128, BN=64, KP=kp, NB=nb))
    compile_kernel(qg._quasi_gru_rows_kernel, {n: "i32" for n in ("M", "B", "NP")} |
                   {n: "i64" for n in ("sx_t", "sx_b", "sx_c")},
                   dict(D=64, KP=64, HAS_BIAS=True, PREC=2, BM=64, BD=32, ND=2))
    compile_kernel(qg._quasi_gru_gemm_kernel, {n: "i32" for n in ("M", "B", "D", "NP", "n_d")} |
                   {n: "i64" for n in ("sx_t", "sx_b", "sx_c")}, dict(HAS_BIAS=True, PREC=2, BM=64, BD=64, BK=32))
    compile_kernel(fd._fused_diag_gru_kernel, {n: "i32" for n in ("T", "D", "N", "n_lb", "NP")} |
                   {"Flags": "*i32", "Counter": "*i32"}, dict(TT=32, BN=64, LB_W=8, HH=3, PREC=2))
''')


def test_kernels_compile_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:  # pragma: no cover - a triton without these entry points
        pytest.skip("this triton has no ASTSource / GPUTarget")
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("compiled") == 17


def test_ptxas_register_report(tmp_path):
    """benchmarks/ptxas_quasi_registers.py: the quasi pass's registers / spills per launch shape, from ptxas."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:  # pragma: no cover - a triton without these entry points
        pytest.skip("this triton has no ASTSource / GPUTarget")
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "regs.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "ptxas_quasi_registers.py"),
                           "--width", "20", "--batch", "3", "--shapes", "16:2:16", "--out", str(out)],
                          env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["first"] for r in rows] == [True, False]
    assert all(r["D"] == 20 and r["cb"] == 16 and r["warps"] == 2 and 16 <= r["registers"] <= 255
               and r["stack"] >= 0 for r in rows)
