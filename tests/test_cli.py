"""The ``fuseopt`` command: its subcommands, ``python -m fuseopt``, and what importing costs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from fuseopt import cli

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("tqdm", "matplotlib", "sklearn")


def test_help_lists_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name in ("demo", "bench", "plot-lr"):
        assert name in cli.COMMANDS and name in out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_command_has_its_own_help(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: fuseopt {command} ")


def test_importing_the_library_and_the_commands_imports_no_optional_package():
    # The extras serve the commands' output only: importing any module must not need them (nor
    # pay for importing them). torch itself imports tqdm when it is installed (torch.hub), so
    # what counts is what fuseopt's modules add to what torch and numba import.
    modules = ["fuseopt", "fuseopt.cli", "fuseopt.bench", "fuseopt.demo", "fuseopt.plot_lr"]
    modules += ["fuseopt.lr_scheduler", "fuseopt.swa_utils", "fuseopt.schedules"]
    code = (
        "import sys, torch, numba\n"
        f"before = {{m for m in {OPTIONAL} if m in sys.modules}}\n"
        f"import {', '.join(modules)}\n"
        f"print(sorted(m for m in {OPTIONAL} if m in sys.modules and m not in before))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_python_m_fuseopt_runs_the_demo():
    argv = ["demo", "--optimizers", "SGD", "--epochs", "1", "--no-plot", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "fuseopt", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fuseopt demo: MLP 64-128-10 on scikit-learn digits")
    assert any(line.split()[:2] == ["SGD", "fuseopt"] for line in lines)


def test_an_error_exits_non_zero_without_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "fuseopt", "plot-lr", "Nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown scheduler 'Nope'; valid schedulers: " in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------- demo and bench: bad numbers
def _one_error_line(code, out, err, prog, *fragments):
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if "error:" in line] == lines[-1:], err
    assert lines[-1].startswith(f"{prog}: error: ")
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


CPUS = os.cpu_count() or 1
# (argv, fragments of the error line): each is refused before any work (no data set, no timing)
BAD_NUMBERS = [
    (["demo", "--epochs", "0"], ["--epochs must be at least 1, got 0"]),
    (["demo", "--epochs", "-1"], ["--epochs must be at least 1, got -1"]),
    (["demo", "--epochs", "1.5"], ["argument --epochs: invalid int value: '1.5'"]),
    (["demo", "--batch-size", "0"], ["--batch-size must be at least 1, got 0"]),
    (["demo", "--batch-size", "-64"], ["--batch-size must be at least 1, got -64"]),
    (["demo", "--threads", "0"], ["--threads must be at least 1, got 0"]),
    (["demo", "--threads", "-2"], ["--threads must be at least 1, got -2"]),
    (["demo", "--threads", str(CPUS + 1)], [f"--threads must be at most {CPUS} (the CPUs)"]),
    (["demo", "--seed", str(2**64)], ["--seed must be an integer in [-2**63, 2**64 - 1]"]),
    (["demo", "--seed", str(-(2**63) - 1)], ["--seed must be an integer in"]),
    (["bench", "--steps", "0"], ["--steps must be at least 1, got 0"]),
    (["bench", "--steps", "-3"], ["--steps must be at least 1, got -3"]),
    (["bench", "--quick", "--steps", "0"], ["--steps must be at least 1, got 0"]),
    (["bench", "--threads", "0"], ["--threads must be at least 1, got 0"]),
    (["bench", "--threads", "-1"], ["--threads must be at least 1, got -1"]),
    (["bench", "--threads", str(CPUS + 1)], [f"--threads must be at most {CPUS} (the CPUs)"]),
    (["bench", "--device", "foo"], ["--device must be cpu, cuda or cuda:N, got 'foo'"]),
    (["bench", "--device", "meta"], ["--device must be cpu, cuda or cuda:N, got 'meta'"]),
    (["bench", "--device", "cuda:99"], ["--device 'cuda:99': "]),
]


@pytest.mark.parametrize("argv, fragments", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_bad_numbers_are_one_line_errors(capsys, argv, fragments):
    # --no-plot: were a value let through, the demo would write no picture here
    extra = ["--no-plot", "--no-progress"] if argv[0] == "demo" else []
    code, out, err = run_cli(capsys, *argv, *extra)
    _one_error_line(code, out, err, f"fuseopt {argv[0]}", *fragments)


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_huge_thread_count_is_refused_in_a_new_process(command):
    # torch.set_num_threads(100000) crashed the process (a segfault, no message): it is refused
    # first. A new process, so that a regression fails this test instead of killing pytest.
    proc = subprocess.run(
        [sys.executable, "-m", "fuseopt", command, "--threads", "100000"]
        + (["--no-plot"] if command == "demo" else []),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last == f"fuseopt {command}: error: --threads must be at most {CPUS} (the CPUs), got 100000"
    )
    assert "Traceback" not in proc.stderr and proc.stdout == ""
