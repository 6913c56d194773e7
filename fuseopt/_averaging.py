"""Weight averaging as an update rule, so that the EMA/SWA updates of :mod:`fuseopt.swa_utils` run
through the same backends (one fused kernel on CPU) as the optimizers."""

from __future__ import annotations

import torch

from fuseopt import kernels
from fuseopt.kernels import numba_cpu
from fuseopt.rule import Flags, Rule


class EMARule(Rule):
    """``avg <- avg + (1 - decay) * (param - avg)``, ATen's lerp (what torch's EMA computes)."""

    has_step = False

    def update(self, ops, f, s, param, grad):
        # the "param" operand is the average being updated, the "grad" operand the model's value
        return dict(param=ops.lerp(param, grad, s.weight))


_EMA = EMARule()


def _fusable(a: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether the pair (of equal shapes: :func:`_apply` checked) may take the kernel;
    :func:`fuseopt._plan.kernel_launch` then checks everything the kernel assumes of them."""
    return (
        a.device.type == "cpu"
        and a.layout == torch.strided
        and numba_cpu.supports(a.dtype)
        and a.dtype == p.dtype
        and a.is_contiguous()
        and p.is_contiguous()
        and not (a.is_neg() or p.is_neg())
    )


def _apply(rule, averages: list[torch.Tensor], params: list[torch.Tensor], scalars: dict) -> None:
    # every check before any tensor changes (torch's foreach ops refuse these too)
    if len(averages) != len(params):
        raise RuntimeError(
            f"weight averaging: {len(averages)} averaged tensors but {len(params)} current ones"
        )
    for i, (a, p) in enumerate(zip(averages, params)):
        if a.shape != p.shape:
            raise RuntimeError(
                f"weight averaging, tensor {i}: the average has shape {tuple(a.shape)}, the "
                f"current value {tuple(p.shape)}"
            )
    kernel = [(a, p) for a, p in zip(averages, params) if _fusable(a, p)]
    if not (kernel and numba_cpu.available()):
        kernel = []
    if kernel and len({a.dtype for a, _ in kernel}) > 1:  # one launch per dtype
        kernel = [(a, p) for a, p in kernel if a.dtype == kernel[0][0].dtype]
    chosen = {id(a) for a, _ in kernel}
    rest = [(a, p) for a, p in zip(averages, params) if id(a) not in chosen]
    if kernel:
        avgs, cur = [a for a, _ in kernel], [p for _, p in kernel]
        try:
            kernels.run("numba", rule, Flags(), scalars, avgs, cur, {})
        except ValueError:  # tensors that alias, a storage too small: torch's ops decide
            rest = kernel + rest
    if rest:
        kernels.run("foreach", rule, Flags(), scalars, [a for a, _ in rest], [p for _, p in rest], {})


@torch.no_grad()
def ema_update(averages: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """In place ``avg.lerp_(param, 1 - decay)`` for every pair, fused on CPU float32/float64."""
    _apply(_EMA, averages, params, {"weight": 1 - decay})


@torch.no_grad()
def swa_update(averages: list[torch.Tensor], params: list[torch.Tensor], n_averaged) -> None:
    """In place equal average, ``avg.lerp_(param, 1 / (n_averaged + 1))`` (torch's formula, the
    weight computed as torch does for an int or a tensor count), fused on CPU."""
    _apply(_EMA, averages, params, {"weight": float(1 / (n_averaged + 1))})
