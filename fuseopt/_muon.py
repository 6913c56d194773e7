"""Muon: momentum orthogonalised by Newton–Schulz iterations, for 2-D (matrix) params.

Not an elementwise rule: orthogonalising needs the whole matrix (matmuls on it), so the step is
plain torch code per param, with torch.optim.Muon's ops in its order (bitwise the same numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fuseopt import _docs, _dtensor
from fuseopt.optimizer import Optimizer
from fuseopt.rule import to_scalar

__all__ = ["Muon"]

# The quintic's coefficients, the norm floor and the iteration count of Keller Jordan's Muon,
# which torch takes as defaults.
DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
DEFAULT_EPS = 1e-7
DEFAULT_NS_STEPS = 5
ADJUST_LR_FNS = ("original", "match_rms_adamw")


def _newton_schulz(
    matrix: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> Tensor:
    r"""Approximately orthogonalise ``matrix`` (``U S V^T \mapsto U S' V^T``, ``S' \approx I``).

    Runs ``steps`` iterations of :math:`X \leftarrow aX + (bA + cA^2)X`, :math:`A = XX^T`, in
    bfloat16 from :math:`X_0 = M / \max(\|M\|_F, \varepsilon)`. The coefficients push small
    singular values up fast rather than converge exactly: the result's singular values lie
    roughly in [0.5, 1.5].

    Args:
        matrix (Tensor): a 2-D tensor. If it is already bfloat16 it is normalised in place.
        coefficients (tuple[float, float, float]): :math:`(a, b, c)`.
        steps (int): number of iterations.
        eps (float): floor of the norm that :math:`X_0` is divided by.

    Returns:
        Tensor: a bfloat16 tensor of ``matrix``'s shape.
    """
    a, b, c = coefficients
    # ``.bfloat16()`` does not copy a bfloat16 tensor: torch then normalises the caller's tensor
    # (for bfloat16 params without Nesterov, the momentum buffer) in place; kept for parity.
    x = matrix.bfloat16()
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T  # work on the wide orientation: the Gram matrix X X^T is then the smaller one
    # The Frobenius norm bounds the spectral norm, so every singular value starts at most 1,
    # inside the region where the iteration converges.
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x.T if tall else x


def _lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The factor Muon scales ``lr`` by for a ``shape`` matrix, so updates have a comparable RMS."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))  # Keller Jordan's scaling
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))  # Moonshot's: the RMS of an AdamW update
    # A group added later is not validated (as in torch): an unknown name leaves lr as is.
    return 1.0


class Muon(Optimizer):
    r"""Implements Muon (MomentUm Orthogonalized by Newton-Schulz) for 2-D parameters.

    .. math::
       \begin{aligned}
            &g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})                                   \\
            &B_t \leftarrow \mu B_{t-1} + (1 - \mu) g_t \qquad (B_0 = 0)                      \\
            &\widetilde{B}_t \leftarrow (1 - \mu) g_t + \mu B_t \text{ if nesterov else } B_t  \\
            &O_t \leftarrow \mathrm{NS}^{(a,b,c)}_k\big(\widetilde{B}_t;\ \varepsilon\big)   \\
            &\theta_t \leftarrow \theta_{t-1}(1 - \gamma\lambda)
                - \gamma\,\rho(A, B)\, O_t
       \end{aligned}

    :math:`\mathrm{NS}^{(a,b,c)}_k` runs :math:`k` Newton–Schulz iterations
    :math:`X \leftarrow aX + (bXX^T + c(XX^T)^2)X` in bfloat16 from
    :math:`X_0 = \widetilde{B}_t / \max(\|\widetilde{B}_t\|_F, \varepsilon)` (transposed when
    the matrix is tall), which maps :math:`USV^T` to about :math:`US'V^T`,
    :math:`S' \approx I`. For an :math:`A \times B` param, :math:`\rho` gives updates a
    comparable RMS across shapes: :math:`\sqrt{\max(1, A/B)}` (``"original"``, Keller Jordan's)
    or :math:`0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``, Moonshot's: the RMS of AdamW's
    update, so AdamW's lr and weight decay carry over). Weight decay uses the unscaled
    :math:`\gamma`.

    Muon is meant for the matrices of hidden layers; optimize biases, embeddings and other
    params with a standard method such as AdamW. State (``momentum_buffer``) and state dicts
    are those of :class:`torch.optim.Muon`.

    Args:
        {params}
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        weight_decay (float, optional): decoupled weight decay (default: 0.1)
        momentum (float, optional): momentum factor (default: 0.95)
        nesterov (bool, optional): enables Nesterov momentum (default: True)
        ns_coefficients (tuple[float, float, float], optional): coefficients :math:`(a, b, c)`
            of the Newton–Schulz polynomial (default: (3.4445, -4.775, 2.0315))
        eps (float, optional): floor of the norm the update is divided by before the
            iterations, for numerical stability (default: 1e-7)
        ns_steps (int, optional): number of Newton–Schulz iterations, less than 100
            (default: 5)
        adjust_lr_fn (str, optional): learning rate scaling by shape, ``"original"`` or
            ``"match_rms_adamw"``; None means ``"original"`` (default: None)

    Example:
        >>> # xdoctest: +SKIP
        >>> matrices = [p for p in model.parameters() if p.ndim == 2]
        >>> others = [p for p in model.parameters() if p.ndim != 2]
        >>> muon = fuseopt.Muon(matrices, lr=0.02, momentum=0.95)
        >>> adamw = fuseopt.AdamW(others, lr=3e-4, weight_decay=0.01)
        >>> loss_fn(model(input), target).backward()
        >>> muon.step()
        >>> adamw.step()
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
        eps: float = DEFAULT_EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not momentum >= 0.0:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
        )  # fmt: skip
        super().__init__(params, defaults)
        # torch checks the shapes after building the groups, and only here: a group added later
        # with a non-2-D param fails at the step instead.
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        "Muon only supports 2D parameters whereas we found a parameter with "
                        f"size: {p.size()}"
                    )

    def _check_group(self, group: dict[str, Any]) -> list[Tensor]:
        """Return the group's params with a grad; raise torch's errors, in torch's order."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
        for p in params:
            if p.grad.ndim != 2:
                raise ValueError("Param gradient must be a 2D matrix")
            if group["ns_steps"] >= 100:
                raise ValueError(
                    "Number of steps must be less than 100 for computational efficiency"
                )
            if len(group["ns_coefficients"]) != 3:
                raise ValueError("Coefficients must be a tuple of exactly 3 values")
        return params

    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate the closure, then update every group's params that have a grad."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            # torch raises these part-way through a step; checking every group first leaves
            # params and state untouched when one fails.
            work = [(group, self._check_group(group)) for group in self.param_groups]
            for group, params in work:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """One Muon step for ``params`` (checked, with grads) of ``group``, in place."""
        lr = to_scalar(group["lr"])
        momentum, nesterov = group["momentum"], group["nesterov"]
        for p in params:
            grad = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    grad, memory_format=torch.preserve_format
                )
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if nesterov else buf
            # A sharded (FSDP2) matrix is gathered whole: Newton-Schulz needs all of it. Every
            # rank runs the same iterations and keeps its own shard of the result, so the numbers
            # are those of unsharded training.
            matrix = _dtensor.full(update)
            ortho = _newton_schulz(
                matrix, group["ns_coefficients"], group["ns_steps"], group["eps"]
            )
            if matrix is not update:
                ortho = _dtensor.like(ortho, p)
                # Unsharded, a bfloat16 ``update`` is normalised in place (see _newton_schulz);
                # here its gathered copy was: the shard takes that copy's values.
                if update.dtype == torch.bfloat16:
                    update.copy_(_dtensor.like(matrix, update))
            scaled_lr = lr * _lr_ratio(group["adjust_lr_fn"], p.shape)
            # Decoupled decay with the unscaled lr; a no-op multiply by 1 when weight_decay is 0.
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(ortho, alpha=-scaled_lr)  # bfloat16 update, promoted to the param's dtype


Muon.__doc__ = _docs.fill(Muon.__doc__)
