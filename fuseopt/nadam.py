"""NAdam: Adam with Nesterov momentum (Dozat, 2016)."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_betas, check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, ScalarState, Zeros, to_scalar, with_fused

__all__ = ["NAdam"]


def _mu(g, step):
    """The momentum coefficient of ``step`` (momentum decay schedule)."""
    return g["betas"][0] * (1.0 - 0.5 * (0.96 ** (step * g["momentum_decay"])))


class NAdamRule(Rule):
    """NAdam's elementwise update; ``mu_product`` is a per-param host scalar, as in torch."""

    state = (
        ScalarState("mu_product", value=1.0, in_graph=True),
        Zeros("exp_avg"),
        Zeros("exp_avg_sq"),
    )

    def flags(self, g, first, step, sv):
        return dict(
            maximize=g["maximize"],
            wd=g["weight_decay"] != 0,
            decoupled=g["decoupled_weight_decay"],
            # differentiable: mu_product is a tensor, and torch scales grad and exp_avg by it
            # before dividing (autograd flows through mu_product)
            on_tensors=torch.is_tensor(sv.get("mu_product")),
        )

    def before(self, g, step, sv):
        torch._foreach_mul_(sv["mu_product"], _mu(g, step))  # float32 tensors, as torch rounds

    def scalars(self, g, step, sv):
        lr, (b1, b2), wd = to_scalar(g["lr"]), g["betas"], g["weight_decay"]
        mu, mu_next = _mu(g, step), _mu(g, step + 1)
        mu_product = sv["mu_product"]
        mu_product_next = mu_product * mu_next
        return dict(
            decay=1 - lr * wd, wd=wd, omb1=1 - b1, b2=b2, omb2=1 - b2, bc2=1 - b2**step,
            eps=g["eps"], grad_step=-lr * (1.0 - mu) / (1.0 - mu_product),
            avg_step=-lr * mu_next / (1.0 - mu_product_next),
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
        denom = ops.sqrt(exp_avg_sq / s.bc2) + s.eps
        if f.on_tensors:
            param = ops.addcdiv(param, grad * s.grad_step, denom)
            param = ops.addcdiv(param, exp_avg * s.avg_step, denom)
        else:
            param = ops.addcdiv(param, grad, denom, value=s.grad_step)
            param = ops.addcdiv(param, exp_avg, denom, value=s.avg_step)
        return dict(param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


class NAdam(Optimizer):
    r"""Implements NAdam.

    .. math::
       \begin{aligned}
            &\mu_t \leftarrow \beta_1 (1 - \tfrac12 0.96^{t\psi}), \quad
             m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
             v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                         \\
            &\theta_t \leftarrow \theta_{t-1}
             - \gamma \frac{1 - \mu_t}{1 - \prod_{i \le t} \mu_i} \frac{g_t}{d_t}
             - \gamma \frac{\mu_{t+1}}{1 - \prod_{i \le t+1} \mu_i} \frac{m_t}{d_t}, \quad
             d_t = \sqrt{v_t / (1 - \beta_2^t)} + \epsilon
       \end{aligned}

    with :math:`g_t` the gradient (negated if maximize) plus weight decay (decoupled, as AdamW,
    with ``decoupled_weight_decay``). State (``step``, ``mu_product``, ``exp_avg``,
    ``exp_avg_sq``) as :class:`torch.optim.NAdam`.

    Args:
        {params}
        lr (float, Tensor, optional): learning rate (default: 2e-3)
        betas (tuple[float, float], optional): coefficients of the running averages
            (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): weight decay (default: 0)
        momentum_decay (float, optional): momentum decay :math:`\psi` (default: 4e-3)
        decoupled_weight_decay (bool, optional): decay as AdamW (default: False)
        {foreach}
        {maximize}
        {capturable}
        {differentiable}
        {fused}
        {clipping}
        {storage}
    """

    rule = NAdamRule()
    _setstate_defaults = dict(
        maximize=False, foreach=None, capturable=False, differentiable=False,
        decoupled_weight_decay=False,
    )  # fmt: skip

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
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
        check_non_negative(weight_decay=weight_decay, momentum_decay=momentum_decay)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, with_fused({**defaults, **grad_options}, fused))


NAdam.__doc__ = _docs.fill(NAdam.__doc__)
