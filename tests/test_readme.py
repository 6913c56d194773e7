"""The README's commands: the test command is what CI runs; the main job is the demo; the GPU
command runs every CUDA case, then the benchmark on CUDA."""

import re
import subprocess
from pathlib import Path

import tomllib
import torch
from conftest import NO_CUDA, check_png

from fuseopt import bench, cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def setup_commands() -> list[str]:
    """The bash blocks of the README's set-up section."""
    section = README.split("## Set-up and the two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_setup_section_holds_exactly_the_two_commands():
    commands = setup_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)  # one line each: copied and run as a whole


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci
    assert setup_commands()[1] == ci


def test_main_job_installs_the_demo_extra_and_runs_the_demo():
    main_job = setup_commands()[0]
    steps = [s.strip() for s in main_job.split("&&")]
    assert steps[0] == "pip install torch==2.13.0"  # the CPU wheel on disk, before the extra
    # torch pinned again beside the extra: no dependency of it may replace the CPU build
    assert steps[1] == 'pip install torch==2.13.0 -e ".[demo]"'
    assert steps[-1] == "fuseopt demo"
    # ... and what it relies on: the console script, the subcommand and the extra's packages
    assert PYPROJECT["project"]["scripts"]["fuseopt"] == "fuseopt.cli:main"
    assert cli.COMMANDS["demo"][0] == "fuseopt.demo"
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras["demo"]) == {"tqdm", "scikit-learn", "matplotlib"}
    assert set(extras["demo"]) <= set(extras["dev"])  # the tests run the demo


def test_readme_shows_the_demo_picture():
    assert "![" in README and "(docs/demo.png)" in README
    check_png(ROOT / "docs" / "demo.png", min_size=(300, 700))


def gpu_command() -> str:
    """The bash block of the README's CUDA section."""
    section = README.split("## CUDA: Triton kernels", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(commands) == 1 and "\n" not in commands[0]  # one line: copied and run as a whole
    return commands[0]


def test_gpu_command_keeps_torch_and_runs_the_cuda_tests_then_the_benchmark():
    install, rest = gpu_command().split(" && ", 1)
    assert install.startswith("pip install ") and install.endswith(' -e ".[dev]"')
    # torch pinned to the installed build's own version (a CUDA one there): pip keeps it
    words = subprocess.run(
        ["bash", "-c", install.replace("pip install", "printf '%s\\n'", 1)],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert words == [f"torch=={torch.__version__}", "-e", ".[dev]"]
    # the tests, then the benchmark even when a test failed
    assert rest == "{ python -m pytest -m cuda -q; python -m fuseopt bench --device cuda --quick; }"
    # ... and what it relies on: the marker, the subcommand and its options, Triton in dev
    markers = PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]
    assert [m.split(":")[0] for m in markers] == ["cuda"]
    assert cli.COMMANDS["bench"][0] == "fuseopt.bench"
    args = bench.build_parser().parse_args(["--device", "cuda", "--quick"])
    assert args.device == "cuda" and args.quick
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    assert any(re.match(r"triton\b", d) for d in dev)


def test_cuda_marker_selects_exactly_the_cases_on_cuda(request):
    """``-m cuda`` (the GPU command) selects exactly the cases whose ``device`` is CUDA; without a
    GPU, each is skipped saying how to run it."""
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        on_cuda = callspec is not None and callspec.params.get("device") == "cuda"
        assert on_cuda == (item.get_closest_marker("cuda") is not None), item.nodeid
        if on_cuda and not torch.cuda.is_available():
            skips = [m for m in item.iter_markers("skipif") if m.args and m.args[0]]
            assert [m.kwargs["reason"] for m in skips] == [NO_CUDA], item.nodeid
