"""ASGD: averaged stochastic gradient descent (Polyak & Juditsky, 1992)."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, ScalarState, Zeros, to_scalar, with_fused

__all__ = ["ASGD"]


class ASGDRule(Rule):
    """ASGD's elementwise update; ``eta`` and ``mu`` are per-param host scalars, as in torch."""

    state = (
        ScalarState("eta", key="lr", on_param_device=True),
        ScalarState("mu", value=1.0, on_param_device=True),
        Zeros("ax"),
    )

    def flags(self, g, first, step, sv):
        # torch copies the param into ax while mu is 1, and averages afterwards
        return dict(maximize=g["maximize"], wd=g["weight_decay"] != 0, average=sv["mu"] != 1)

    def scalars(self, g, step, sv):
        eta = sv["eta"]
        return dict(wd=g["weight_decay"], decay=1 - g["lambd"] * eta, neg_eta=-eta, mu=sv["mu"])

    def after(self, g, step, sv):
        lr, lambd = to_scalar(g["lr"]), g["lambd"]
        eta = lr / ((1 + lambd * lr * step) ** g["alpha"])
        mu = 1 / max(1, step - g["t0"])
        # one foreach copy per state (from a float64 scalar: one rounding, as torch's copy_)
        for name, value in (("eta", eta), ("mu", mu)):
            src = torch.as_tensor(value, dtype=torch.float64)
            torch._foreach_copy_(sv[name], [src] * len(sv[name]))

    def update(self, ops, f, s, param, grad, ax):
        if f.maximize:
            grad = -grad
        if f.wd:
            grad = ops.add(grad, param, alpha=s.wd)
        param = ops.add(param * s.decay, grad, alpha=s.neg_eta)
        ax = ax + (param - ax) * s.mu if f.average else param
        return dict(param=param, ax=ax)


class ASGD(Optimizer):
    r"""Implements Averaged Stochastic Gradient Descent.

    .. math::
       \begin{aligned}
            &\theta_t \leftarrow (1 - \lambda \eta_t)\theta_{t-1} - \eta_t g_t, \quad
             a_t \leftarrow a_{t-1} + \mu_t (\theta_t - a_{t-1})                           \\
            &\eta_{t+1} \leftarrow \gamma / (1 + \lambda \gamma t)^\alpha, \quad
             \mu_{t+1} \leftarrow 1 / \max(1, t - t_0)
       \end{aligned}

    with :math:`g_t` the gradient (negated if maximize) plus the weight decay term. State
    (``step``, ``eta``, ``mu``, ``ax``) as :class:`torch.optim.ASGD`.

    Args:
        {params}
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        lambd (float, optional): decay term (default: 1e-4)
        alpha (float, optional): power for the eta update (default: 0.75)
        t0 (float, optional): point at which to start averaging (default: 1e6)
        weight_decay (float, optional): weight decay, L2 penalty (default: 0)
        {foreach}
        {maximize}
        {differentiable}
        {capturable}
        {fused}
        {clipping}
        {storage}
    """

    rule = ASGDRule()
    _setstate_defaults = dict(foreach=None, maximize=False, differentiable=False, capturable=False)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
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
        check_non_negative(weight_decay=weight_decay)
        defaults = dict(
            lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, foreach=foreach,
            maximize=maximize, differentiable=differentiable, capturable=capturable,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, with_fused({**defaults, **grad_options}, fused))


ASGD.__doc__ = _docs.fill(ASGD.__doc__)
