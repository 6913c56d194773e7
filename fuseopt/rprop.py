"""Rprop: resilient backpropagation (Riedmiller & Braun, 1993)."""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_lr
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Fill, Rule, Zeros, with_fused

__all__ = ["Rprop"]


def _f32(*values: float) -> tuple[float, ...]:
    """``values`` rounded to float32, as the kernels see them (on the host: no device read)."""
    return struct.unpack(f"{len(values)}f", struct.pack(f"{len(values)}f", *values))


class RpropRule(Rule):
    """Rprop's elementwise update: step sizes grow while the gradient keeps its sign."""

    reads_step = False  # torch counts its steps and reads none

    state = (Zeros("prev"), Fill("step_size", key="lr", like_grad=True))

    def flags(self, g, first, step, sv):
        etaminus, etaplus = g["etas"]
        # torch's range for the etas, in the kernels' float32 too (a user may change them later)
        plain = all(0 < m < 1 < p for m, p in ((etaminus, etaplus), _f32(etaminus, etaplus)))
        return dict(maximize=g["maximize"], plain_etas=plain)

    def scalars(self, g, step, sv):
        (etaminus, etaplus), (lo, hi) = g["etas"], g["step_sizes"]
        return dict(etaminus=etaminus, etaplus=etaplus, lo=lo, hi=hi)

    def update(self, ops, f, s, param, grad, prev, step_size):
        if f.maximize:
            grad = -grad
        if f.plain_etas:
            # torch's chain below, in fewer selects (16-bit kernels are compute-bound, this one
            # most): with 0 < eta- < 1 < eta+ no replaced value matches a later test, and
            # step_size * 1 is step_size, so every branch rounds as torch's one multiply
            product = grad * prev
            turned = ops.lt(product, 0)
            grown = ops.where(turned, step_size * s.etaminus, step_size)
            grown = ops.where(ops.gt(product, 0), step_size * s.etaplus, grown)
            step_size = ops.clamp(grown, s.lo, s.hi)
            grad = ops.where(turned, 0, grad)
        else:
            factor = ops.sign(grad * prev)  # then, as torch, sign -> eta+ / eta- / 1 in place
            factor = ops.where(ops.gt(factor, 0), s.etaplus, factor)
            factor = ops.where(ops.lt(factor, 0), s.etaminus, factor)
            factor = ops.where(ops.eq(factor, 0), 1, factor)
            step_size = ops.clamp(step_size * factor, s.lo, s.hi)
            grad = ops.where(ops.eq(factor, s.etaminus), 0, grad)  # no step after a sign change
        param = ops.addcmul(param, ops.sign(grad), step_size, value=-1)
        return dict(param=param, prev=grad, step_size=step_size)


class Rprop(Optimizer):
    r"""Implements the resilient backpropagation algorithm.

    .. math::
       \begin{aligned}
            &\eta_t \leftarrow \min(\eta_{t-1}\eta_+, \Gamma_{max}) \text{ if } g_t g_{t-1} > 0,
             \; \max(\eta_{t-1}\eta_-, \Gamma_{min}) \text{ and } g_t \leftarrow 0
             \text{ if } g_t g_{t-1} < 0, \text{ else } \eta_{t-1}                          \\
            &\theta_t \leftarrow \theta_{t-1} - \eta_t \operatorname{sign}(g_t)
       \end{aligned}

    State (``step``, ``prev``, ``step_size``) as :class:`torch.optim.Rprop`.

    Args:
        {params}
        lr (float, Tensor, optional): learning rate, the initial step size (default: 1e-2)
        etas (tuple[float, float], optional): multiplicative decrease and increase factors
            (default: (0.5, 1.2))
        step_sizes (tuple[float, float], optional): minimal and maximal step sizes
            (default: (1e-6, 50))
        {capturable}
        {foreach}
        {maximize}
        {differentiable}
        {fused}
        {clipping}
        {storage}
    """

    rule = RpropRule()
    _setstate_defaults = dict(foreach=None, maximize=False, differentiable=False, capturable=False)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        skip_if_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        kahan_sum: bool = False,
        state_bits: int | None = None,
    ) -> None:
        check_lr(lr)
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")
        defaults = dict(
            lr=lr, etas=etas, step_sizes=step_sizes, foreach=foreach, maximize=maximize,
            differentiable=differentiable, capturable=capturable,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, with_fused({**defaults, **grad_options}, fused))


Rprop.__doc__ = _docs.fill(Rprop.__doc__)
