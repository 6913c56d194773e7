"""The README's two commands: the test command is what CI runs; the main job is the demo."""

import re
from pathlib import Path

import tomllib
from conftest import check_png

from fuseopt import cli

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
