"""Schedule-Free SGD, AdamW and RAdam (Defazio et al., 2024, "The Road Less Scheduled"): no
learning-rate schedule; the params a model trains with interpolate between the iterate of plain
SGD/Adam steps and a running average of those iterates, which the model is evaluated at."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from fuseopt import _compile, _docs, _first_pass, _storage
from fuseopt._validate import check_betas, check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import FirstValue, Rule, Zeros, with_fused

__all__ = ["AdamWScheduleFree", "SGDScheduleFree", "RAdamScheduleFree"]

#: the running values the reference keeps in each param group, and their starting values
RUNNING = dict(k=0, train_mode=False, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)


class ScheduleFreeRule(Rule):
    """The step shared by the three: from a direction ``d`` (the grad, or Adam's normalized grad,
    plus weight decay at ``y``), ``y`` moves towards ``z`` by ``ckp1`` and along ``d``, and ``z``
    takes the plain step. ``z`` starts as the param (a first value: the update reads the param
    in its place). The per-step host scalars come from the group's running values, which
    :meth:`advance` computes as they stand after this step (the optimizer stores them once the
    step has run)."""

    state = (FirstValue("z"),)
    has_step = False  # (the step count is the group's ``k``, as in the reference)

    def beta1(self, g) -> float:
        """The interpolation weight between the average ``x`` and ``z``."""
        return g["betas"][0]

    def lr(self, g) -> float:
        """This step's learning rate: the linear warm-up over ``warmup_steps``."""
        k, warmup = g["k"], g["warmup_steps"]
        return g["lr"] * ((k + 1) / warmup if k < warmup else 1.0)

    def advance(self, g) -> tuple[dict, float]:
        """The group's running values after this step, and the step's average weight ``ckp1``,
        in the reference's Python double arithmetic (reading the group, changing nothing)."""
        k, lr = g["k"], self.lr(g)
        lr_max = max(lr, g["lr_max"])
        weight = ((k + 1) ** g["r"]) * (lr_max ** g["weight_lr_power"])
        weight_sum = g["weight_sum"] + weight
        ckp1 = weight / weight_sum if weight_sum != 0 else 0  # (the reference's ZeroDivision)
        return dict(k=k + 1, scheduled_lr=lr, lr_max=lr_max, weight_sum=weight_sum), ckp1

    def flags(self, g, first, step, sv):
        return dict(first=first, maximize=g["maximize"], wd=g["weight_decay"] != 0)

    def scalars(self, g, step, sv):
        running, ckp1 = self.advance(g)
        lr = running["scheduled_lr"]
        return dict(
            wd=g["weight_decay"], ckp1=ckp1, y_lr=lr * (self.beta1(g) * (1 - ckp1) - 1), neg_lr=-lr
        )

    def direction(self, ops, f, s, grad, **moments) -> tuple:
        """The step's direction before weight decay, and the new moments."""
        return grad, {}

    def update(self, ops, f, s, param, grad, z=None, **moments):
        if f.maximize:
            grad = -grad
        d, moments = self.direction(ops, f, s, grad, **moments)
        if f.wd:  # (decay at y, the param)
            d = ops.add(d, param, alpha=s.wd)
        if f.first:
            z = param
        y = ops.add(ops.lerp(param, z, s.ckp1), d, alpha=s.y_lr)
        return dict(param=y, z=ops.add(z, d, alpha=s.neg_lr), **moments)


class SGDScheduleFreeRule(ScheduleFreeRule):
    """Schedule-Free SGD: the direction is the grad; ``momentum`` is the interpolation weight."""

    def beta1(self, g):
        return g["momentum"]


class AdamWScheduleFreeRule(ScheduleFreeRule):
    """Schedule-Free AdamW: the grad divided by the bias-corrected root of its running square."""

    state = (FirstValue("z"), Zeros("exp_avg_sq"))

    def adaptive(self, g) -> bool:
        """Whether this step divides by the second moment (always, for AdamW)."""
        return True

    def flags(self, g, first, step, sv):
        return dict(super().flags(g, first, step, sv), adaptive=self.adaptive(g))

    def scalars(self, g, step, sv):
        b2 = g["betas"][1]
        bc2 = 1 - b2 ** (g["k"] + 1)
        return dict(super().scalars(g, step, sv), b2=b2, omb2=1 - b2, bc2=bc2, eps=g["eps"])

    def direction(self, ops, f, s, grad, exp_avg_sq):
        exp_avg_sq = ops.addcmul(exp_avg_sq * s.b2, grad, grad, value=s.omb2)
        if f.adaptive:
            grad = grad / (ops.sqrt(exp_avg_sq / s.bc2) + s.eps)
        return grad, dict(exp_avg_sq=exp_avg_sq)


class RAdamScheduleFreeRule(AdamWScheduleFreeRule):
    """Schedule-Free RAdam: RAdam's rectification scales the learning rate; while the
    approximated SMA is 4 or less, the step is SGD's (or none: ``silent_sgd_phase``)."""

    @staticmethod
    def _rho(g) -> tuple[float, float]:
        """RAdam's rho_t and rho_inf at this step, in the reference's arithmetic."""
        step, b2 = g["k"] + 1, g["betas"][1]
        b2_t = b2**step
        rho_inf = 2 / (1 - b2) - 1
        return rho_inf - 2 * step * b2_t / (1 - b2_t), rho_inf

    def adaptive(self, g):
        return self._rho(g)[0] > 4.0

    def lr(self, g):
        rho_t, rho_inf = self._rho(g)
        if rho_t > 4.0:
            rect = (
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            ) ** 0.5
        else:
            rect = float(not g["silent_sgd_phase"])
        return g["lr"] * rect


class _ScheduleFree(Optimizer):
    """What the three optimizers share: the train/eval switch, the mode check and the running
    values of each group."""

    def __init__(self, params, defaults: dict, fused: bool | None, clipping: tuple) -> None:
        # (no ``fused`` key unless asked for: the groups stay the reference's)
        defaults = with_fused({**defaults, **RUNNING}, fused)
        super().__init__(params, {**defaults, **_first_pass.options(*clipping)})

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # the group's running values advance on the host: a step the kernels would skip on the
        # device (GradScaler's found_inf) must not reach step() at all, so GradScaler unscales
        # and skips itself
        return False

    def add_param_group(self, param_group: dict) -> None:
        # a group added later joins in the optimizer's mode (the reference's joins in eval mode,
        # and its step checks only the first group: the new group's params were never switched)
        if self.param_groups and "train_mode" not in param_group:
            param_group["train_mode"] = self.param_groups[0]["train_mode"]
        super().add_param_group(param_group)

    @torch.no_grad()
    def train(self) -> None:
        """Switch the params to ``y``, where the grads are taken (a no-op in train mode)."""
        self._switch(True)

    @torch.no_grad()
    def eval(self) -> None:
        """Switch the params to the average ``x``, where the model is evaluated (and best
        checkpointed; a no-op in eval mode)."""
        self._switch(False)

    def _switch(self, train: bool) -> None:
        # y = lerp(x, z, 1 - beta1), x = lerp(y, z, 1 - 1/beta1): the reference's lerp, one
        # ATen op per param, not the step's update (no grad, no rule)
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            beta1 = self.rule.beta1(group)
            weight = 1 - beta1 if train else 1 - 1 / beta1
            batches = defaultdict(lambda: ([], []))
            for p in group["params"]:
                z = self.state.get(p, {}).get("z")
                if z is not None:  # (a param that never stepped: y = x = z)
                    ps, zs = batches[(p.device, p.dtype, z.device, z.dtype)]
                    ps.append(p)
                    zs.append(z)
            for (_, p_dtype, _, z_dtype), (ps, zs) in batches.items():
                if p_dtype == z_dtype:
                    torch._foreach_lerp_(ps, zs, weight)
                    continue
                # a storage format (state_dtype: z in another dtype than the param): float32
                # math, the param rounded once, as the step computes
                for p, z in zip(ps, zs):
                    wide = z.to(device=p.device, dtype=torch.float32)
                    p.copy_(torch.lerp(p.float(), wide, weight))
            group["train_mode"] = train

    def _step(self, closure=None):
        # (read past dynamo's Optimizer handling: under torch.compile it guards the modes only)
        for i, group in enumerate(_compile.groups(self)):
            if not group["train_mode"]:
                raise RuntimeError(
                    f"{type(self).__name__}: step() in eval mode (param group {i}): call "
                    "optimizer.train() before training and optimizer.eval() before evaluating "
                    "or saving"
                )
        return super()._step(closure)

    def _record_step(self, ran: bool, found_inf=None) -> None:
        # (the end of every step, eager or inside the compiled step's op: the running values
        # advance with the step, under torch.compile too)
        super()._record_step(ran, found_inf)
        groups = self.param_groups
        # a step that ran, or that found no grad (the reference counts those too); a skipped one
        # (skip_if_nonfinite) counts not
        if ran or not any(p.grad is not None for g in groups for p in g["params"]):
            for group in groups:
                group.update(self.rule.advance(group)[0])


def _check_common(lr, eps, weight_decay, warmup_steps, r, weight_lr_power, name) -> None:
    if isinstance(lr, Tensor):
        raise TypeError(f"{name}: lr must be a number (the group's running values are numbers)")
    check_lr(lr)
    check_non_negative(eps=eps, weight_decay=weight_decay, r=r, weight_lr_power=weight_lr_power)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"Invalid warmup_steps value: {warmup_steps!r} (an int >= 0)")


def _check_adam_betas(betas) -> None:
    check_betas(betas)
    if betas[0] == 0:  # (eval() divides by it)
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]} (in (0, 1))")


_MATH_ADAM = r"""
    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla f(y_{t-1}) \quad (-\text{ if maximize}), \quad
             v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                            \\
            &d_t \leftarrow g_t \big/ \big(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon\big)
             + \lambda y_{t-1}                                                               \\
            &\gamma_{max} \leftarrow \max(\gamma_{max}, \gamma_t), \quad
             w_t \leftarrow t^r \gamma_{max}^{p}, \quad
             c_t \leftarrow w_t \big/ \textstyle\sum_{i \le t} w_i \; (0 \text{ if the sum is 0}) \\
            &y_t \leftarrow (1 - c_t) y_{t-1} + c_t z_{t-1}
             + \gamma_t (\beta_1 (1 - c_t) - 1) d_t, \quad
             z_t \leftarrow z_{t-1} - \gamma_t d_t \quad (z_0 = y_0)                           \\
            &\text{eval: } x_t = (y_t - (1 - \beta_1) z_t) / \beta_1
       \end{aligned}
"""

_CONVENTIONS = """The params are ``y`` in train mode and the average ``x`` in eval mode. A new
    optimizer is in eval mode, as the reference's: call ``optimizer.train()`` before training and
    ``optimizer.eval()`` before evaluating or saving the model (Hugging Face's Trainer calls
    them where they exist); ``step()`` in eval mode raises. The mode is the groups'
    ``train_mode``, in the state dict: a state dict loads in the mode it was saved in (with the
    model's params saved with it). Argument names, defaults, state (``z``{more}) and the groups'
    running values (``k``, ``lr_max``, ``weight_sum``, ``scheduled_lr``, ``train_mode``) are
    those of the ``schedulefree`` package's ``{name}``, whose numbers these are and whose state
    dicts load here (and ours there). A step that finds no grad counts, as there; one that
    ``skip_if_nonfinite`` skips does not. Beyond the reference: ``maximize`` negates the grad;
    grads are never written (it normalizes them in place); a group added later joins in the
    optimizer's mode (its joins in eval mode); every group must be in train mode to step (it
    checks the first); GradScaler unscales and skips inf steps itself (the running values
    live on the host)."""


class SGDScheduleFree(_ScheduleFree):
    r"""Implements Schedule-Free SGD (Defazio et al., 2024, "The Road Less Scheduled").

    .. math::
       \begin{aligned}
            &d_t \leftarrow \pm\nabla f(y_{t-1}) + \lambda y_{t-1}
             \quad (-\text{ if maximize})                                                      \\
            &\gamma_t \leftarrow \gamma \min(1, t / T_{warmup}), \quad
             \gamma_{max} \leftarrow \max(\gamma_{max}, \gamma_t), \quad
             w_t \leftarrow t^r \gamma_{max}^{p}, \quad
             c_t \leftarrow w_t \big/ \textstyle\sum_{i \le t} w_i                             \\
            &y_t \leftarrow (1 - c_t) y_{t-1} + c_t z_{t-1}
             + \gamma_t (\mu (1 - c_t) - 1) d_t, \quad
             z_t \leftarrow z_{t-1} - \gamma_t d_t \quad (z_0 = y_0)                           \\
            &\text{eval: } x_t = (y_t - (1 - \mu) z_t) / \mu
       \end{aligned}

    {conventions}

    Args:
        {params}
        lr (float, optional): learning rate (default: 1.0)
        momentum (float, optional): the interpolation :math:`\mu` between the average and
            ``z``, in (0, 1) (default: 0.9)
        weight_decay (float, optional): weight decay, L2 penalty at ``y`` (default: 0)
        warmup_steps (int, optional): steps of linear learning-rate warm-up (default: 0)
        r (float, optional): polynomial weighting power of the average (default: 0)
        weight_lr_power (float, optional): the weights of the average are the largest
            learning rate so far to this power (default: 2)
        {maximize}
        {foreach}
        {fused}
        {clipping}
        {storage}
    """

    rule = SGDScheduleFreeRule()

    def __init__(
        self,
        params,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2,
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
        _check_common(lr, 0.0, weight_decay, warmup_steps, r, weight_lr_power, "SGDScheduleFree")
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum} (in (0, 1))")
        defaults = dict(
            lr=lr, momentum=momentum, r=r, warmup_steps=warmup_steps,
            weight_lr_power=weight_lr_power, weight_decay=weight_decay, maximize=maximize,
            foreach=foreach,
        )  # fmt: skip
        clipping = (max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite)
        defaults |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, defaults, fused, clipping)


class AdamWScheduleFree(_ScheduleFree):
    r"""Implements Schedule-Free AdamW (Defazio et al., 2024, "The Road Less Scheduled").
    {math}
    :math:`\gamma_t = \gamma \min(1, t / T_{warmup})` (linear warm-up) and :math:`p` is
    ``weight_lr_power``.

    {conventions}

    Args:
        {params}
        lr (float, optional): learning rate (default: 0.0025)
        betas (tuple[float, float], optional): the interpolation :math:`\beta_1` between the
            average and ``z`` (in (0, 1)), and the coefficient of the grad's running square
            (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): weight decay, at ``y`` (default: 0)
        warmup_steps (int, optional): steps of linear learning-rate warm-up (default: 0)
        r (float, optional): polynomial weighting power of the average (default: 0)
        weight_lr_power (float, optional): the weights of the average are the largest
            learning rate so far to this power (default: 2.0)
        {maximize}
        {foreach}
        {fused}
        {clipping}
        {storage}
    """

    rule = AdamWScheduleFreeRule()

    def __init__(
        self,
        params,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
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
        _check_common(lr, eps, weight_decay, warmup_steps, r, weight_lr_power, "AdamWScheduleFree")
        _check_adam_betas(betas)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, r=r, warmup_steps=warmup_steps,
            weight_lr_power=weight_lr_power, weight_decay=weight_decay, maximize=maximize,
            foreach=foreach,
        )  # fmt: skip
        clipping = (max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite)
        defaults |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, defaults, fused, clipping)


class RAdamScheduleFree(_ScheduleFree):
    r"""Implements Schedule-Free RAdam (the ``schedulefree`` package's variant of Defazio et
    al., 2024, "The Road Less Scheduled", with RAdam's rectification instead of a warm-up).
    {math}
    :math:`\gamma_t = \gamma\, r_t` with RAdam's rectification
    :math:`r_t = \sqrt{(\rho_t - 4)(\rho_t - 2)\rho_\infty / ((\rho_\infty - 4)(\rho_\infty - 2)
    \rho_t)}` where :math:`\rho_t > 4`; before that, :math:`d_t` is the grad itself (plus decay)
    and :math:`r_t = 1`, or 0 with ``silent_sgd_phase`` (the params stay, the second moment
    accumulates). :math:`p` is ``weight_lr_power``.

    {conventions}

    Args:
        {params}
        lr (float, optional): learning rate (default: 0.0025)
        betas (tuple[float, float], optional): the interpolation :math:`\beta_1` between the
            average and ``z`` (in (0, 1)), and the coefficient of the grad's running square
            (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): weight decay, at ``y`` (default: 0)
        r (float, optional): polynomial weighting power of the average (default: 0)
        weight_lr_power (float, optional): the weights of the average are the largest
            learning rate so far to this power (default: 2.0)
        silent_sgd_phase (bool, optional): no step while the rectification is undefined
            (:math:`\rho_t \le 4`), instead of SGD steps (default: True)
        {maximize}
        {foreach}
        {fused}
        {clipping}
        {storage}
    """

    rule = RAdamScheduleFreeRule()

    def __init__(
        self,
        params,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        silent_sgd_phase: bool = True,
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
        _check_common(lr, eps, weight_decay, 0, r, weight_lr_power, "RAdamScheduleFree")
        _check_adam_betas(betas)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, r=r, weight_lr_power=weight_lr_power,
            weight_decay=weight_decay, silent_sgd_phase=silent_sgd_phase, maximize=maximize,
            foreach=foreach,
        )  # fmt: skip
        clipping = (max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite)
        defaults |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, defaults, fused, clipping)


for _cls, _more in (
    (SGDScheduleFree, ""),
    (AdamWScheduleFree, ", ``exp_avg_sq``"),
    (RAdamScheduleFree, ", ``exp_avg_sq``"),
):
    _doc = _cls.__doc__.replace("{math}", _MATH_ADAM)
    _doc = _doc.replace("{conventions}", _CONVENTIONS.format(more=_more, name=_cls.__name__))
    _cls.__doc__ = _docs.fill(_doc)
