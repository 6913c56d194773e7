"""Constructor checks shared by the algorithms, with torch.optim's exact messages and order."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def check_lr(lr: Any) -> None:
    """A learning rate: a number or a 1-element tensor, not negative."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_non_negative(**options: Any) -> None:
    """torch's ``Invalid <name> value: <v>`` for the first negative option (``eps``: epsilon)."""
    for name, value in options.items():
        if not 0.0 <= value:
            raise ValueError(f"Invalid {'epsilon' if name == 'eps' else name} value: {value}")


def check_betas(betas: Any) -> None:
    """Both betas in [0, 1)."""
    for i in (0, 1):
        if not 0.0 <= betas[i] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")


def check_three_betas(betas, beta3_closed: bool) -> None:
    """Three numbers: the first two in [0, 1), the third in [0, 1] (``beta3_closed``) or
    [0, 1); torch's message for the index out of range."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 3:
        raise ValueError(f"betas must hold three values (beta1, beta2, beta3), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"betas[{i}] must be a number, got {type(beta).__name__}")
        closed = i == 2 and beta3_closed
        if not (0.0 <= beta <= 1.0 if closed else 0.0 <= beta < 1.0):
            rng = "[0, 1]" if closed else "[0, 1)"
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (in {rng})")
