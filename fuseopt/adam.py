"""Adam: adaptive moment estimation (Kingma & Ba, 2014), with AMSGrad and decoupled weight decay."""

from __future__ import annotations

import torch
from torch import Tensor, is_tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_betas, check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, Zeros
from fuseopt.rule import to_scalar as _scalar

__all__ = ["Adam"]


class AdamRule(Rule):
    """Adam's elementwise update, the same for Adam and AdamW (``decoupled_weight_decay``)."""

    state = (
        Zeros("exp_avg", signed=True),
        Zeros("exp_avg_sq", signed=False),
        Zeros("max_exp_avg_sq", when=lambda g: g["amsgrad"], signed=False),
    )
    sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"
    differentiable_on_tensors = True

    def flags(self, g, first, step, sv):
        return dict(
            amsgrad=g["amsgrad"],
            maximize=g["maximize"],
            wd=g["weight_decay"] != 0,
            decoupled=g["decoupled_weight_decay"],
            # step tensors (capturable, differentiable): torch folds the step size into the
            # denominator, with scalars that are 0-dim tensors
            on_tensors=is_tensor(step),
            cautious=g.get("cautious", False),
        )

    def reduces(self, f):
        return f.cautious

    def _moments(self, ops, f, s, param, grad, exp_avg, exp_avg_sq):
        """The grad as the update uses it (maximize, coupled decay), the decayed param and the
        new moments."""
        if f.maximize:
            grad = -grad
        if f.wd and f.decoupled:
            param = param * s.decay
        elif f.wd:
            grad = ops.add(grad, param, alpha=s.wd)
        exp_avg = ops.lerp(exp_avg, grad, s.omb1)
        exp_avg_sq = ops.addcmul(exp_avg_sq * s.b2, grad, grad, value=s.omb2)
        return grad, param, exp_avg, exp_avg_sq

    def reduce(self, ops, f, s, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None):
        # cautious: the elements whose update agrees in sign with the grad (the update's sign is
        # the new first moment's: its denominator is positive), and the tensor's size
        grad, _, exp_avg, _ = self._moments(ops, f, s, param, grad, exp_avg, exp_avg_sq)
        kept = ops.where(ops.gt(exp_avg * grad, 0.0), 1.0, 0.0)
        return dict(kept=kept, size=kept * 0.0 + 1.0)

    def tensor_scalars(self, group, f, sums, ndims, scalars):
        # the masked update rescaled by size / (kept + 1) (Liang et al., 2024; C-Optim's and
        # pytorch-optimizer's ``apply_cautious``)
        return dict(caution=sums["size"] / (sums["kept"] + 1.0))

    def scalars(self, g, step, sv):
        lr, (b1, b2), wd = _scalar(g["lr"]), map(_scalar, g["betas"]), g["weight_decay"]
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        out = dict(decay=1 - lr * wd, wd=wd, omb1=1 - b1, b2=b2, omb2=1 - b2, eps=g["eps"])
        if is_tensor(step):  # in torch's order of tensor ops, each rounded in the step's dtype
            neg_step_size = (lr / bc1).neg()
            out.update(denom_scale=bc2.sqrt() * neg_step_size, denom_eps=g["eps"] / neg_step_size)
        else:
            out.update(bc2_sqrt=bc2**0.5, neg_step_size=-(lr / bc1))
        return out

    def update(self, ops, f, s, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None):
        grad, param, exp_avg, exp_avg_sq = self._moments(
            ops, f, s, param, grad, exp_avg, exp_avg_sq
        )
        if f.amsgrad:
            max_exp_avg_sq = ops.maximum(max_exp_avg_sq, exp_avg_sq)
        root = ops.sqrt(max_exp_avg_sq if f.amsgrad else exp_avg_sq)
        step = exp_avg  # (cautious: zero where the update's sign is not the grad's, rescaled)
        if f.cautious:
            step = ops.where(ops.gt(exp_avg * grad, 0.0), exp_avg * s.caution, 0.0)
        if f.on_tensors:
            param = ops.addcdiv(param, step, root / s.denom_scale + s.denom_eps)
        else:
            param = ops.addcdiv(param, step, root / s.bc2_sqrt + s.eps, value=s.neg_step_size)
        return dict(
            param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, max_exp_avg_sq=max_exp_avg_sq
        )


def _check_adam_args(lr, betas, eps, weight_decay, foreach, capturable):
    """torch.optim's validation of Adam's and AdamW's arguments, with its messages."""
    if isinstance(lr, Tensor) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    check_lr(lr)
    check_non_negative(eps=eps)
    check_betas(betas)
    check_non_negative(weight_decay=weight_decay)
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for i in (0, 1):
        if isinstance(betas[i], Tensor):
            if foreach and not capturable:
                raise ValueError(
                    f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True"
                )
            if betas[i].numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


class Adam(Optimizer):
    r"""Implements Adam.

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (-\text{ if maximize})                                              \\
            &\text{if } \lambda \neq 0: \text{decoupled: } \theta_{t-1} \leftarrow
                \theta_{t-1}(1 - \gamma\lambda) \text{, else } g_t \leftarrow g_t + \lambda\theta_{t-1} \\
            &m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t                            \\
            &v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                          \\
            &\text{if amsgrad: } v_t^{max} \leftarrow \max(v_{t-1}^{max}, v_t), \;
                \hat{v} = v_t^{max} \text{ else } \hat{v} = v_t                             \\
            &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
                m_t \big/ \big(\sqrt{\hat{v}} / \sqrt{1 - \beta_2^t} + \epsilon\big)
       \end{aligned}

    Numbers, state keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and state
    dicts are those of :class:`torch.optim.Adam`.

    Args:
        {params}
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float, float], optional): coefficients of the running averages of the
            gradient and its square (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator for numerical stability
            (default: 1e-8)
        weight_decay (float, optional): weight decay, L2 penalty (default: 0)
        amsgrad (bool, optional): use the AMSGrad variant (default: False)
        {foreach}
        {maximize}
        {capturable}
        {differentiable}
        {fused}
        {clipping}
        {storage}
        decoupled_weight_decay (bool, optional): decay the weights directly, as AdamW
            (default: False)
        cautious (bool, optional): beyond torch: C-Adam(W) (Liang et al., 2024), the update
            zeroed where its sign is not the grad's and rescaled by ``numel / (kept + 1)`` per
            tensor, from a first pass of the same step (default: False)
    """

    rule = AdamRule()
    _setstate_defaults = dict(
        amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
        decoupled_weight_decay=False, fused=None,
    )  # fmt: skip

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        cautious: bool = False,
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        skip_if_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        kahan_sum: bool = False,
        state_bits: int | None = None,
    ) -> None:
        _check_adam_args(lr, betas, eps, weight_decay, foreach, capturable)
        if not isinstance(cautious, bool):
            raise TypeError(f"cautious must be a bool, got {type(cautious).__name__}")
        if cautious and (capturable or differentiable):
            raise ValueError(
                "cautious=True is not supported with capturable=True or differentiable=True"
            )
        defaults = dict(
            lr=lr, betas=tuple(map(_scalar, betas)), eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        if cautious:  # (only where asked for: the groups stay torch's)
            defaults["cautious"] = True
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, {**defaults, **grad_options})


Adam.__doc__ = _docs.fill(Adam.__doc__)
