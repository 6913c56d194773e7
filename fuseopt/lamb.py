"""LAMB: layer-wise adaptive moments (You et al., 2019), Adam's direction scaled for each tensor
by the trust ratio of the param's norm to the direction's norm."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_betas, check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, Zeros

__all__ = ["Lamb"]

CLAMP = 10.0  # the param norm's upper bound in the trust ratio (pytorch-optimizer's ``clamp``)


class LambRule(Rule):
    """LAMB's elementwise update. :meth:`reduce` sums the squares of the decayed param and of
    the direction (computed from the new moments, nothing written); :meth:`update` computes the
    same direction again and steps by the trust ratio."""

    state = (Zeros("exp_avg"), Zeros("exp_avg_sq"))

    def reduces(self, f):
        return not f.adam  # (no trust ratio: no norms)

    def flags(self, g, first, step, sv):
        wd = g["weight_decay"] > 0
        return dict(
            maximize=g["maximize"], decoupled=wd and g["weight_decouple"],
            coupled=wd and not g["weight_decouple"], adam=g["adam"],
        )  # fmt: skip

    def scalars(self, g, step, sv):
        lr, (b1, b2) = g["lr"], g["betas"]
        return dict(
            b1=b1, beta3=1 - b1 if g["grad_averaging"] else 1.0, b2=b2, omb2=1 - b2,
            eps=g["eps"], wd=g["weight_decay"],
            decay=1 - g["weight_decay"] * (1.0 if g["fixed_decay"] else lr),
            neg_step=-lr / (1 - b1**step),  # (the first moment's bias correction only)
        )  # fmt: skip

    def _direction(self, ops, f, s, param, grad, exp_avg, exp_avg_sq):
        """The decayed param, the direction, and the new moments."""
        if f.maximize:
            grad = -grad
        exp_avg = ops.add(exp_avg * s.b1, grad, alpha=s.beta3)
        exp_avg_sq = ops.addcmul(exp_avg_sq * s.b2, grad, grad, value=s.omb2)
        if f.decoupled:
            param = param * s.decay
        direction = exp_avg / (ops.sqrt(exp_avg_sq) + s.eps)
        if f.coupled:
            direction = ops.add(direction, param, alpha=s.wd)
        return param, direction, exp_avg, exp_avg_sq

    def reduce(self, ops, f, s, param, grad, exp_avg, exp_avg_sq):
        param, direction, _, _ = self._direction(ops, f, s, param, grad, exp_avg, exp_avg_sq)
        return dict(param_sq=param * param, direction_sq=direction * direction)

    def tensor_scalars(self, group, f, sums, ndims, scalars):
        p_norm = sums["param_sq"].sqrt().clamp(max=CLAMP)
        d_norm = sums["direction_sq"].sqrt()
        trust = torch.where((p_norm == 0) | (d_norm == 0), 1.0, p_norm / (d_norm + group["eps"]))
        return dict(alpha=scalars["neg_step"] * trust)

    def update(self, ops, f, s, param, grad, exp_avg, exp_avg_sq):
        param, direction, exp_avg, exp_avg_sq = self._direction(
            ops, f, s, param, grad, exp_avg, exp_avg_sq
        )
        param = ops.add(param, direction, alpha=s.neg_step if f.adam else s.alpha)
        return dict(param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


class Lamb(Optimizer):
    r"""Implements LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning: Training
    BERT in 76 minutes").

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) \quad (-\text{ if maximize})    \\
            &m_t \leftarrow \beta_1 m_{t-1} + \beta_3 g_t, \quad
             v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2
             \quad (\beta_3 = 1 - \beta_1 \text{ with grad averaging, else } 1)               \\
            &\text{decoupled: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda), \quad
             u_t \leftarrow m_t / (\sqrt{v_t} + \epsilon)
             \; (+ \lambda\theta_{t-1} \text{ if coupled})                                       \\
            &r_t \leftarrow \min(\lVert\theta_{t-1}\rVert, 10) / (\lVert u_t\rVert + \epsilon)
             \text{ (1 where a norm is 0; 1 with adam=True)}                                    \\
            &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t} r_t u_t
       \end{aligned}

    Argument names, defaults and numbers are ``pytorch-optimizer``'s ``Lamb`` (without its
    ``rectify``, ``pre_norm`` and ``degenerated_to_sgd`` variants, which raise here). Both norms
    of every tensor come from one first pass over params, grads and moments in the same step
    (fused: one reduction kernel, float64 sums); the grads are never written. ``max_grad_norm``
    is fuseopt's global-norm clipping inside the step (pytorch-optimizer's applies only with
    ``pre_norm``). State: ``step``, ``exp_avg``, ``exp_avg_sq``.

    Args:
        {params}
        lr (float, optional): learning rate (default: 1e-3)
        betas (tuple[float, float], optional): coefficients of the running averages
            (default: (0.9, 0.999))
        weight_decay (float, optional): weight decay (default: 0)
        weight_decouple (bool, optional): decay the weights directly, as AdamW (default: True)
        fixed_decay (bool, optional): decoupled decay by ``weight_decay``, not
            ``lr * weight_decay`` (default: False)
        grad_averaging (bool, optional): scale the grad by ``1 - beta1`` in the first moment
            (default: True)
        adam (bool, optional): no trust ratio: Adam's step without the second bias correction;
            a param group with ``adam=True`` excludes its params (biases, norm weights) from the
            layer-wise adaptation (default: False)
        eps (float, optional): term added to the denominators (default: 1e-6)
        {maximize}
        {foreach}
        {fused}
        {clipping}
        {storage}
    """

    rule = LambRule()

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = False,
        degenerated_to_sgd: bool = False,
        grad_averaging: bool = True,
        adam: bool = False,
        pre_norm: bool = False,
        eps: float = 1e-6,
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
            raise TypeError("Lamb: lr must be a number (the reference takes no tensor lr)")
        check_lr(lr)
        check_betas(betas)
        check_non_negative(weight_decay=weight_decay, eps=eps)
        for name, value in (
            ("rectify", rectify), ("degenerated_to_sgd", degenerated_to_sgd),
            ("pre_norm", pre_norm),
        ):  # fmt: skip
            if value:
                raise NotImplementedError(
                    f"Lamb: {name}=True is not implemented (pytorch-optimizer's variant); for "
                    "clipping by the global grad norm, use max_grad_norm"
                )
        defaults = dict(
            lr=lr, betas=tuple(betas), weight_decay=weight_decay, weight_decouple=weight_decouple,
            fixed_decay=fixed_decay, grad_averaging=grad_averaging, adam=adam, eps=eps,
            maximize=maximize, foreach=foreach, fused=fused,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, {**defaults, **grad_options})


Lamb.__doc__ = _docs.fill(Lamb.__doc__)
