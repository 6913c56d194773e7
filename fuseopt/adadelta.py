"""Adadelta: an adaptive learning rate method (Zeiler, 2012)."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, Zeros, to_scalar, with_fused

__all__ = ["Adadelta"]


class AdadeltaRule(Rule):
    """Adadelta's elementwise update."""

    reads_step = False  # torch counts its steps and reads none

    state = (Zeros("square_avg"), Zeros("acc_delta"))

    def flags(self, g, first, step, sv):
        return dict(maximize=g["maximize"], wd=g["weight_decay"] != 0)

    def scalars(self, g, step, sv):
        rho = g["rho"]
        return dict(
            wd=g["weight_decay"], rho=rho, omr=1 - rho, eps=g["eps"], neg_lr=-to_scalar(g["lr"])
        )

    def update(self, ops, f, s, param, grad, square_avg, acc_delta):
        if f.maximize:
            grad = -grad
        if f.wd:
            grad = ops.add(grad, param, alpha=s.wd)
        square_avg = ops.addcmul(square_avg * s.rho, grad, grad, value=s.omr)
        std = ops.sqrt(square_avg + s.eps)
        delta = ops.sqrt(acc_delta + s.eps) / std * grad
        acc_delta = ops.addcmul(acc_delta * s.rho, delta, delta, value=s.omr)
        param = ops.add(param, delta, alpha=s.neg_lr)
        return dict(param=param, square_avg=square_avg, acc_delta=acc_delta)


class Adadelta(Optimizer):
    r"""Implements Adadelta.

    .. math::
       \begin{aligned}
            &v_t \leftarrow \rho v_{t-1} + (1 - \rho) g_t^2, \quad
             \Delta x_t \leftarrow \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}} g_t \\
            &u_t \leftarrow \rho u_{t-1} + (1 - \rho) \Delta x_t^2, \quad
             \theta_t \leftarrow \theta_{t-1} - \gamma \Delta x_t
       \end{aligned}

    with :math:`g_t` the gradient (negated if maximize) plus :math:`\lambda\theta_{t-1}`. State
    (``step``, ``square_avg``, ``acc_delta``) as :class:`torch.optim.Adadelta`.

    Args:
        {params}
        lr (float, Tensor, optional): coefficient that scales delta (default: 1.0)
        rho (float, optional): coefficient of the running averages (default: 0.9)
        eps (float, optional): term added to the denominator (default: 1e-6)
        weight_decay (float, optional): weight decay, L2 penalty (default: 0)
        {foreach}
        {capturable}
        {maximize}
        {differentiable}
        {fused}
        {clipping}
        {storage}
    """

    rule = AdadeltaRule()
    _setstate_defaults = dict(foreach=None, maximize=False, differentiable=False, capturable=False)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
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
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        check_non_negative(eps=eps, weight_decay=weight_decay)
        defaults = dict(
            lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
            capturable=capturable, foreach=foreach, differentiable=differentiable,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, with_fused({**defaults, **grad_options}, fused))


Adadelta.__doc__ = _docs.fill(Adadelta.__doc__)
