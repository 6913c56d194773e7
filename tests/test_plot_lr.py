"""``fuseopt plot-lr``: options from the scheduler's signature, the sparkline, the picture, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import check_png, run_cli

import fuseopt
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
        (
            ["StepLR", "--step-size", "2", "--steps", "0"],
            "--steps must be an integer in [1, 1000000]",
        ),
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


# ------------------------------------------------------------------- out-of-range option values
def assert_one_error_line(code, out, err, prog, *fragments):
    """Exit status 2, nothing on stdout, no traceback, one ``PROG: error:`` line (the last, after
    argparse's usage) holding every fragment."""
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if "error:" in line] == lines[-1:], err
    assert lines[-1].startswith(f"{prog}: error: "), err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


# (argv, fragments the error line holds): every option with a range, and values that are zero,
# negative, not finite or too large; the option is named in each.
BAD_VALUES = [
    (["StepLR", "--step-size", "0"], ["StepLR: --step-size must be an integer >= 1, got 0"]),
    (["StepLR", "--step-size", "-1"], ["--step-size must be an integer >= 1, got -1"]),
    (["StepLR", "--step-size", "2", "--gamma", "nan"], ["--gamma: expected a number, got 'nan'"]),
    (["StepLR", "--step-size", "2", "--gamma", "inf"], ["--gamma: expected a number, got 'inf'"]),
    (["StepLR", "--step-size", "2", "--gamma", "-inf"], ["argument --gamma"]),
    (["StepLR", "--step-size", "2", "--gamma", "1e308"], ["overflows to inf", "--gamma 1e+308"]),
    (["MultiStepLR", "--milestones", "-1"], ["each value of --milestones must be an integer >= 0"]),
    (["MultiStepLR", "--milestones", "2,-3"], ["--milestones must be an integer >= 0, got -3"]),
    (["ConstantLR", "--factor", "0"], ["--factor must be a number in (0, 1], got 0.0"]),
    (["ConstantLR", "--factor", "1.5"], ["--factor must be a number in (0, 1], got 1.5"]),
    (["ConstantLR", "--total-iters", "-1"], ["--total-iters must be an integer >= 0, got -1"]),
    (["LinearLR", "--start-factor", "0"], ["--start-factor must be a number in (0, 1]"]),
    (["LinearLR", "--end-factor", "-0.5"], ["--end-factor must be a number in [0, 1], got -0.5"]),
    (["LinearLR", "--end-factor", "2"], ["--end-factor must be a number in [0, 1], got 2.0"]),
    (["LinearLR", "--total-iters", "-2"], ["--total-iters must be an integer >= 0, got -2"]),
    (["ExponentialLR", "--gamma", "1e308"], ["ExponentialLR: the lr overflows", "--gamma 1e+308"]),
    (["ExponentialLR", "--gamma", "nan"], ["--gamma: expected a number, got 'nan'"]),
    (["PolynomialLR", "--power", "-1"], ["--power must be a number >= 0, got -1.0"]),
    (["PolynomialLR", "--total-iters", "-1"], ["--total-iters must be an integer >= 0"]),
    (["CosineAnnealingLR", "--T-max", "0"], ["--T-max must be an integer >= 1, got 0"]),
    (["CosineAnnealingLR", "--t-max", "-1"], ["--T-max must be an integer >= 1, got -1"]),
    (["CosineAnnealingLR", "--T-max", "2000000"], ["2000001 steps", "pass --steps N"]),
    (["CosineAnnealingLR", "--T-max", "5", "--eta-min", "inf"], ["--eta-min: expected a number"]),
    (["CosineAnnealingWarmRestarts", "--T-0", "0"], ["--T-0 must be an integer >= 1, got 0"]),
    (["CosineAnnealingWarmRestarts", "--T-0", "-1"], ["--T-0 must be an integer >= 1, got -1"]),
    (["CosineAnnealingWarmRestarts", "--T-0", "2", "--T-mult", "0"], ["--T-mult must be an"]),
    (["CosineAnnealingWarmRestarts", "--T-0", "2", "--eta-min", "1e308"], ["--eta-min 1e+308"]),
    (["CyclicLR", "--base-lr", "0.1", "--max-lr", "1", "--step-size-up", "0"], ["--step-size-up"]),
    (["CyclicLR", "--base-lr", "0.1", "--max-lr", "1", "--step-size-up", "-1"], [">= 1, got -1"]),
    (
        ["CyclicLR", "--base-lr", "0.1", "--max-lr", "1", "--step-size-down", "-1"],
        ["--step-size-d"],
    ),
    (["CyclicLR", "--base-lr", "nan", "--max-lr", "1"], ["--base-lr: expected a number"]),
    (
        [
            "CyclicLR",
            "--base-lr",
            "0.1",
            "--max-lr",
            "1",
            "--mode",
            "exp_range",
            "--gamma",
            "1e308",
        ],
        ["CyclicLR cannot be computed with", "--gamma 1e+308", "overflow"],
    ),
    (["CyclicLR", "--base-lr", "0.1", "--max-lr", "1", "--mode", "x"], ["CyclicLR: --mode is"]),
    (
        ["OneCycleLR", "--max-lr", "1", "--total-steps", "0"],
        ["--total-steps must be an integer >="],
    ),
    (["OneCycleLR", "--max-lr", "1", "--total-steps", "-1"], ["--total-steps must be", "got -1"]),
    (["OneCycleLR", "--max-lr", "1", "--epochs", "0", "--steps-per-epoch", "5"], ["--epochs must"]),
    (["OneCycleLR", "--max-lr", "1", "--epochs", "2", "--steps-per-epoch", "0"], ["--steps-per-e"]),
    (["OneCycleLR", "--max-lr", "1", "--epochs", "2"], ["--total-steps OR (--epochs AND --steps-"]),
    (
        ["OneCycleLR", "--max-lr", "1", "--pct-start", "1.5"],
        ["--pct-start must be a number in [0, 1]"],
    ),
    (["OneCycleLR", "--max-lr", "1", "--div-factor", "0"], ["--div-factor must be a number > 0"]),
    (["OneCycleLR", "--max-lr", "1", "--final-div-factor", "-1"], ["--final-div-factor must be a"]),
    (
        ["OneCycleLR", "--max-lr", "1", "--total-steps", "10", "--steps", "11"],
        ["--steps must be at"],
    ),
    (["WSDLR", "--total-steps", "0"], ["WSDLR: --total-steps must be an integer >= 1, got 0"]),
    (
        ["WSDLR", "--total-steps", "20", "--warmup-steps", "-1"],
        ["--warmup-steps must be an integer"],
    ),
    (["WSDLR", "--total-steps", "20", "--warmup-steps", "30"], ["--warmup-steps <= 20, got 30"]),
    (["WSDLR", "--total-steps", "20", "--decay-steps", "1.5"], ["--decay-steps as a fraction of"]),
    (["WSDLR", "--total-steps", "20", "--eta-min", "-1"], ["--eta-min must be a number >= 0"]),
    (
        ["WSDLR", "--total-steps", "20", "--warmup-start-factor", "2"],
        ["--warmup-start-factor must"],
    ),
    (["WarmupCosineLR", "--total-steps", "-1"], ["--total-steps must be an integer >= 1, got -1"]),
    (["WarmupCosineLR", "--total-steps", "9", "--warmup-start-factor", "-0.5"], ["in [0, 1]"]),
    (
        ["WarmupCosineLR", "--total-steps", "9", "--eta-min", "-1"],
        ["--eta-min must be a number >="],
    ),
    (
        ["StepLR", "--step-size", "2", "--steps", "-1"],
        ["--steps must be an integer in [1, 1000000]"],
    ),
    (
        ["StepLR", "--step-size", "2", "--steps", "1000001"],
        ["--steps must be an integer in [1, 100"],
    ),
]


@pytest.mark.parametrize("argv, fragments", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_are_one_line_errors(capsys, argv, fragments):
    code, out, err = run_cli(capsys, "plot-lr", *argv, "--no-plot")
    assert_one_error_line(code, out, err, "fuseopt plot-lr", *fragments)


# The edges of each range, and values just inside them: accepted, and plotted to the end.
EDGE_VALUES = [
    ["StepLR", "--step-size", "1"],
    ["MultiStepLR", "--milestones", "0,3"],
    ["ConstantLR", "--factor", "1", "--total-iters", "0"],
    ["ConstantLR", "--factor", "1e-300"],
    ["LinearLR", "--start-factor", "1", "--end-factor", "0", "--total-iters", "0"],
    ["PolynomialLR", "--power", "0", "--total-iters", "0"],
    ["CosineAnnealingLR", "--T-max", "1"],
    ["CosineAnnealingWarmRestarts", "--T-0", "1", "--T-mult", "1"],
    [
        "CyclicLR",
        "--base-lr",
        "0.1",
        "--max-lr",
        "1",
        "--step-size-up",
        "1",
        "--step-size-down",
        "0",
    ],
    ["OneCycleLR", "--max-lr", "1", "--total-steps", "1"],
    ["OneCycleLR", "--max-lr", "1", "--pct-start", "0"],
    ["OneCycleLR", "--max-lr", "1", "--pct-start", "1", "--div-factor", "1e-3"],
    ["OneCycleLR", "--max-lr", "1", "--epochs", "1", "--steps-per-epoch", "1"],
    ["WSDLR", "--total-steps", "1", "--warmup-steps", "0", "--eta-min", "0"],
    ["WarmupCosineLR", "--total-steps", "5", "--warmup-steps", "5", "--warmup-start-factor", "1"],
    ["StepLR", "--step-size", "2", "--steps", "1"],
]


@pytest.mark.parametrize("argv", EDGE_VALUES, ids=[" ".join(a) for a in EDGE_VALUES])
def test_edge_values_are_accepted(capsys, argv):
    code, out, err = run_cli(capsys, "plot-lr", *argv, "--no-plot")
    assert code == 0, err
    assert out.startswith(argv[0] + "(") and "\nlr " in out


# (scheduler, option): out-of-range values the scheduler itself takes (a negative count of steps,
# never reached), which the command rejects: they leave no schedule length to plot.
STRICTER_THAN_THE_SCHEDULER = {
    ("MultiStepLR", "milestones"),
    ("ConstantLR", "total_iters"),
    ("LinearLR", "total_iters"),
    ("PolynomialLR", "total_iters"),
    ("CyclicLR", "step_size_down"),
}
REQUIRED = {
    "StepLR": {"step_size": 3},
    "MultiStepLR": {"milestones": [2, 4]},
    "ExponentialLR": {"gamma": 0.9},
    "CosineAnnealingLR": {"T_max": 10},
    "CosineAnnealingWarmRestarts": {"T_0": 5},
    "CyclicLR": {"base_lr": 0.1, "max_lr": 1.0, "step_size_up": 4},
    "OneCycleLR": {"max_lr": 0.1, "total_steps": 30},
    "WSDLR": {"total_steps": 30},
    "WarmupCosineLR": {"total_steps": 30},
}


def _outside(accepted, integer):
    values = []
    if accepted.lo is not None:
        values.append(accepted.lo if accepted.lo_open else accepted.lo - (1 if integer else 0.5))
    if accepted.hi is not None:
        values.append(accepted.hi if accepted.hi_open else accepted.hi + (1 if integer else 0.5))
    return [int(v) if integer else float(v) for v in values]


def _run_schedule(lib, name, kwargs, steps=30):
    """The exception type ``lib``'s scheduler raises over ``steps`` steps, or None."""
    opt_cls = torch.optim.SGD if lib is torch.optim.lr_scheduler else fuseopt.SGD
    opt = opt_cls([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = getattr(lib, name)(opt, **kwargs)
            for _ in range(steps - 1):
                opt.step()
                sched.step()
    except Exception as e:
        return type(e)
    return None


RANGED = [(n, o) for n, options in plot_lr.RANGES.items() for o in options]


@pytest.mark.parametrize("name, option", RANGED, ids=[f"{n}.{o}" for n, o in RANGED])
def test_ranges_match_the_schedulers(name, option):
    # Every value the command rejects, the scheduler rejects too (a ValueError), or cannot compute
    # (a ZeroDivisionError), as torch's does; but for the few listed above.
    cls = plot_lr.schedulers()[name]
    annotation = str(plot_lr._options(cls)[option].annotation)
    integer = "float" not in annotation
    for value in _outside(plot_lr.RANGES[name][option], integer):
        kwargs = dict(REQUIRED.get(name, {}))
        if name == "OneCycleLR" and option in ("epochs", "steps_per_epoch"):
            kwargs = {"max_lr": 0.1, "epochs": 3, "steps_per_epoch": 10}
        kwargs[option] = [value] if annotation.startswith("Iterable") else value
        ours = _run_schedule(lr_scheduler, name, kwargs)
        if hasattr(torch.optim.lr_scheduler, name):
            assert ours == _run_schedule(torch.optim.lr_scheduler, name, kwargs), value
        if (name, option) in STRICTER_THAN_THE_SCHEDULER:
            assert ours is None, value  # the list above is not stale
        else:
            assert ours in (ValueError, ZeroDivisionError), (value, ours)


def test_help_states_the_ranges(capsys):
    code, out, _ = run_cli(capsys, "plot-lr", "OneCycleLR", "-h")
    assert code == 0
    flat = " ".join(out.split())
    assert "pct_start (float; default: 0.3; a number in [0, 1])" in flat
    assert "div_factor (float; default: 25.0; a number > 0)" in flat
    assert "1 to 1000000" in flat


def test_integer_text_for_a_float_option_is_a_float(capsys):
    value = plot_lr.parse_value("1", "float", "--pct-start")
    assert value == 1.0 and isinstance(value, float)
    assert isinstance(plot_lr.parse_value("1", "int | float | None", "--decay-steps"), int)
    # torch's OneCycleLR rejects pct_start=1 (an int) but takes 1.0
    code, out, _ = run_cli(
        capsys, "plot-lr", "OneCycleLR", "--max-lr", "1", "--pct-start", "1", "--no-plot"
    )
    assert code == 0 and "pct_start=1.0" in out
