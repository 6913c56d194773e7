r"""Learning rate schedulers, with the API and the exact numbers of ``torch.optim.lr_scheduler``.

Every scheduler here drives fuseopt optimizers and ``torch.optim`` optimizers alike (anything that is
a ``torch.optim.Optimizer``; fuseopt's base class subclasses it as a type marker). The recursive
:meth:`LRScheduler.get_lr` forms and the closed forms used by the deprecated ``step(epoch)`` repeat
torch's floating-point operations in torch's order, so the learning rate sequences are bitwise equal.
"""

from __future__ import annotations

import math
import types
import warnings
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from functools import partial, wraps
from typing import Any, SupportsFloat
from weakref import ref

import torch
from torch import Tensor

from . import schedules

__all__ = [
    "LRScheduler",
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "SequentialLR",
    "CosineAnnealingLR",
    "ChainedScheduler",
    "ReduceLROnPlateau",
    "CyclicLR",
    "CosineAnnealingWarmRestarts",
    "OneCycleLR",
    "PolynomialLR",
    # beyond torch
    "WarmupCosineLR",
    "WSDLR",
    "preview",
    "plot",
]

# Only the type: the schedulers accept fuseopt's and torch's optimizers, never call torch.optim code.
_OptimizerType = torch.optim.Optimizer

EPOCH_DEPRECATION_WARNING = (
    "The epoch parameter in `scheduler.step()` was not necessary and is being "
    "deprecated where possible. Please use `scheduler.step()` to step the "
    "scheduler. During the deprecation, if epoch is different from None, the "
    "closed form is used instead of the new chainable form, where available. "
    "Please open an issue if you are unable to replicate your use case: "
    "https://github.com/pytorch/pytorch/issues/new/choose."
)

_HOW_TO_URL = "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate"

# The mark torch's schedulers put on a wrapped ``optimizer.step``. Using the same name means a torch
# scheduler and a fuseopt scheduler on one optimizer share a single wrapper and one ``_opt_called``.
_WRAPPED_MARK = "_wrapped_by_lr_sched"


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, _OptimizerType):
        raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")


def _copy(value: Any) -> Any:
    # A tensor hyper-parameter is cloned so that callers never alias the optimizer's own tensor.
    return value.clone() if isinstance(value, Tensor) else value


def _group_values(optimizer: Any, key: str) -> list[Any]:
    """``group[key]`` of every param group, tensors cloned (a missing key raises ``KeyError``)."""
    return [_copy(group[key]) for group in optimizer.param_groups]


def _set_group_value(group: dict[str, Any], key: str, value: Any) -> None:
    """Write ``value`` to ``group[key]``; a tensor there is kept and filled in place."""
    current = group[key]
    if isinstance(current, Tensor):
        if isinstance(value, Tensor) and value.dim() != 0:
            value = value.squeeze()  # fill_ wants a scalar; a 1-element tensor is one
        current.fill_(value)
    else:
        group[key] = value


HyperKey = str | tuple[str, int]


def _check_key(key: Any) -> HyperKey:
    """Normalize a scheduled hyper-parameter's key: a group entry, or (entry, index) of a tuple."""
    if isinstance(key, str):
        return key
    if (
        isinstance(key, (tuple, list))
        and len(key) == 2
        and isinstance(key[0], str)
        and isinstance(key[1], int)
        and not isinstance(key[1], bool)
    ):
        return (key[0], key[1])
    raise TypeError(f"key must be a str or a (str, int) pair, got {key!r}")


def _key_name(key: HyperKey) -> str:
    """The name a key gives its ``initial_<name>`` entry: ``"lr"``, ``"betas_0"``, ..."""
    return key if isinstance(key, str) else f"{key[0]}_{key[1]}"


def _get_hyper(group: dict[str, Any], key: HyperKey) -> Any:
    if isinstance(key, str):
        return group[key]
    name, index = key
    return group[name][index]


def _set_hyper(group: dict[str, Any], key: HyperKey, value: Any) -> None:
    """Write ``value`` at ``key``; a tuple entry is rebuilt with one element replaced."""
    if isinstance(key, str):
        _set_group_value(group, key, value)
        return
    name, index = key
    entry = group[name]
    current = entry[index]
    if isinstance(current, Tensor):  # a tensor element is kept, as for a plain entry
        if isinstance(value, Tensor) and value.dim() != 0:
            value = value.squeeze()
        current.fill_(value)
        return
    items = list(entry)
    items[index] = value
    group[name] = type(entry)(items) if isinstance(entry, (tuple, list)) else tuple(items)


def _per_group(name: str, optimizer: Any, value: Any) -> list[Any]:
    """One value per param group: a list/tuple must match the groups, a scalar is repeated."""
    n_groups = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n_groups:
            raise ValueError(
                f"{name} must have the same length as optimizer.param_groups. "
                f"{name} has {len(value)} values, param_groups has {n_groups}."
            )
        values = list(value)
    else:
        values = [value] * n_groups
    return [_copy(v) for v in values]


def _track_optimizer_step(optimizer: Any) -> None:
    """Wrap ``optimizer.step`` (on the instance) so it records that it ran, as torch does.

    The record (``optimizer._opt_called``) lets :meth:`LRScheduler.step` warn about the old
    ``scheduler.step()``-before-``optimizer.step()`` order. The wrapper holds the optimizer weakly,
    so it does not keep the optimizer alive through its own attribute.
    """
    step = optimizer.step
    if hasattr(step, _WRAPPED_MARK):
        return
    func = getattr(step, "__func__", None)
    if func is not None and getattr(step, "__self__", None) is optimizer:
        opt_ref = ref(optimizer)

        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            opt = opt_ref()
            opt._opt_called = True
            return func.__get__(opt, opt.__class__)(*args, **kwargs)

    else:  # ``step`` is already some plain callable: wrap it as it is
        opt_ref = ref(optimizer)

        @wraps(step)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            opt_ref()._opt_called = True
            return step(*args, **kwargs)

    setattr(wrapper, _WRAPPED_MARK, True)
    optimizer.step = wrapper


def _callables_state(fns: list[Any]) -> list[dict[str, Any] | None]:
    # Plain functions (lambdas included) cannot be saved; callable objects keep their attributes.
    return [None if isinstance(fn, types.FunctionType) else fn.__dict__.copy() for fn in fns]


class LRScheduler:
    r"""Base class for all learning rate schedulers.

    Subclasses define :meth:`get_lr` (and, where it exists, a closed form ``_get_closed_form_lr``).

    Args:
        optimizer (Optimizer): the optimizer whose learning rates are scheduled.
        last_epoch (int): index of the last epoch. ``-1`` (default) starts afresh; another value
            resumes and needs ``initial_lr`` in every param group. Default: -1.
        key (str or tuple): the hyper-parameter scheduled (beyond torch): a param group entry such
            as ``"weight_decay"``, or ``(entry, index)`` for one element of a tuple entry, such as
            ``("betas", 0)``. Its starting value is kept in the group as ``initial_<key>``
            (``initial_betas_0`` for ``("betas", 0)``), and ``base_lrs``/``get_last_lr()`` hold
            its values. Default: ``"lr"``, which is exactly torch's behaviour.
    """

    _get_lr_called_within_step: bool = False
    _is_initial: bool = False
    # A class default, so that a scheduler of the lr has torch's exact state_dict layout; another
    # key is set on the instance and so saved with the state.
    _key: HyperKey = "lr"

    def __init__(self, optimizer: Any, last_epoch: int = -1, *, key: HyperKey = "lr") -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        key = _check_key(key)
        if key != "lr":
            self._key = key
        initial = self._initial_key
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault(initial, _copy(_get_hyper(group, key)))
        else:
            for i, group in enumerate(optimizer.param_groups):
                if initial not in group:
                    raise KeyError(
                        f"param '{initial}' is not specified in param_groups[{i}] when resuming "
                        "scheduler with last_epoch >= 0.\n"
                        "This typically happens when:\n"
                        "1. You're trying to resume training from a checkpoint but haven't "
                        "properly loaded the optimizer state\n"
                        "2. You're using last_epoch >= 0 for a fresh training run (not recommended)"
                    )
        self.base_lrs: list[Any] = _group_values(optimizer, initial)
        self.last_epoch = last_epoch
        _track_optimizer_step(optimizer)
        self._initial_step()

    @property
    def _initial_key(self) -> str:
        return f"initial_{_key_name(self._key)}"

    def _current_values(self) -> list[Any]:
        """The scheduled hyper-parameter of every group, tensors cloned."""
        return [_copy(_get_hyper(group, self._key)) for group in self.optimizer.param_groups]

    def _current(self, group: dict[str, Any]) -> Any:
        return _get_hyper(group, self._key)

    def _initial_step(self) -> None:
        """Reset the step count and take the first step, which sets the starting learning rates."""
        self._step_count = 0
        with self._initial_mode():
            self.step()

    @contextmanager
    def _initial_mode(self):
        self._is_initial = True
        try:
            yield
        finally:
            self._is_initial = False

    @contextmanager
    def _within_step(self):
        # get_lr called by the scheduler itself must not warn "use get_last_lr()".
        self._get_lr_called_within_step = True
        try:
            yield
        finally:
            self._get_lr_called_within_step = False

    def _warn_if_outside_step(self) -> None:
        if not self._get_lr_called_within_step:
            warnings.warn(
                "To get the last learning rate computed by the scheduler, "
                "please use `get_last_lr()`.",
                UserWarning,
                stacklevel=3,
            )

    def state_dict(self) -> dict[str, Any]:
        """Return the state of the scheduler as a :class:`dict`: every attribute but the optimizer."""
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the scheduler's state.

        Args:
            state_dict (dict): scheduler state, as returned by :meth:`state_dict`.
        """
        self.__dict__.update(state_dict)

    def get_last_lr(self) -> list[float | Tensor]:
        """Return the last learning rates computed by the scheduler (copies, one per group)."""
        return self._last_lr

    def get_lr(self) -> list[float | Tensor]:
        """Compute the learning rate of each param group for the current ``last_epoch``."""
        raise NotImplementedError

    def step(self, epoch: int | None = None) -> None:
        """Advance the schedule by one epoch and write the new learning rates to the optimizer.

        Args:
            epoch (int, optional): deprecated; sets ``last_epoch`` and uses the closed form where
                the scheduler has one.
        """
        if self._step_count == 1:
            if not hasattr(self.optimizer.step, _WRAPPED_MARK):
                warnings.warn(
                    "Seems like `optimizer.step()` has been overridden after learning rate "
                    "scheduler initialization. Please, make sure to call `optimizer.step()` before "
                    f"`lr_scheduler.step()`. See more details at {_HOW_TO_URL}",
                    UserWarning,
                    stacklevel=2,
                )
            elif not getattr(self.optimizer, "_opt_called", False):
                warnings.warn(
                    "Detected call of `lr_scheduler.step()` before `optimizer.step()`. "
                    "In PyTorch 1.1.0 and later, you should call them in the opposite order: "
                    "`optimizer.step()` before `lr_scheduler.step()`.  Failure to do this "
                    "will result in PyTorch skipping the first value of the learning rate "
                    f"schedule. See more details at {_HOW_TO_URL}",
                    UserWarning,
                    stacklevel=2,
                )
        self._step_count += 1
        if epoch is not None:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
        self._update_lr(epoch)

    def _update_lr(self, epoch: int | None = None) -> None:
        with self._within_step():
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                closed_form = getattr(self, "_get_closed_form_lr", None)
                values = closed_form() if closed_form is not None else self.get_lr()
        groups = self.optimizer.param_groups
        if len(values) != len(groups):
            raise ValueError(f"got {len(values)} learning rates for {len(groups)} param groups")
        for group, lr in zip(groups, values):
            _set_hyper(group, self._key, lr)
        self._last_lr: list[Any] = self._current_values()


class _LRScheduler(LRScheduler):
    """Old name of :class:`LRScheduler`, kept for code that subclasses it."""


def _lambdas_for(optimizer: Any, lr_lambda: Any) -> list[Any]:
    n_groups = len(optimizer.param_groups)
    if not isinstance(lr_lambda, (list, tuple)):
        return [lr_lambda] * n_groups
    if len(lr_lambda) != n_groups:
        raise ValueError(f"Expected {n_groups} lr_lambdas, but got {len(lr_lambda)}")
    return list(lr_lambda)


class _LambdaStateMixin:
    """``state_dict`` for schedulers holding ``lr_lambdas``: functions dropped, objects' state kept."""

    def state_dict(self) -> dict[str, Any]:
        """Return the scheduler's state; each ``lr_lambda`` is ``None`` or a callable's ``__dict__``."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        state["lr_lambdas"] = _callables_state(self.lr_lambdas)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the scheduler's state, restoring the saved callable objects' attributes."""
        saved = state_dict.pop("lr_lambdas")
        self.__dict__.update(state_dict)
        state_dict["lr_lambdas"] = saved  # the caller's dict is left as it was given
        for fn, fn_state in zip(self.lr_lambdas, saved):
            if fn_state is not None:
                fn.__dict__.update(fn_state)


class LambdaLR(_LambdaStateMixin, LRScheduler):
    r"""Set each group's learning rate to its initial lr times ``lr_lambda(epoch)``.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        lr_lambda (function or list): a function of the epoch giving the factor, or one per group.
        last_epoch (int): the index of last epoch. Default: -1.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.
    """

    def __init__(
        self, optimizer: Any, lr_lambda: Any, last_epoch: int = -1, *, key: HyperKey = "lr"
    ) -> None:
        self.optimizer = optimizer
        self.lr_lambdas = _lambdas_for(optimizer, lr_lambda)
        super().__init__(optimizer, last_epoch, key=key)

    def get_lr(self) -> list[float | Tensor]:
        """Compute ``base_lr * lr_lambda(last_epoch)`` for each group."""
        self._warn_if_outside_step()
        return [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)]


class MultiplicativeLR(_LambdaStateMixin, LRScheduler):
    r"""Multiply each group's learning rate by ``lr_lambda(epoch)`` every epoch.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        lr_lambda (function or list): a function of the epoch giving the factor, or one per group.
        last_epoch (int): the index of last epoch. Default: -1.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.
    """

    def __init__(
        self, optimizer: Any, lr_lambda: Any, last_epoch: int = -1, *, key: HyperKey = "lr"
    ) -> None:
        self.optimizer = optimizer
        self.lr_lambdas = _lambdas_for(optimizer, lr_lambda)
        for fn in self.lr_lambdas:
            if not callable(fn):
                raise TypeError(f"lr_lambda should be a function, but got {type(fn).__name__}")
        super().__init__(optimizer, last_epoch, key=key)

    def get_lr(self) -> list[float | Tensor]:
        """Compute ``lr * lr_lambda(last_epoch)`` for each group (the lr itself on the first step)."""
        self._warn_if_outside_step()
        if self._is_initial:
            return self._current_values()
        groups = self.optimizer.param_groups
        return [self._current(g) * fn(self.last_epoch) for fn, g in zip(self.lr_lambdas, groups)]


class StepLR(LRScheduler):
    r"""Decay each group's learning rate by ``gamma`` every ``step_size`` epochs.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        step_size (int): period of learning rate decay.
        gamma (float): multiplicative factor of learning rate decay. Default: 0.1.
        last_epoch (int): the index of last epoch. Default: -1.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.
    """

    def __init__(
        self,
        optimizer: Any,
        step_size: int,
        gamma: float = 0.1,
        last_epoch: int = -1,
        *,
        key: HyperKey = "lr",
    ) -> None:
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch, key=key)

    def get_lr(self) -> list[float | Tensor]:
        """Compute the learning rates: ``lr * gamma`` at multiples of ``step_size``, else ``lr``."""
        self._warn_if_outside_step()
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current_values()
        return [self._current(g) * self.gamma for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        return [b * self.gamma ** (self.last_epoch // self.step_size) for b in self.base_lrs]


class MultiStepLR(LRScheduler):
    r"""Decay each group's learning rate by ``gamma`` at each milestone epoch.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        milestones (list): epoch indices; a repeated milestone decays as many times.
        gamma (float): multiplicative factor of learning rate decay. Default: 0.1.
        last_epoch (int): the index of last epoch. Default: -1.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.
    """

    def __init__(
        self,
        optimizer: Any,
        milestones: Iterable[int],
        gamma: float = 0.1,
        last_epoch: int = -1,
        *,
        key: HyperKey = "lr",
    ) -> None:
        self.milestones = Counter(milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch, key=key)

    def get_lr(self) -> list[float | Tensor]:
        """Compute the learning rates, decayed once per milestone at ``last_epoch``."""
        self._warn_if_outside_step()
        if self.last_epoch not in self.milestones:
            return self._current_values()
        times = self.milestones[self.last_epoch]
        return [self._current(g) * self.gamma**times for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        passed = bisect_right(sorted(self.milestones.elements()), self.last_epoch)
        return [b * self.gamma**passed for b in self.base_lrs]


class ConstantLR(LRScheduler):
    r"""Multiply each group's learning rate by ``factor`` until epoch ``total_iters``.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        factor (float): the factor, in [0, 1]. Default: 1/3.
        total_iters (int): number of epochs the factor applies. Default: 5.
        last_epoch (int): the index of last epoch. Default: -1.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.
    """

    def __init__(
        self,
        optimizer: Any,
        factor: float = 1.0 / 3,
        total_iters: int = 5,
        last_epoch: int = -1,
        *,
        key: HyperKey = "lr",
    ) -> None:
        if factor > 1.0 or factor < 0:
            raise ValueError("Constant multiplicative factor expected to be between 0 and 1.")
        self.factor = factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch, key=key)

    def get_lr(self) -> list[float | Tensor]:
        """Compute the learning rates: scaled down at epoch 0, restored at ``total_iters``."""
        self._warn_if_outside_step()
        groups = self.optimizer.param_groups
        if self.last_epoch == 0:
            return [self._current(g) * self.factor for g in groups]
        if self.last_epoch != self.total_iters:
            return self._current_values()
        return [self._current(g) * (1.0 / self.factor) for g in groups]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        done = self.last_epoch >= self.total_iters
        return [b * (self.factor + done * (1 - self.factor)) for b in self.base_lrs]


class LinearLR(LRScheduler):
    r"""Scale each group's learning rate linearly from ``start_factor`` to ``end_factor``.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        start_factor (float): factor at the first epoch, in (0, 1]. Default: 1/3.
        end_factor (float): factor at and after ``total_iters``, in [0, 1]. Default: 1.0.
        total_iters (int): number of epochs of the ramp. Default: 5.
        last_epoch (int): the index of last epoch. Default: -1.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.
    """

    def __init__(
        self,
        optimizer: Any,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
        *,
        key: HyperKey = "lr",
    ) -> None:
        if start_factor > 1.0 or start_factor <= 0:
            raise ValueError(
                "Starting multiplicative factor expected to be greater than 0 and less or equal to 1."
            )
        if end_factor > 1.0 or end_factor < 0:
            raise ValueError("Ending multiplicative factor expected to be between 0 and 1.")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch, key=key)

    def get_lr(self) -> list[float | Tensor]:
        """Compute the learning rates of the next point on the linear ramp, from the current ones."""
        self._warn_if_outside_step()
        groups = self.optimizer.param_groups
        if self.last_epoch == 0:
            return [self._current(g) * self.start_factor for g in groups]
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._current_values()
        span = self.end_factor - self.start_factor
        ratio = 1.0 + span / (self.total_iters * self.start_factor + (self.last_epoch - 1) * span)
        return [self._current(g) * ratio for g in groups]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        span = self.end_factor - self.start_factor
        frac = min(self.total_iters, self.last_epoch)
        return [b * (self.start_factor + span * frac / self.total_iters) for b in self.base_lrs]


class ExponentialLR(LRScheduler):
    r"""Decay each group's learning rate by ``gamma`` every epoch.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        gamma (float): multiplicative factor of learning rate decay.
        last_epoch (int): the index of last epoch. Default: -1.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.
    """

    def __init__(
        self, optimizer: Any, gamma: float, last_epoch: int = -1, *, key: HyperKey = "lr"
    ) -> None:
        self.gamma = gamma
        super().__init__(optimizer, last_epoch, key=key)

    def get_lr(self) -> list[float | Tensor]:
        """Compute ``lr * gamma`` for each group (the lr itself on the first step)."""
        self._warn_if_outside_step()
        if self._is_initial:
            return self._current_values()
        return [self._current(g) * self.gamma for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        return [b * self.gamma**self.last_epoch for b in self.base_lrs]


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


class PolynomialLR(LRScheduler):
    r"""Decay each group's learning rate polynomially to zero over ``total_iters`` epochs.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        total_iters (int): number of epochs of the decay. Default: 5.
        power (float): power of the polynomial. Default: 1.0.
        last_epoch (int): the index of last epoch. Default: -1.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.
    """

    def __init__(
        self,
        optimizer: Any,
        total_iters: int = 5,
        power: float = 1.0,
        last_epoch: int = -1,
        *,
        key: HyperKey = "lr",
    ) -> None:
        self.total_iters = total_iters
        self.power = power
        super().__init__(optimizer, last_epoch, key=key)

    def get_lr(self) -> list[float | Tensor]:
        """Compute the learning rates of the next point on the polynomial, from the current ones."""
        self._warn_if_outside_step()
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._current_values()
        now = 1.0 - self.last_epoch / self.total_iters
        before = 1.0 - (self.last_epoch - 1) / self.total_iters
        factor = (now / before) ** self.power
        return [self._current(g) * factor for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        frac = min(self.total_iters, self.last_epoch) / self.total_iters
        return [b * (1.0 - frac) ** self.power for b in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    r"""Anneal each group's learning rate along a cosine between its initial lr and ``eta_min``.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        T_max (int): half period of the cosine, in epochs.
        eta_min (float): minimum learning rate. Default: 0.0.
        last_epoch (int): the index of last epoch. Default: -1.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.
    """

    def __init__(
        self,
        optimizer: Any,
        T_max: int,
        eta_min: float = 0.0,
        last_epoch: int = -1,
        *,
        key: HyperKey = "lr",
    ) -> None:
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch, key=key)

    def get_lr(self) -> list[float | Tensor]:
        """Compute the learning rates of the next point on the cosine (recursive form)."""
        self._warn_if_outside_step()
        groups = self.optimizer.param_groups
        t, t_max, eta_min = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._current_values()
        if self._step_count == 1 and t > 0:  # resumed: no previous lr to recurse from
            return [
                eta_min + (b - eta_min) * (1 + math.cos(t * math.pi / t_max)) / 2
                for b in self.base_lrs
            ]
        if (t - 1 - t_max) % (2 * t_max) == 0:  # leaving the trough, where the ratio is 0/0
            return [
                self._current(g) + (b - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
                for b, g in zip(self.base_lrs, groups)
            ]
        ratio = (1 + math.cos(math.pi * t / t_max)) / (1 + math.cos(math.pi * (t - 1) / t_max))
        return [ratio * (self._current(g) - eta_min) + eta_min for g in groups]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        cos = 1 + math.cos(math.pi * self.last_epoch / self.T_max)
        return [self.eta_min + (b - self.eta_min) * cos / 2 for b in self.base_lrs]


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


class ReduceLROnPlateau(LRScheduler):
    r"""Reduce each group's learning rate by ``factor`` when a metric stops improving.

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


def _set_momentum(group: dict[str, Any], use_beta1: bool, value: Any) -> None:
    if use_beta1:
        group["betas"] = (value, *group["betas"][1:])
    else:
        group["momentum"] = value


def _init_cycled_momentum(
    optimizer: Any, base_momentum: Any, max_momentum: Any, last_epoch: int
) -> tuple[bool, list[Any], list[Any]]:
    """Check the optimizer has a momentum (or beta1) to cycle and, on a fresh start, set it."""
    if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
        raise ValueError(
            "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"
        )
    use_beta1 = "betas" in optimizer.defaults
    max_momentums = _per_group("max_momentum", optimizer, max_momentum)
    base_momentums = _per_group("base_momentum", optimizer, base_momentum)
    if last_epoch == -1:
        for top, bottom, group in zip(max_momentums, base_momentums, optimizer.param_groups):
            _set_momentum(group, use_beta1, top)
            group["max_momentum"] = top
            group["base_momentum"] = bottom
    return use_beta1, base_momentums, max_momentums


class CyclicLR(LRScheduler):
    r"""Cycle each group's learning rate between ``base_lr`` and ``max_lr`` (cyclical LR policy).

    The lr changes after every batch; ``step`` is called once per batch.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        base_lr (float or list): lower learning rate boundary, or one per group.
        max_lr (float or list): upper learning rate boundary, or one per group.
        step_size_up (int): iterations in the increasing half of a cycle. Default: 2000.
        step_size_down (int): iterations in the decreasing half; ``step_size_up`` if None.
        mode (str): ``"triangular"``, ``"triangular2"`` or ``"exp_range"``. Default: ``"triangular"``.
        gamma (float): base of ``exp_range``'s ``gamma**iterations`` scaling. Default: 1.0.
        scale_fn (function): custom amplitude scaling (replaces ``mode``). Default: None.
        scale_mode (str): ``"cycle"`` or ``"iterations"``: what ``scale_fn`` is given. Default:
            ``"cycle"``.
        cycle_momentum (bool): cycle momentum (or beta1) inversely to the lr. Default: True.
        base_momentum (float or list): lower momentum boundary. Default: 0.8.
        max_momentum (float or list): upper momentum boundary. Default: 0.9.
        last_epoch (int): index of the last batch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Any,
        base_lr: float | list[float],
        max_lr: float | list[float],
        step_size_up: int = 2000,
        step_size_down: int | None = None,
        mode: str = "triangular",
        gamma: float = 1.0,
        scale_fn: Callable[[float], float] | None = None,
        scale_mode: str = "cycle",
        cycle_momentum: bool = True,
        base_momentum: float = 0.8,
        max_momentum: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        base_lrs = _per_group("base_lr", optimizer, base_lr)
        if last_epoch == -1:
            for lr, group in zip(base_lrs, optimizer.param_groups):
                _set_group_value(group, "lr", lr)
        self.max_lrs = _per_group("max_lr", optimizer, max_lr)
        up = float(step_size_up)
        down = float(step_size_down) if step_size_down is not None else up
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        if mode not in ("triangular", "triangular2", "exp_range") and scale_fn is None:
            raise ValueError("mode is invalid and scale_fn is None")
        self.mode = mode
        self.gamma = gamma
        self._scale_fn_custom = scale_fn
        self.scale_mode = scale_mode
        self._init_scale_fn()
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            self.use_beta1, self.base_momentums, self.max_momentums = _init_cycled_momentum(
                optimizer, base_momentum, max_momentum, last_epoch
            )
        super().__init__(optimizer, last_epoch)
        self.base_lrs = base_lrs

    def _init_scale_fn(self) -> None:
        # The built-in scalings are not saved in state_dict (a partial of a method does not pickle
        # well); they are rebuilt from ``mode`` here, on construction and on load.
        if self._scale_fn_custom is not None:
            return
        if self.mode == "triangular":
            self._scale_fn_ref = self._triangular_scale_fn
            self.scale_mode = "cycle"
        elif self.mode == "triangular2":
            self._scale_fn_ref = self._triangular2_scale_fn
            self.scale_mode = "cycle"
        elif self.mode == "exp_range":
            self._scale_fn_ref = partial(self._exp_range_scale_fn, self.gamma)
            self.scale_mode = "iterations"

    def scale_fn(self, x: Any) -> float:
        """The amplitude scaling at ``x`` (a cycle number or an iteration, per ``scale_mode``)."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        return self._scale_fn_ref(x)

    @staticmethod
    def _triangular_scale_fn(x: float) -> float:
        return 1.0

    @staticmethod
    def _triangular2_scale_fn(x: float) -> float:
        return 1 / (2.0 ** (x - 1))

    @staticmethod
    def _exp_range_scale_fn(gamma: float, x: float) -> float:
        return gamma**x

    def get_lr(self) -> list[float | Tensor]:
        """Compute the learning rates at ``last_epoch`` (and set the cycled momentums)."""
        self._warn_if_outside_step()
        cycle = math.floor(1 + self.last_epoch / self.total_size)
        x = 1.0 + self.last_epoch / self.total_size - cycle
        if x <= self.step_ratio:
            scale_factor = x / self.step_ratio
        else:
            scale_factor = (x - 1) / (self.step_ratio - 1)
        x_scale = cycle if self.scale_mode == "cycle" else self.last_epoch
        # scale_fn is called once per value, as torch does: a stateful custom one sees the same calls.
        lrs = [
            base + (top - base) * scale_factor * self.scale_fn(x_scale)
            for base, top in zip(self.base_lrs, self.max_lrs)
        ]
        if self.cycle_momentum:
            momentums = [
                top - (top - base) * scale_factor * self.scale_fn(x_scale)
                for base, top in zip(self.base_momentums, self.max_momentums)
            ]
            for group, momentum in zip(self.optimizer.param_groups, momentums):
                _set_momentum(group, self.use_beta1, momentum)
        return lrs

    def state_dict(self) -> dict[str, Any]:
        """Return the state; a custom ``scale_fn`` is kept only as a callable object's ``__dict__``."""
        state = super().state_dict()
        state.pop("_scale_fn_ref", None)
        fn = state.pop("_scale_fn_custom")
        state["_scale_fn_custom"] = _callables_state([fn])[0] if fn is not None else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state, restoring a custom ``scale_fn`` object's attributes."""
        # Unlike torch, the given dict is not left without its "_scale_fn_custom" entry.
        state_dict = dict(state_dict)
        fn_state = state_dict.pop("_scale_fn_custom")
        super().load_state_dict(state_dict)
        if fn_state is not None:
            self._scale_fn_custom.__dict__.update(fn_state)
        self._init_scale_fn()


class CosineAnnealingWarmRestarts(LRScheduler):
    r"""Cosine annealing with warm restarts (SGDR): the cosine restarts every ``T_i`` epochs.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        T_0 (int): number of epochs of the first period.
        T_mult (int): factor by which each period is longer than the last. Default: 1.
        eta_min (float): minimum learning rate. Default: 0.0.
        last_epoch (int): the index of last epoch. Default: -1.
        key (str or tuple): the hyper-parameter scheduled, as in :class:`LRScheduler`.
            Default: ``"lr"``.
    """

    def __init__(
        self,
        optimizer: Any,
        T_0: int,
        T_mult: int = 1,
        eta_min: float = 0.0,
        last_epoch: int = -1,
        *,
        key: HyperKey = "lr",
    ) -> None:
        if T_0 <= 0 or not isinstance(T_0, int):
            raise ValueError(f"Expected positive integer T_0, but got {T_0}")
        if T_mult < 1 or not isinstance(T_mult, int):
            raise ValueError(f"Expected integer T_mult >= 1, but got {T_mult}")
        if not isinstance(eta_min, (float, int)):
            raise ValueError(
                f"Expected float or int eta_min, but got {eta_min} of type {type(eta_min)}"
            )
        self.T_0 = T_0
        self.T_i = T_0
        self.T_mult = T_mult
        self.eta_min = eta_min
        self.T_cur = last_epoch
        super().__init__(optimizer, last_epoch, key=key)

    def get_lr(self) -> list[float | Tensor]:
        """Compute the learning rates at ``T_cur`` epochs into the current period."""
        self._warn_if_outside_step()
        cos = 1 + math.cos(math.pi * self.T_cur / self.T_i)
        return [self.eta_min + (b - self.eta_min) * cos / 2 for b in self.base_lrs]

    def step(self, epoch: float | None = None) -> None:
        """Step the schedule; ``epoch`` may be fractional (e.g. ``epoch + i / iters``).

        Args:
            epoch (float, optional): the (possibly fractional) epoch to move to.
        """
        # As in torch, this step neither counts steps nor warns about the call order.
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        elif epoch < 0:
            raise ValueError(f"Expected non-negative epoch, but got {epoch}")
        elif epoch >= self.T_0:
            if self.T_mult == 1:
                self.T_cur = epoch % self.T_0
            else:
                # Index n of the period holding ``epoch``: T_0 * (T_mult**n - 1) / (T_mult - 1)
                # epochs come before it.
                n = int(math.log(epoch / self.T_0 * (self.T_mult - 1) + 1, self.T_mult))
                self.T_cur = epoch - self.T_0 * (self.T_mult**n - 1) / (self.T_mult - 1)
                self.T_i = self.T_0 * self.T_mult**n
        else:
            self.T_i = self.T_0
            self.T_cur = epoch
        self.last_epoch = math.floor(epoch)
        with self._within_step():
            values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            _set_hyper(group, self._key, lr)
        self._last_lr = self._current_values()


class OneCycleLR(LRScheduler):
    r"""The 1cycle policy: warm the lr up to ``max_lr``, then anneal it far below the start.

    The lr changes after every batch; ``step`` is called once per batch.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        max_lr (float or list): peak learning rate, or one per group.
        total_steps (int): total number of steps; else ``epochs * steps_per_epoch``.
        epochs (int): number of epochs (with ``steps_per_epoch``).
        steps_per_epoch (int): number of steps per epoch (with ``epochs``).
        pct_start (float): fraction of the cycle spent increasing the lr. Default: 0.3.
        anneal_strategy (str): ``"cos"`` or ``"linear"``. Default: ``"cos"``.
        cycle_momentum (bool): cycle momentum (or beta1) inversely to the lr. Default: True.
        base_momentum (float or list): lower momentum boundary. Default: 0.85.
        max_momentum (float or list): upper momentum boundary. Default: 0.95.
        div_factor (float): ``initial_lr = max_lr / div_factor``. Default: 25.
        final_div_factor (float): ``min_lr = initial_lr / final_div_factor``. Default: 1e4.
        three_phase (bool): come back down to ``initial_lr`` before annihilating. Default: False.
        last_epoch (int): index of the last batch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Any,
        max_lr: float | list[float],
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum: float | list[float] = 0.85,
        max_momentum: float | list[float] = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        if total_steps is not None:
            if total_steps <= 0 or not isinstance(total_steps, int):
                raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
            self.total_steps = total_steps
        elif epochs is not None and steps_per_epoch is not None:
            if not isinstance(epochs, int) or epochs <= 0:
                raise ValueError(f"Expected positive integer epochs, but got {epochs}")
            if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
                raise ValueError(
                    f"Expected positive integer steps_per_epoch, but got {steps_per_epoch}"
                )
            self.total_steps = epochs * steps_per_epoch
        else:
            raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")

        def phase(end_step: float, lr: tuple[str, str], momentum: tuple[str, str]) -> dict:
            return {
                "end_step": end_step,
                "start_lr": lr[0],
                "end_lr": lr[1],
                "start_momentum": momentum[0],
                "end_momentum": momentum[1],
            }

        warmup_end = float(pct_start * self.total_steps) - 1
        last = self.total_steps - 1
        if three_phase:
            self._schedule_phases = [
                phase(warmup_end, ("initial_lr", "max_lr"), ("max_momentum", "base_momentum")),
                phase(
                    float(2 * pct_start * self.total_steps) - 2,
                    ("max_lr", "initial_lr"),
                    ("base_momentum", "max_momentum"),
                ),
                phase(last, ("initial_lr", "min_lr"), ("max_momentum", "max_momentum")),
            ]
        else:
            self._schedule_phases = [
                phase(warmup_end, ("initial_lr", "max_lr"), ("max_momentum", "base_momentum")),
                phase(last, ("max_lr", "min_lr"), ("base_momentum", "max_momentum")),
            ]
        if pct_start < 0 or pct_start > 1 or not isinstance(pct_start, float):
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}"
            )
        self._anneal_func_type = anneal_strategy
        max_lrs = _per_group("max_lr", optimizer, max_lr)
        if last_epoch == -1:
            for top, group in zip(max_lrs, optimizer.param_groups):
                group["initial_lr"] = top / div_factor
                group["max_lr"] = top
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            self.use_beta1, _, _ = _init_cycled_momentum(
                optimizer, base_momentum, max_momentum, last_epoch
            )
        super().__init__(optimizer, last_epoch)

    def _anneal_func(self, start: Any, end: Any, pct: float) -> Any:
        if self._anneal_func_type == "cos":
            return self._annealing_cos(start, end, pct)
        if self._anneal_func_type == "linear":
            return self._annealing_linear(start, end, pct)
        raise ValueError(f"Unknown _anneal_func_type: {self._anneal_func_type}")

    @staticmethod
    def _annealing_cos(start: Any, end: Any, pct: float) -> Any:
        # Cosine from ``start`` (pct 0) to ``end`` (pct 1).
        cos_out = math.cos(math.pi * pct) + 1
        return end + (start - end) / 2.0 * cos_out

    @staticmethod
    def _annealing_linear(start: Any, end: Any, pct: float) -> Any:
        return (end - start) * pct + start

    def get_lr(self) -> list[float | Tensor]:
        """Compute the learning rates at ``last_epoch`` (and set the cycled momentums)."""
        self._warn_if_outside_step()
        step_num = self.last_epoch
        if step_num > self.total_steps:
            raise ValueError(
                f"Tried to step {step_num} times. The specified number of total steps is "
                f"{self.total_steps}"
            )
        lrs = []
        last_phase = len(self._schedule_phases) - 1
        for group in self.optimizer.param_groups:
            start_step = 0.0
            for i, ph in enumerate(self._schedule_phases):
                end_step = ph["end_step"]
                if step_num <= end_step or i == last_phase:
                    pct = (step_num - start_step) / (end_step - start_step)
                    lr = self._anneal_func(group[ph["start_lr"]], group[ph["end_lr"]], pct)
                    if self.cycle_momentum:
                        momentum = self._anneal_func(
                            group[ph["start_momentum"]], group[ph["end_momentum"]], pct
                        )
                    break
                start_step = end_step
            lrs.append(lr)
            if self.cycle_momentum:
                _set_momentum(group, self.use_beta1, momentum)
        return lrs


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
