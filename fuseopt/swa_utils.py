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


def _broadcasts_to(src: Tensor, dst: Tensor) -> bool:
    """Whether ``src`` broadcasts to ``dst``'s shape (what an in-place op on ``dst`` accepts)."""
    if src.shape == dst.shape:
        return True
    try:
        return torch.broadcast_shapes(src.shape, dst.shape) == dst.shape
    except RuntimeError:
        return False


def _shape_error(what: str, src: Tensor, dst_what: str, dst: Tensor) -> RuntimeError:
    return RuntimeError(
        f"{what} has shape {tuple(src.shape)}, which does not broadcast to the shape "
        f"{tuple(dst.shape)} of {dst_what}"
    )


def _check_lists(
    avg_name: str,
    averaged: ParamList,
    current: ParamList,
    lerp: bool,
    length_error: type[Exception] = RuntimeError,
) -> bool:
    """Raise, before any tensor is written, what torch's multi-tensor update would raise.

    The fused kernel walks each pair as two buffers of the averaged tensor's length and type, so a
    shorter, differently typed or off-device ``current`` tensor is read out of bounds (garbage or
    a crash) where torch raises; hence every pair is checked first, and all of them before any is
    updated (torch's own errors can come after some tensors are updated). The exception types are
    torch's: ``length_error`` for lists of different lengths; RuntimeError for shapes that do not
    broadcast, other devices or dtypes; NotImplementedError for an integer tensor on lerp's path.

    Returns whether the lists can go to the fused kernel as they are (one device and dtype, equal
    shapes); if not, they are valid for torch's foreach ops.
    """
    if len(averaged) != len(current):
        raise length_error(
            f"{avg_name} and current_param_list must have the same length, "
            f"got {len(averaged)} and {len(current)}"
        )
    first = averaged[0]
    # The common case in one comparison of lists (per-tensor checks cost ~1 us a tensor, which a
    # fused EMA of many small tensors would feel): equal shapes, dtypes and devices pair by pair.
    keys = [(a.shape, a.dtype, a.device) for a in averaged]
    if keys == [(c.shape, c.dtype, c.device) for c in current]:
        if not lerp:
            return True
        if all(k[1:] == keys[0][1:] for k in keys):
            return True  # one dtype (floating point, as the first) and one device: fusable
    fusable = True
    for i, (a, c) in enumerate(zip(averaged, current)):
        if a.shape != c.shape:
            if not _broadcasts_to(c, a):
                raise _shape_error(f"current_param_list[{i}]", c, f"{avg_name}[{i}]", a)
            fusable = False  # a broadcast operand: the kernel walks equal shapes only
        if not lerp:
            continue
        if not (a.is_floating_point() or a.is_complex()):
            raise NotImplementedError(
                f"{avg_name}[{i}] has dtype {a.dtype}, but {avg_name}[0] is {first.dtype}: a list "
                "whose first tensor is floating point or complex is averaged with lerp, which has "
                "no integer kernel"
            )
        if c.device != a.device:
            raise RuntimeError(
                f"current_param_list[{i}] is on device {c.device}, but {avg_name}[{i}] is on "
                f"{a.device}: they must be on the same device"
            )
        if c.dtype != a.dtype:
            raise RuntimeError(
                f"current_param_list[{i}] has dtype {c.dtype}, but {avg_name}[{i}] has dtype "
                f"{a.dtype}: lerp needs them equal"
            )
        if a.dtype != first.dtype or a.device != first.device:
            fusable = False  # one kernel call handles a single dtype and device
    return fusable


def _lerp_lists(
    averaged: ParamList,
    current: ParamList,
    weight: float,
    fusable: bool,
    fused: Callable[[list[Tensor], list[Tensor]], None],
) -> None:
    """``averaged[i].lerp_(current[i], weight)`` for checked lists: ``fused`` where it can run."""
    if fusable:
        fused(list(averaged), list(current))
        return
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    broadcast: tuple[list[Tensor], list[Tensor]] = ([], [])
    for a, c in zip(averaged, current):
        pair = broadcast if a.shape != c.shape else groups.setdefault((a.device, a.dtype), ([], []))
        pair[0].append(a)
        pair[1].append(c)
    for a_list, c_list in groups.values():
        fused(a_list, c_list)
    if broadcast[0]:
        # torch's foreach lerp broadcasts ``current``; the fused kernel does not.
        torch._foreach_lerp_(broadcast[0], broadcast[1], weight)


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
        The lists must have equal lengths and each current tensor must broadcast to its average
        (and, for floating-point averages, have its dtype and device), as in torch; otherwise it
        raises before any tensor is updated.
    """
    decay_at = _decay_schedule(decay, warmup, warmup_power, warmup_gamma)

    def check(ema_param_list: ParamList, current_param_list: ParamList) -> bool:
        lerp = ema_param_list[0].is_floating_point() or ema_param_list[0].is_complex()
        # Lists of other lengths: torch's foreach lerp raises a RuntimeError, its integer path's
        # zip(strict=True) a ValueError.
        error = RuntimeError if lerp else ValueError
        return _check_lists("ema_param_list", ema_param_list, current_param_list, lerp, error)

    @torch.no_grad()
    def update(
        ema_param_list: ParamList, current_param_list: ParamList, num_averaged: Any, fusable: bool
    ) -> None:
        d = decay_at(num_averaged)
        if ema_param_list[0].is_floating_point() or ema_param_list[0].is_complex():
            # One fused pass (numba on CPU, foreach elsewhere), ATen's lerp rounding: bitwise the
            # averages of torch's _foreach_lerp_.
            _lerp_lists(
                ema_param_list,
                current_param_list,
                1 - d,
                fusable,
                lambda a, c: _averaging.ema_update(a, c, d),
            )
        else:
            # lerp has no integer kernels.
            for p_ema, p_model in zip(ema_param_list, current_param_list, strict=True):
                p_ema.copy_(p_ema * d + p_model * (1 - d))

    @torch.no_grad()
    def ema_update(
        ema_param_list: ParamList, current_param_list: ParamList, num_averaged: Any
    ) -> None:
        update(
            ema_param_list,
            current_param_list,
            num_averaged,
            check(ema_param_list, current_param_list),
        )

    # AveragedModel checks every (device, dtype) group before it updates any.
    ema_update._fuseopt_check = check  # type: ignore[attr-defined]
    ema_update._fuseopt_update = update  # type: ignore[attr-defined]
    return ema_update


def get_swa_multi_avg_fn() -> Callable[[ParamList, ParamList, Tensor | int], None]:
    r"""Get the function applying an equal-weight average (SWA) to lists of tensors in place.

    After ``n`` models, ``W^{SWA} \leftarrow W^{SWA} + (W^{model} - W^{SWA}) / (n + 1)``.

    Returns:
        Callable: ``fn(averaged_param_list, current_param_list, num_averaged)``. The lists must
        have equal lengths and each current tensor must broadcast to its average and have its
        dtype and device, as in torch; otherwise it raises before any tensor is updated.
    """

    def check(averaged_param_list: ParamList, current_param_list: ParamList) -> bool:
        first = averaged_param_list[0]
        lerp = first.is_floating_point() or first.is_complex()
        fusable = _check_lists("averaged_param_list", averaged_param_list, current_param_list, lerp)
        if not lerp:
            # torch's integer branch always raises a RuntimeError (a float alpha, or an integer
            # addcdiv, or a float result cast to an integer tensor); say so before any update.
            raise RuntimeError(
                f"averaged_param_list[0] has dtype {first.dtype}: the SWA average of integer or "
                "bool tensors is not supported (torch raises too); average floating-point tensors"
            )
        return fusable

    @torch.no_grad()
    def update(
        averaged_param_list: ParamList,
        current_param_list: ParamList,
        num_averaged: Any,
        fusable: bool,
    ) -> None:
        # The weight is computed as torch does (a 0-dim tensor when n is one) so that the rounding
        # of 1/(n+1) and thus the result are the same.
        weight = float(1 / (num_averaged + 1))
        _lerp_lists(
            averaged_param_list,
            current_param_list,
            weight,
            fusable,
            lambda a, c: _averaging.swa_update(a, c, num_averaged),
        )

    @torch.no_grad()
    def swa_update(
        averaged_param_list: ParamList, current_param_list: ParamList, num_averaged: Any
    ) -> None:
        update(
            averaged_param_list,
            current_param_list,
            num_averaged,
            check(averaged_param_list, current_param_list),
        )

    swa_update._fuseopt_check = check  # type: ignore[attr-defined]
    swa_update._fuseopt_update = update  # type: ignore[attr-defined]
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
# The model dtypes torch's grouping of (averaged, model) pairs accepts beside the average's own.
_ANY_AVERAGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


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

    def _name(self, module: Module, own: bool, index: int) -> str:
        """The name of the ``index``-th tensor of :meth:`_tensors` (for error messages only)."""
        if self.use_buffers:
            named = itertools.chain(module.named_parameters(), module.named_buffers())
        else:
            named = self.named_parameters() if own else module.named_parameters()
        name = next(itertools.islice(named, index, None))[0]
        return f"averaged tensor {name!r}" if own else f"model tensor {name!r}"

    def _group_fn(self, device: torch.device) -> Callable[..., None] | None:
        """The multi-tensor function averaging a group on ``device``; None: tensor by tensor."""
        if self.multi_avg_fn is not None:
            return self.multi_avg_fn
        # torch's default: its foreach SWA where the device has foreach kernels.
        return get_swa_multi_avg_fn() if device.type in _foreach_devices() else None

    def _check_update(
        self,
        model: Module,
        averaged: list[Tensor],
        current: list[Tensor],
        buffers: tuple[list[Tensor], list[Tensor]],
    ) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor], bool]] | None:
        """Raise, before anything is written, what torch's update would raise (at any point).

        torch raises some of these only after it has updated part of the average (the buffers
        are checked last); here nothing changes when it raises. The checks run in torch's order,
        so the same problem is reported first. Returns the (device, dtype) groups to average, each
        with whether it can run fused, or None when the update is a copy or goes through
        ``avg_fn``.
        """
        for i, (a, c) in enumerate(zip(averaged, current)):
            # copy_, lerp_ and avg_fn's result copied back all need ``c`` to broadcast to ``a``.
            if a.shape != c.shape and not _broadcasts_to(c, a):
                what = f"update_parameters: {self._name(model, False, i)}"
                raise _shape_error(what, c, self._name(self.module, True, i), a)
        groups = None
        if self.n_averaged.item() != 0 and self.avg_fn is None:
            groups = self._check_groups(model, averaged, current)
        if not self.use_buffers:
            own, theirs = buffers
            if len(own) != len(theirs):
                # ValueError, as torch's zip(strict=True) over the buffers.
                raise ValueError(
                    f"update_parameters: model has {len(theirs)} buffers but the averaged model "
                    f"has {len(own)}; with use_buffers=False they are copied one to one"
                )
            for i, (b_avg, b_model) in enumerate(zip(own, theirs)):
                if not _broadcasts_to(b_model, b_avg):
                    name = next(itertools.islice(model.named_buffers(), i, None))[0]
                    raise _shape_error(
                        f"update_parameters: model buffer {name!r}", b_model, "its copy", b_avg
                    )
        return groups

    def _check_groups(
        self, model: Module, averaged: list[Tensor], current: list[Tensor]
    ) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor], bool]]:
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for i, (a, c) in enumerate(zip(averaged, current)):
            # torch groups the pairs by the averaged tensor's device and dtype, and accepts a
            # model tensor of another dtype only if it is float32, float64 or bfloat16.
            if c.dtype != a.dtype and c.dtype not in _ANY_AVERAGE_DTYPES:
                raise RuntimeError(
                    f"update_parameters: {self._name(model, False, i)} has dtype {c.dtype}, but "
                    f"{self._name(self.module, True, i)} has dtype {a.dtype}; a model tensor must "
                    "have its average's dtype, or be float32, float64 or bfloat16"
                )
            pair = groups.setdefault((a.device, a.dtype), ([], []))
            pair[0].append(a)
            pair[1].append(c)
        checked = {}
        for (dev, dtype), (a_list, c_list) in groups.items():
            check = getattr(self._group_fn(dev), "_fuseopt_check", None)
            # fuseopt's own multi-avg functions check every group before any is updated; the
            # tensor-by-tensor path promotes (always valid), a user's function is called as
            # torch calls it.
            try:
                fusable = check(a_list, c_list) if check is not None else False
            except (RuntimeError, ValueError, NotImplementedError) as e:
                # The indices in the message count within this group: say which group it is.
                raise type(e)(
                    f"update_parameters, averaging the {dtype} tensors on {dev}: {e}"
                ) from None
            checked[(dev, dtype)] = (a_list, c_list, fusable)
        return checked

    @torch.no_grad()
    def update_parameters(self, model: Module) -> None:
        """Fold ``model``'s current weights into the average (copy them on the first call).

        Every check runs before anything is written: when it raises (a model tensor that does not
        broadcast to its average, another number of buffers, a dtype torch rejects), neither the
        average nor ``n_averaged`` changes.

        Args:
            model (torch.nn.Module): the model being trained, with the averaged model's layout.
        """
        averaged: list[Tensor] = []
        current: list[Tensor] = []
        # zip without strict: torch pairs them the same way, averaging the common prefix when the
        # models have different numbers of tensors.
        for p_avg, p_model in zip(self._tensors(self.module, True), self._tensors(model, False)):
            averaged.append(p_avg.detach())
            current.append(p_model.detach().to(p_avg.device))
        # The unaveraged buffers, listed once (walking the modules costs as much as the checks).
        buffers = (
            ([], []) if self.use_buffers else (list(self.module.buffers()), list(model.buffers()))
        )
        groups = self._check_update(model, averaged, current, buffers)
        if self.n_averaged.item() == 0:
            for a, c in zip(averaged, current):
                a.copy_(c)
        elif groups is None:
            for a, c in zip(averaged, current):
                a.copy_(self.avg_fn(a, c, self.n_averaged.to(a.device)))  # type: ignore[misc]
        else:
            for (dev, _), (a_list, c_list, fusable) in groups.items():
                n = self.n_averaged.to(dev)
                fn = self._group_fn(dev)
                if fn is not None:
                    update = getattr(fn, "_fuseopt_update", None)
                    if update is not None:
                        update(a_list, c_list, n, fusable)  # checked above
                    else:
                        fn(a_list, c_list, n)
                else:
                    # Where torch has no foreach kernels (CPU) it averages tensor by tensor; the
                    # same formula here keeps the averages bitwise equal to torch's.
                    swa = get_swa_avg_fn()
                    for a, c in zip(a_list, c_list):
                        a.copy_(swa(a, c, n))
        if not self.use_buffers:
            # Unaveraged buffers follow the trained model.
            for b_avg, b_model in zip(*buffers, strict=True):
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
