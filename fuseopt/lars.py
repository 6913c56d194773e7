"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg, 2017), SGD with momentum whose
step for each matrix is scaled by the trust ratio of its param and grad norms."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, Zeros

__all__ = ["LARS"]


class LARSRule(Rule):
    """LARS's elementwise update; the norms come from :meth:`reduce`, the trust ratio (and which
    params adapt: those of more than one dimension) from :meth:`tensor_scalars`."""

    state = (Zeros("momentum_buffer", when=lambda g: g["momentum"] > 0),)
    has_step = False

    def reduces(self, f):
        return True

    def flags(self, g, first, step, sv):
        return dict(maximize=g["maximize"], momentum=g["momentum"] > 0, nesterov=g["nesterov"])

    def scalars(self, g, step, sv):
        return dict(momentum=g["momentum"], damp=1 - g["dampening"], neg_lr=-g["lr"])

    def reduce(self, ops, f, s, param, grad, **state):
        return dict(param_sq=param * param, grad_sq=grad * grad)

    def tensor_scalars(self, group, f, sums, ndims, scalars):
        p_norm, g_norm = sums["param_sq"].sqrt(), sums["grad_sq"].sqrt()
        denom = g_norm + group["weight_decay"] * p_norm
        trust = torch.where(
            (p_norm > 0) & (denom > 0), group["trust_coefficient"] * p_norm / denom, 1.0
        )
        adapts = ndims > 1  # vectors and scalars (biases, norms): plain SGD, no weight decay
        decay = torch.full_like(trust, float(group["weight_decay"]))
        return dict(trust=torch.where(adapts, trust, 1.0), decay=torch.where(adapts, decay, 0.0))

    def update(self, ops, f, s, param, grad, momentum_buffer=None):
        if f.maximize:
            grad = -grad
        grad = ops.add(grad, param, alpha=s.decay) * s.trust
        if f.momentum:
            momentum_buffer = ops.add(momentum_buffer * s.momentum, grad, alpha=s.damp)
            grad = (
                ops.add(grad, momentum_buffer, alpha=s.momentum) if f.nesterov else momentum_buffer
            )
        return dict(param=ops.add(param, grad, alpha=s.neg_lr), momentum_buffer=momentum_buffer)


class LARS(Optimizer):
    r"""Implements LARS (You et al., 2017, "Large Batch Training of Convolutional Networks").

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) \quad (-\text{ if maximize})   \\
            &\text{if } \dim\theta > 1:\; r_t \leftarrow \eta\,
                \frac{\lVert\theta_{t-1}\rVert}{\lVert g_t\rVert + \lambda\lVert\theta_{t-1}\rVert}
                \text{ (1 where a norm is 0)},\;
                g_t \leftarrow r_t\,(g_t + \lambda\theta_{t-1})                              \\
            &\text{if } \mu > 0: b_t \leftarrow \mu b_{t-1} + (1 - \tau) g_t,\;
                g_t \leftarrow g_t + \mu b_t \text{ if nesterov else } b_t                     \\
            &\theta_t \leftarrow \theta_{t-1} - \gamma g_t
       \end{aligned}

    Params of one dimension or none (biases, norm weights) take plain SGD, without weight decay or
    trust ratio, as in ``pytorch-optimizer``'s ``LARS``, whose argument names, defaults and numbers
    these are (the norms are summed in float64, where it takes them in the param's dtype). The
    norms of every param come from one first pass over params and grads in the same step (fused:
    one reduction kernel); the grads are never written (``pytorch-optimizer`` scales them in
    place). State: ``momentum_buffer`` (zeros at the first step), only with momentum.

    Args:
        {params}
        lr (float, optional): learning rate (default: 1e-3)
        weight_decay (float, optional): weight decay of the params that adapt (default: 0)
        momentum (float, optional): momentum factor, in [0, 1) (default: 0.9)
        dampening (float, optional): dampening for momentum, in [0, 1) (default: 0)
        trust_coefficient (float, optional): the trust coefficient :math:`\eta` (default: 1e-3)
        nesterov (bool, optional): enables Nesterov momentum (default: False)
        {maximize}
        {foreach}
        {fused}
        {clipping}
        {storage}
    """

    rule = LARSRule()

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        trust_coefficient: float = 1e-3,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
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
        if isinstance(lr, Tensor):
            raise TypeError("LARS: lr must be a number (the reference takes no tensor lr)")
        check_lr(lr)
        check_non_negative(weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        for name, value in (("momentum", momentum), ("dampening", dampening)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Invalid {name} value: {value} (in [0, 1))")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
            trust_coefficient=trust_coefficient, nesterov=nesterov, maximize=maximize,
            foreach=foreach, fused=fused,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, {**defaults, **grad_options})


LARS.__doc__ = _docs.fill(LARS.__doc__)
