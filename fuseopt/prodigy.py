"""Prodigy (Mishchenko & Defazio, 2023): Adam whose step size d is estimated as it trains, one d
for every param of every group, from sums over all of them taken in the step's first pass."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fuseopt import _docs, _dtensor, _first_pass, _storage
from fuseopt._validate import check_betas, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Clone, Rule, Zeros

__all__ = ["Prodigy"]

# the options prodigyopt reads from the first group alone and applies to every group: a group
# that steps must hold the first group's (``k`` only counts where it enters the bias correction)
SHARED = ("betas", "beta3", "decouple", "use_bias_correction", "d")
# the group values of the estimate, which a group added later takes from the first group
ESTIMATE = ("d", "d_max", "d_numerator", "k", "d_denom", "d_hat")


def _beta3(group: dict) -> float:
    return math.sqrt(group["betas"][1]) if group["beta3"] is None else group["beta3"]


def _dlr(group: dict, lr: float) -> float:
    """The step's learning rate ``d * lr``, times Adam's bias correction where asked for."""
    if group["use_bias_correction"]:
        b1, b2, k = *group["betas"], group["k"]
        bias_correction = ((1 - b2 ** (k + 1)) ** 0.5) / (1 - b1 ** (k + 1))
    else:
        bias_correction = 1
    return group["d"] * lr * bias_correction


def _supported(group: dict) -> None:
    """A clear error for prodigyopt's options that this rule cannot express."""
    slice_p = group["slice_p"]
    if isinstance(slice_p, bool) or not isinstance(slice_p, int) or slice_p < 1:
        raise ValueError(f"Invalid slice_p value: {slice_p} (an integer >= 1)")
    if slice_p > 1:
        raise NotImplementedError(
            "Prodigy: slice_p > 1 is not implemented (prodigyopt's estimate from every "
            "slice_p-th element keeps s and p0 smaller than the param, which the fused step "
            "walks alongside it); use slice_p=1"
        )
    if group["fsdp_in_use"]:
        raise NotImplementedError(
            "Prodigy: fsdp_in_use=True is not implemented (the estimate of d needs its sums "
            "over every rank)"
        )


def _check_params(params: list) -> None:
    for p in params:
        if p.is_complex():
            raise NotImplementedError(
                "Prodigy does not support complex params (prodigyopt's estimate of d is real)"
            )
        if _dtensor.is_dtensor(p) or hasattr(p, "_fsdp_flattened"):
            raise NotImplementedError(
                "Prodigy with sharded (FSDP, DTensor) params is not implemented: the estimate "
                "of d needs its sums over every rank"
            )


class ProdigyRule(Rule):
    """Prodigy's elementwise update. :meth:`reduce` sums, per tensor, ``<g, p0 - p>`` and the
    l1 norm of the new ``s`` (computed, not written); :meth:`step_scalars` totals them over
    every launch of the step into the new d, as prodigyopt over all its groups; :meth:`update`
    then writes the moments and ``s`` and steps with Adam's direction."""

    state = (
        Zeros("s"),
        Clone("p0"),
        Zeros("exp_avg", when=lambda g: g["betas"][0] > 0),
        Zeros("exp_avg_sq"),
    )
    sparse_error = "Prodigy does not support sparse gradients"
    reads_step = False  # (``step`` only counts: d's own counter is the group's ``k``)
    shares_sums = True

    def flags(self, g, first, step, sv):
        wd = g["weight_decay"] != 0
        return dict(
            maximize=g["maximize"], coupled=wd and not g["decouple"],
            decoupled=wd and g["decouple"], momentum=g["betas"][0] > 0,
            active=g["lr"] > 0,  # (prodigyopt: a group at lr 0 keeps its moments and s)
        )  # fmt: skip

    def reduces(self, f):
        return f.active

    def scalars(self, g, step, sv):
        # (the group's own d, k, lr: those of the first group, which step_scalars checks)
        b1, b2 = g["betas"]
        d, d0 = g["d"], g["d0"]
        scale = d if g["safeguard_warmup"] else _dlr(g, g["lr"])
        return dict(
            b1=b1, b2=b2, b3=_beta3(g), wd=g["weight_decay"], m_alpha=d * (1 - b1),
            v_value=d * d * (1 - b2), s_alpha=(d / d0) * scale,
        )  # fmt: skip

    def _grad(self, ops, f, sc, param, grad):
        if f.maximize:
            grad = -grad
        if f.coupled:
            grad = ops.add(grad, param, alpha=sc.wd)
        return grad

    def reduce(self, ops, f, sc, param, grad, s, p0, exp_avg_sq, exp_avg=None):
        grad = self._grad(ops, f, sc, param, grad)
        s = ops.add(s * sc.b3, grad, alpha=sc.s_alpha)
        return dict(dot=grad * (p0 - param), s_abs=ops.abs(s))

    def step_scalars(self, groups, batches):
        lead = groups[0]  # (prodigyopt reads the estimate and the shared options here)
        lr = max(g["lr"] for g in groups)
        for g in groups:
            _supported(g)
            if g["lr"] not in (lr, 0.0):
                raise RuntimeError(
                    "Setting different lr values in different parameter groups is only "
                    "supported for values of 0"
                )
        for g, *_ in batches:
            _check_shared(groups, g)
        d, d_max = lead["d"], lead["d_max"]
        dlr = _dlr(lead, lr)
        numerator = lead["d_numerator"] * _beta3(lead)
        delta = denom = 0.0
        for g, _, _, sums, _ in batches:
            if sums:
                weight = (d / g["d0"]) * dlr
                for x in sums["dot"].tolist():
                    delta += weight * x
                for x in sums["s_abs"].tolist():
                    denom += x
        if denom == 0:  # no grad yet (prodigyopt returns before stepping)
            return None
        numerator += delta
        d_hat = lead["d_coef"] * numerator / denom
        if d == groups[-1]["d0"]:  # (prodigyopt compares with the last group's d0)
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * lead["growth_rate"])
        scalars = [
            dict(
                d_eps=d * g["eps"], neg_dlr=-dlr, neg_dlr_d=-dlr * d, decay=-g["weight_decay"] * dlr
            )
            for g, *_ in batches
        ]
        values = dict(d_numerator=numerator, d_denom=denom, d=d, d_max=d_max, d_hat=d_hat)

        def commit():
            for g in groups:
                g.update(values)
                g["k"] = g["k"] + 1

        return scalars, commit

    def update(self, ops, f, sc, param, grad, s, p0, exp_avg_sq, exp_avg=None):
        grad = self._grad(ops, f, sc, param, grad)
        if f.active:
            s = ops.add(s * sc.b3, grad, alpha=sc.s_alpha)
            if f.momentum:
                exp_avg = ops.add(exp_avg * sc.b1, grad, alpha=sc.m_alpha)
            exp_avg_sq = ops.addcmul(exp_avg_sq * sc.b2, grad, grad, value=sc.v_value)
        denom = ops.sqrt(exp_avg_sq) + sc.d_eps
        if f.decoupled:
            param = ops.add(param, param, alpha=sc.decay)
        if f.momentum:
            param = ops.addcdiv(param, exp_avg, denom, value=sc.neg_dlr)
        else:
            param = ops.addcdiv(param, grad, denom, value=sc.neg_dlr_d)
        if not f.active:  # (nothing but the param is written)
            return dict(param=param)
        return dict(param=param, s=s, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


def _check_shared(groups: list[dict], group: dict) -> None:
    """A clear error where ``group`` steps with another value of an option that prodigyopt
    reads from the first group alone."""
    lead = groups[0]
    keys = SHARED + (("k",) if lead["use_bias_correction"] else ())
    for key in keys:
        mine, theirs = group[key], lead[key]
        if key == "betas":
            mine, theirs = tuple(mine), tuple(theirs)
        if mine != theirs:
            i = next(i for i, g in enumerate(groups) if g is group)
            raise ValueError(
                f"Prodigy: param group {i} has {key}={mine!r}, the first group {key}={theirs!r}; "
                "one d is estimated for every group, with the first group's options and "
                f"estimate (as prodigyopt reads them): give every group the same {key}"
            )


class Prodigy(Optimizer):
    r"""Implements Prodigy (Mishchenko & Defazio, 2023, "Prodigy: An Expeditiously Adaptive
    Parameter-Free Learner"): Adam whose step size :math:`d` is estimated as it trains.

    .. math::
       \begin{aligned}
            &\hat\gamma_k \leftarrow d_k\,\gamma\,\sqrt{1 - \beta_2^{k+1}} / (1 - \beta_1^{k+1})
             \quad (d_k\gamma \text{ without bias correction})                               \\
            &g_k \leftarrow \pm\nabla_\theta f_k(\theta_k) \quad (-\text{ if maximize};\;
             + \lambda\theta_k \text{ if coupled decay})                                        \\
            &r_{k+1} \leftarrow \beta_3 r_k + \textstyle\sum \frac{d_k}{d_0}\hat\gamma_k
             \langle g_k, \theta_0 - \theta_k\rangle                                            \\
            &s_{k+1} \leftarrow \beta_3 s_k + \frac{d_k}{d_0}\hat\gamma_k g_k
             \quad (\tfrac{d_k}{d_0} d_k g_k \text{ with safeguard\_warmup})                    \\
            &m_{k+1} \leftarrow \beta_1 m_k + d_k(1 - \beta_1) g_k, \quad
             v_{k+1} \leftarrow \beta_2 v_k + d_k^2(1 - \beta_2) g_k^2                           \\
            &\hat d \leftarrow c\, r_{k+1} / \textstyle\sum \lVert s_{k+1}\rVert_1, \quad
             d_{max} \leftarrow \max(d_{max}, \hat d)                                            \\
            &d_{k+1} \leftarrow \min(d_{max}, \rho\, d_k)
             \quad (d_k \leftarrow \max(d_k, \hat d) \text{ first, while } d_k = d_0)            \\
            &\theta_{k+1} \leftarrow \theta_k(1 - \lambda\hat\gamma_k)
             - \hat\gamma_k\, m_{k+1} / (\sqrt{v_{k+1}} + d_{k+1}\epsilon)
             \quad (\text{decay if decoupled};\; \beta_1 = 0: d_{k+1} g_k \text{ for } m_{k+1})
       \end{aligned}

    The sums run over every param of every group with a grad: one :math:`d` for all of them
    (:math:`\beta_3 = \sqrt{\beta_2}` where ``beta3`` is None, :math:`c` = ``d_coef``,
    :math:`\rho` = ``growth_rate``, :math:`\theta_0` = the param when its state was made).
    Argument names, defaults, state keys and numbers are ``prodigyopt``'s ``Prodigy``, group
    values included (``d``, ``d0``, ``d_max``, ``d_numerator``, ``k``, and after the first step
    ``d_denom``, ``d_hat``): its state dicts load here. Both sums come from one first pass over
    params, grads, ``p0`` and ``s`` in the same step (fused: one reduction kernel, float64
    sums), before anything is written; the update then writes params, moments and ``s`` in one
    pass. As prodigyopt: a group whose ``lr`` is 0 keeps its moments and ``s`` (its params
    still move by the others' step size), the other groups share one ``lr``, and a step before
    any grad is nonzero (the sum of ``|s|`` is 0) changes nothing.

    Where fuseopt deliberately differs: ``s`` and ``p0`` have the param's shape (prodigyopt
    keeps them flattened, and ``p0`` of an all-zero param as a 0-dim zero; those load here as
    they are, converted); grads are never written (prodigyopt adds the coupled decay into
    them); the options prodigyopt reads from the first group alone (``betas``, ``beta3``,
    ``decouple``, ``use_bias_correction``, the estimate ``d``, and ``k`` with bias correction)
    must be the same in every group that steps, else a clear error (a group added later takes
    the first group's estimate and ``k``); the step that finds every grad zero makes no state
    (prodigyopt makes it, with the same values, at that step); ``slice_p > 1``,
    ``fsdp_in_use=True``, sharded and complex params raise ``NotImplementedError``.
    ``maximize`` and in-step clipping are fuseopt's. State: ``step``, ``s``, ``p0``,
    ``exp_avg`` (where ``betas[0] > 0``), ``exp_avg_sq``.

    Args:
        {params}
        lr (float, optional): learning-rate adjustment, a multiplier of the estimated step
            size d (default: 1.0)
        betas (tuple[float, float], optional): coefficients of the running averages of the
            grad and its square (default: (0.9, 0.999))
        beta3 (float, optional): coefficient of the running sums of the estimate; None for
            ``sqrt(betas[1])`` (default: None)
        eps (float, optional): term added to the denominator, times d (default: 1e-8)
        weight_decay (float, optional): weight decay (default: 0)
        decouple (bool, optional): decay the weights directly, as AdamW, rather than adding
            the decay to the grad (default: True)
        use_bias_correction (bool, optional): Adam's bias correction in the step size
            (default: False)
        safeguard_warmup (bool, optional): leave lr out of the estimate's denominator, against
            instability while warming up (default: False)
        d0 (float, optional): initial estimate of d (default: 1e-6)
        d_coef (float, optional): coefficient of the estimate of d (default: 1.0)
        growth_rate (float, optional): the most d may grow by in a step (default: inf)
        fsdp_in_use (bool, optional): prodigyopt's sums over FSDP ranks; True is not
            implemented (default: False)
        slice_p (int, optional): prodigyopt's estimate from every slice_p-th element; only 1 is
            implemented (default: 1)
        {maximize}
        {foreach}
        {fused}
        {clipping}
        {storage}
    """

    rule = ProdigyRule()

    def __init__(
        self,
        params,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = float("inf"),
        fsdp_in_use: bool = False,
        slice_p: int = 1,
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
            raise TypeError("Prodigy: lr must be a number (the reference takes no tensor lr)")
        # (prodigyopt's checks and messages, then the arguments it leaves unchecked)
        if not 0.0 < d0:
            raise ValueError(f"Invalid d0 value: {d0}")
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        check_betas(betas)
        if beta3 is not None and not 0.0 <= beta3 < 1.0:
            raise ValueError(f"Invalid beta3 value: {beta3} (in [0, 1), or None)")
        check_non_negative(weight_decay=weight_decay)
        if not 0.0 < d_coef < math.inf:
            raise ValueError(f"Invalid d_coef value: {d_coef} (a positive number)")
        if not 0.0 < growth_rate:
            raise ValueError(f"Invalid growth_rate value: {growth_rate} (a positive number)")
        defaults = dict(
            lr=lr, betas=tuple(betas), beta3=beta3, eps=eps, weight_decay=weight_decay, d=d0,
            d0=d0, d_max=d0, d_numerator=0.0, d_coef=d_coef, k=0, growth_rate=growth_rate,
            use_bias_correction=use_bias_correction, decouple=decouple,
            safeguard_warmup=safeguard_warmup, fsdp_in_use=fsdp_in_use, slice_p=slice_p,
            maximize=maximize, foreach=foreach, fused=fused,
        )  # fmt: skip
        _supported(defaults)
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, {**defaults, **grad_options})

    def add_param_group(self, param_group: dict) -> None:
        """As :meth:`fuseopt.optimizer.Optimizer.add_param_group`; a group added after the
        first takes the first group's estimate (``d``, ``d_max``, ``d_numerator``, ``k``, ...)
        where it gives none: prodigyopt steps every group with the first group's."""
        given = set(param_group) if isinstance(param_group, dict) else set()
        lead = self.param_groups[0] if self.param_groups else None
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _supported(group)
            _check_params(group["params"])
        except Exception:
            self.param_groups.pop()
            raise
        if lead is not None:
            for key in ESTIMATE:
                if key in lead and key not in given:
                    group[key] = lead[key]

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`fuseopt.optimizer.Optimizer.load_state_dict`; also takes prodigyopt's state
        dicts (flat ``s`` and ``p0``, a 0-dim ``p0`` for a param that was all zeros)."""
        for group in state_dict["param_groups"]:
            _supported({"slice_p": 1, "fsdp_in_use": False, **group})
        super().load_state_dict(state_dict)

    def _after_setstate(self) -> None:
        # prodigyopt's s and p0: flat (or, for p0, a 0-dim zero): into the param's layout
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p)
                    for key in ("s", "p0") if state else ():
                        t = state.get(key)
                        if not torch.is_tensor(t) or t.shape == p.shape:
                            continue
                        if t.numel() == p.numel():
                            t = t.reshape(p.shape)
                        elif not (key == "p0" and t.dim() == 0):
                            continue  # (the step says what is wrong with it)
                        state[key] = torch.empty_like(p).copy_(t)


Prodigy.__doc__ = _docs.fill(Prodigy.__doc__)
