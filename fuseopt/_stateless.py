"""``swap_in_optimizer_params_and_state``: step an optimizer on other params and state for a while.

Plain code: it moves dicts around and never reads a tensor (the step inside the context is the
optimizer's own, with every check of :mod:`fuseopt._plan`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["swap_in_optimizer_params_and_state"]

_NAME = "swap_in_optimizer_params_and_state"


def _swap_in_groups(optimizer, params: list, saved: dict) -> tuple[dict, list[tuple]]:
    """Check ``saved`` (a ``state_dict()``) against ``optimizer`` and pair it with ``params``:
    ``(saved state, [(live group, saved group, its params)])``; torch's errors otherwise."""
    if not optimizer.state:
        raise RuntimeError(f"{_NAME} requires initialized optimizer state.")
    if not isinstance(saved, dict):
        raise RuntimeError(f"{_NAME} requires a DCP-style optimizer state_dict.")
    state, groups = saved.get("state"), saved.get("param_groups")
    if not isinstance(state, dict):
        raise RuntimeError(
            f"{_NAME} requires swapin_optim_state['state'] to be a dict mapping packed parameter "
            f"ids to per-param state dicts, got {type(state).__name__}."
        )
    if any(torch.is_tensor(k) for k in state):
        raise RuntimeError(
            f"{_NAME} requires optimizer.state_dict()-style state keyed by packed parameter ids."
        )
    if any(isinstance(k, int) and not isinstance(v, dict) for k, v in state.items()):
        raise RuntimeError(
            f"{_NAME} requires per-parameter optimizer state entries to be dictionaries."
        )
    if not isinstance(groups, list):
        raise RuntimeError(
            f"{_NAME} requires swapin_optim_state['param_groups'] to be a list of param-group "
            f"dicts, got {type(groups).__name__}."
        )
    if len(groups) != len(optimizer.param_groups):
        raise RuntimeError(
            "swapin_optim_state has a different number of parameter groups than the live optimizer."
        )
    pairs, used, seen = [], 0, set()
    for i, (live, group) in enumerate(zip(optimizer.param_groups, groups)):
        if not isinstance(group, dict):
            raise RuntimeError(f"{_NAME} requires each optimizer param group to be a dictionary.")
        ids = group.get("params")
        if not isinstance(ids, list) or not all(isinstance(k, int) for k in ids):
            raise RuntimeError(
                f"{_NAME} requires optimizer.state_dict()-style param_groups[*]['params'] entries "
                "keyed by packed parameter ids."
            )
        if len(ids) != len(live["params"]):
            raise RuntimeError(
                f"swapin_optim_state param group {i} has a different number of params than the "
                "live optimizer param group."
            )
        only_saved = [k for k in group if k not in live]
        only_live = [k for k in live if k not in group]
        if only_saved or only_live:
            raise RuntimeError(
                f"{_NAME} requires optimizer.state_dict()-style param group keys to exactly match "
                f"the live optimizer group keys for group {i}. Keys only in swap-in: "
                f"{only_saved}. Keys only in live: {only_live}."
            )
        if used + len(ids) > len(params):
            raise RuntimeError(
                f"{_NAME} requires the explicit parameter state to match optimizer.param_groups "
                "ordering."
            )
        pairs.append((live, group, params[used : used + len(ids)]))
        used += len(ids)
        seen.update(ids)
    extra = [k for k in state if k not in seen]
    if extra:
        raise RuntimeError(
            f"{_NAME} requires swapin_optim_state['state'] to be keyed only by packed parameter "
            f"ids from param_groups[*]['params']; got extra keys {extra!r}."
        )
    return state, pairs


@contextlib.contextmanager
def swap_in_optimizer_params_and_state(
    optimizer, swapin_parameters: dict[str, torch.Tensor], swapin_optim_state: dict[str, Any]
) -> Iterator[None]:
    r"""Step ``optimizer`` on other params and state inside the context; restore it on exit.

    Inside the context every optimizer API (hooks included) sees ``swapin_parameters`` as the
    params of its groups, the options of ``swapin_optim_state["param_groups"]`` as the groups'
    options, and ``swapin_optim_state["state"]`` as its state: ``optimizer.step()`` updates the
    swapped-in tensors in place. On exit the live groups and state are restored as they were.

    Args:
        optimizer (Optimizer): the live optimizer; its state must already be initialized.
        swapin_parameters (dict[str, Tensor]): the params to step, in the order of the
            optimizer's groups (usually ``model.named_parameters()`` order).
        swapin_optim_state (dict): an ``optimizer.state_dict()``-shaped dict: ``"state"`` keyed
            by packed param ids, ``"param_groups"`` with the live groups' keys. Only in-place
            edits of its tensors outlive the context; a state entry replaced inside it does not.

    Example:
        >>> # xdoctest: +SKIP
        >>> with fuseopt.swap_in_optimizer_params_and_state(opt, params, osd):
        ...     opt.step()  # steps ``params`` and the tensors of ``osd``
    """
    state, pairs = _swap_in_groups(optimizer, list(swapin_parameters.values()), swapin_optim_state)
    live_state = optimizer.state
    # shallow copies: the live ``params`` lists themselves come back (callers compare with ``is``)
    live_groups = [dict(g) for g in optimizer.param_groups]
    try:
        swapped: defaultdict[torch.Tensor, Any] = defaultdict(dict)
        for live, group, params in pairs:
            live.update((k, v) for k, v in group.items() if k != "params")
            live["params"] = params
            for p, k in zip(params, group["params"]):
                # a new dict of the same tensors: in-place updates reach the caller's state,
                # entries added or replaced inside the context do not
                swapped[p] = dict(state.get(k, {}))
        optimizer.state = swapped
        yield
    finally:
        for group, saved in zip(optimizer.param_groups, live_groups):
            group.clear()
            group.update(saved)
        optimizer.state = live_state
