"""The ``fuseopt`` command: ``fuseopt demo | bench | plot-lr ...`` (also ``python -m fuseopt ...``)."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# subcommand -> (module whose ``main(argv, prog)`` runs it, help line). Modules are imported only
# when their subcommand runs, so ``fuseopt --help`` stays fast.
COMMANDS = {
    "demo": ("fuseopt.demo", "train a small model with several optimizers; table and loss plot"),
    "bench": ("fuseopt.bench", "time optimizer.step() of fuseopt against torch.optim"),
    "plot-lr": ("fuseopt.plot_lr", "plot a scheduler's lr (and momentum) curve"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand's own options are parsed by its module."""
    parser = argparse.ArgumentParser(
        prog="fuseopt", description="torch.optim, re-implemented with fused kernels."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_line) in COMMANDS.items():
        # No -h here: ``fuseopt bench -h`` must reach the subcommand's own, complete parser.
        sub.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fuseopt COMMAND [ARGS...]``; ARGS go unchanged to the subcommand's ``main``."""
    args, rest = build_parser().parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(rest, prog=f"fuseopt {args.command}")
