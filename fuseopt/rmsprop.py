"""RMSprop: root-mean-square propagation (Hinton, lecture 6e), centered and with momentum."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, Zeros, to_scalar, with_fused

__all__ = ["RMSprop"]


class RMSpropRule(Rule):
    """RMSprop's elementwise update."""

    reads_step = False  # torch counts its steps and reads none

    state = (
        Zeros("square_avg"),
        Zeros("momentum_buffer", when=lambda g: g["momentum"] > 0),
        Zeros("grad_avg", when=lambda g: g["centered"]),
    )

    def flags(self, g, first, step, sv):
        return dict(
            maximize=g["maximize"],
            wd=g["weight_decay"] != 0,
            momentum=g["momentum"] > 0,
            centered=g["centered"],
        )

    def scalars(self, g, step, sv):
        alpha = g["alpha"]
        return dict(
            wd=g["weight_decay"], alpha=alpha, oma=1 - alpha, eps=g["eps"],
            momentum=g["momentum"], neg_lr=-to_scalar(g["lr"]),
        )  # fmt: skip

    def update(self, ops, f, s, param, grad, square_avg, momentum_buffer=None, grad_avg=None):
        if f.maximize:
            grad = -grad
        if f.wd:
            grad = ops.add(grad, param, alpha=s.wd)
        square_avg = ops.addcmul(square_avg * s.alpha, grad, grad, value=s.oma)
        if f.centered:
            grad_avg = ops.lerp(grad_avg, grad, s.oma)
            avg = ops.sqrt(ops.addcmul(square_avg, grad_avg, grad_avg, value=-1))
        else:
            avg = ops.sqrt(square_avg)
        avg = avg + s.eps
        if f.momentum:
            momentum_buffer = ops.addcdiv(momentum_buffer * s.momentum, grad, avg)
            param = ops.add(param, momentum_buffer, alpha=s.neg_lr)
        else:
            param = ops.addcdiv(param, grad, avg, value=s.neg_lr)
        return dict(
            param=param, square_avg=square_avg, momentum_buffer=momentum_buffer, grad_avg=grad_avg
        )


class RMSprop(Optimizer):
    r"""Implements RMSprop.

    .. math::
       \begin{aligned}
            &v_t \leftarrow \alpha v_{t-1} + (1 - \alpha) g_t^2, \quad
             \tilde{v}_t = v_t - \bar{g}_t^2 \text{ if centered } (\bar{g}_t \leftarrow
             \alpha \bar{g}_{t-1} + (1 - \alpha) g_t) \text{ else } v_t                   \\
            &b_t \leftarrow \mu b_{t-1} + g_t / (\sqrt{\tilde{v}_t} + \epsilon), \;
             \theta_t \leftarrow \theta_{t-1} - \gamma b_t \text{ if } \mu > 0 \text{ else }
             \theta_{t-1} - \gamma g_t / (\sqrt{\tilde{v}_t} + \epsilon)
       \end{aligned}

    with :math:`g_t` the gradient (negated if maximize) plus :math:`\lambda\theta_{t-1}`. State
    (``step``, ``square_avg``, ``momentum_buffer``, ``grad_avg``) as :class:`torch.optim.RMSprop`.

    Args:
        {params}
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        alpha (float, optional): smoothing constant (default: 0.99)
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): weight decay, L2 penalty (default: 0)
        momentum (float, optional): momentum factor (default: 0)
        centered (bool, optional): normalise by an estimate of the gradient's variance
            (default: False)
        {capturable}
        {foreach}
        {maximize}
        {differentiable}
        {fused}
        {clipping}
        {storage}
    """

    rule = RMSpropRule()
    _setstate_defaults = dict(
        momentum=0, centered=False, foreach=None, maximize=False, differentiable=False,
        capturable=False,
    )  # fmt: skip

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
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
        check_non_negative(eps=eps, momentum=momentum, weight_decay=weight_decay, alpha=alpha)
        defaults = dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
            weight_decay=weight_decay, capturable=capturable, foreach=foreach, maximize=maximize,
            differentiable=differentiable,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, with_fused({**defaults, **grad_options}, fused))


RMSprop.__doc__ = _docs.fill(RMSprop.__doc__)
