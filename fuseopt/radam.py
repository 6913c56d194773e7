"""RAdam: Adam with a rectified adaptive learning rate (Liu et al., 2019)."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_betas, check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, Zeros, to_scalar, with_fused

__all__ = ["RAdam"]


def _rho(g, step):
    """(rho_inf, rho_t): the length of the approximated simple moving average."""
    _, b2 = g["betas"]  # (unpacked: torch's ValueError for malformed betas)
    rho_inf = 2 / (1 - b2) - 1
    return rho_inf, rho_inf - 2 * step * (b2**step) / (1 - b2**step)


class RAdamRule(Rule):
    """RAdam's elementwise update; the rectification switch is a per-step flag."""

    state = (Zeros("exp_avg"), Zeros("exp_avg_sq"))
    flags_read_step = True

    def flags(self, g, first, step, sv):
        return dict(
            maximize=g["maximize"],
            wd=g["weight_decay"] != 0,
            decoupled=g["decoupled_weight_decay"],
            rectify=bool(_rho(g, step)[1] > 5.0),
        )

    def scalars(self, g, step, sv):
        lr, (b1, b2), wd = to_scalar(g["lr"]), g["betas"], g["weight_decay"]
        bc2 = 1 - b2**step
        rho_inf, rho_t = _rho(g, step)
        rect = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        return dict(
            decay=1 - lr * wd, wd=wd, omb1=1 - b1, b2=b2, omb2=1 - b2, bc1=1 - b1**step,
            bc2_sqrt=bc2**0.5, lr=lr, eps=g["eps"], rect=rect**0.5 if rect > 0 else 0.0,
        )  # fmt: skip

    def update(self, ops, f, s, param, grad, exp_avg, exp_avg_sq):
        if f.maximize:
            grad = -grad
        if f.wd and f.decoupled:
            param = param * s.decay
        elif f.wd:
            grad = ops.add(grad, param, alpha=s.wd)
        exp_avg = ops.lerp(exp_avg, grad, s.omb1)
        exp_avg_sq = ops.addcmul(exp_avg_sq * s.b2, grad, grad, value=s.omb2)
        step = exp_avg / s.bc1 * s.lr
        if f.rectify:
            step = step * (s.bc2_sqrt / (ops.sqrt(exp_avg_sq) + s.eps)) * s.rect
        param = ops.add(param, step, alpha=-1.0)
        return dict(param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


class RAdam(Optimizer):
    r"""Implements RAdam.

    .. math::
       \begin{aligned}
            &m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
             v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
             \hat{m}_t = m_t / (1 - \beta_1^t)                                            \\
            &\rho_\infty = \tfrac{2}{1 - \beta_2} - 1, \quad
             \rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)                       \\
            &\theta_t \leftarrow \theta_{t-1} - \gamma \hat{m}_t \, r_t
             \tfrac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon} \text{ if } \rho_t > 5,
             \text{ else } \theta_{t-1} - \gamma \hat{m}_t, \quad
             r_t = \sqrt{\tfrac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}
                               {(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
       \end{aligned}

    with :math:`g_t` the gradient (negated if maximize) plus weight decay (decoupled with
    ``decoupled_weight_decay``). State (``step``, ``exp_avg``, ``exp_avg_sq``) as
    :class:`torch.optim.RAdam`.

    Args:
        {params}
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float, float], optional): coefficients of the running averages
            (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): weight decay (default: 0)
        decoupled_weight_decay (bool, optional): decay as AdamW (default: False)
        {foreach}
        {maximize}
        {capturable}
        {differentiable}
        {fused}
        {clipping}
        {storage}
    """

    rule = RAdamRule()
    _setstate_defaults = dict(
        foreach=None, maximize=False, differentiable=False, decoupled_weight_decay=False,
        capturable=False,
    )  # fmt: skip

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
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
        check_non_negative(eps=eps)
        check_betas(betas)
        check_non_negative(weight_decay=weight_decay)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
            foreach=foreach, capturable=capturable, decoupled_weight_decay=decoupled_weight_decay,
            differentiable=differentiable,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, with_fused({**defaults, **grad_options}, fused))


RAdam.__doc__ = _docs.fill(RAdam.__doc__)
