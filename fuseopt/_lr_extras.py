"""Schedulers and tools beyond torch: WarmupCosineLR and WSDLR on :mod:`fuseopt.schedules`,
``preview`` and ``plot``; part of :mod:`fuseopt.lr_scheduler`, which re-exports them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fuseopt import schedules
from fuseopt.lr_scheduler import (
    HyperKey,
    LRScheduler,
    _check_key,
    _get_hyper,
)


def _check_factor(name: str, value: Any, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must satisfy {low} <= {name} <= {high}, got {value}")
    return float(value)


class _ScheduleLR(LRScheduler):
    """A scheduler whose value is a pure :mod:`fuseopt.schedules` function of ``last_epoch``.

    The value depends on ``last_epoch`` and the group's initial value alone (closed form, never
    the previous value), so a scheduler restored by :meth:`load_state_dict` goes on exactly.
    """

    def _schedule(self, peak: float) -> schedules.Schedule:
        raise NotImplementedError

    def get_lr(self) -> list[float | Tensor]:
        """Compute each group's value: the schedule at ``last_epoch``, peaking at its initial one."""
        self._warn_if_outside_step()
        # Rebuilt on each call (it is cheap): a closure in the instance would land in state_dict,
        # which then could not be pickled.
        return [self._schedule(float(base))(self.last_epoch) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        return self.get_lr()


class WarmupCosineLR(_ScheduleLR):
    r"""Linear warm-up to each group's initial lr, then a half cosine down to ``eta_min``.

    Beyond torch. At epoch ``t`` the lr is :func:`fuseopt.schedules.warmup_cosine` with the
    group's ``initial_lr`` as ``peak``: it rises linearly from ``warmup_start_factor * initial_lr``
    (epoch 0) to ``initial_lr`` (epoch ``warmup_steps``), follows a half cosine to ``eta_min`` at
    ``total_steps``, and stays there.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        total_steps (int): epoch at which ``eta_min`` is reached, >= 1.
        warmup_steps (int): length of the warm-up, in ``[0, total_steps]``. Default: 0.
        warmup_start_factor (float): lr at epoch 0 as a fraction of the initial lr, in [0, 1].
            Default: 0.0.
        eta_min (float): final learning rate. Default: 0.0.
        last_epoch (int): the index of last epoch. Default: -1.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.

    Example:
        >>> # xdoctest: +SKIP
        >>> scheduler = WarmupCosineLR(optimizer, total_steps=1000, warmup_steps=100)
        >>> for batch in data:
        >>>     train_batch(...)
        >>>     scheduler.step()
    """

    def __init__(
        self,
        optimizer: Any,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_start_factor: float = 0.0,
        eta_min: float = 0.0,
        last_epoch: int = -1,
        *,
        key: HyperKey = "lr",
    ) -> None:
        self.warmup_start_factor = _check_factor("warmup_start_factor", warmup_start_factor, 0, 1)
        self.eta_min = _check_factor("eta_min", eta_min, 0, math.inf)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self._schedule(1.0)  # checks total_steps and warmup_steps, naming them
        super().__init__(optimizer, last_epoch, key=key)

    def _schedule(self, peak: float) -> schedules.Schedule:
        return schedules.warmup_cosine(
            peak,
            self.total_steps,
            self.warmup_steps,
            start=self.warmup_start_factor * peak,
            end=self.eta_min,
        )


class WSDLR(_ScheduleLR):
    r"""Warmup-stable-decay: warm up to each group's initial lr, hold it, then decay to ``eta_min``.

    Beyond torch. At epoch ``t`` the lr is :func:`fuseopt.schedules.wsd` with the group's
    ``initial_lr`` as ``peak``: a linear warm-up from ``warmup_start_factor * initial_lr`` over
    ``warmup_steps`` epochs, a plateau at ``initial_lr``, and a decay over the last
    ``decay_steps`` epochs before ``total_steps`` down to ``eta_min``, which then stays.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        total_steps (int): epoch at which ``eta_min`` is reached, >= 1.
        warmup_steps (int): length of the warm-up, in ``[0, total_steps]``. Default: 0.
        decay_steps (int, float or None): length of the decay: an int, or a float in (0, 1]
            giving that fraction of ``total_steps``. Default: None (the last 20%).
        decay (str): shape of the decay: ``"linear"``, ``"cosine"`` or ``"sqrt"``.
            Default: ``"linear"``.
        eta_min (float): final learning rate. Default: 0.0.
        last_epoch (int): the index of last epoch. Default: -1.
        warmup_start_factor (float): lr at epoch 0 as a fraction of the initial lr, in [0, 1].
            Default: 0.0.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.
    """

    def __init__(
        self,
        optimizer: Any,
        total_steps: int,
        warmup_steps: int = 0,
        decay_steps: int | float | None = None,
        decay: str = "linear",
        eta_min: float = 0.0,
        last_epoch: int = -1,
        *,
        warmup_start_factor: float = 0.0,
        key: HyperKey = "lr",
    ) -> None:
        self.warmup_start_factor = _check_factor("warmup_start_factor", warmup_start_factor, 0, 1)
        self.eta_min = _check_factor("eta_min", eta_min, 0, math.inf)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.decay = decay
        self._schedule(1.0)  # checks the step counts and decay, naming them
        super().__init__(optimizer, last_epoch, key=key)

    def _schedule(self, peak: float) -> schedules.Schedule:
        return schedules.wsd(
            peak,
            self.total_steps,
            self.warmup_steps,
            self.decay_steps,
            start=self.warmup_start_factor * peak,
            end=self.eta_min,
            decay=self.decay,
        )


def _default_optimizer(params: list[Tensor]) -> Any:
    from . import SGD  # here: the package imports this module

    return SGD(params, lr=1.0, momentum=0.9)


def preview(
    scheduler_factory: Callable[[Any], Any],
    steps: int,
    key: HyperKey = "lr",
    optimizer_factory: Callable[[list[Tensor]], Any] | None = None,
) -> list[float]:
    r"""Return the values a scheduler gives, step by step, without training anything.

    The scheduler is built by ``scheduler_factory`` on a throwaway optimizer over one dummy
    parameter (by default ``fuseopt.SGD(lr=1.0, momentum=0.9)``, so lrs read as factors). Each
    step calls ``optimizer.step()`` (no gradients: nothing moves) then ``scheduler.step()``.

    Args:
        scheduler_factory (callable): ``optimizer -> scheduler``.
        steps (int): number of values to return, >= 0.
        key (str or tuple): the hyper-parameter read from the first param group, a group entry or
            ``(entry, index)``. Default: ``"lr"``.
        optimizer_factory (callable, optional): ``params -> optimizer`` for the throwaway
            optimizer, e.g. to preview ``("betas", 0)`` on an Adam. Default: the SGD above.

    Returns:
        list of float: the value in effect for optimizer steps ``0 .. steps - 1``.

    Example:
        >>> preview(lambda opt: StepLR(opt, step_size=2), 5)
        [1.0, 1.0, 0.1, 0.1, 0.010000000000000002]
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    key = _check_key(key)
    make_optimizer = optimizer_factory or _default_optimizer
    optimizer = make_optimizer([torch.zeros(1, requires_grad=True)])
    scheduler = scheduler_factory(optimizer)
    values = []
    for i in range(steps):
        if i:
            optimizer.step()
            scheduler.step()
        values.append(float(_get_hyper(optimizer.param_groups[0], key)))
    return values


def plot(
    scheduler_factory: Callable[[Any], Any],
    steps: int,
    path: Any,
    key: HyperKey = "lr",
    optimizer_factory: Callable[[list[Tensor]], Any] | None = None,
) -> Any:
    r"""Plot :func:`preview`'s values against the step and save the figure (PNG by default).

    Needs matplotlib, the optional extra ``fuseopt[plot]``.

    Args:
        scheduler_factory (callable): ``optimizer -> scheduler``.
        steps (int): number of steps plotted.
        path (str or path-like): file written; its suffix picks the format.
        key (str or tuple): the hyper-parameter plotted. Default: ``"lr"``.
        optimizer_factory (callable, optional): as in :func:`preview`.

    Returns:
        the ``path`` given.
    """
    try:
        # Imported here: matplotlib is optional, and heavy to import.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "fuseopt.lr_scheduler.plot needs matplotlib: pip install 'fuseopt[plot]' "
            "(or pip install matplotlib)"
        ) from err
    values = preview(scheduler_factory, steps, key=key, optimizer_factory=optimizer_factory)
    # A bare Figure, not pyplot: no global figure state, no GUI backend chosen behind the caller.
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(len(values)), values)
    ax.set_xlabel("step")
    ax.set_ylabel(key if isinstance(key, str) else f"{key[0]}[{key[1]}]")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path
