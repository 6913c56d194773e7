"""SGD: stochastic gradient descent, with momentum, dampening, Nesterov and weight decay."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import FirstValue, Rule

__all__ = ["SGD"]


class SGDRule(Rule):
    """SGD's elementwise update; the momentum buffer is the first step's gradient, as in torch."""

    state = (FirstValue("momentum_buffer", when=lambda g: g["momentum"] != 0, signed=True),)
    has_step = False
    sparse_ok = True

    def flags(self, g, first, step, sv):
        return dict(
            maximize=g["maximize"],
            wd=g["weight_decay"] != 0,
            momentum=g["momentum"] != 0,
            first=first,
            nesterov=g["nesterov"],
        )

    def scalars(self, g, step, sv):
        return dict(
            wd=g["weight_decay"], momentum=g["momentum"], damp=1 - g["dampening"], neg_lr=-g["lr"]
        )

    def update(self, ops, f, s, param, grad, momentum_buffer=None):
        if f.maximize:
            grad = -grad
        if f.wd:
            grad = ops.add(grad, param, alpha=s.wd)
        if f.momentum:
            if not f.first:
                momentum_buffer = ops.add(momentum_buffer * s.momentum, grad, alpha=s.damp)
            else:  # torch's first buffer is a detached copy of the grad
                momentum_buffer = ops.detach(grad)
            grad = (
                ops.add(grad, momentum_buffer, alpha=s.momentum) if f.nesterov else momentum_buffer
            )
        return dict(param=ops.add(param, grad, alpha=s.neg_lr), momentum_buffer=momentum_buffer)

    def check_sparse(self, group, param, grad):
        if group["weight_decay"] != 0:
            # torch's error (ATen's, from grad.add(param)), raised here before any param of the
            # group is stepped rather than part-way through it
            raise RuntimeError(
                "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
            )
        # (a sparse grad runs the for-loop: it stores the param as a dense step does, random
        # bits included, and the momentum buffer as a sparse tensor)
        buffer = ("momentum_buffer",) if group["momentum"] != 0 else ()
        _storage.check_sparse(self, group, param, buffer, param_store=False)


class SGD(Optimizer):
    r"""Implements stochastic gradient descent (optionally with momentum).

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1}
                \quad (-\text{ if maximize})                                              \\
            &\text{if } \mu \neq 0: b_t \leftarrow g_t \text{ if } t = 1
                \text{ else } \mu b_{t-1} + (1 - \tau) g_t;\;
                g_t \leftarrow g_t + \mu b_t \text{ if nesterov else } b_t                \\
            &\theta_t \leftarrow \theta_{t-1} - \gamma g_t
       \end{aligned}

    State (``momentum_buffer``, only with momentum) and state dicts are those of
    :class:`torch.optim.SGD`. Sparse gradients run the reference implementation (with a storage
    option: not with ``state_bits=8`` nor stochastic rounding of a bfloat16 momentum,
    docs/storage.md).

    Args:
        {params}
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        momentum (float, optional): momentum factor (default: 0)
        dampening (float, optional): dampening for momentum (default: 0)
        weight_decay (float, optional): weight decay, L2 penalty (default: 0)
        nesterov (bool, optional): enables Nesterov momentum (default: False)
        {maximize}
        {foreach}
        {differentiable}
        {fused}
        {clipping}
        {storage}
    """

    rule = SGDRule()
    _setstate_defaults = dict(
        nesterov=False, maximize=False, foreach=None, differentiable=False, fused=False
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
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
        check_non_negative(momentum=momentum, weight_decay=weight_decay)
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
            fused=fused,
        )  # fmt: skip
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, {**defaults, **grad_options})


SGD.__doc__ = _docs.fill(SGD.__doc__)
