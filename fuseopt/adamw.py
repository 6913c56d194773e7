"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from fuseopt import _docs
from fuseopt.adam import Adam

__all__ = ["AdamW"]


class AdamW(Adam):
    r"""Implements AdamW: :class:`~fuseopt.Adam` with ``decoupled_weight_decay=True``.

    .. math::
        \theta_{t-1} \leftarrow \theta_{t-1} (1 - \gamma\lambda), \text{ then the Adam step}

    Args:
        {params}
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float, float], optional): coefficients of the running averages
            (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): decoupled weight decay coefficient (default: 1e-2)
        amsgrad (bool, optional): use the AMSGrad variant (default: False)
        {maximize}
        {foreach}
        {capturable}
        {differentiable}
        {fused}
        cautious (bool, optional): beyond torch: C-AdamW (Liang et al., 2024), see
            :class:`~fuseopt.Adam` (default: False)
        {clipping}
        {storage}
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
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
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, cautious=cautious, max_grad_norm=max_grad_norm,
            norm_type=norm_type,
            error_if_nonfinite=error_if_nonfinite, skip_if_nonfinite=skip_if_nonfinite,
            state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, kahan_sum=kahan_sum,
            state_bits=state_bits,
        )  # fmt: skip

    def _after_setstate(self) -> None:
        # As torch: any state loaded into AdamW decays decoupled, whatever the saved flag says.
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


AdamW.__doc__ = _docs.fill(AdamW.__doc__)
