"""Adafactor: Adam-like steps with a factored (row x column) second moment (Shazeer & Stern, 2018).

Plain code, no elementwise rule: the second moment of a matrix is kept as row and column means
(reductions across the tensor), and the step size depends on the norms of the param and of the
update, so no step is a function of one element alone.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from fuseopt import _docs, _dtensor
from fuseopt._dispatch import scalar_dtype
from fuseopt.optimizer import Optimizer
from fuseopt.rule import to_scalar

__all__ = ["Adafactor"]


def _mean_square(grad: Tensor, dim: int) -> Tensor:
    """``(grad * grad).mean(dim, keepdim=True)`` as ``norm**2 / n``: no grad-sized temporary, and
    rounded as torch rounds it."""
    return torch.linalg.vector_norm(grad, dim=dim, keepdim=True).square_().div_(grad.size(dim))


def _step_scalars(step: float, lr, beta2_decay: float, eps2: float, param_norm: float, numel: int):
    """(weight of the new squared gradient, unclipped step size) of one param at ``step``.

    Python floats, computed as torch computes them (a Tensor lr makes the step size a Tensor).
    """
    weight = step**beta2_decay  # 1 - beta2_t
    relative = min(lr, 1 / (step**0.5))  # rho_t
    return weight, max(eps2, param_norm / (numel**0.5)) * relative


def _clipped(alpha, update_norm: float, numel: int, d: float):
    """The signed step size, ``alpha`` shrunk when the update's RMS exceeds the threshold ``d``."""
    return -alpha / max(1.0, update_norm / ((numel**0.5) * d))


def _factored(grad: Tensor) -> bool:
    return grad.dim() > 1


class Adafactor(Optimizer):
    r"""Implements Adafactor.

    .. math::
       \begin{aligned}
            &G_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) \quad (-\text{ if maximize}),
                \quad \widehat{\beta}_{2_t} = 1 - t^{\tau}                                    \\
            &\rho_t \leftarrow \min(\gamma, 1/\sqrt{t}), \quad
                \alpha_t \leftarrow \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t        \\
            &\theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)                          \\
            &\text{if } \dim G_t > 1:                                                        \\
            &\quad R_t \leftarrow \widehat{\beta}_{2_t} R_{t-1}
                + (1 - \widehat{\beta}_{2_t})\,\mathrm{mean}_{\text{last}}(G_t \odot G_t)     \\
            &\quad C_t \leftarrow \widehat{\beta}_{2_t} C_{t-1}
                + (1 - \widehat{\beta}_{2_t})\,\mathrm{mean}_{\text{second last}}(G_t \odot G_t) \\
            &\quad \widehat{V}_t \leftarrow R_t C_t / \max(\mathrm{mean}(R_t), \epsilon_1)    \\
            &\text{else: } \widehat{V}_t \leftarrow \widehat{\beta}_{2_t}\widehat{V}_{t-1}
                + (1 - \widehat{\beta}_{2_t})\, G_t \odot G_t                                 \\
            &U_t \leftarrow G_t / \max(\sqrt{\widehat{V}_t}, \epsilon_1)                     \\
            &\theta_t \leftarrow \theta_{t-1}
                - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t) / d)}\, U_t
       \end{aligned}

    :math:`\mathrm{RMS}(x) = \lVert x \rVert_2 / \sqrt{\mathrm{numel}(x)}`. Tensors with two or
    more dims keep the row factor ``row_var`` (last dim reduced to 1) and the column factor
    ``col_var`` (second last dim reduced to 1); vectors and scalars keep the full ``variance``.
    Numbers, state (``step``, ``row_var``, ``col_var`` or ``variance``) and state dicts are
    those of :class:`torch.optim.Adafactor`. When :math:`\epsilon_1` is None it is the machine
    epsilon of the dtype of the group's first param with a gradient.

    Args:
        {params}
        lr (float, Tensor, optional): unlike other optimizers, Adafactor does not require a
            learning rate; it caps the relative step size :math:`\rho_t` (default: 1e-2)
        beta2_decay (float, optional): the decay rate :math:`\tau` of
            :math:`\beta_2` (default: -0.8)
        eps (tuple[float | None, float], optional): :math:`\epsilon_1`, added to the
            denominator of the update (None: the dtype's machine epsilon), and
            :math:`\epsilon_2`, the smallest param scale (default: (None, 1e-3))
        d (float, optional): the clipping threshold of the update's RMS (default: 1.0)
        weight_decay (float, optional): decoupled weight decay :math:`\lambda` (default: 0.0)
        foreach (bool, optional): whether the foreach (multi-tensor) implementation is used;
            on CPU it gives the for-loop's numbers bit for bit. If unspecified (None), a group
            runs the foreach implementation when its params are off CPU and the for-loop on
            CPU, where foreach ops are per-tensor loops anyway; torch always runs its for-loop
            then (default: None)
        {maximize}
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        # torch's checks, in its order and with its messages.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not beta2_decay <= 0.0:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not eps[0] >= 0.0:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not eps[1] >= 0.0:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not d >= 1.0:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        defaults = dict(
            lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
            foreach=foreach, maximize=maximize,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _after_setstate(self) -> None:
        # Old checkpoints saved ``step`` as a number; the steps here are tensors, as in torch.
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and not torch.is_tensor(state["step"]):
                    state["step"] = torch.tensor(float(state["step"]), dtype=scalar_dtype())

    # ------------------------------------------------------------------------------------ step
    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if (
            getattr(self, "grad_scale", None) is not None
            or getattr(self, "found_inf", None) is not None
        ):
            raise AssertionError("Grad scaling should occur outside of optimizer.step()")
        with torch.no_grad():
            # Every check before any change: an error leaves all params and state as they were
            # (torch would already have stepped the groups before the offending one).
            work = []
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                for p in params:
                    if torch.is_complex(p):
                        raise RuntimeError("Adafactor does not support complex parameters")
                    if p.grad.is_sparse:
                        raise RuntimeError("Adafactor does not support sparse gradients")
                    if _dtensor.is_dtensor(p):
                        raise NotImplementedError(
                            "Adafactor does not support DTensor parameters (FSDP2, tensor "
                            "parallel): its row/column second moments and its step size (the RMS "
                            "of the param and of the update) reduce over whole tensors, not over "
                            "a rank's shard. Optimize such params with an elementwise optimizer "
                            "(e.g. AdamW), or keep them unsharded."
                        )
                work.append((group, params))
            for group, params in work:
                if params:
                    self._step_group(group, params)
        return loss

    def _state(self, p: Tensor) -> dict:
        """``p``'s state, created on its first step (shapes follow the gradient)."""
        state = self.state[p]
        if not state:
            grad = p.grad
            state["step"] = torch.tensor(0.0, dtype=scalar_dtype())  # on CPU: read every step
            if _factored(grad):
                state["row_var"] = grad.new_zeros((*grad.shape[:-1], 1))
                state["col_var"] = grad.new_zeros((*grad.shape[:-2], 1, grad.shape[-1]))
            else:
                state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        return state

    def _step_group(self, group: dict, params: list[Tensor]) -> None:
        eps1, eps2 = group["eps"]
        if eps1 is None:
            # One value for the whole group, from its first param: torch's for-loop sets it
            # at its first param and keeps it for the rest.
            eps1 = torch.finfo(params[0].dtype).eps
        foreach = group["foreach"]
        if foreach is None:
            foreach = params[0].device.type != "cpu"
        opts = dict(
            lr=to_scalar(group["lr"]), beta2_decay=group["beta2_decay"], eps1=eps1, eps2=eps2,
            d=group["d"], weight_decay=group["weight_decay"], maximize=group["maximize"],
        )  # fmt: skip
        if not foreach:
            for p in params:
                self._single(p, self._state(p), **opts)
            return
        # foreach: one batch per device, dtype and kind of second moment
        batches: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            batches[(p.device, p.dtype, _factored(p.grad))].append(p)
        for (_, _, factored), batch in batches.items():
            self._multi(batch, [self._state(p) for p in batch], factored, **opts)

    @staticmethod
    def _single(p, state, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize) -> None:
        """The for-loop step of one param."""
        grad = -p.grad if maximize else p.grad
        step = state["step"]
        step.add_(1)
        weight, alpha = _step_scalars(
            step.item(), lr, beta2_decay, eps2, p.norm(2).item(), p.numel()
        )
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        if _factored(grad):
            row_var, col_var = state["row_var"], state["col_var"]
            row_var.lerp_(_mean_square(grad, -1), weight)
            col_var.lerp_(_mean_square(grad, -2), weight)
            # the rank-1 estimate R C: an outer product, as exact as torch's k=1 matmul
            estimate = row_var * col_var
            estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
            estimate.clamp_(min=eps1 * eps1)
        else:
            variance = state["variance"]
            variance.lerp_(grad * grad, weight)
            estimate = variance.clamp_min(eps1 * eps1)  # a new tensor: the state stays unclamped
        # eps1 is squared above, before the root: the floor of the denominator is eps1 itself
        update = estimate.rsqrt_().mul_(grad)
        p.add_(update, alpha=_clipped(alpha, update.norm(2).item(), update.numel(), d))

    @staticmethod
    def _multi(
        params, states, factored, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize
    ) -> None:
        """The foreach step of a batch of params of one device and dtype, all factored or not."""
        grads = [p.grad for p in params]
        if maximize:
            grads = torch._foreach_neg(grads)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        # One host read for all param norms (and below for all update norms), not one per param.
        norms = torch.stack(torch._foreach_norm(params)).tolist()
        scalars = [
            _step_scalars(s.item(), lr, beta2_decay, eps2, n, p.numel())
            for s, n, p in zip(steps, norms, params)
        ]
        weights = [w for w, _ in scalars]
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        if factored:
            row_vars = [s["row_var"] for s in states]
            col_vars = [s["col_var"] for s in states]
            torch._foreach_lerp_(row_vars, [_mean_square(g, -1) for g in grads], weights)
            torch._foreach_lerp_(col_vars, [_mean_square(g, -2) for g in grads], weights)
            estimates = [r * c for r, c in zip(row_vars, col_vars)]  # shapes differ: no foreach
            row_means = [r.mean(dim=-2, keepdim=True) for r in row_vars]
            torch._foreach_clamp_min_(row_means, eps1)
            torch._foreach_div_(estimates, row_means)
            torch._foreach_clamp_min_(estimates, eps1 * eps1)
        else:
            variances = [s["variance"] for s in states]
            torch._foreach_lerp_(variances, torch._foreach_mul(grads, grads), weights)
            estimates = torch._foreach_clamp_min(variances, eps1 * eps1)
        torch._foreach_rsqrt_(estimates)
        torch._foreach_mul_(estimates, grads)
        updates = estimates
        update_norms = torch.stack(torch._foreach_norm(updates)).tolist()
        # ``add_(u, alpha=a)`` rounds a*u + p once; no foreach op takes one alpha per tensor, and
        # scaling the updates first would round twice (torch's foreach differs from its for-loop
        # by that last bit). A per-tensor add keeps this path equal to the for-loop.
        for p, u, n, (_, alpha) in zip(params, updates, update_norms, scalars):
            p.add_(u, alpha=_clipped(alpha, n, u.numel(), d))


Adafactor.__doc__ = _docs.fill(Adafactor.__doc__)
