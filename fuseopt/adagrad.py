"""Adagrad: adaptive subgradient methods (Duchi et al., 2011)."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs, _first_pass, _storage
from fuseopt._dispatch import init_state
from fuseopt._validate import check_lr, check_non_negative
from fuseopt.optimizer import Optimizer
from fuseopt.rule import Fill, Rule, to_scalar

__all__ = ["Adagrad"]


class AdagradRule(Rule):
    """Adagrad's elementwise update; sparse grads take :meth:`sparse_update`."""

    state = (Fill("sum", key="initial_accumulator_value"),)
    sparse_ok = True

    def flags(self, g, first, step, sv):
        return dict(maximize=g["maximize"], wd=g["weight_decay"] != 0)

    def scalars(self, g, step, sv):
        clr = to_scalar(g["lr"]) / (1 + (step - 1) * g["lr_decay"])
        return dict(wd=g["weight_decay"], eps=g["eps"], neg_clr=-clr)

    def update(self, ops, f, s, param, grad, sum):
        if f.maximize:
            grad = -grad
        if f.wd:
            grad = ops.add(grad, param, alpha=s.wd)
        sum = ops.addcmul(sum, grad, grad, value=1)
        param = ops.addcdiv(param, grad, ops.sqrt(sum) + s.eps, value=s.neg_clr)
        return dict(param=param, sum=sum)

    def check_sparse(self, group, param, grad):
        if group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")
        _storage.check_sparse(self, group, param, ("sum",), param_store=True)

    @staticmethod
    def sparse_update(g, param, grad, state, step):
        """Adagrad's step on the rows a sparse ``grad`` touches (the others stay as they are):
        torch's sparse arithmetic, or, where the group asks for a storage format, the dense
        step's on those rows (:func:`_stored_update`)."""
        # Plain code: only the rows a sparse grad touches change (gather/scatter, not elementwise).
        if _storage.widened(g, param):
            _stored_update(g, param, grad, state, step)
            return
        if g["maximize"]:
            grad = -grad
        clr = to_scalar(g["lr"]) / (1 + (step - 1) * g["lr_decay"])
        grad = grad.coalesce()  # the update is not linear: each index once
        indices, values = grad._indices(), grad._values()
        sparse = lambda v: torch.sparse_coo_tensor(indices, v, grad.size())
        state["sum"].add_(sparse(values.pow(2)))
        std = state["sum"].sparse_mask(grad)._values().sqrt_().add_(g["eps"])
        param.add_(sparse(values / std), alpha=-clr)


def _stored_update(g: dict, param: Tensor, grad: Tensor, state: dict, step) -> None:
    """The sparse step of a group with a storage format (:mod:`fuseopt._storage`): the dense
    step's float32 arithmetic, op for op, on the rows ``grad`` touches, read from the stored
    ``sum`` and param and rounded once per store (the param with Kahan summation where the
    group asks for it); the other rows, and their ``kahan_comp``, stay as they are, as a dense
    step's zero grad leaves them."""
    clr = to_scalar(g["lr"]) / (1 + (step - 1) * g["lr_decay"])
    # (repeated indices summed in float32, as the dense grad would hold them)
    grad = grad.to(_storage.COMPUTE).coalesce()
    rows = tuple(grad._indices())  # one index tensor per sparse dim: the touched slices
    values = -grad._values() if g["maximize"] else grad._values()
    total = torch.addcmul(state["sum"][rows].to(_storage.COMPUTE), values, values, value=1)
    new = torch.addcdiv(
        param[rows].to(_storage.COMPUTE), values, torch.sqrt(total) + g["eps"], value=-clr
    )
    state["sum"][rows] = total.to(state["sum"].dtype)
    if _storage.kahan(g, param):
        comp = state[_storage.KAHAN]
        stored, lost = _storage.kahan_sum(param[rows], new, comp[rows])
        comp[rows] = lost.to(comp.dtype)
        param[rows] = stored
    else:
        param[rows] = new.to(param.dtype)


class Adagrad(Optimizer):
    r"""Implements Adagrad.

    .. math::
       \begin{aligned}
            &\tilde{\gamma} \leftarrow \gamma / (1 + (t - 1) \eta), \quad
             s_t \leftarrow s_{t-1} + g_t^2, \quad
             \theta_t \leftarrow \theta_{t-1} - \tilde{\gamma} \frac{g_t}{\sqrt{s_t} + \epsilon}
       \end{aligned}

    with :math:`g_t` the gradient (negated if maximize) plus :math:`\lambda\theta_{t-1}`. State
    (``step``, ``sum``) is created at construction, as :class:`torch.optim.Adagrad` does. Sparse
    gradients are supported (without weight decay); with a storage option their step is the
    dense step on the rows they touch (not with stochastic rounding of a bfloat16 store,
    docs/storage.md).

    Args:
        {params}
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        lr_decay (float, optional): learning rate decay (default: 0)
        weight_decay (float, optional): weight decay, L2 penalty (default: 0)
        initial_accumulator_value (float, optional): initial value of the sum of squares
            (default: 0)
        eps (float, optional): term added to the denominator (default: 1e-10)
        {foreach}
        {maximize}
        {differentiable}
        {fused}
        {clipping}
        {storage}
    """

    rule = AdagradRule()
    _setstate_defaults = dict(foreach=None, maximize=False, differentiable=False, fused=None)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
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
        check_non_negative(
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
        )
        defaults = dict(
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, foreach=foreach,
            maximize=maximize, differentiable=differentiable, fused=fused,
        )  # fmt: skip
        grad_options = _first_pass.options(
            max_grad_norm, norm_type, error_if_nonfinite, skip_if_nonfinite
        )
        grad_options |= _storage.options(state_dtype, stochastic_rounding, kahan_sum, state_bits)
        super().__init__(params, {**defaults, **grad_options})
        for group in self.param_groups:
            init_state(self, group, group["params"])


Adagrad.__doc__ = _docs.fill(Adagrad.__doc__)
