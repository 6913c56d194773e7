"""ADOPT: Adam with the grad normalised by the previous second moment, then clipped (Taniguchi
et al., 2024)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_betas, check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, Zeros

__all__ = ["ADOPT", "default_clip"]

STABLE_EPS = 1e-16  # the floor of the second moment in StableAdamW's RMS (pytorch-optimizer's)


def default_clip(step: int) -> float:
    """The paper's clipping bound of the normalised grad at ``step``: ``step ** 0.25``."""
    return math.pow(step, 0.25)


class ADOPTRule(Rule):
    """ADOPT's elementwise update. A param's first step only sets the second moment to the
    squared grad; later ones step with the grad normalised by the second moment of the steps
    before. With ``cautious`` or ``stable_adamw``, a first pass sums what they need per tensor
    (on the first step too, where nothing reads the sums: whether a step has a first pass may
    not depend on the step count)."""

    state = (Zeros("exp_avg"), Zeros("exp_avg_sq"))
    flags_read_step = True  # (the first step is another kernel)

    def flags(self, g, first, step, sv):
        wd = g["weight_decay"] != 0
        return dict(
            maximize=g["maximize"], decoupled=wd and g["weight_decouple"],
            coupled=wd and not g["weight_decouple"], initial=float(step) == 1,
            clipped=g["clip_lambda"] is not None, cautious=g["cautious"],
            stable=g["stable_adamw"],
        )  # fmt: skip

    def reduces(self, f):
        return f.cautious or f.stable

    def scalars(self, g, step, sv):
        lr, (b1, b2), wd = g["lr"], g["betas"], g["weight_decay"]
        clip = 0.0
        if g["clip_lambda"] is not None and float(step) != 1:
            clip = float(g["clip_lambda"](int(float(step))))  # (the reference passes an int)
        return dict(
            omb1=1 - b1, b2=b2, omb2=1 - b2, eps=g["eps"], inf=math.inf, wd=wd,
            decay=1 - wd * (1.0 if g["fixed_decay"] else lr), neg_lr=-lr, clip=clip,
            neg_clip=-clip, stable_eps=STABLE_EPS,
        )  # fmt: skip

    def _decayed(self, ops, f, s, param, grad):
        """The param and the grad after maximize and weight decay."""
        if f.maximize:
            grad = -grad
        if f.decoupled:
            param = param * s.decay
        elif f.coupled:
            grad = ops.add(grad, param, alpha=s.wd)
        return param, grad

    def _moment(self, ops, f, s, grad, exp_avg, exp_avg_sq):
        """The normalised, clipped grad and the new first moment."""
        normed = grad / ops.clamp(ops.sqrt(exp_avg_sq), s.eps, s.inf)
        if f.clipped:
            normed = ops.clamp(normed, s.neg_clip, s.clip)
        return normed, ops.lerp(exp_avg, normed, s.omb1)

    def reduce(self, ops, f, s, param, grad, exp_avg, exp_avg_sq):
        _, grad = self._decayed(ops, f, s, param, grad)
        out = dict(size=ops.where(ops.gt(grad, 0.0), 1.0, 1.0))  # (1 for NaN too)
        if f.cautious:  # the elements whose update agrees in sign with the normalised grad
            normed, exp_avg = self._moment(ops, f, s, grad, exp_avg, exp_avg_sq)
            out["kept"] = ops.where(ops.gt(exp_avg * normed, 0.0), 1.0, 0.0)
        if f.stable:  # StableAdamW's mean of g^2 / v over the tensor, v of the steps before
            out["ratio"] = grad * grad / ops.clamp(exp_avg_sq, s.stable_eps, s.inf)
        return out

    def tensor_scalars(self, group, f, sums, ndims, scalars):
        out = {}
        if f.cautious:  # (C-Optim's rescaling, as pytorch-optimizer's ``apply_cautious``)
            out["caution"] = sums["size"] / (sums["kept"] + 1.0)
        if f.stable:
            out["rms"] = (sums["ratio"] / sums["size"]).sqrt().clamp(min=1.0)
        return out

    def update(self, ops, f, s, param, grad, exp_avg, exp_avg_sq):
        param, grad = self._decayed(ops, f, s, param, grad)
        if f.initial:
            return dict(param=param, exp_avg=None, exp_avg_sq=ops.addcmul(exp_avg_sq, grad, grad))
        normed, exp_avg = self._moment(ops, f, s, grad, exp_avg, exp_avg_sq)
        step = exp_avg
        if f.cautious:
            step = ops.where(ops.gt(exp_avg * normed, 0.0), exp_avg * s.caution, 0.0)
        if f.stable:
            step = step / s.rms
        param = ops.add(param, step, alpha=s.neg_lr)
        exp_avg_sq = ops.addcmul(exp_avg_sq * s.b2, grad, grad, value=s.omb2)
        return dict(param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


class ADOPT(Optimizer):
    r"""Implements ADOPT (Taniguchi et al., 2024, "ADOPT: Modified Adam Can Converge with Any
    :math:`\beta_2` with the Optimal Rate").

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) \quad (-\text{ if maximize});
             \text{ if } \lambda > 0: \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)
             \text{ (decoupled; } 1 - \lambda \text{ if fixed), else }
             g_t \leftarrow g_t + \lambda\theta_{t-1}                                          \\
            &t = 1: v_1 \leftarrow g_1^2 \text{ (and nothing else)}                            \\
            &t > 1: \hat{g}_t \leftarrow \operatorname{clip}\big(g_t / \max(\sqrt{v_{t-1}},
             \epsilon),\, c_t\big), \quad c_t = \text{clip\_lambda}(t)                         \\
            &\phantom{t > 1:} m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1)\hat{g}_t, \quad
             \theta_t \leftarrow \theta_{t-1} - \gamma m_t, \quad
             v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2
       \end{aligned}

    where :math:`\operatorname{clip}(x, c)` clamps to :math:`[-c, c]` (no clipping where
    ``clip_lambda`` is None). Argument names, defaults and numbers are ``pytorch-optimizer``'s
    ``ADOPT``, with its ``cautious`` (C-Optim: the update :math:`m_t` zeroed where its sign is
    not :math:`\hat{g}_t`'s and rescaled by ``numel / (kept + 1)`` per tensor) and
    ``stable_adamw`` (the update divided by :math:`\max(1, \sqrt{\operatorname{mean}(g_t^2 /
    \max(v_{t-1}, 10^{-16}))})` per tensor) variants; their per-tensor sums come from a first
    pass of the same step (float64 sums, where the reference's are in the param's dtype). The
    grads are never written (the reference negates them and adds the coupled decay in place).

    Deliberate differences from the reference: the step count is each param's ``step`` (state:
    ``step``, ``exp_avg``, ``exp_avg_sq``), as torch's optimizers keep it, not the group's: a
    param whose first grad comes late starts with its own first step. ``clip_lambda`` is a group
    option (a group may set its own), which :meth:`state_dict` leaves out (code, not state: the
    reference saves none, and ``torch.load(weights_only=True)`` reads no functions); a loaded
    group takes the constructor's, as the reference keeps its own across a load.

    Args:
        {params}
        lr (float, optional): learning rate (default: 1e-3)
        betas (tuple[float, float], optional): coefficients of the running averages
            (default: (0.9, 0.9999))
        clip_lambda (Callable[[int], float], optional): the clipping bound of the normalised
            grad at each step (from 2 on); None: no clipping (default: :func:`default_clip`,
            ``step ** 0.25``)
        weight_decay (float, optional): weight decay (default: 0)
        weight_decouple (bool, optional): decay the weights directly, as AdamW (default: False)
        fixed_decay (bool, optional): decoupled decay by ``weight_decay``, not
            ``lr * weight_decay`` (default: False)
        {foreach}
        eps (float, optional): the floor of the second moment's square root (default: 1e-6)
        {maximize}
        cautious (bool, optional): the C-Optim mask, see above (default: False)
        stable_adamw (bool, optional): StableAdamW's per-tensor RMS, see above (default: False)
        {fused}
        {clipping}
        {storage}
    """

    rule = ADOPTRule()
    _setstate_defaults = dict(
        weight_decouple=False, fixed_decay=False, foreach=None, maximize=False, cautious=False,
        stable_adamw=False, fused=None,
    )  # fmt: skip

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        clip_lambda: Callable[[int], float] | None = default_clip,
        weight_decay: float = 0.0,
        weight_decouple: bool = False,
        fixed_decay: bool = False,
        foreach: bool | None = None,
        eps: float = 1e-6,
        maximize: bool = False,
        *,
        cautious: bool = False,
        stable_adamw: bool = False,
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
            raise TypeError("ADOPT: lr must be a number (the reference takes no tensor lr)")
        check_lr(lr)
        check_betas(betas)
        check_non_negative(weight_decay=weight_decay, eps=eps)
        if clip_lambda is not None and not callable(clip_lambda):
            raise TypeError(
                f"clip_lambda must be a callable (step -> bound) or None, got "
                f"{type(clip_lambda).__name__}"
            )
        for name, value in (("cautious", cautious), ("stable_adamw", stable_adamw)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        defaults = dict(
            lr=lr, betas=tuple(betas), clip_lambda=clip_lambda, weight_decay=weight_decay,
            weight_decouple=weight_decouple, fixed_decay=fixed_decay, foreach=foreach, eps=eps,
            maximize=maximize, cautious=cautious, stable_adamw=stable_adamw, fused=fused,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, {**defaults, **grad_options})

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, without the groups' ``clip_lambda`` (see the class docstring)."""
        out = super().state_dict()
        for group in out["param_groups"]:  # (copies of the groups: these are not changed)
            group.pop("clip_lambda", None)
        return out

    def _after_setstate(self) -> None:
        # a loaded group has no clip_lambda (see state_dict): this optimizer's, as the reference
        # keeps its own across a load
        for group in self.param_groups:
            group.setdefault("clip_lambda", self.defaults["clip_lambda"])


ADOPT.__doc__ = _docs.fill(ADOPT.__doc__)
