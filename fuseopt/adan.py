"""Adan: adaptive Nesterov momentum (Xie et al., 2022), Adam-like moments of the grad, of the
difference of consecutive grads, and of their Nesterov-corrected sum."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_lr, check_non_negative, check_three_betas
from fuseopt.optimizer import Optimizer
from fuseopt.rule import FirstValue, Rule, Zeros

__all__ = ["Adan"]


class AdanRule(Rule):
    """Adan's elementwise update. ``previous_grad`` holds minus the last grad (the reference's
    convention, so that the difference is one add); it is made by the first step, which has no
    difference yet: the reference's first previous grad is minus the first grad."""

    state = (
        Zeros("exp_avg"),
        Zeros("exp_avg_sq"),
        Zeros("exp_avg_diff"),
        FirstValue("previous_grad"),
    )

    def flags(self, g, first, step, sv):
        wd = g["weight_decay"] != 0
        return dict(
            maximize=g["maximize"], first=first, decoupled=wd and g["weight_decouple"],
            proximal=wd and not g["weight_decouple"],
        )  # fmt: skip

    def scalars(self, g, step, sv):
        lr, (b1, b2, b3), wd = g["lr"], g["betas"], g["weight_decay"]
        return dict(
            omb1=1 - b1, b2=b2, omb2=1 - b2, b3=b3, omb3=1 - b3, eps=g["eps"],
            bc3_sqrt=math.sqrt(1 - math.pow(b3, step)),
            neg_step=-lr / (1 - math.pow(b1, step)),
            neg_diff_step=-lr * b2 / (1 - math.pow(b2, step)),
            decay=1 - lr * wd, shrink=1 + lr * wd,
        )  # fmt: skip

    def update(self, ops, f, s, param, grad, exp_avg, exp_avg_sq, exp_avg_diff, previous_grad=None):
        if f.maximize:
            grad = -grad
        diff = grad + (-grad if f.first else previous_grad)  # (the first: zero)
        exp_avg = ops.lerp(exp_avg, grad, s.omb1)
        exp_avg_diff = ops.lerp(exp_avg_diff, diff, s.omb2)
        nesterov = diff * s.b2 + grad  # g_t + b2 (g_t - g_{t-1})
        exp_avg_sq = ops.addcmul(exp_avg_sq * s.b3, nesterov, nesterov, value=s.omb3)
        denom = ops.sqrt(exp_avg_sq) / s.bc3_sqrt + s.eps
        if f.decoupled:
            param = param * s.decay
        param = ops.addcdiv(param, exp_avg, denom, value=s.neg_step)
        param = ops.addcdiv(param, exp_avg_diff, denom, value=s.neg_diff_step)
        if f.proximal:  # the paper's proximal decay, after the step
            param = param / s.shrink
        return dict(
            param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, exp_avg_diff=exp_avg_diff,
            previous_grad=-grad,
        )  # fmt: skip


class Adan(Optimizer):
    r"""Implements Adan (Xie et al., 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models").

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm c_t\nabla_\theta f_t(\theta_{t-1}) \quad (-\text{ if maximize};
             c_t \text{ the clip coefficient, else } 1)                                        \\
            &d_t \leftarrow g_t - g_{t-1} \quad (d_1 = 0)                                         \\
            &m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
             n_t \leftarrow \beta_2 n_{t-1} + (1 - \beta_2) d_t                                  \\
            &v_t \leftarrow \beta_3 v_{t-1} + (1 - \beta_3) (g_t + \beta_2 d_t)^2                \\
            &\eta_t \leftarrow \sqrt{v_t} / \sqrt{1 - \beta_3^t} + \epsilon, \quad
             \text{decoupled: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)         \\
            &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{\eta_t}
             - \frac{\gamma\beta_2}{1 - \beta_2^t} \frac{n_t}{\eta_t}                          \\
            &\text{not decoupled: } \theta_t \leftarrow \theta_t / (1 + \gamma\lambda)
       \end{aligned}

    Argument names, defaults, state keys and numbers are ``pytorch-optimizer``'s ``Adan``
    (without its ``use_gc`` and ``adanorm`` variants). State: ``step``, ``exp_avg`` (:math:`m`),
    ``exp_avg_sq`` (:math:`v`), ``exp_avg_diff`` (:math:`n`) and ``previous_grad``, which holds
    :math:`-g_{t-1}`, as there. Deliberate differences:

    * ``max_grad_norm`` is fuseopt's global-norm clipping inside the step, the numbers of
      ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_grad_norm / (norm + 1e-6)``, the norm
      in the grads' dtype); pytorch-optimizer's divides by ``norm + eps``, the norm summed in
      float32: the coefficients differ by a relative ``(1e-6 - eps) / norm`` at most. Its
      ``max_grad_norm=0.0`` (no clipping) is accepted and means None here. The grads are never
      written (pytorch-optimizer clips, negates and scales them in place).
    * ``maximize=True``: the first step has no grad difference, as without it (the step of
      minimizing :math:`-f`); pytorch-optimizer's first previous grad is minus the grad before
      its negation, a difference of :math:`-2 g_1` at its first step.

    Args:
        {params}
        lr (float, optional): learning rate (default: 1e-3)
        betas (tuple[float, float, float], optional): coefficients of the running averages of
            the grad, of the grad's difference and of the squared Nesterov grad
            (default: (0.98, 0.92, 0.99))
        weight_decay (float, optional): weight decay (default: 0)
        weight_decouple (bool, optional): decay the weights before the step, as AdamW; else the
            paper's proximal decay, a division after it (default: False)
        {foreach}
        eps (float, optional): term added to the denominator (default: 1e-8)
        {maximize}
        {fused}
        {clipping}
        {storage}
        use_gc, adanorm (bool, optional): pytorch-optimizer's variants, not implemented: True
            raises (default: False)
    """

    rule = AdanRule()

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        weight_decay: float = 0.0,
        weight_decouple: bool = False,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        eps: float = 1e-8,
        maximize: bool = False,
        *,
        fused: bool | None = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        skip_if_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        kahan_sum: bool = False,
        state_bits: int | None = None,
        use_gc: bool = False,
        adanorm: bool = False,
    ) -> None:
        if isinstance(lr, Tensor):
            raise TypeError("Adan: lr must be a number (the reference takes no tensor lr)")
        check_lr(lr)
        # (beta3 = 1 would divide by 1 - beta3**t = 0: NaN params, where the reference allows it)
        check_three_betas(betas, beta3_closed=False)
        check_non_negative(weight_decay=weight_decay, eps=eps)
        for name, value in (("use_gc", use_gc), ("adanorm", adanorm)):
            if value:
                raise NotImplementedError(
                    f"Adan: {name}=True is not implemented (pytorch-optimizer's variant)"
                )
        if max_grad_norm == 0.0 and not isinstance(max_grad_norm, bool):
            max_grad_norm = None  # (pytorch-optimizer's default: no clipping)
        defaults = dict(
            lr=lr, betas=tuple(betas), weight_decay=weight_decay,
            weight_decouple=weight_decouple, eps=eps, maximize=maximize, foreach=foreach,
            fused=fused,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, {**defaults, **grad_options})


Adan.__doc__ = _docs.fill(Adan.__doc__)
