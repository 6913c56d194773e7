"""``fuseopt plot-lr``: plot any scheduler's learning rate (and momentum) curve.

``fuseopt plot-lr OneCycleLR --max-lr 0.1 --total-steps 1000 -o lr.png`` builds the scheduler from
the command line (each of its constructor arguments is an option: ``max_lr`` -> ``--max-lr``), runs
it on a throwaway optimizer (:func:`fuseopt.lr_scheduler.preview`), prints a text sparkline of the
values and writes a picture of them (matplotlib, the optional ``demo`` extra).
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import fuseopt
from fuseopt import lr_scheduler
from fuseopt._console import MISSING_EXTRA, check_image_format, check_output, write_plot

__all__ = [
    "RANGES",
    "Range",
    "build_scheduler",
    "check_ranges",
    "main",
    "parse_value",
    "schedulers",
    "sparkline",
]

# Schedulers whose arguments a command line cannot spell, and why.
NOT_FROM_CLI = {
    "LRScheduler": "is the base class of the schedulers, with no schedule of its own",
    "LambdaLR": "needs a Python function (lr_lambda)",
    "MultiplicativeLR": "needs a Python function (lr_lambda)",
    "SequentialLR": "is built from other scheduler objects",
    "ChainedScheduler": "is built from other scheduler objects",
    "ReduceLROnPlateau": "needs a metric at every step",
}
# Constructor arguments that are not options: the optimizer is the throwaway one of preview(),
# the plot always starts at step 0, the scheduled key is the lr, and a scale_fn is a function.
NOT_OPTIONS = {"self", "optimizer", "last_epoch", "key", "scale_fn"}
DEFAULT_STEPS = 100
MAX_STEPS = 1_000_000  # a plot of more steps takes minutes to compute, and shows nothing more
SPARK_WIDTH = 60


class Range:
    """The values an option accepts: an interval, each end closed, open or unbounded (None).

    Args:
        lo, hi (float, optional): the ends. lo_open, hi_open (bool): whether they are excluded.
    """

    def __init__(
        self,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def __contains__(self, value: float) -> bool:
        lo_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        hi_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return lo_ok and hi_ok

    def describe(self, kind: str) -> str:
        """``kind`` ("an integer", "a number") with the interval, e.g. "a number in (0, 1]"."""
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"{kind} in {left}{self.lo:g}, {self.hi:g}{right}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {self.hi:g}"
        return kind


_AT_LEAST_0, _AT_LEAST_1 = Range(0), Range(1)
_POSITIVE, _UNIT = Range(0, lo_open=True), Range(0, 1)
# Each scheduler's options with a fixed accepted range (a list option: each of its values). Most
# are the schedulers' own checks; the others are values the scheduler (as torch's) takes but then
# divides by zero with (StepLR's step_size 0, CosineAnnealingLR's T_max 0, ConstantLR's factor 0,
# PolynomialLR's negative power, CyclicLR's step_size_up 0, OneCycleLR's div factors 0), or
# negative lengths and periods, which mean nothing and leave no length to plot. Ranges that depend
# on other options (WSDLR's warmup_steps <= total_steps, ...) are the scheduler's checks.
RANGES: dict[str, dict[str, Range]] = {
    "StepLR": {"step_size": _AT_LEAST_1},
    "MultiStepLR": {"milestones": _AT_LEAST_0},
    "ConstantLR": {"factor": Range(0, 1, lo_open=True), "total_iters": _AT_LEAST_0},
    "LinearLR": {
        "start_factor": Range(0, 1, lo_open=True),
        "end_factor": _UNIT,
        "total_iters": _AT_LEAST_0,
    },
    "PolynomialLR": {"total_iters": _AT_LEAST_0, "power": _AT_LEAST_0},
    "CosineAnnealingLR": {"T_max": _AT_LEAST_1},
    "CosineAnnealingWarmRestarts": {"T_0": _AT_LEAST_1, "T_mult": _AT_LEAST_1},
    "CyclicLR": {"step_size_up": _AT_LEAST_1, "step_size_down": _AT_LEAST_0},
    "OneCycleLR": {
        "total_steps": _AT_LEAST_1,
        "epochs": _AT_LEAST_1,
        "steps_per_epoch": _AT_LEAST_1,
        "pct_start": _UNIT,
        "div_factor": _POSITIVE,
        "final_div_factor": _POSITIVE,
    },
    "WSDLR": {
        "total_steps": _AT_LEAST_1,
        "warmup_steps": _AT_LEAST_0,
        "eta_min": _AT_LEAST_0,
        "warmup_start_factor": _UNIT,
    },
    "WarmupCosineLR": {
        "total_steps": _AT_LEAST_1,
        "warmup_steps": _AT_LEAST_0,
        "eta_min": _AT_LEAST_0,
        "warmup_start_factor": _UNIT,
    },
}


def schedulers() -> dict[str, type]:
    """The schedulers of :mod:`fuseopt.lr_scheduler` that can be built from a command line."""
    return {
        name: obj
        for name, obj in vars(lr_scheduler).items()
        if name in lr_scheduler.__all__
        and isinstance(obj, type)
        and issubclass(obj, lr_scheduler.LRScheduler)
        and name not in NOT_FROM_CLI
    }


def _options(cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {name: p for name, p in params.items() if name not in NOT_OPTIONS}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_value(text: str, annotation: str, option: str) -> Any:
    """Parse one option's text by the constructor argument's annotation (a string, e.g.
    ``"float | list[float]"``): ``none``, ``true``/``false``, ints, floats, comma lists, strings.

    Raises:
        ValueError: naming ``option``, when the text is none of what the annotation allows.
    """
    ann = annotation.replace(" ", "")
    if text.lower() == "none" and "None" in ann:
        return None
    if ann == "bool":
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{option}: expected true or false, got {text!r}")
    is_list = ann.startswith(("list", "Iterable", "Sequence")) or "|list" in ann

    def one(item: str) -> Any:
        if "int" in ann:
            try:
                return int(item)
            except ValueError:
                pass
        if "float" in ann:
            # after int only where an int is allowed: "1" is 1.0 for a float-only argument
            # (torch's OneCycleLR rejects an int pct_start)
            try:
                value = float(item)
            except ValueError:
                pass
            else:
                if math.isfinite(value):
                    return value
        if "str" in ann:
            return item
        kind = _kind(ann)
        raise ValueError(f"{option}: expected {kind}{' or a comma list' * is_list}, got {item!r}")

    if is_list and ("," in text or ann.startswith(("list", "Iterable", "Sequence"))):
        return [one(item) for item in text.split(",") if item.strip()]
    return one(text)


def _kind(annotation: str) -> str:
    return "a number" if "float" in annotation else "an integer"


def check_ranges(cls: type, kwargs: dict[str, Any]) -> None:
    """Check the options with a fixed range (:data:`RANGES`) before the scheduler is built.

    Raises:
        ValueError: naming the option and its accepted range.
    """
    options = _options(cls)
    for name, accepted in RANGES.get(cls.__name__, {}).items():
        value = kwargs.get(name)
        values = value if isinstance(value, list) else [value]
        for item in values:
            if (
                isinstance(item, (int, float))
                and not isinstance(item, bool)
                and item not in accepted
            ):
                what = accepted.describe(_kind(str(options[name].annotation).replace(" ", "")))
                each = "each value of " if isinstance(value, list) else ""
                raise ValueError(f"{cls.__name__}: {each}{_flag(name)} must be {what}, got {item}")


def _with_flags(message: str, cls: type) -> str:
    """A scheduler's error message with its argument names written as options (T_0 -> --T-0)."""
    for name in sorted(_options(cls), key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?!\w)", _flag(name), message)
    return message


def _default_steps(cls: type, kwargs: dict[str, Any]) -> int:
    """Enough steps to see the whole schedule: to its end, or a few of its periods."""
    if cls is lr_scheduler.OneCycleLR:
        return _one_cycle_total(kwargs) or DEFAULT_STEPS  # it refuses to step past its end
    for key in ("total_steps", "T_max", "total_iters"):
        if isinstance(kwargs.get(key), int):
            return kwargs[key] + 1  # the last value, reached at that epoch, included
    if isinstance(kwargs.get("T_0"), int):
        return kwargs["T_0"] * 3 * max(1, kwargs.get("T_mult", 1)) + 1
    if isinstance(kwargs.get("step_size"), int):
        return kwargs["step_size"] * 5
    if isinstance(kwargs.get("milestones"), list) and kwargs["milestones"]:
        return max(kwargs["milestones"]) * 5 // 4 + 1
    if "step_size_up" in kwargs:
        up = kwargs.get("step_size_up") or 2000
        return 2 * (up + (kwargs.get("step_size_down") or up))
    return DEFAULT_STEPS


def _one_cycle_total(kwargs: dict[str, Any]) -> int | None:
    """OneCycleLR's length: total_steps, or epochs * steps_per_epoch."""
    if kwargs.get("total_steps") is not None:
        return kwargs["total_steps"]
    if kwargs.get("epochs") is not None and kwargs.get("steps_per_epoch") is not None:
        return kwargs["epochs"] * kwargs["steps_per_epoch"]
    return None


def build_scheduler(
    name: str, kwargs: dict[str, Any], steps: int | None = None
) -> tuple[type, dict[str, Any], Callable[[Any], Any]]:
    """Resolve a scheduler name (any case) and complete its arguments for a plot.

    OneCycleLR without ``total_steps`` or ``epochs`` gets ``total_steps=steps``.

    Returns:
        ``(class, arguments, factory)``: the factory builds the scheduler on an optimizer.

    Raises:
        ValueError: an unknown name (listing the valid ones), or one that needs Python objects.
    """
    valid = schedulers()
    lower = {n.lower(): n for n in [*valid, *NOT_FROM_CLI]}
    if name.lower() not in lower:
        raise ValueError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(valid)}")
    name = lower[name.lower()]
    if name in NOT_FROM_CLI:
        raise ValueError(
            f"{name} cannot be built from the command line: it {NOT_FROM_CLI[name]}; "
            f"use fuseopt.lr_scheduler.plot() from Python, or one of: {', '.join(valid)}"
        )
    cls = valid[name]
    kwargs = dict(kwargs)
    one_cycle = cls is lr_scheduler.OneCycleLR
    if one_cycle and kwargs.get("total_steps") is None and kwargs.get("epochs") is None:
        kwargs["total_steps"] = steps or DEFAULT_STEPS
    return cls, kwargs, lambda optimizer: cls(optimizer, **kwargs)


def _blocks() -> str:
    blocks = "▁▂▃▄▅▆▇█"
    try:
        blocks.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "_.-~=*#@"  # a terminal that cannot show the block characters
    return blocks


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH, blocks: str | None = None) -> str:
    """``values`` as one line of block characters, lowest to highest, sampled to ``width``."""
    blocks = blocks or _blocks()
    if not values:
        return ""
    n = len(values)
    picked = (
        values if n <= width else [values[round(i * (n - 1) / (width - 1))] for i in range(width)]
    )
    lo, hi = min(values), max(values)
    if hi == lo:
        return blocks[len(blocks) // 2] * len(picked)
    top = len(blocks) - 1
    return "".join(blocks[min(top, int((v - lo) / (hi - lo) * len(blocks)))] for v in picked)


def _summary(label: str, values: list[float]) -> str:
    return (
        f"{label:<9}{sparkline(values)}  first {values[0]:.4g}  min {min(values):.4g}  "
        f"max {max(values):.4g}  last {values[-1]:.4g}"
    )


def _plot(curves: dict[str, list[float]], title: str, path: Any) -> None:
    # A bare Figure, not pyplot: no global figure state, no GUI backend chosen behind the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.2 + 1.6 * len(curves)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(curves), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, values) in zip(axes, curves.items()):
        ax.plot(range(len(values)), values, color="C0" if label == "lr" else "C1")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_title(title, fontsize=9)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path)


def build_parser(prog: str | None = None, cls: type | None = None) -> argparse.ArgumentParser:
    """The parser of ``fuseopt plot-lr``; with ``cls``, one option per constructor argument."""
    names = ", ".join(schedulers())
    parser = argparse.ArgumentParser(
        prog=prog or "fuseopt plot-lr",
        allow_abbrev=False,  # options come from the signature: a prefix must not guess one
        description="Plot a scheduler's lr (and momentum) curve and print it as a sparkline. "
        "Each constructor argument of the scheduler is an option (max_lr -> --max-lr; lists "
        "as 1,2,3; true/false; none). `fuseopt plot-lr SCHEDULER -h` lists them.",
    )
    parser.add_argument("scheduler", metavar="SCHEDULER", help=f"one of: {names}")
    parser.add_argument(
        "--steps",
        type=int,
        help=f"optimizer steps plotted, 1 to {MAX_STEPS} (default: to the end of the schedule)",
    )
    parser.add_argument(
        "-o", "--output", default="lr.png", help="picture written (default: lr.png)"
    )
    parser.add_argument("--no-plot", action="store_true", help="print the sparkline only")
    parser.add_argument(
        "--lr",
        type=float,
        default=1.0,
        help="the optimizer's lr before the scheduler (default: 1.0, so values read as factors)",
    )
    if cls is not None:
        group = parser.add_argument_group(f"{cls.__name__} options")
        for name, p in _options(cls).items():
            required = p.default is inspect.Parameter.empty
            default = "required" if required else f"default: {p.default!r}"
            accepted = RANGES.get(cls.__name__, {}).get(name)
            if accepted is not None:
                kind = _kind(str(p.annotation).replace(" ", ""))
                default += f"; {accepted.describe(kind)}"
            # torch's T_max is --T-max; --t-max is accepted too
            aliases = dict.fromkeys([_flag(name), _flag(name).lower()])
            group.add_argument(
                *aliases,
                dest=f"opt_{name}",
                metavar="VALUE",
                required=required,
                help=f"{name} ({p.annotation}; {default})",
            )
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point of ``fuseopt plot-lr``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The scheduler comes first: its options are known only once it is.
    name = argv[0] if argv and not argv[0].startswith("-") else None
    parser = build_parser(prog)
    if name is None:
        parser.parse_args(argv)  # -h prints the help; anything else: SCHEDULER is missing
        parser.error("the following arguments are required: SCHEDULER")
    try:
        cls, _, _ = build_scheduler(name, {})
    except ValueError as e:
        parser.error(str(e))
    parser = build_parser(prog, cls)
    args, unknown = parser.parse_known_args(argv)
    options = _options(cls)
    if unknown:
        flags = ", ".join(_flag(n) for n in options)
        parser.error(
            f"unknown option {unknown[0]!r} for {cls.__name__}; valid options: {flags}, "
            "--steps, -o/--output, --no-plot, --lr"
        )
    try:
        kwargs = {
            n: parse_value(getattr(args, f"opt_{n}"), str(p.annotation), _flag(n))
            for n, p in options.items()
            if getattr(args, f"opt_{n}") is not None
        }
        check_ranges(cls, kwargs)
        if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
            raise ValueError(f"--steps must be an integer in [1, {MAX_STEPS}], got {args.steps}")
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {args.lr}")
        cls, kwargs, factory = build_scheduler(cls.__name__, kwargs, args.steps)
        steps = args.steps if args.steps is not None else _default_steps(cls, kwargs)
        if steps > MAX_STEPS:  # the default: to the end of a very long schedule
            raise ValueError(
                f"the whole schedule is {steps} steps, over the {MAX_STEPS} that can be "
                "plotted: pass --steps N to plot its start"
            )
        total = _one_cycle_total(kwargs) if cls is lr_scheduler.OneCycleLR else None
        if total is not None and steps > total:
            raise ValueError(
                f"--steps must be at most OneCycleLR's total steps ({total}), which it cannot "
                f"step past; got {steps}"
            )
        if not args.no_plot:
            check_image_format(check_output(args.output, "-o/--output"), "-o/--output")
    except ValueError as e:
        parser.error(str(e))
    except ImportError:
        parser.error(f"writing a picture needs matplotlib: {MISSING_EXTRA} (or use --no-plot)")

    def optimizer(params: list[Any]) -> Any:
        return fuseopt.SGD(params, lr=args.lr, momentum=0.9)

    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    given = " ".join(f"{_flag(k)} {v}" for k, v in kwargs.items() if k in options)
    try:
        curves = {"lr": lr_scheduler.preview(factory, steps, optimizer_factory=optimizer)}
        momentum = lr_scheduler.preview(factory, steps, "momentum", optimizer_factory=optimizer)
    except (ValueError, TypeError) as e:  # the scheduler's own checks of its arguments
        parser.error(f"{cls.__name__}: {_with_flags(str(e), cls)}")
    except ArithmeticError as e:  # a division by zero RANGES does not foresee: no traceback
        why = "its values overflow a float" if isinstance(e, OverflowError) else str(e)
        parser.error(f"{cls.__name__} cannot be computed with {given}: {why}")
    if len(set(momentum)) > 1:  # cycled (OneCycleLR, CyclicLR): worth its own panel
        curves["momentum"] = momentum
    for label, values in curves.items():
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:  # e.g. --gamma 1e308: the lr overflows (no sparkline, no plot)
            parser.error(
                f"{cls.__name__}: the {label} overflows to {values[bad]} at step {bad} with "
                f"{given}: use smaller values"
            )
    title = f"{cls.__name__}({shown}), {steps} steps"
    print(title)
    for label, values in curves.items():
        print(_summary(label, values))
    if args.no_plot:
        return 0
    return write_plot(lambda: _plot(curves, title, args.output), args.output, parser.prog)


if __name__ == "__main__":
    raise SystemExit(main())
