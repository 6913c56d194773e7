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
import sys
from collections.abc import Callable, Sequence
from typing import Any

import fuseopt
from fuseopt import lr_scheduler
from fuseopt._console import MISSING_EXTRA, check_image_format, check_output, write_plot

__all__ = ["build_scheduler", "main", "parse_value", "schedulers", "sparkline"]

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
SPARK_WIDTH = 60


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
    number = "int" in ann or "float" in ann

    def one(item: str) -> Any:
        if number:
            try:
                return int(item)
            except ValueError:
                pass
            if "float" in ann:
                try:
                    value = float(item)
                except ValueError:
                    pass
                else:
                    if math.isfinite(value):
                        return value
        if "str" in ann:
            return item
        kind = "a number" if "float" in ann else "an integer"
        raise ValueError(f"{option}: expected {kind}{' or a comma list' * is_list}, got {item!r}")

    if is_list and ("," in text or ann.startswith(("list", "Iterable", "Sequence"))):
        return [one(item) for item in text.split(",") if item.strip()]
    return one(text)


def _default_steps(cls: type, kwargs: dict[str, Any]) -> int:
    """Enough steps to see the whole schedule: to its end, or a few of its periods."""
    if cls is lr_scheduler.OneCycleLR and kwargs.get("total_steps"):
        return kwargs["total_steps"]  # OneCycleLR refuses to step past total_steps - 1
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
    parser.add_argument("--steps", type=int, help="optimizer steps plotted (default: to the end)")
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
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {args.lr}")
        cls, kwargs, factory = build_scheduler(cls.__name__, kwargs, args.steps)
        steps = args.steps if args.steps is not None else _default_steps(cls, kwargs)
        if not args.no_plot:
            check_image_format(check_output(args.output, "-o/--output"), "-o/--output")
    except ValueError as e:
        parser.error(str(e))
    except ImportError:
        parser.error(f"writing a picture needs matplotlib: {MISSING_EXTRA} (or use --no-plot)")

    def optimizer(params: list[Any]) -> Any:
        return fuseopt.SGD(params, lr=args.lr, momentum=0.9)

    try:
        curves = {"lr": lr_scheduler.preview(factory, steps, optimizer_factory=optimizer)}
        momentum = lr_scheduler.preview(factory, steps, "momentum", optimizer_factory=optimizer)
    except (ValueError, TypeError) as e:  # the scheduler's own checks of its arguments
        parser.error(f"{cls.__name__}: {e}")
    if len(set(momentum)) > 1:  # cycled (OneCycleLR, CyclicLR): worth its own panel
        curves["momentum"] = momentum
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    title = f"{cls.__name__}({shown}), {steps} steps"
    print(title)
    for label, values in curves.items():
        print(_summary(label, values))
    if args.no_plot:
        return 0
    return write_plot(lambda: _plot(curves, title, args.output), args.output, parser.prog)


if __name__ == "__main__":
    raise SystemExit(main())
