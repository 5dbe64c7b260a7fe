"""The command-line entry points: one line per mistake before any work, output files, console scripts."""
import importlib
import importlib.metadata as md
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from seqpar.cli import ray_solve, solve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--seq-len", "300", "--hidden", "3", "--device", "cpu", "--quiet", "--baseline-window", "100"]


def _errors(capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2
    assert out == "" and "Traceback" not in err and "[rank" not in err
    lines = err.strip().splitlines()
    assert len(lines) == len(set(lines)), "a line printed twice: " + err
    return lines


@pytest.mark.parametrize("argv,expected", [
    (["--seq-len", "10Q"], "argument --seq-len: cannot parse a count from '10Q'"),
    (["--seq-len", "0"], "argument --seq-len: must be >= 1"),
    (["--hidden", "-3"], "argument --hidden: expected a positive integer; got '-3'"),
    (["--batch", "two"], "argument --batch: expected a positive integer; got 'two'"),
    (["--jacobian", "foo"], "argument --jacobian: expected one of auto, dense, diag, block, block:k"),
    (["--cell", "lstm", "--hidden", "5", "--jacobian", "block:4"],
     "argument --jacobian: block size 4 does not divide the state size 10"),
    (["--device", "tpu"], "argument --device: expected cuda, cuda:N or cpu; got 'tpu'"),
    (["--json", "/nonexistent/dir/s.json"],
     "argument --json: cannot write '/nonexistent/dir/s.json': directory '/nonexistent/dir' does not exist"),
    (["--tol", "2"], "argument --tol: expected a number in (0, 1)"),
    (["--overwrite"], "argument --overwrite: only used with --out DIR"),
    (["--verify-window", "10"], "argument --verify-window: only used with --verify"),
])
@pytest.mark.parametrize("main", [solve.main, ray_solve.main], ids=["solve", "ray_solve"])
def test_one_line_per_mistake(capsys, main, argv, expected):
    lines = _errors(capsys, main, argv)
    assert len(lines) == 1 and expected in lines[0], lines
    assert lines[0].split(": error: ")[0] and ": error: " in lines[0]


def test_device_cuda_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    lines = _errors(capsys, solve.main, ["--device", "cuda"])
    assert lines == [f"{lines[0].split(':')[0]}: error: argument --device: cuda requested but no CUDA GPU is "
                     f"available here (torch {torch.__version__}); use --device cpu"]
    lines = _errors(capsys, ray_solve.main, ["--device", "cuda"])
    assert "argument --device: cuda on Ray needs --use-gpu" in lines[0]


def test_several_mistakes_one_line_each(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    lines = _errors(capsys, solve.main, ["--json", str(tmp_path / "no" / "s.json"), "--out", str(tmp_path / "f"),
                                         "--overwrite"])
    assert len(lines) == 2 and "argument --json" in lines[0] and "argument --out" in lines[1], lines
    assert "exists and is not a directory" in lines[1]


def test_out_nonempty_refused_then_overwrite_clears_only_own_files(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "states_rank00003.npy").write_bytes(b"stale")
    lines = _errors(capsys, solve.main, [*TINY, "--out", str(out)])
    assert "argument --out" in lines[0] and "not empty" in lines[0] and "--overwrite" in lines[0]
    assert solve.main([*TINY, "--out", str(out), "--overwrite", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["manifest.json", "notes.txt", "states_rank00000.npy"]
    assert f"to {out}" in printed and "states_rank00000.npy" in printed and "removed 1 earlier" in printed
    man = json.loads((out / "manifest.json").read_text())
    assert man["seed"] == 7 and man["input_size"] == 3 and man["cell"] == "diag-gru" and man["dtype"] == "float32"
    assert man["jacobian"] == "diag" and man["jacobian_option"] == "auto"
    assert "--seed" in man["command_line"] and "7" in man["command_line"]
    assert set(man["versions"]) == {"seqpar", "torch", "python"}


def test_npy_and_safetensors_files_get_the_same_mode(capsys, tmp_path):
    pytest.importorskip("safetensors")
    modes = {}
    for fmt in ("npy", "safetensors"):
        assert solve.main([*TINY, "--out", str(tmp_path / fmt), "--out-format", fmt]) == 0
        modes[fmt] = stat.S_IMODE(os.stat(tmp_path / fmt / f"states_rank00000.{fmt}").st_mode)
        assert modes[fmt] == stat.S_IMODE(os.stat(tmp_path / fmt / "manifest.json").st_mode)
    assert modes["npy"] == modes["safetensors"], modes


def test_summary_then_speedup_then_verify(capsys, tmp_path):
    assert solve.main([*TINY, "--verify", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    i_sum, i_speed, i_ver = out.index("summary:"), out.index("speed-up vs step-by-step"), out.index("verify: window")
    assert i_sum < i_speed < i_ver and "extrapolated to T=300" in out
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["speedup_vs_sequential"] > 0 and s["baseline_steps_per_rank"] == 100 and s["verify_ok"]


def test_verify_emits_no_requires_grad_warning(tmp_path):
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", os.path.join(ROOT, "launch", "solve.py"), *TINY,
                        "--verify"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "requires_grad" not in r.stderr and "Warning" not in r.stderr


def test_wrapper_error_has_no_traceback():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "solve.py"), "--hidden", "-3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "solve.py: error: argument --hidden: expected a positive integer; got '-3'\n"


def test_default_job_checks_options_before_torchrun():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "default_job.py"), "--jacobian", "foo"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "default job:" not in r.stdout, r.stdout
    assert r.stderr.startswith("default_job.py: error: argument --jacobian:") and r.stderr.count("\n") == 1


# ------------------------------------------------------------------ console scripts
def _scripts():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_console_scripts_declared_and_importable():
    scripts = _scripts()
    assert {"seqpar-solve", "seqpar-ray-solve"} <= set(scripts)
    for name, target in scripts.items():
        mod, func = target.split(":")
        assert callable(getattr(importlib.import_module(mod), func)), name


@pytest.mark.parametrize("module", ["seqpar.cli.solve", "seqpar.cli.ray_solve", "seqpar.cli.default_job",
                                    "seqpar.cli.train"])
def test_module_help_runs(module):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "--seq-len" in r.stdout, r.stderr


def test_module_tiny_solve(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "seqpar.cli.solve", *TINY, "--json", "s.json"], capture_output=True,
                       text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["converged"] is True


def _installed_from_here():
    """The installed seqpar distribution if ``import seqpar`` resolves to this checkout (an editable install of
    it, as in CI), else None.  (Editable installs need not record a direct_url.json.)"""
    try:
        dist = md.distribution("seqpar")
    except md.PackageNotFoundError:
        return None
    import seqpar

    pkg_root = os.path.realpath(os.path.dirname(os.path.dirname(seqpar.__file__)))
    scripts = os.path.join(os.path.dirname(sys.executable), "seqpar-solve")
    return dist if pkg_root == os.path.realpath(ROOT) and os.path.exists(scripts) else None


def test_installed_console_scripts():
    """Where this checkout is the installed seqpar (CI: pip install -e ".[test]"), the scripts exist and run."""
    dist = _installed_from_here()
    if dist is None:
        pytest.skip("seqpar is not installed from this checkout (the venv holds another install)")
    eps = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert eps == _scripts()
    exe = shutil.which("seqpar-solve") or os.path.join(os.path.dirname(sys.executable), "seqpar-solve")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: seqpar-solve" in r.stdout, r.stderr
    r = subprocess.run([exe, *TINY], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "converged=True" in r.stdout, r.stderr
