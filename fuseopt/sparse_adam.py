"""SparseAdam: Adam masked to the entries a sparse gradient names (for ``nn.Embedding(sparse=True)``).

Plain code, no elementwise rule: a step reads and writes only the positions listed by the coalesced
sparse gradient (a gather and a scatter per tensor), not every element of dense tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fuseopt import _docs
from fuseopt.optimizer import Optimizer
from fuseopt.rule import to_scalar

__all__ = ["SparseAdam"]


def _where(grad: Tensor, *dense: Tensor) -> tuple[tuple[Tensor, ...], list[Tensor]]:
    """An advanced index for the positions of a coalesced sparse ``grad``, and ``dense`` as views
    that index takes rows of: ``view[index]`` lines up with ``grad._values()``."""
    indices = grad._indices()
    if indices.size(0) == 0:
        # No sparse dims: the (at most one) value is the whole tensor; a leading axis of size 1
        # gives it a row to index, and writes through the view land in the tensor itself.
        index = (indices.new_zeros(indices.size(1)),)
        return index, [t.unsqueeze(0) for t in dense]
    return tuple(indices), list(dense)


class SparseAdam(Optimizer):
    r"""Implements a masked version of Adam, for parameters whose gradients are sparse.

    Only the moments and parameter entries that the (coalesced) sparse gradient stores are
    updated; every stored value counts as non-zero, even an explicit zero. Params must be dense,
    gradients sparse (as :class:`torch.nn.Embedding` gives with ``sparse=True``).

    .. math::
       \begin{aligned}
            &\text{for each position } i \text{ stored in the coalesced sparse } g_t
                = \pm\nabla_\theta f_t(\theta_{t-1}) \quad (-\text{ if maximize}): \\
            &\quad m_{t,i} \leftarrow m_{t-1,i} + (1 - \beta_1)(g_{t,i} - m_{t-1,i})         \\
            &\quad v_{t,i} \leftarrow v_{t-1,i} + (1 - \beta_2)(g_{t,i}^2 - v_{t-1,i})       \\
            &\quad \theta_{t,i} \leftarrow \theta_{t-1,i} - \gamma
                \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
                \frac{m_{t,i}}{\sqrt{v_{t,i}} + \epsilon}
       \end{aligned}

    :math:`t` counts the steps in which the param had a gradient (an empty one included). State
    (``step`` as a Python int, ``exp_avg``, ``exp_avg_sq``) and state dicts are those of
    :class:`torch.optim.SparseAdam`.

    Args:
        {params}
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float, float], optional): coefficients used for computing running
            averages of gradient and its square (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator to improve numerical stability
            (default: 1e-8)
        {maximize}
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
    ) -> None:
        # torch's checks, order and messages; lr and eps must be strictly positive here.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps > 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i in (0, 1):
            if not 0.0 <= betas[i] < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        super().__init__(params, defaults)

        # Like torch, only the constructor's groups are checked (add_param_group does not).
        where = lambda test: [
            [gi, pi]
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
            if test(p)
        ]
        sparse, complex_ = where(lambda p: p.is_sparse), where(lambda p: p.is_complex())
        if sparse:
            raise ValueError(
                f"Sparse params at indices {sparse}: SparseAdam requires dense parameter tensors"
            )
        if complex_:
            raise ValueError(
                f"Complex params at indices {complex_}: SparseAdam does not support complex "
                "parameters"
            )

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            # Check every gradient first: a dense one fails the step before any state changes
            # (torch would already have counted the steps of the params before it).
            work = []
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if any(not p.grad.is_sparse for p in params):
                    raise RuntimeError(
                        "SparseAdam does not support dense gradients, please consider Adam instead"
                    )
                work.append((group, params))
            for group, params in work:
                for p in params:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        """One masked Adam step of ``p`` (dense) with its sparse gradient."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1  # counted even when the gradient turns out empty, as in torch
        step = state["step"]

        # Coalescing sums duplicate indices: the update is non-linear in the gradient, so each
        # position must appear once. Negating after the sum is exact (rounding is sign-symmetric).
        grad = p.grad.coalesce()
        values = grad._values()
        if values.numel() == 0:
            return
        if group["maximize"]:
            values = -values
        beta1, beta2 = group["betas"]
        index, (param, exp_avg, exp_avg_sq) = _where(grad, p, state["exp_avg"], state["exp_avg_sq"])

        # m + (1 - beta1) (g - m), rounded as ``old + increment`` (the increment first), which
        # is how torch adds its sparse increment into the dense buffer.
        old = exp_avg[index]
        exp_avg_new = old + (values - old).mul_(1 - beta1)
        exp_avg.index_put_(index, exp_avg_new)
        old = exp_avg_sq[index]
        exp_avg_sq_new = old + (values * values - old).mul_(1 - beta2)
        exp_avg_sq.index_put_(index, exp_avg_sq_new)

        lr = to_scalar(group["lr"])
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        denom = exp_avg_sq_new.sqrt_().add_(group["eps"])
        # Indices are unique after coalescing, so accumulating adds each increment exactly once.
        param.index_put_(index, exp_avg_new.div_(denom).mul_(-step_size), accumulate=True)


SparseAdam.__doc__ = _docs.fill(SparseAdam.__doc__)
