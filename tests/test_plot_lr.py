"""``fuseopt plot-lr``: options from the scheduler's signature, the sparkline, the picture, errors."""

from __future__ import annotations

import pytest
from conftest import check_png, run_cli

from fuseopt import lr_scheduler, plot_lr

BLOCKS = "▁▂▃▄▅▆▇█"


def test_one_cycle_plot_and_sparklines(tmp_path, capsys):
    path = tmp_path / "lr.png"
    code, out, _ = run_cli(
        capsys, "plot-lr", "OneCycleLR", "--max-lr", "0.1", "--total-steps", "200", "-o", str(path)
    )
    assert code == 0
    check_png(path)
    lines = out.splitlines()
    assert lines[0] == "OneCycleLR(max_lr=0.1, total_steps=200), 200 steps"
    lr_line, momentum_line = lines[1], lines[2]
    assert lr_line.startswith("lr ") and momentum_line.startswith("momentum ")
    spark = lr_line.split()[1]
    assert len(spark) == plot_lr.SPARK_WIDTH and set(spark) <= set(BLOCKS)
    # lr rises from max_lr / 25 to max_lr, then falls; momentum does the opposite
    assert spark[0] == "▁" and "█" in spark and spark[-1] == "▁"
    assert momentum_line.split()[1][0] == "█"
    assert "first 0.004 " in lr_line and "max 0.1 " in lr_line
    assert "min 0.85 " in momentum_line and "max 0.95 " in momentum_line
    assert lines[-1] == f"wrote {path}"


def test_values_are_the_schedulers(capsys):
    code, out, _ = run_cli(
        capsys, "plot-lr", "steplr", "--step-size", "3", "--gamma", "0.5", "--lr", "2", "--no-plot"
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "StepLR(step_size=3, gamma=0.5), 15 steps"  # 5 periods by default
    assert len(lines) == 2  # the momentum is not scheduled: no line for it
    spark = lines[1].split()[1]
    assert spark == "███▄▄▄▂▂▂▁▁▁▁▁▁"
    assert lines[1].endswith("first 2  min 0.125  max 2  last 0.125")


def test_uppercase_and_lowercase_flags_and_lists(capsys):
    code, out, _ = run_cli(capsys, "plot-lr", "CosineAnnealingLR", "--T-max", "10", "--no-plot")
    assert code == 0 and out.startswith("CosineAnnealingLR(T_max=10), 11 steps")
    code, out, _ = run_cli(capsys, "plot-lr", "CosineAnnealingLR", "--t-max", "4", "--no-plot")
    assert code == 0 and out.startswith("CosineAnnealingLR(T_max=4), 5 steps")
    code, out, _ = run_cli(
        capsys, "plot-lr", "MultiStepLR", "--milestones", "2,4", "--steps", "6", "--no-plot"
    )
    assert code == 0 and out.startswith("MultiStepLR(milestones=[2, 4]), 6 steps")
    assert "last 0.01" in out


def test_parse_value():
    assert plot_lr.parse_value("0.1", "float | list[float]", "--max-lr") == 0.1
    assert plot_lr.parse_value("0.1,0.2", "float | list[float]", "--max-lr") == [0.1, 0.2]
    assert plot_lr.parse_value("30", "Iterable[int]", "--milestones") == [30]
    assert plot_lr.parse_value("none", "int | None", "--total-steps") is None
    assert plot_lr.parse_value("false", "bool", "--three-phase") is False
    assert plot_lr.parse_value("cos", "str", "--anneal-strategy") == "cos"
    assert plot_lr.parse_value("7", "int", "--step-size") == 7
    with pytest.raises(ValueError, match="--step-size: expected an integer, got '7.5'"):
        plot_lr.parse_value("7.5", "int", "--step-size")
    with pytest.raises(ValueError, match="--gamma: expected a number, got 'nan'"):
        plot_lr.parse_value("nan", "float", "--gamma")


def test_sparkline():
    assert plot_lr.sparkline([0, 1, 2, 3, 4, 5, 6, 7], blocks=BLOCKS) == BLOCKS
    assert plot_lr.sparkline([3.0] * 5, blocks=BLOCKS) == "▅" * 5
    long = plot_lr.sparkline(list(range(1000)), width=40, blocks=BLOCKS)
    assert len(long) == 40 and long[0] == "▁" and long[-1] == "█"
    assert list(long) == sorted(long)


def test_every_buildable_scheduler_has_options():
    names = plot_lr.schedulers()
    assert {"OneCycleLR", "CyclicLR", "StepLR", "WarmupCosineLR", "WSDLR"} <= set(names)
    assert not set(names) & set(plot_lr.NOT_FROM_CLI)
    built = {n for n, obj in vars(lr_scheduler).items() if n in lr_scheduler.__all__}
    assert set(names) | set(plot_lr.NOT_FROM_CLI) | {"preview", "plot"} == built


@pytest.mark.parametrize(
    "argv, message",
    [
        (["Nope"], "unknown scheduler 'Nope'; valid schedulers: StepLR, MultiStepLR"),
        (["LambdaLR"], "LambdaLR cannot be built from the command line: it needs a Python"),
        (["ReduceLROnPlateau"], "ReduceLROnPlateau cannot be built from the command line"),
        (["OneCycleLR", "--max-lr", "abc"], "--max-lr: expected a number or a comma list, got"),
        (["OneCycleLR", "--max-lr", "0.1", "--foo", "3"], "unknown option '--foo' for OneCycleLR;"),
        (["OneCycleLR"], "the following arguments are required: --max-lr"),
        (["StepLR", "--step-size", "2", "--steps", "0"], "--steps must be at least 1, got 0"),
        (["StepLR", "--step-size", "2", "--steps", "x"], "argument --steps: invalid int value"),
        (["StepLR", "--step-size", "2", "--lr", "-1"], "--lr must be a positive number"),
        (["StepLR", "--step-size", "-2", "--no-plot"], "StepLR: "),
        ([], "the following arguments are required: SCHEDULER"),
    ],
)
def test_errors(capsys, argv, message):
    code, out, err = run_cli(capsys, "plot-lr", *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""


def test_unknown_option_lists_the_valid_ones(capsys):
    _, _, err = run_cli(capsys, "plot-lr", "OneCycleLR", "--max-lr", "0.1", "--foo", "3")
    assert "valid options: --max-lr, --total-steps, --epochs" in err and "--three-phase" in err


def test_unwritable_output(tmp_path, capsys):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("")
    for path, why in [
        (tmp_path / "missing" / "lr.png", "does not exist"),
        (not_a_folder / "lr.png", "is not a directory"),
        (tmp_path, "it is a directory"),
        (tmp_path / "lr.nope", "unknown image format 'nope'; valid suffixes: "),
    ]:
        code, _, err = run_cli(capsys, "plot-lr", "StepLR", "--step-size", "2", "-o", str(path))
        assert code == 2
        assert f"cannot write -o/--output {str(path)!r}" in err and why in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing written
