r"""Weight averaging (SWA and EMA), with the API and the numbers of ``torch.optim.swa_utils``.

:class:`AveragedModel` keeps a running average of a model's parameters (and optionally buffers),
:class:`SWALR` anneals the learning rate to a constant for the averaging phase, and
:func:`update_bn` recomputes BatchNorm statistics for the averaged weights. The default averaging
functions run the same tensor operations as torch's, so the averaged weights are bitwise equal.

Beyond torch (all opt-in; the defaults are torch's behaviour): an EMA decay warm-up
(``warmup=True`` in :func:`get_ema_multi_avg_fn` / :func:`get_ema_avg_fn`), ``copy=False`` in
:class:`AveragedModel`, and ``call_fn``, ``max_batches`` and ``progress`` in :func:`update_bn`.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm

from fuseopt import _averaging
from fuseopt.lr_scheduler import LRScheduler, _check_optimizer, _per_group

__all__ = [
    "AveragedModel",
    "SWALR",
    "ema_warmup_decay",
    "get_ema_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_swa_multi_avg_fn",
    "update_bn",
]

ParamList = list[Tensor] | tuple[Tensor, ...]


# ------------------------------------------------------------------------------ averaging functions
def _check_decay(decay: float) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(
            f"Invalid decay value {decay} provided. Please provide a value in [0,1] range."
        )


def _check_warmup(warmup_power: float, warmup_gamma: float) -> None:
    if not warmup_power > 0.0:
        raise ValueError(f"Invalid warmup_power value {warmup_power}: it must be > 0.")
    if not warmup_gamma > 0.0:
        raise ValueError(f"Invalid warmup_gamma value {warmup_gamma}: it must be > 0.")


def ema_warmup_decay(num_averaged: int, decay: float, power: float, gamma: float) -> float:
    r"""The warmed-up EMA decay after ``num_averaged`` models (beyond torch; timm's ModelEmaV3).

    .. math::
        d_n = \min\left(\text{decay},\ 1 - (1 + n / \gamma)^{-p}\right)

    Args:
        num_averaged (int): number of models averaged so far (``n``, at least 1 when updating).
        decay (float): the cap, the decay reached once warmed up.
        power (float): the warm-up power ``p``.
        gamma (float): the warm-up inverse rate ``gamma``.

    Returns:
        float: the decay to use for this update.
    """
    return min(decay, max(0.0, 1.0 - (1.0 + num_averaged / gamma) ** -power))


def _decay_schedule(
    decay: float, warmup: bool, warmup_power: float, warmup_gamma: float
) -> Callable[[Any], float]:
    """Check the EMA options; return ``num_averaged -> decay`` (constant unless ``warmup``)."""
    _check_decay(decay)
    if not warmup:
        return lambda num_averaged: decay
    _check_warmup(warmup_power, warmup_gamma)
    return lambda n: ema_warmup_decay(int(n), decay, warmup_power, warmup_gamma)


def get_ema_multi_avg_fn(
    decay: float = 0.999,
    warmup: bool = False,
    warmup_power: float = 2 / 3,
    warmup_gamma: float = 1.0,
) -> Callable[[ParamList, ParamList, Tensor | int], None]:
    r"""Get the function applying an exponential moving average (EMA) to lists of tensors in place.

    .. math::
        W_0^{\text{EMA}} = W_0^{\text{model}}, \qquad
        W_{t+1}^{\text{EMA}} = \text{decay} \times W_t^{\text{EMA}}
            + (1 - \text{decay}) \times W_{t+1}^{\text{model}}

    Args:
        decay (float): decay rate, in [0, 1]. Default: 0.999.
        warmup (bool): beyond torch. If ``True``, the decay used for the update after ``n`` models
            is :func:`ema_warmup_decay` ``(n, decay, warmup_power, warmup_gamma)``: small at first,
            growing towards ``decay``. Default: ``False`` (a constant ``decay``, as torch).
        warmup_power (float): the warm-up power, > 0. Default: 2/3.
        warmup_gamma (float): the warm-up inverse rate, > 0. Default: 1.0.

    Returns:
        Callable: ``fn(ema_param_list, current_param_list, num_averaged)`` updating the first list.
    """
    decay_at = _decay_schedule(decay, warmup, warmup_power, warmup_gamma)

    @torch.no_grad()
    def ema_update(ema_list: ParamList, current_list: ParamList, num_averaged: Any) -> None:
        d = decay_at(num_averaged)
        if ema_list[0].is_floating_point() or ema_list[0].is_complex():
            # One fused pass (numba on CPU float32/float64, foreach elsewhere), ATen's lerp
            # rounding: bitwise the averages of torch's _foreach_lerp_.
            _averaging.ema_update(list(ema_list), list(current_list), d)
        else:
            # lerp has no integer kernels.
            for p_ema, p_model in zip(ema_list, current_list, strict=True):
                p_ema.copy_(p_ema * d + p_model * (1 - d))

    return ema_update


def get_swa_multi_avg_fn() -> Callable[[ParamList, ParamList, Tensor | int], None]:
    r"""Get the function applying an equal-weight average (SWA) to lists of tensors in place.

    After ``n`` models, ``W^{SWA} \leftarrow W^{SWA} + (W^{model} - W^{SWA}) / (n + 1)``.

    Returns:
        Callable: ``fn(averaged_param_list, current_param_list, num_averaged)``.
    """

    @torch.no_grad()
    def swa_update(avg_list: ParamList, current_list: ParamList, num_averaged: Any) -> None:
        if avg_list[0].is_floating_point() or avg_list[0].is_complex():
            # The weight is computed as torch does (a 0-dim tensor when n is one) so that the
            # rounding of 1/(n+1) and thus the result are the same.
            _averaging.swa_update(list(avg_list), list(current_list), num_averaged)
        else:
            diffs = torch._foreach_sub(list(current_list), list(avg_list))
            if isinstance(num_averaged, Tensor):
                torch._foreach_addcdiv_(list(avg_list), diffs, [num_averaged + 1] * len(avg_list))
            else:
                torch._foreach_add_(list(avg_list), diffs, alpha=1.0 / (num_averaged + 1))

    return swa_update


def get_ema_avg_fn(
    decay: float = 0.999,
    warmup: bool = False,
    warmup_power: float = 2 / 3,
    warmup_gamma: float = 1.0,
) -> Callable[[Tensor, Tensor, Tensor | int], Tensor]:
    r"""Get the function applying an exponential moving average (EMA) to a single tensor.

    Args:
        decay (float): decay rate, in [0, 1]. Default: 0.999.
        warmup (bool): beyond torch; as in :func:`get_ema_multi_avg_fn`. Default: ``False``.
        warmup_power (float): the warm-up power, > 0. Default: 2/3.
        warmup_gamma (float): the warm-up inverse rate, > 0. Default: 1.0.

    Returns:
        Callable: ``fn(ema_param, current_param, num_averaged)`` returning the new average.
    """
    decay_at = _decay_schedule(decay, warmup, warmup_power, warmup_gamma)

    @torch.no_grad()
    def ema_update(ema_param: Tensor, current_param: Tensor, num_averaged: Any) -> Tensor:
        d = decay_at(num_averaged)
        return d * ema_param + (1 - d) * current_param

    return ema_update


def get_swa_avg_fn() -> Callable[[Tensor, Tensor, Tensor | int], Tensor]:
    r"""Get the function applying an equal-weight average (SWA) to a single tensor.

    Returns:
        Callable: ``fn(averaged_param, current_param, num_averaged)`` returning the new average.
    """

    @torch.no_grad()
    def swa_update(avg: Tensor, current: Tensor, num_averaged: Any) -> Tensor:
        return avg + (current - avg) / (num_averaged + 1)

    return swa_update


# ---------------------------------------------------------------------------------- AveragedModel
def _foreach_devices() -> tuple[str, ...]:
    # The device types torch treats as having foreach kernels for the default SWA average.
    return ("cuda", "xpu", "mtia", torch._C._get_privateuse1_backend_name())


class AveragedModel(Module):
    r"""Keeps a running average of a model's weights, for SWA and EMA.

    The first :meth:`update_parameters` call copies the model's weights; every later call folds
    them into the average with ``avg_fn`` / ``multi_avg_fn`` (an equal-weight average by default).

    Args:
        model (torch.nn.Module): the model whose weights are averaged.
        device (torch.device, optional): if given, the averaged model is kept on this device.
        avg_fn (function, optional): ``avg_fn(averaged, current, num_averaged)`` returning the new
            average of one tensor. Default: None.
        multi_avg_fn (function, optional): ``multi_avg_fn(averaged_list, current_list,
            num_averaged)`` updating a list of tensors in place. Default: None (SWA).
        use_buffers (bool): if ``True``, buffers are averaged too; otherwise they are copied from
            ``model`` on every update. Default: ``False``.
        copy (bool): beyond torch. If ``False``, ``model`` is used as the averaged module itself,
            not deep-copied (for a model the caller has already copied, or one that cannot be
            deep-copied). Default: ``True``.

    Example:
        >>> swa_model = AveragedModel(model)
        >>> for epoch in range(epochs):
        ...     train(model, optimizer)
        ...     swa_model.update_parameters(model)
        >>> update_bn(loader, swa_model)

    .. note::
        ``avg_fn`` and ``multi_avg_fn`` are not saved in :meth:`state_dict`.
    """

    n_averaged: Tensor

    def __init__(
        self,
        model: Module,
        device: int | torch.device | str | None = None,
        avg_fn: Callable[[Tensor, Tensor, Tensor | int], Tensor] | None = None,
        multi_avg_fn: Callable[[ParamList, ParamList, Tensor | int], None] | None = None,
        use_buffers: bool = False,
        copy: bool = True,
    ) -> None:
        super().__init__()
        if avg_fn is not None and multi_avg_fn is not None:
            # AssertionError, as torch raises, so that callers catching it behave the same.
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        self.module = deepcopy(model) if copy else model
        if device is not None:
            self.module = self.module.to(device)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the averaged module."""
        return self.module(*args, **kwargs)

    def _tensors(self, module: Module, own: bool) -> Iterable[Tensor]:
        if self.use_buffers:
            return itertools.chain(module.parameters(), module.buffers())
        # torch averages ``self.parameters()`` (the same tensors as ``self.module``'s).
        return self.parameters() if own else module.parameters()

    @torch.no_grad()
    def update_parameters(self, model: Module) -> None:
        """Fold ``model``'s current weights into the average (copy them on the first call).

        Args:
            model (torch.nn.Module): the model being trained, with the averaged model's layout.
        """
        averaged: list[Tensor] = []
        current: list[Tensor] = []
        # zip without strict: torch pairs them the same way.
        for p_avg, p_model in zip(self._tensors(self.module, True), self._tensors(model, False)):
            averaged.append(p_avg.detach())
            current.append(p_model.detach().to(p_avg.device))
        if self.n_averaged.item() == 0:
            for a, c in zip(averaged, current):
                a.copy_(c)
        elif self.avg_fn is not None:
            for a, c in zip(averaged, current):
                a.copy_(self.avg_fn(a, c, self.n_averaged.to(a.device)))
        else:
            # A foreach kernel wants its lists on one device with one dtype.
            groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
            for a, c in zip(averaged, current):
                pair = groups.setdefault((a.device, a.dtype), ([], []))
                pair[0].append(a)
                pair[1].append(c)
            for (dev, _), (a_list, c_list) in groups.items():
                n = self.n_averaged.to(dev)
                if self.multi_avg_fn is not None:
                    self.multi_avg_fn(a_list, c_list, n)
                elif dev.type in _foreach_devices():
                    get_swa_multi_avg_fn()(a_list, c_list, n)
                else:
                    # Where torch has no foreach kernels (CPU) it averages tensor by tensor; the
                    # same formula here keeps the averages bitwise equal to torch's.
                    swa = get_swa_avg_fn()
                    for a, c in zip(a_list, c_list):
                        a.copy_(swa(a, c, n))
        if not self.use_buffers:
            # Unaveraged buffers follow the trained model.
            for b_avg, b_model in zip(self.module.buffers(), model.buffers(), strict=True):
                b_avg.detach().copy_(b_model.detach().to(b_avg.device))
        self.n_averaged += 1


# -------------------------------------------------------------------------------------- update_bn
def _to_device(batch: Any, device: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _progress(loader: Iterable[Any], total: int | None) -> Iterable[Any]:
    try:
        from tqdm import tqdm  # optional: only used when installed
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(loader, total=total, desc="update_bn", file=sys.stderr)
        return
    for count, batch in enumerate(loader, 1):
        of = f"/{total}" if total is not None else ""
        sys.stderr.write(f"\rupdate_bn: batch {count}{of}")
        sys.stderr.flush()
        yield batch
    sys.stderr.write("\n")
    sys.stderr.flush()


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: Module,
    device: int | torch.device | str | None = None,
    call_fn: Callable[[Module, Any], Any] | None = None,
    progress: bool = False,
    max_batches: int | None = None,
) -> None:
    r"""Recompute the BatchNorm running statistics of ``model`` with one pass over ``loader``.

    Every BatchNorm layer's running stats are reset, and its momentum set to ``None`` (a cumulative
    average) for the pass; momenta and the training mode are restored afterwards.

    Args:
        loader (iterable): batches; by default each is a tensor, or a list/tuple whose first element
            is the model's input.
        model (torch.nn.Module): the model whose BatchNorm statistics are recomputed.
        device (torch.device, optional): if given, batches are moved there first (every tensor in
            a dict/list/tuple batch when ``call_fn`` is given).
        call_fn (function, optional): beyond torch. ``call_fn(model, batch)`` runs the model on a
            batch, e.g. ``lambda m, b: m(**b)`` for dict batches. Default: None.
        progress (bool): beyond torch. If ``True``, report progress on stderr (with tqdm when it
            is installed). Default: ``False``.
        max_batches (int, optional): beyond torch. Use at most this many batches. Default: None.

    Example:
        >>> update_bn(loader, swa_model)
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    momenta = {}
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return
    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None
    batches: Iterable[Any] = loader
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
    if progress:
        # A loader without len() (a generator) gets a count without a total.
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        batches = _progress(batches, total)
    try:
        for batch in batches:
            if call_fn is None:
                if isinstance(batch, (list, tuple)):
                    batch = batch[0]
                if device is not None:
                    batch = batch.to(device)
                model(batch)
            else:
                if device is not None:
                    batch = _to_device(batch, device)
                call_fn(model, batch)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)


# ------------------------------------------------------------------------------------------ SWALR
class SWALR(LRScheduler):
    r"""Anneal each param group's learning rate to a fixed value, for the SWA phase.

    Over ``anneal_epochs`` epochs the learning rate moves from its current value to ``swa_lr``
    along a cosine or linear curve, then stays at ``swa_lr``.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        swa_lr (float or list): the final learning rate, for all groups or one per group.
        anneal_epochs (int): number of epochs of the annealing phase, >= 0. Default: 10.
        anneal_strategy (str): ``"cos"`` or ``"linear"``. Default: ``"cos"``.
        last_epoch (int): the index of the last epoch. Default: -1.

    Example:
        >>> scheduler = CosineAnnealingLR(optimizer, T_max=100)
        >>> swa_scheduler = SWALR(optimizer, swa_lr=0.05, anneal_epochs=5)
        >>> for epoch in range(100):
        ...     train(model, optimizer)
        ...     if epoch > 60:
        ...         swa_model.update_parameters(model)
        ...         swa_scheduler.step()
        ...     else:
        ...         scheduler.step()
    """

    def __init__(
        self,
        optimizer: Any,
        swa_lr: float | list[float],
        anneal_epochs: int = 10,
        anneal_strategy: str = "cos",
        last_epoch: int = -1,
    ) -> None:
        # Checked first (torch fails later with an AttributeError) so the error names the problem.
        _check_optimizer(optimizer)
        swa_lrs = _per_group("swa_lr", optimizer, swa_lr)
        for value, group in zip(swa_lrs, optimizer.param_groups):
            group["swa_lr"] = value
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}"
            )
        self._set_anneal_func(anneal_strategy)
        if not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise ValueError(f"anneal_epochs must be equal or greater than 0, got {anneal_epochs}")
        self.anneal_epochs = anneal_epochs
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _linear_anneal(t: float) -> float:
        return t

    @staticmethod
    def _cosine_anneal(t: float) -> float:
        return (1 - math.cos(math.pi * t)) / 2

    def _set_anneal_func(self, strategy: str) -> None:
        self._anneal_strategy = strategy
        self.anneal_func = self._cosine_anneal if strategy == "cos" else self._linear_anneal

    @staticmethod
    def _start_lr(lr: Any, swa_lr: Any, alpha: float) -> Any:
        # Invert the previous step's interpolation to recover the lr the annealing started from,
        # so that the schedule composes with other schedulers that changed the lr meanwhile.
        if alpha == 1:
            return swa_lr
        return (lr - alpha * swa_lr) / (1 - alpha)

    def _alpha(self, step: int) -> float:
        return self.anneal_func(max(0, min(1, step / max(1, self.anneal_epochs))))

    def get_lr(self) -> list[float | Tensor]:
        """Compute each group's learning rate for the current step."""
        self._warn_if_outside_step()
        step = self._step_count - 1
        if self.anneal_epochs == 0:
            step = max(1, step)
        prev_alpha = self._alpha(step - 1)
        alpha = self._alpha(step)
        groups = self.optimizer.param_groups
        starts = [self._start_lr(g["lr"], g["swa_lr"], prev_alpha) for g in groups]
        return [g["swa_lr"] * alpha + lr * (1 - alpha) for g, lr in zip(groups, starts)]

    def state_dict(self) -> dict[str, Any]:
        """Return the scheduler's state: every attribute but the optimizer and the anneal function."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "anneal_func")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the scheduler's state.

        Args:
            state_dict (dict): scheduler state, as returned by :meth:`state_dict`.
        """
        self.__dict__.update(state_dict)
        self._set_anneal_func(self._anneal_strategy)
