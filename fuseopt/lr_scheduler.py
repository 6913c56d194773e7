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
from collections.abc import Iterable
from contextlib import contextmanager
from functools import wraps
from typing import Any
from weakref import ref

import torch
from torch import Tensor

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


class LRScheduler(torch.optim.lr_scheduler.LRScheduler):
    r"""Base class for all learning rate schedulers.

    Subclasses define :meth:`get_lr` (and, where it exists, a closed form ``_get_closed_form_lr``).
    It subclasses :class:`torch.optim.lr_scheduler.LRScheduler` only as a type marker (tools such
    as Lightning and accelerate accept a scheduler by that ``isinstance`` check): it defines every
    method torch's class has, and none of torch's scheduler code runs.

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


# The rest of the module lives in three private files (kept short); they import the base above.
from fuseopt._lr_composite import ChainedScheduler, ReduceLROnPlateau, SequentialLR  # noqa: E402
from fuseopt._lr_cyclic import CosineAnnealingWarmRestarts, CyclicLR, OneCycleLR  # noqa: E402
from fuseopt._lr_extras import WSDLR, WarmupCosineLR, plot, preview  # noqa: E402
