"""Training with smaller optimizer states: ``python -m fuseopt.storage_convergence``.

An MLP (64-256-256-10) learns scikit-learn's bundled digits with AdamW at a small learning rate
(1e-4): the same initial weights and minibatches for every run of :data:`VARIANTS`: float32
params, then bfloat16 params, grads and states (the forward pass too) stored to nearest, with
``kahan_sum=True``, and with ``stochastic_rounding=True``; then float32 params with 8-bit
blockwise moments (``state_bits=8``). Adam's updates are about ``lr`` per element, below half a
bfloat16 ulp of most weights (|w| ~ 0.06: ulp 2**-12..2**-11), so to-nearest stores lose most
of them and the plain bfloat16 run stalls; the compensated ones keep them and follow float32. The command prints the full-batch train loss of each run at the end and,
with ``--plot PATH``, draws each run's loss curve (the full-batch loss every ``--every`` steps).

A run is one row of :data:`VARIANTS`: the dtype of the model and the optimizer's storage options.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import fuseopt
from fuseopt._console import MISSING_EXTRA, check_image_format, check_output, write_plot

__all__ = ["VARIANTS", "digits", "main", "plot", "train", "train_curve"]

# run name -> (dtype of the model's params, grads and forward pass; fuseopt.AdamW's options)
VARIANTS: dict[str, tuple[torch.dtype, dict[str, Any]]] = {
    "float32": (torch.float32, {}),
    "bfloat16": (torch.bfloat16, {}),
    "bfloat16 + kahan_sum": (torch.bfloat16, dict(kahan_sum=True)),
    "bfloat16 + stochastic_rounding": (torch.bfloat16, dict(stochastic_rounding=True)),
    # 8-bit moments of the 64x256 and 256x256 weights (4,096 elements or more: the rest keep
    # float32 ones)
    "float32 + state_bits=8": (torch.float32, dict(state_bits=8)),
}

EVERY = 10  # steps between two points of a loss curve


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: 1,797 images of 8x8 pixels scaled to [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def train_curve(
    variant: str,
    steps: int = 300,
    lr: float = 1e-4,
    batch: int = 256,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    every: int = EVERY,
) -> list[tuple[int, float]]:
    """Train the MLP with the options of ``variant`` (a key of :data:`VARIANTS`); the full-batch
    train loss before the first step, after every ``every`` steps, and after the last: a list of
    ``(step, loss)``. Measuring the loss changes nothing in the run (no grad, no random draw)."""
    dtype, options = VARIANTS[variant]
    x, y = data if data is not None else digits()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).to(dtype)
    opt = fuseopt.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **options)
    gen = torch.Generator().manual_seed(1)
    x = x.to(dtype)

    def full_batch_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(x).float(), y).item()

    curve = [(0, full_batch_loss())]
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]).float(), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            curve.append((step, full_batch_loss()))
    return curve


def train(
    variant: str,
    steps: int = 300,
    lr: float = 1e-4,
    batch: int = 256,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """The full-batch train loss after ``steps`` steps of :func:`train_curve`'s run."""
    return train_curve(variant, steps, lr, batch, data, every=steps)[-1][1]


def plot(curves: dict[str, list[tuple[int, float]]], title: str, path: Any) -> None:
    """Draw the loss curves (name -> ``(step, loss)`` list) on one log-scale axis; write ``path``
    (the format from its suffix)."""
    # A bare Figure, not pyplot: no global figure state, no GUI backend chosen behind the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (name, curve) in enumerate(curves.items()):
        steps, losses = zip(*curve)
        # the first run (float32), the reference, wide and grey beneath the others: where a run
        # follows it, both stay visible
        style = (
            dict(color="0.7", linewidth=5, zorder=1)
            if i == 0
            else dict(color=f"C{i - 1}", linewidth=1.4, zorder=2)
        )
        ax.plot(steps, losses, label=f"{name}: {losses[-1]:.3f}", **style)
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ticks = [t for t in (0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5) if lo <= t <= hi]
    ax.set_yticks(ticks, labels=[f"{t:g}" for t in ticks])
    ax.set_yticks([], minor=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("full-batch train loss")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="run: final loss", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None} if str(path).endswith(".png") else None)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m fuseopt.storage_convergence``."""
    parser = argparse.ArgumentParser(
        prog="python -m fuseopt.storage_convergence", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--steps", type=int, default=600, help="AdamW steps (default: 600)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    parser.add_argument(
        "--every",
        type=int,
        default=EVERY,
        help=f"steps between two points of the loss curves (default: {EVERY})",
    )
    parser.add_argument(
        "--plot", metavar="PATH", help="draw the loss curves to PATH (.png, .svg, ...)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: train every variant, print the final losses, plot the curves."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        if args.every < 1:
            raise ValueError(f"--every must be at least 1, got {args.every}")
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {args.lr}")
        if args.plot:  # fail now, not after the training
            check_image_format(check_output(args.plot, "--plot"), "--plot")
    except ValueError as e:
        parser.error(str(e))
    except ImportError:
        parser.error(f"--plot needs matplotlib: {MISSING_EXTRA}")
    data = digits()
    title = f"AdamW lr={args.lr:g}, {args.steps} steps of 256 digits"
    print(f"{title}; full-batch train loss")
    curves = {}
    for variant in VARIANTS:
        start = time.perf_counter()
        curves[variant] = train_curve(variant, args.steps, args.lr, data=data, every=args.every)
        elapsed = time.perf_counter() - start
        print(f"  {variant:<32} {curves[variant][-1][1]:.4f}   ({elapsed:.1f} s)", flush=True)
    if not args.plot:
        return 0

    def draw() -> None:
        plot(curves, f"MLP 64-256-256-10 on scikit-learn's digits: {title}", args.plot)

    return write_plot(draw, args.plot, parser.prog, "--plot")


if __name__ == "__main__":
    sys.exit(main())
