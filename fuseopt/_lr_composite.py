"""Schedulers that compose others (SequentialLR, ChainedScheduler) and ReduceLROnPlateau;
part of :mod:`fuseopt.lr_scheduler`, which re-exports them."""

from __future__ import annotations

import math
import warnings
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any, SupportsFloat

import torch

from fuseopt.lr_scheduler import (
    EPOCH_DEPRECATION_WARNING,
    LRScheduler,
    _check_optimizer,
    _copy,
    _group_values,
    _set_group_value,
)


def _check_composed(
    owner: str, optimizer: Any, schedulers: Sequence[Any], allow_plateau: bool = False
) -> None:
    for i, scheduler in enumerate(schedulers):
        if not hasattr(scheduler, "optimizer"):
            raise TypeError(f"{owner} at index {i} should have `optimizer` as its attribute.")
        if isinstance(scheduler, ReduceLROnPlateau) and not allow_plateau:
            raise ValueError(
                f"{owner} does not support `ReduceLROnPlateau` scheduler as it requires additional "
                "kwargs to be specified when calling `step`, but got one at index "
                f"{i} in the given schedulers sequence."
            )
        if optimizer != scheduler.optimizer:
            raise ValueError(
                f"{owner} expects all schedulers to belong to the same optimizer, but got "
                f"scheduler {scheduler.__class__.__name__} at index {i} has "
                f"{scheduler.optimizer}, which is different from {optimizer.__class__.__name__}."
            )


def _metric_for(composite: Any, metrics: SupportsFloat | None) -> SupportsFloat:
    """The metric a composite hands its ReduceLROnPlateau, which cannot step without one."""
    if metrics is None:
        raise TypeError(
            f"{type(composite).__name__}.step() needs `metrics` for its ReduceLROnPlateau, "
            "e.g. scheduler.step(val_loss)"
        )
    return metrics


class _ComposedStateMixin:
    """``state_dict`` of a scheduler made of schedulers: theirs nested under ``_schedulers``."""

    def state_dict(self) -> dict[str, Any]:
        """Return the state, with each inner scheduler's ``state_dict`` under ``_schedulers``."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_schedulers")}
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state, and each inner scheduler's from ``_schedulers``."""
        inner = state_dict.pop("_schedulers")
        self.__dict__.update(state_dict)
        state_dict["_schedulers"] = inner  # the caller's dict is left as it was given
        for scheduler, s_state in zip(self._schedulers, inner):
            scheduler.load_state_dict(s_state)


class SequentialLR(_ComposedStateMixin, LRScheduler):
    r"""Run schedulers one after another, switching at the given milestones.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        schedulers (list): the schedulers, in order.
        milestones (list): epochs at which the next scheduler takes over (one fewer than schedulers).
        last_epoch (int): the index of last epoch. Default: -1.
        forward_metrics (bool): beyond torch, allow :class:`ReduceLROnPlateau` among
            ``schedulers``: ``step(metrics)`` hands ``metrics`` to it while it is in charge (the
            others ignore it). When it takes over at a milestone, the lrs restart from the groups'
            ``initial_lr``, as another scheduler restarts from its epoch 0. Default: False (torch:
            a ``ReduceLROnPlateau`` is refused).
    """

    # Class defaults keep torch's state_dict layout when the option is off.
    _forward_metrics: bool = False

    def __init__(
        self,
        optimizer: Any,
        schedulers: list[Any],
        milestones: list[int],
        last_epoch: int = -1,
        *,
        forward_metrics: bool = False,
    ) -> None:
        name = self.__class__.__name__
        if len(schedulers) < 1:
            raise ValueError(f"{name} expects at least one scheduler, but got no scheduler.")
        _check_composed(name, optimizer, schedulers, allow_plateau=forward_metrics)
        if forward_metrics:
            self._forward_metrics = True
            # A ReduceLROnPlateau sets no initial_lr, and may be the only scheduler here.
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", _copy(group["lr"]))
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                "Sequential Schedulers expects number of schedulers provided to be one more than "
                "the number of milestone points, but got number of schedulers "
                f"{len(schedulers)} and the number of milestones to be equal to {len(milestones)}"
            )
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        # Constructing the inner schedulers stepped the lrs; start over from the initial ones.
        for group in optimizer.param_groups:
            _set_group_value(group, "lr", group["initial_lr"])
        self.recursive_undo()
        first = self._schedulers[bisect_right(self._milestones, 0)]
        if isinstance(first, ReduceLROnPlateau):
            # Nothing to take back or redo: it has not stepped and the lrs are the initial ones.
            self._last_lr = _group_values(optimizer, "lr")
        else:
            first._initial_step()
            self._last_lr = first.get_last_lr()

    def recursive_undo(self, sched: Any = None) -> None:
        """Take back the initial step of every (nested) scheduler: decrement its ``last_epoch``."""
        target = self if sched is None else sched
        if hasattr(target, "_schedulers"):
            for inner in target._schedulers:
                self.recursive_undo(inner)
        elif isinstance(target, ReduceLROnPlateau):
            pass  # it took no initial step (only reachable with forward_metrics)
        elif hasattr(target, "last_epoch"):
            target.last_epoch -= 1

    def step(self, metrics: SupportsFloat | None = None) -> None:
        """Step the scheduler in charge; at a milestone, start the next one from epoch 0.

        Args:
            metrics (float, optional): with ``forward_metrics``, the metric handed to a
                :class:`ReduceLROnPlateau` in charge; ignored otherwise.
        """
        self.last_epoch += 1
        idx = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[idx]
        if isinstance(scheduler, ReduceLROnPlateau):
            if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
                # Its "epoch 0": the initial lrs, and a fresh record of the best metric.
                for group in self.optimizer.param_groups:
                    _set_group_value(group, "lr", group["initial_lr"])
                scheduler._reset()
            scheduler.step(_metric_for(self, metrics))
        elif idx > 0 and self._milestones[idx - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()


class ChainedScheduler(_ComposedStateMixin, LRScheduler):
    r"""Step several schedulers together, each acting on the lr the previous one left.

    Args:
        schedulers (sequence): the schedulers to chain.
        optimizer (Optimizer, optional): their optimizer; the first scheduler's if not given.
        forward_metrics (bool): beyond torch, allow :class:`ReduceLROnPlateau` among
            ``schedulers``: ``step(metrics)`` hands ``metrics`` to it and steps the others
            plainly. Default: False (torch: a ``ReduceLROnPlateau`` is refused).
    """

    # Class default keeps torch's state_dict layout when the option is off.
    _forward_metrics: bool = False

    def __init__(
        self, schedulers: Sequence[Any], optimizer: Any = None, *, forward_metrics: bool = False
    ) -> None:
        name = self.__class__.__name__
        if len(schedulers) < 1:
            raise ValueError(
                f"{name} expects at least one scheduler to be chained, but got no scheduler."
            )
        optimizer = optimizer or schedulers[0].optimizer
        _check_composed(name, optimizer, schedulers, allow_plateau=forward_metrics)
        if forward_metrics:
            self._forward_metrics = True
        self._schedulers = schedulers
        self.optimizer = optimizer
        self._last_lr = _group_values(self._schedulers[-1].optimizer, "lr")

    def step(self, metrics: SupportsFloat | None = None) -> None:
        """Step every chained scheduler, in order.

        Args:
            metrics (float, optional): with ``forward_metrics``, the metric handed to each
                :class:`ReduceLROnPlateau`; ignored otherwise.
        """
        for scheduler in self._schedulers:
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(_metric_for(self, metrics))
            else:
                scheduler.step()
        self._last_lr = _group_values(self._schedulers[-1].optimizer, "lr")


class ReduceLROnPlateau(LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
    r"""Reduce each group's learning rate by ``factor`` when a metric stops improving.

    Also an instance of :class:`torch.optim.lr_scheduler.ReduceLROnPlateau`, as a type marker
    (Lightning steps such a scheduler with the monitored metric): it defines every method of
    torch's class, and none of torch's code runs.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        mode (str): ``"min"`` (the metric should go down) or ``"max"``. Default: ``"min"``.
        factor (float): multiplicative factor of the reduction, < 1. Default: 0.1.
        patience (int): epochs without improvement tolerated before reducing. Default: 10.
        threshold (float): least change that counts as an improvement. Default: 1e-4.
        threshold_mode (str): ``"rel"`` (relative to the best) or ``"abs"``. Default: ``"rel"``.
        cooldown (int): epochs to wait after a reduction before counting again. Default: 0.
        min_lr (float or list): lower bound of the lr, or one per group. Default: 0.
        eps (float): a reduction smaller than this is not applied. Default: 1e-8.
    """

    def __init__(
        self,
        optimizer: Any,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: list[float] | float = 0,
        eps: float = 1e-8,
    ) -> None:
        if factor >= 1.0:
            raise ValueError("Factor should be < 1.0.")
        self.factor = factor
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        n_groups = len(optimizer.param_groups)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != n_groups:
                raise ValueError(f"expected {n_groups} min_lrs, got {len(min_lr)}")
            self.default_min_lr = None
            self.min_lrs = list(min_lr)
        else:
            self.default_min_lr = min_lr
            self.min_lrs = [min_lr] * n_groups
        self.patience = patience
        self.cooldown = cooldown
        self.eps = eps
        self.last_epoch = 0
        self._last_lr = _group_values(optimizer, "lr")
        self._init_is_better(mode=mode, threshold=threshold, threshold_mode=threshold_mode)
        self._reset()

    def _reset(self) -> None:
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def step(self, metrics: SupportsFloat, epoch: int | None = None) -> None:  # type: ignore[override]
        """Record the metric of an epoch and reduce the learning rates if it has plateaued.

        Args:
            metrics (float): the monitored quantity.
            epoch (int, optional): deprecated; sets ``last_epoch``.
        """
        current = float(metrics)
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
        self.last_epoch = epoch
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # epochs in cooldown never count as bad
        if self.num_bad_epochs > self.patience:
            self._reduce_lr(epoch)
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = _group_values(self.optimizer, "lr")

    def _reduce_lr(self, epoch: int) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"The number of param groups in the `optimizer` ({len(groups)}) differs from "
                    f"when `ReduceLROnPlateau` was initialized ({len(self.min_lrs)}), usually due "
                    "to a new param group being added to the optimizer. Please modify the "
                    "`min_lrs` field to match the length of the `optimizer` param groups."
                )
            # A single min_lr applies to groups added since: extend it.
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                _set_group_value(group, "lr", new_lr)

    @property
    def in_cooldown(self) -> bool:
        """Whether the scheduler is waiting out its cooldown."""
        return self.cooldown_counter > 0

    def _is_better(self, a: float, best: float) -> bool:
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return a < best * (1.0 - self.threshold)
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def _init_is_better(self, mode: str, threshold: float, threshold_mode: str) -> None:
        if mode not in {"min", "max"}:
            raise ValueError("mode " + mode + " is unknown!")
        if threshold_mode not in {"rel", "abs"}:
            raise ValueError("threshold mode " + threshold_mode + " is unknown!")
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the scheduler's state (and re-derive the comparison from its mode)."""
        self.__dict__.update(state_dict)
        self._init_is_better(
            mode=self.mode, threshold=self.threshold, threshold_mode=self.threshold_mode
        )
