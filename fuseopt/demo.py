"""``fuseopt demo``: train a small real model with several optimizers and compare them.

An MLP (64-128-10) learns scikit-learn's bundled digits (1,797 8x8 images, no download) with each
optimizer in turn: the same initial weights, the same minibatches, the same budget. Each run shows a
progress bar; then a table gives the final train loss, the test accuracy, the wall time and the time
spent in ``optimizer.step()``, and a picture shows the loss and test error curves.
``--compare-torch`` also trains with torch.optim's same-named optimizers and reports how far the
loss curves are apart (fuseopt computes torch's numbers, so: by rounding only).

scikit-learn, matplotlib and tqdm are the optional ``demo`` extra: imported when the command runs.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import fuseopt
from fuseopt import lr_scheduler, swa_utils
from fuseopt._console import (
    MISSING_EXTRA,
    Progress,
    check_image_format,
    check_output,
    write_plot,
)

__all__ = [
    "ALGORITHMS",
    "SCHEDULERS",
    "Result",
    "Run",
    "build_parser",
    "format_table",
    "load_digits",
    "main",
    "make_model",
    "max_difference",
    "parse_runs",
    "plot",
    "train",
]

# The demo's hyperparameters per algorithm: a sensible lr for this problem, otherwise defaults.
# LBFGS (needs a closure), SparseAdam (sparse grads) and Muon (2-D params only) do not fit a
# plain minibatch loop over an MLP with biases.
ALGORITHMS: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 0.05, "momentum": 0.9},
    "Adam": {"lr": 3e-3},
    "AdamW": {"lr": 3e-3, "weight_decay": 0.01},
    "RMSprop": {"lr": 1e-3},
    "NAdam": {"lr": 3e-3},
    "RAdam": {"lr": 3e-3},
    "Adamax": {"lr": 3e-3},
    "Adagrad": {"lr": 0.05},
    "Adadelta": {"lr": 1.0},
    "ASGD": {"lr": 0.05},
    "Rprop": {"lr": 1e-3},
    "Adafactor": {"lr": 1e-2},
}


def _cycles_momentum(optimizer: Any) -> bool:
    return any(k in optimizer.defaults for k in ("momentum", "betas"))


# Schedulers stepped once per optimizer step, over the whole budget of `total` steps; `m` is the
# scheduler module: fuseopt.lr_scheduler, or torch's for a torch.optim run when torch has the class.
SCHEDULERS: dict[str, Callable[[Any, Any, int], Any]] = {
    "WarmupCosineLR": lambda m, opt, total: m.WarmupCosineLR(
        opt, total_steps=total, warmup_steps=max(1, total // 10)
    ),
    "WSDLR": lambda m, opt, total: m.WSDLR(
        opt, total_steps=total, warmup_steps=max(1, total // 10)
    ),
    "OneCycleLR": lambda m, opt, total: m.OneCycleLR(
        opt,
        max_lr=[g["lr"] for g in opt.param_groups],
        total_steps=total,
        cycle_momentum=_cycles_momentum(opt),
    ),
    "CosineAnnealingLR": lambda m, opt, total: m.CosineAnnealingLR(opt, T_max=total),
    "LinearLR": lambda m, opt, total: m.LinearLR(
        opt, start_factor=1.0, end_factor=0.01, total_iters=total
    ),
}
EMA = "EMA"
EMA_DECAY = 0.99  # averages about the last 100 steps: a few epochs of this budget
DEFAULT_RUNS = "SGD,Adam,AdamW,RMSprop,NAdam,AdamW+WarmupCosineLR+EMA"
DEFAULT_EPOCHS = 20
BATCH_SIZE = 64
TEST_SIZE = 360  # 20 % of the 1,797 images
SPLIT_SEED = 0  # the train/test split never changes; --seed changes the init and the batches


@dataclass(frozen=True)
class Run:
    """One training run: an algorithm, optionally a scheduler and an EMA of the weights."""

    algorithm: str
    scheduler: str | None = None
    ema: bool = False

    @property
    def name(self) -> str:
        """``OPTIMIZER[+SCHEDULER][+EMA]``, as ``--optimizers`` spells it."""
        return "+".join(
            [self.algorithm, *([self.scheduler] if self.scheduler else []), *[EMA] * self.ema]
        )


@dataclass
class Result:
    """What one run of one library measured."""

    run: Run
    library: str
    losses: list[float] = field(default_factory=list)  # minibatch loss of every step
    epoch_acc: list[float] = field(default_factory=list)  # test accuracy after each epoch
    train_loss: float = math.nan  # full train set, final weights
    test_acc: float = math.nan  # final weights (the EMA's with +EMA)
    wall_s: float = 0.0
    step_s: float = 0.0
    steps: int = 0


def _pick(name: str, valid: Sequence[str], what: str, where: str) -> str:
    lower = {v.lower(): v for v in valid}
    if name.lower() not in lower:
        raise ValueError(f"unknown {what} {name!r} in {where}; valid {what}s: {', '.join(valid)}")
    return lower[name.lower()]


def parse_runs(text: str, scheduler: str | None = None) -> list[Run]:
    """``"SGD,AdamW+OneCycleLR+EMA"`` -> runs. ``scheduler`` goes to each run without one.

    Raises:
        ValueError: an unknown optimizer or scheduler name (listing the valid ones).
    """
    runs = []
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            continue
        head, *parts = [p.strip() for p in spec.split("+")]
        where = f"--optimizers {spec!r}"
        algorithm = _pick(head, list(ALGORITHMS), "optimizer", where)
        sched, ema = None, False
        for part in parts:
            if part.lower() == EMA.lower():
                ema = True
            else:
                sched = _pick(part, [*SCHEDULERS, EMA], "scheduler", where)
        runs.append(Run(algorithm, sched or scheduler, ema))
    if not runs:
        raise ValueError(
            f"--optimizers names no optimizer; valid optimizers: {', '.join(ALGORITHMS)}"
        )
    return runs


# ----------------------------------------------------------------------------------- training
def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as float32 in [0, 1]: ``(x_train, y_train, x_test, y_test)``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install "fuseopt[demo]"``).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ImportError(
            f"fuseopt demo needs scikit-learn for its data set (digits): {MISSING_EXTRA}"
        ) from err
    x, y = sklearn_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return x[train], y[train], x[test], y[test]


def make_model(seed: int) -> nn.Module:
    """The MLP 64-128-10, initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def _build(run: Run, library: str, model: nn.Module, total_steps: int) -> tuple[Any, Any, Any]:
    """The run's optimizer, scheduler (or None) and averaged model (or None) for ``library``."""
    module = torch.optim if library == "torch" else fuseopt
    opt = getattr(module, run.algorithm)(model.parameters(), **ALGORITHMS[run.algorithm])
    sched = None
    if run.scheduler is not None:
        # torch's run keeps our scheduler where torch has none of that name: ours drive torch.optim
        # optimizers with torch's numbers (the comparison is about the optimizers).
        schedulers = lr_scheduler
        if library == "torch" and hasattr(torch.optim.lr_scheduler, run.scheduler):
            schedulers = torch.optim.lr_scheduler
        sched = SCHEDULERS[run.scheduler](schedulers, opt, total_steps)
    ema = None
    if run.ema:
        swa = torch.optim.swa_utils if library == "torch" else swa_utils
        ema = swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(EMA_DECAY))
    return opt, sched, ema


def _warm_up(run: Run, library: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Two steps on a throwaway copy: numba compiles (or loads) the kernels here, so the timed
    run measures training, not compilation."""
    scratch = copy.deepcopy(model)
    opt, _, ema = _build(run, library, scratch, 10)
    for _ in range(2):
        F.cross_entropy(scratch(x), y).backward()
        opt.step()
        opt.zero_grad()
        if ema is not None:
            ema.update_parameters(scratch)


def train(
    run: Run,
    library: str,
    data: tuple[torch.Tensor, ...],
    epochs: int,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    threads: int | None = None,
) -> Result:
    """Train the MLP with ``run`` from ``library`` (``"fuseopt"`` or ``"torch"``).

    The initial weights and the order of the minibatches depend on ``seed`` only, so every run
    sees the same ones. ``threads``: torch's (and so numba's) thread count while training.
    """
    x_train, y_train, x_test, y_test = data
    model = make_model(seed)
    if threads is not None:
        torch.set_num_threads(threads)  # numba's kernels follow torch's count
    _warm_up(run, library, model, x_train[:batch_size], y_train[:batch_size])
    per_epoch = math.ceil(len(y_train) / batch_size)
    opt, sched, ema = _build(run, library, model, epochs * per_epoch)
    result = Result(run, library)
    order = torch.Generator().manual_seed(seed)
    bar = Progress(epochs * per_epoch, f"{run.name} ({library})", enabled=progress, lines=False)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        batches = torch.randperm(len(y_train), generator=order).split(batch_size)
        for idx in batches:
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            t = time.perf_counter()
            opt.step()
            result.step_s += time.perf_counter() - t
            if sched is not None:
                sched.step()
            if ema is not None:
                ema.update_parameters(model)
            result.losses.append(loss.item())
            bar.update()
        model.eval()
        _, acc = _evaluate(ema if ema is not None else model, x_test, y_test)
        result.epoch_acc.append(acc)
        bar.update(0, note=f"epoch {epoch}/{epochs} loss {result.losses[-1]:.4f} acc {acc:.1%}")
    result.train_loss, _ = _evaluate(model, x_train, y_train)
    result.test_acc = result.epoch_acc[-1]
    result.wall_s = time.perf_counter() - start
    result.steps = len(result.losses)
    bar.close()
    return result


# -------------------------------------------------------------------------------------- report
def max_difference(a: Result, b: Result) -> float:
    """The largest absolute difference between two runs' per-step loss curves."""
    return max((abs(u - v) for u, v in zip(a.losses, b.losses, strict=True)), default=0.0)


def format_table(results: list[Result]) -> str:
    """One line per run and library; with torch's runs, the fuseopt line's max |loss difference|."""
    compare = any(r.library == "torch" for r in results)
    torch_of = {r.run: r for r in results if r.library == "torch"}
    w = max(len("run"), *(len(r.run.name) for r in results))
    head = (
        f"{'run':<{w}}  {'library':<7}  {'train loss':>10}  {'test acc':>8}  {'wall s':>6}  "
        f"{'step s':>6}  {'ms/step':>7}" + ("  max |Δloss|" if compare else "")
    )
    lines = [head, "-" * len(head)]
    for r in results:
        line = (
            f"{r.run.name:<{w}}  {r.library:<7}  {r.train_loss:>10.4f}  {r.test_acc:>7.1%}  "
            f"{r.wall_s:>6.2f}  {r.step_s:>6.3f}  {1e3 * r.step_s / max(r.steps, 1):>7.3f}"
        )
        if compare and r.library == "fuseopt" and r.run in torch_of:
            line += f"  {max_difference(r, torch_of[r.run]):>11.2e}"
        lines.append(line)
    return "\n".join(lines)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the minibatch loss is noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(results: list[Result], path: Any, title: str, per_epoch: int) -> None:
    """Loss (moving average) and test error curves; torch's runs dashed over fuseopt's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = Figure(figsize=(10, 4), dpi=80)
    FigureCanvasAgg(fig)
    loss_ax, err_ax = fig.subplots(1, 2)
    colors: dict[Run, str] = {}
    for r in results:
        color = colors.setdefault(r.run, f"C{len(colors) % 10}")
        style = dict(color=color, ls="--" if r.library == "torch" else "-", lw=1.2)
        x = [(i + 1) / per_epoch for i in range(len(r.losses))]
        loss_ax.plot(x, _smooth(r.losses, per_epoch), **style)
        # Error on a log scale: 2 % against 3 % stays visible; an error of 0 is drawn at 0.1 %.
        errors = [max(0.1, 100 * (1 - a)) for a in r.epoch_acc]
        err_ax.plot(range(1, len(errors) + 1), errors, marker=".", **style)
    handles = [Line2D([], [], color=c, label=run.name) for run, c in colors.items()]
    if any(r.library == "torch" for r in results):
        handles.append(Line2D([], [], color="k", ls="--", label="torch.optim (dashed)"))
    # 0.3, not 3 x 10^-1; minor ticks labelled at 2, 3 and 5 only, so that labels never overlap
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "235" else "")
    for ax in (loss_ax, err_ax):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
    loss_ax.set_ylabel(f"train loss (moving average of {per_epoch} steps)")
    err_ax.set_ylabel("test error (%)")
    loss_ax.legend(handles=handles, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------- CLI
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``fuseopt demo``."""
    parser = argparse.ArgumentParser(
        prog=prog or "fuseopt demo",
        description="Train an MLP on scikit-learn's digits with several optimizers (same seed, "
        "same budget); print a table and write a picture of the curves.",
    )
    parser.add_argument(
        "--optimizers",
        default=DEFAULT_RUNS,
        metavar="RUNS",
        help="comma-separated runs, each OPTIMIZER[+SCHEDULER][+EMA] (default: "
        f"{DEFAULT_RUNS}). Optimizers: {', '.join(ALGORITHMS)}. Schedulers (stepped every "
        f"step, over the whole budget): {', '.join(SCHEDULERS)}",
    )
    parser.add_argument(
        "--scheduler", metavar="NAME", help="a scheduler for every run that names none"
    )
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default: {DEFAULT_EPOCHS}"
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"default: {BATCH_SIZE}")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    parser.add_argument("-o", "--output", default="demo.png", help="picture (default: demo.png)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.add_argument(
        "--compare-torch",
        action="store_true",
        help="also train with torch.optim's same-named optimizers; the table gives the largest "
        "difference of the loss curves and the picture draws torch's dashed",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch (and numba) threads while training (default: 1: the model is tiny, and a "
        "parallel region on a busy machine waits for its slowest thread)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point of ``fuseopt demo``."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        scheduler = None
        if args.scheduler is not None:
            scheduler = _pick(args.scheduler, list(SCHEDULERS), "scheduler", "--scheduler")
        runs = parse_runs(args.optimizers, scheduler)
        for option in ("epochs", "batch_size", "threads"):
            if getattr(args, option) < 1:
                flag = "--" + option.replace("_", "-")
                raise ValueError(f"{flag} must be at least 1, got {getattr(args, option)}")
        cpus = os.cpu_count() or 1
        if args.threads > cpus:  # torch starts them all: 100000 threads crash the process
            raise ValueError(f"--threads must be at most {cpus} (the CPUs), got {args.threads}")
        if not -(2**63) <= args.seed < 2**64:  # what torch.manual_seed takes
            raise ValueError(f"--seed must be an integer in [-2**63, 2**64 - 1], got {args.seed}")
        if not args.no_plot:
            check_image_format(check_output(args.output, "-o/--output"), "-o/--output")
    except ValueError as e:
        parser.error(str(e))
    except ImportError:
        parser.error(f"writing the picture needs matplotlib: {MISSING_EXTRA} (or use --no-plot)")
    try:
        data = load_digits()
    except ImportError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    libraries = ["fuseopt", "torch"] if args.compare_torch else ["fuseopt"]
    threads = torch.get_num_threads()
    try:
        results = [
            train(
                run,
                library,
                data,
                args.epochs,
                args.seed,
                args.batch_size,
                progress=not args.no_progress,
                threads=args.threads,
            )
            for run in runs
            for library in libraries
        ]
    finally:
        torch.set_num_threads(threads)
    per_epoch = math.ceil(len(data[1]) / args.batch_size)
    title = (
        f"MLP 64-128-10 on scikit-learn digits ({len(data[1])} train / {len(data[3])} test), "
        f"{args.epochs} epoch{'s' * (args.epochs > 1)} of batch {args.batch_size}, seed {args.seed}"
    )
    print(f"fuseopt demo: {title}")
    print(
        f"fuseopt {fuseopt.__version__}, torch {torch.__version__}, python "
        f"{platform.python_version()}, {args.threads} thread{'s' * (args.threads > 1)}"
    )
    print(format_table(results))
    print(
        "train loss: full train set, final weights; test acc: final weights (the EMA's for +EMA); "
        "step s: time in optimizer.step() (after a 2-step warm-up on a throwaway copy)"
    )
    if args.no_plot:
        return 0
    return write_plot(
        lambda: plot(results, args.output, title, per_epoch), args.output, parser.prog
    )


if __name__ == "__main__":
    raise SystemExit(main())
