"""Lion: evolved sign momentum (Chen et al., 2023), the sign of an interpolation of the momentum
and the grad, with decoupled weight decay."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._validate import check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Rule, Zeros

__all__ = ["Lion"]


class LionRule(Rule):
    """Lion's elementwise update. Only ``cautious=True`` runs a first pass: it counts per tensor
    the elements whose update agrees in sign with the grad."""

    state = (Zeros("exp_avg", signed=True),)
    has_step = False  # (lion-pytorch keeps no step: the update does not depend on it)

    def flags(self, g, first, step, sv):
        return dict(maximize=g["maximize"], wd=g["weight_decay"] != 0, cautious=g["cautious"])

    def reduces(self, f):
        return f.cautious

    def scalars(self, g, step, sv):
        lr, (b1, b2), wd = g["lr"], g["betas"], g["weight_decay"]
        if g["decoupled_weight_decay"]:
            wd = wd / g["init_lr"]  # (lion-pytorch's: the decay follows lr's schedule, not lr)
        return dict(b1=b1, omb1=1 - b1, b2=b2, omb2=1 - b2, decay=1 - lr * wd, neg_lr=-lr)

    def _direction(self, ops, f, s, grad, exp_avg):
        """The grad as the update reads it and the update's direction, ``sign(c_t)``."""
        if f.maximize:
            grad = -grad
        return grad, ops.sign(ops.add(exp_avg * s.b1, grad, alpha=s.omb1))

    def reduce(self, ops, f, s, param, grad, exp_avg):
        grad, direction = self._direction(ops, f, s, grad, exp_avg)
        kept = ops.where(ops.gt(direction * grad, 0.0), 1.0, 0.0)  # (a product by 1, -1 or 0)
        return dict(kept=kept, size=kept * 0.0 + 1.0)

    def tensor_scalars(self, group, f, sums, ndims, scalars):
        # C-Optim's rescaling of the masked update, as pytorch-optimizer's ``apply_cautious``
        return dict(caution=sums["size"] / (sums["kept"] + 1.0))

    def update(self, ops, f, s, param, grad, exp_avg):
        grad, direction = self._direction(ops, f, s, grad, exp_avg)
        if f.wd:
            param = param * s.decay
        if f.cautious:
            direction = ops.where(ops.gt(direction * grad, 0.0), direction * s.caution, 0.0)
        param = ops.add(param, direction, alpha=s.neg_lr)
        exp_avg = ops.add(exp_avg * s.b2, grad, alpha=s.omb2)
        return dict(param=param, exp_avg=exp_avg)


class Lion(Optimizer):
    r"""Implements Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) \quad (-\text{ if maximize})   \\
            &\theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda')
             \quad (\lambda' = \lambda, \text{ or } \lambda / \gamma_0
             \text{ with decoupled\_weight\_decay})                                            \\
            &u_t \leftarrow \operatorname{sign}\big(\beta_1 m_{t-1} + (1 - \beta_1) g_t\big)
             \quad \big(\text{cautious: } u_t \leftarrow u_t\,\mathbb{1}[u_t g_t > 0]\,
             \tfrac{n}{k + 1}\big)                                                              \\
            &\theta_t \leftarrow \theta_{t-1} - \gamma u_t                                      \\
            &m_t \leftarrow \beta_2 m_{t-1} + (1 - \beta_2) g_t
       \end{aligned}

    with :math:`\gamma_0` the constructor's ``lr``, :math:`n` a tensor's number of elements and
    :math:`k` the number of them that the mask keeps. Argument names, defaults and numbers are
    ``lion-pytorch``'s ``Lion`` (its ``decoupled_weight_decay`` divides the decay by the ``lr``
    given to the constructor, kept in each group as ``init_lr``: a schedule scales the decay
    with the lr). State: ``exp_avg``, as lion-pytorch's (no ``step``): lion-pytorch's state
    dicts load, and a loaded group lacking an option (``decoupled_weight_decay``, ``init_lr``,
    which lion-pytorch keeps per optimizer, not per group) takes this optimizer's.

    Beyond lion-pytorch: ``maximize``; the fused kernel on CPU (numba) as on CUDA (Triton: what
    lion-pytorch's ``use_triton=True`` asks for, taken here as ``fused=True``); ``cautious=True``
    (C-Optim, Liang et al., 2024, as ``pytorch-optimizer``'s ``Lion(cautious=True)`` and
    :class:`~fuseopt.Adam`'s): the update zeroed where its sign is not the grad's and rescaled
    by ``n / (k + 1)`` per tensor, :math:`k` counted by a first pass of the same step. The
    validation is torch's style: ``lr`` must be positive and each beta in [0, 1], the ranges
    lion-pytorch asserts, and ``weight_decay`` not negative.

    Args:
        {params}
        lr (float, optional): learning rate, positive (default: 1e-4)
        betas (tuple[float, float], optional): the interpolation coefficient of the update and
            the momentum's decay, each in [0, 1] (default: (0.9, 0.99))
        weight_decay (float, optional): decoupled weight decay (default: 0)
        use_triton (bool, optional): lion-pytorch's switch to its Triton kernel: here
            ``fused=True`` (the fused kernel, Triton on CUDA, numba on CPU) (default: False)
        decoupled_weight_decay (bool, optional): decay by ``lr / init_lr * weight_decay``
            rather than ``lr * weight_decay`` (default: False)
        cautious (bool, optional): the C-Optim mask, see above (default: False)
        {maximize}
        {foreach}
        {fused}
        {clipping}
        {storage}
    """

    rule = LionRule()
    _setstate_defaults: dict = {}  # (see ``_after_setstate``)

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
        *,
        cautious: bool = False,
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
            raise TypeError("Lion: lr must be a number (the reference takes no tensor lr)")
        check_lr(lr)
        if lr == 0:  # (decoupled_weight_decay divides by it)
            raise ValueError(f"Invalid learning rate: {lr} (Lion's must be positive)")
        for i in (0, 1):
            if not 0.0 <= betas[i] <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]} (in [0, 1])")
        check_non_negative(weight_decay=weight_decay)
        for name, value in (
            ("use_triton", use_triton), ("decoupled_weight_decay", decoupled_weight_decay),
            ("cautious", cautious),
        ):  # fmt: skip
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if use_triton:
            if fused is False or foreach:
                raise ValueError(
                    "use_triton=True asks for the fused kernel: it cannot be combined with "
                    "fused=False or foreach=True"
                )
            fused = True
        defaults = dict(
            lr=lr, betas=tuple(betas), weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, init_lr=lr, cautious=cautious,
            maximize=maximize, foreach=foreach, fused=fused,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, {**defaults, **grad_options})

    def _after_setstate(self) -> None:
        # A loaded group lacking an option takes this optimizer's: a state dict of lion-pytorch
        # (its groups: lr, betas, weight_decay) then steps as lion-pytorch after a load, which
        # keeps its own decoupled_weight_decay and init_lr.
        options = ("decoupled_weight_decay", "init_lr", "cautious", "maximize", "foreach", "fused")
        for group in self.param_groups:
            for key in options:
                group.setdefault(key, self.defaults[key])


Lion.__doc__ = _docs.fill(Lion.__doc__)
