"""AdEMAMix (Pagliardini, Ablin & Grangier, 2024): Adam whose step mixes a fast and a slow
exponential moving average of the grad, with warm-ups of the slow one's weight and decay."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_lr, check_non_negative, check_three_betas
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, Zeros

__all__ = ["AdEMAMix"]


def alpha_at(step: float, alpha: float, t_alpha_beta3: float | None) -> float:
    """The slow average's weight at ``step``: a linear warm-up to ``alpha`` over
    ``t_alpha_beta3`` steps (the reference's ``schedule_alpha``)."""
    return alpha if t_alpha_beta3 is None else min(step * alpha / t_alpha_beta3, alpha)


def beta3_at(step: float, beta1: float, beta3: float, t_alpha_beta3: float | None) -> float:
    """The slow average's decay at ``step``: from ``beta1`` to ``beta3`` over ``t_alpha_beta3``
    steps, linear in the half-life, :math:`1 / \\log\\beta` (the reference's
    ``schedule_beta3``)."""
    if t_alpha_beta3 is None:
        return beta3
    log1, log3 = math.log(beta1), math.log(beta3)
    frac = step / t_alpha_beta3
    return min(math.exp(log1 * log3 / ((1.0 - frac) * log3 + frac * log1)), beta3)


class AdEMAMixRule(Rule):
    """AdEMAMix's elementwise update; with ``cautious``, :meth:`reduce` counts per tensor the
    elements whose fast average agrees in sign with the grad (as Adam's, fuseopt/adam.py)."""

    state = (
        Zeros("exp_avg", signed=True),
        Zeros("exp_avg_sq", signed=False),
        Zeros("exp_avg_slow", signed=True),
    )

    def flags(self, g, first, step, sv):
        wd = g["weight_decay"]
        return dict(
            maximize=g["maximize"], decoupled=wd != 0 and g["weight_decouple"],
            coupled=wd > 0 and not g["weight_decouple"], cautious=g.get("cautious", False),
        )  # fmt: skip

    def reduces(self, f):
        return f.cautious

    def scalars(self, g, step, sv):
        lr, (b1, b2, b3), wd, t = g["lr"], g["betas"], g["weight_decay"], g["t_alpha_beta3"]
        return dict(
            omb1=1 - b1, b2=b2, omb2=1 - b2, omb3=1 - beta3_at(step, b1, b3, t),
            bc1=1 - math.pow(b1, step), bc2_sqrt=math.sqrt(1 - math.pow(b2, step)),
            alpha=alpha_at(step, g["alpha"], t), eps=g["eps"], wd=wd,
            decay=1 - wd * (1.0 if g["fixed_decay"] else lr), neg_lr=-lr,
        )  # fmt: skip

    def _moments(self, ops, f, s, param, grad, exp_avg, exp_avg_sq, exp_avg_slow):
        """The grad as the averages see it (maximize, coupled decay), the decayed param and the
        new averages."""
        if f.maximize:
            grad = -grad
        if f.decoupled:
            param = param * s.decay
        elif f.coupled:
            grad = ops.add(grad, param, alpha=s.wd)
        exp_avg = ops.lerp(exp_avg, grad, s.omb1)
        exp_avg_sq = ops.addcmul(exp_avg_sq * s.b2, grad, grad, value=s.omb2)
        exp_avg_slow = ops.lerp(exp_avg_slow, grad, s.omb3)
        return grad, param, exp_avg, exp_avg_sq, exp_avg_slow

    def reduce(self, ops, f, s, param, grad, exp_avg, exp_avg_sq, exp_avg_slow):
        # cautious: the elements where the fast average agrees in sign with the grad, and the
        # tensor's size (the reference masks the fast average only, not the slow one)
        grad, _, exp_avg, _, _ = self._moments(
            ops, f, s, param, grad, exp_avg, exp_avg_sq, exp_avg_slow
        )
        kept = ops.where(ops.gt(exp_avg * grad, 0.0), 1.0, 0.0)
        return dict(kept=kept, size=kept * 0.0 + 1.0)

    def tensor_scalars(self, group, f, sums, ndims, scalars):
        # the masked average rescaled by size / (kept + 1), as ``apply_cautious``
        return dict(caution=sums["size"] / (sums["kept"] + 1.0))

    def update(self, ops, f, s, param, grad, exp_avg, exp_avg_sq, exp_avg_slow):
        grad, param, exp_avg, exp_avg_sq, exp_avg_slow = self._moments(
            ops, f, s, param, grad, exp_avg, exp_avg_sq, exp_avg_slow
        )
        denom = ops.sqrt(exp_avg_sq) / s.bc2_sqrt + s.eps
        fast = exp_avg
        if f.cautious:
            fast = ops.where(ops.gt(exp_avg * grad, 0.0), exp_avg * s.caution, 0.0)
        mixed = ops.add(fast / s.bc1, exp_avg_slow, alpha=s.alpha)
        param = ops.addcdiv(param, mixed, denom, value=s.neg_lr)
        return dict(param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, exp_avg_slow=exp_avg_slow)


class AdEMAMix(Optimizer):
    r"""Implements AdEMAMix (Pagliardini et al., 2024, "The AdEMAMix Optimizer: Better, Faster,
    Older").

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) \quad (-\text{ if maximize})    \\
            &\text{if } \lambda \neq 0: \text{decoupled: } \theta_{t-1} \leftarrow
             \theta_{t-1}(1 - \lambda\gamma) \;(\lambda \text{ with fixed decay}),
             \text{ else } g_t \leftarrow g_t + \lambda\theta_{t-1}                             \\
            &\alpha_t \leftarrow \min(t\alpha / T, \alpha), \quad
             \beta_{3,t} \leftarrow \min\Big(\exp\frac{\ln\beta_1 \ln\beta_3}
             {(1 - t/T)\ln\beta_3 + (t/T)\ln\beta_1}, \beta_3\Big)
             \quad (\alpha, \beta_3 \text{ where } T \text{ is None})                           \\
            &m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
             s_t \leftarrow \beta_{3,t} s_{t-1} + (1 - \beta_{3,t}) g_t                         \\
            &v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                               \\
            &\text{cautious: } m'_t \leftarrow m_t \mathbb{1}[m_t g_t > 0]\,
             \frac{n}{1 + \sum\mathbb{1}[m_t g_t > 0]} \text{ per tensor of } n
             \text{ elements, else } m'_t \leftarrow m_t                                         \\
            &\theta_t \leftarrow \theta_{t-1} - \gamma \Big(\frac{m'_t}{1 - \beta_1^t}
             + \alpha_t s_t\Big) \Big/ \Big(\frac{\sqrt{v_t}}{\sqrt{1 - \beta_2^t}}
             + \epsilon\Big)
       \end{aligned}

    Argument names, defaults, state keys and numbers are ``pytorch-optimizer``'s ``AdEMAMix``
    (without its ``stable_adamw`` variant); the warm-ups are its schedules, computed on the host
    in double from the step. State: ``step``, ``exp_avg`` (:math:`m`), ``exp_avg_sq``
    (:math:`v`), ``exp_avg_slow`` (:math:`s`). ``cautious=True`` is its ``cautious`` option
    (C-Optim, Liang et al., 2024): only the fast average is masked, the per-tensor counts come
    from a first pass of the same step (fused: one reduction kernel) and the grads are never
    written. Deliberate differences: ``max_grad_norm`` (fuseopt's clipping inside the step) is
    beyond the reference; complex params step on their real views, where the reference refuses
    them; 16-bit params compute in float32 and round once (the reference divides, then adds, in
    the param's dtype).

    Args:
        {params}
        lr (float, optional): learning rate (default: 1e-3)
        betas (tuple[float, float, float], optional): decays of the fast average, of the squared
            grad's average (each in [0, 1)) and of the slow average (in [0, 1])
            (default: (0.9, 0.999, 0.9999))
        weight_decay (float, optional): weight decay (default: 0)
        weight_decouple (bool, optional): decay the weights directly, as AdamW (default: False)
        fixed_decay (bool, optional): decoupled decay by ``weight_decay``, not
            ``lr * weight_decay`` (default: False)
        alpha (float, optional): the slow average's weight (default: 5.0)
        t_alpha_beta3 (float, optional): steps :math:`T` of the warm-up of ``alpha`` and of the
            slow decay; None: no warm-up (default: None)
        eps (float, optional): term added to the denominator (default: 1e-8)
        {maximize}
        {foreach}
        {fused}
        cautious (bool, optional): mask the fast average where its sign is not the grad's,
            rescaled by ``numel / (kept + 1)`` per tensor (default: False)
        {clipping}
        {storage}
    """

    rule = AdEMAMixRule()

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        weight_decouple: bool = False,
        fixed_decay: bool = False,
        alpha: float = 5.0,
        t_alpha_beta3: float | None = None,
        eps: float = 1e-8,
        maximize: bool = False,
        foreach: bool | None = None,
        *,
        fused: bool | None = None,
        cautious: bool = False,
        stable_adamw: bool = False,
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        skip_if_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        kahan_sum: bool = False,
        state_bits: int | None = None,
    ) -> None:
        if isinstance(lr, Tensor):
            raise TypeError("AdEMAMix: lr must be a number (a tensor lr is not supported)")
        check_lr(lr)
        check_three_betas(betas, beta3_closed=True)
        check_non_negative(weight_decay=weight_decay, eps=eps, alpha=alpha)
        if t_alpha_beta3 is not None:
            # (the schedules divide by it and take the logarithms of beta1 and beta3)
            if isinstance(t_alpha_beta3, bool) or not isinstance(t_alpha_beta3, (int, float)):
                raise TypeError(
                    f"t_alpha_beta3 must be a number or None, got {type(t_alpha_beta3).__name__}"
                )
            if not 0.0 < t_alpha_beta3 < math.inf:
                raise ValueError(
                    f"Invalid t_alpha_beta3 value: {t_alpha_beta3} (a positive number of steps, "
                    "or None for no warm-up)"
                )
            if betas[0] == 0.0 or betas[2] == 0.0:
                raise ValueError(
                    f"t_alpha_beta3 needs beta1 and beta3 above 0 (its schedule takes their "
                    f"logarithms), got betas={tuple(betas)}"
                )
        if not isinstance(cautious, bool):
            raise TypeError(f"cautious must be a bool, got {type(cautious).__name__}")
        if stable_adamw:
            raise NotImplementedError(
                "AdEMAMix: stable_adamw=True is not implemented (pytorch-optimizer's variant)"
            )
        defaults = dict(
            lr=lr, betas=tuple(betas), weight_decay=weight_decay,
            weight_decouple=weight_decouple, fixed_decay=fixed_decay, alpha=alpha,
            t_alpha_beta3=t_alpha_beta3, eps=eps, maximize=maximize, foreach=foreach,
            fused=fused,
        )  # fmt: skip
        if cautious:  # (only where asked for, as the reference's kwargs)
            defaults["cautious"] = True
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, {**defaults, **grad_options})


AdEMAMix.__doc__ = _docs.fill(AdEMAMix.__doc__)
