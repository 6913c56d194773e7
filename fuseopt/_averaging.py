"""Weight averaging as an update rule, so that the EMA/SWA updates of :mod:`fuseopt.swa_utils` run
through the same backends (one fused kernel on CPU) as the optimizers."""

from __future__ import annotations

import torch

from fuseopt.kernels import foreach, numba_cpu
from fuseopt.rule import Flags, Rule


class EMARule(Rule):
    """``avg <- avg + (1 - decay) * (param - avg)``, ATen's lerp (what torch's EMA computes)."""

    has_step = False

    def update(self, ops, f, s, param, grad):
        # the "param" operand is the average being updated, the "grad" operand the model's value
        return dict(param=ops.lerp(param, grad, s.weight))


_EMA = EMARule()


def _apply(rule, averages: list[torch.Tensor], params: list[torch.Tensor], scalars: dict) -> None:
    kernel = [
        (a, p)
        for a, p in zip(averages, params)
        if a.device.type == "cpu"
        and numba_cpu.supports(a.dtype)
        and a.dtype == p.dtype
        and a.is_contiguous()
        and p.is_contiguous()
    ]
    rest = [(a, p) for a, p in zip(averages, params) if not any(a is k for k, _ in kernel)]
    if kernel and numba_cpu.available():
        numba_cpu.run(rule, Flags(), scalars, [a for a, _ in kernel], [p for _, p in kernel], {})
    else:
        rest = kernel + rest
    if rest:
        foreach.run(rule, Flags(), scalars, [a for a, _ in rest], [p for _, p in rest], {})


@torch.no_grad()
def ema_update(averages: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """In place ``avg.lerp_(param, 1 - decay)`` for every pair, fused on CPU float32/float64."""
    _apply(_EMA, averages, params, {"weight": 1 - decay})


@torch.no_grad()
def swa_update(averages: list[torch.Tensor], params: list[torch.Tensor], n_averaged) -> None:
    """In place equal average, ``avg.lerp_(param, 1 / (n_averaged + 1))`` (torch's formula, the
    weight computed as torch does for an int or a tensor count), fused on CPU."""
    _apply(_EMA, averages, params, {"weight": float(1 / (n_averaged + 1))})
