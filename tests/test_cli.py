"""The ``fuseopt`` command: its subcommands, ``python -m fuseopt``, and what importing costs."""

from __future__ import annotations

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
