"""Adamax: Adam with the infinity norm (Kingma & Ba, 2014, section 7)."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_betas, check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, Zeros, to_scalar, with_fused

__all__ = ["Adamax"]


class AdamaxRule(Rule):
    """Adamax's elementwise update."""

    state = (Zeros("exp_avg"), Zeros("exp_inf"))

    def flags(self, g, first, step, sv):
        return dict(maximize=g["maximize"], wd=g["weight_decay"] != 0)

    def scalars(self, g, step, sv):
        b1, b2 = g["betas"]
        return dict(
            wd=g["weight_decay"], omb1=1 - b1, b2=b2, eps=g["eps"],
            neg_clr=-(to_scalar(g["lr"]) / (1 - b1**step)),
        )  # fmt: skip

    def update(self, ops, f, s, param, grad, exp_avg, exp_inf):
        if f.maximize:
            grad = -grad
        if f.wd:
            grad = ops.add(grad, param, alpha=s.wd)
        exp_avg = ops.lerp(exp_avg, grad, s.omb1)
        exp_inf = ops.maximum(exp_inf * s.b2, ops.abs(grad) + s.eps)
        param = ops.addcdiv(param, exp_avg, exp_inf, value=s.neg_clr)
        return dict(param=param, exp_avg=exp_avg, exp_inf=exp_inf)


class Adamax(Optimizer):
    r"""Implements Adamax (Adam based on the infinity norm).

    .. math::
       \begin{aligned}
            &m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
             u_t \leftarrow \max(\beta_2 u_{t-1}, |g_t| + \epsilon)                   \\
            &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{u_t}
       \end{aligned}

    with :math:`g_t` the gradient (negated if maximize) plus :math:`\lambda\theta_{t-1}`. State
    (``step``, ``exp_avg``, ``exp_inf``) as :class:`torch.optim.Adamax`.

    Args:
        {params}
        lr (float, Tensor, optional): learning rate (default: 2e-3)
        betas (tuple[float, float], optional): coefficients of the running average and of the
            infinity norm (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): weight decay, L2 penalty (default: 0)
        {foreach}
        {maximize}
        {differentiable}
        {capturable}
        {fused}
        {clipping}
        {storage}
    """

    rule = AdamaxRule()
    _setstate_defaults = dict(foreach=None, maximize=False, differentiable=False, capturable=False)

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
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
        check_non_negative(eps=eps)
        check_betas(betas)
        check_non_negative(weight_decay=weight_decay)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
            maximize=maximize, differentiable=differentiable, capturable=capturable,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, with_fused({**defaults, **grad_options}, fused))


Adamax.__doc__ = _docs.fill(Adamax.__doc__)
