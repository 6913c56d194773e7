"""Loading an optimizer state by param names: ``opt.load_state_dict(sd, by_name=True)``.

torch matches a saved state to the params by position, so reordering modules or adding a layer
silently gives one param another's moments. Here each saved param is matched to the optimizer's
param of the same name: the names each group keeps in ``param_names`` (torch records them when
the optimizer is built from ``model.named_parameters()``), however the params are grouped.

Three layouts are read:

* ``state_dict()`` of fuseopt or torch.optim: ``state`` keyed by int ids, each group listing the
  ids in ``params`` and the names in ``param_names``;
* DCP's ``get_optimizer_state_dict`` (``torch.distributed.checkpoint.state_dict``): ``state``
  keyed by the params' fully qualified names, which each group lists in ``params``;
* the same flattened (``StateDictOptions(flatten_optimizer_state_dict=True)``): one key per value,
  ``"state.<name>.<key>"`` and ``"param_groups.<name>.<option>"``.

Group options (lr, betas, ...): where the groups correspond one to one (every group of ours holds
matched params of at most one saved group, and every saved group's matched params went to at most
one group of ours) a group takes the options of its saved group, with our storage options where
it has none (a torch checkpoint keeps our ``state_dtype``, ``state_bits``), as the positional
load does;
otherwise (groups split or merged) every group keeps its own options, since the saved ones
disagree within a group. A group with no matched param keeps its own options either way. DCP
does otherwise: it gives each group the options of every saved group that shares a param with it
(the last one wins where they differ).
"""

from __future__ import annotations

from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fuseopt import _quant_io, _storage
from fuseopt.optimizer import Optimizer, _loaded_state

__all__ = ["IncompatibleKeys", "load_by_name"]

_STATE, _GROUPS = "state", "param_groups"
_NOT_OPTIONS = ("params", "param_names")


class IncompatibleKeys(NamedTuple):
    """What a load by name left out, as :meth:`torch.nn.Module.load_state_dict` returns it."""

    #: names of the optimizer's params that got no saved state (left fresh)
    missing_keys: list[str]
    #: names of saved params that were not loaded
    unexpected_keys: list[str]


@dataclass
class _Saved:
    """A saved state dict, by name: each group's names and options, and each param's state."""

    groups: list[tuple[list[str], dict[str, Any]]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    #: state of no param (int keys that no group lists), kept as the positional load keeps it
    orphans: dict[Any, Any] = field(default_factory=dict)


def load_by_name(
    opt: Optimizer, state_dict: dict[str, Any], *, strict: bool = True, keep: bool = False
) -> Any:
    r"""Load ``state_dict`` into ``opt``, matching params by name (the work of
    ``opt.load_state_dict(state_dict, by_name=True, strict=strict)``, after its pre-hooks).

    Args:
        opt (Optimizer): the optimizer; each of its groups must have ``param_names``.
        state_dict (dict): a state dict in one of the layouts of this module's docstring.
        strict (bool): raise ``RuntimeError`` naming the unmatched params and the states that do
            not fit their param, and change nothing; with False, load the rest (default: True)
        keep (bool): floating states keep their saved dtype (``keep_state_dtype``)
            (default: False)

    Returns:
        :class:`IncompatibleKeys`: the names of our params left fresh (``missing_keys``) and of the
        saved params not loaded (``unexpected_keys``); a param whose saved state does not fit
        its shape is in both.
    """
    from fuseopt.lbfgs import LBFGS  # (it imports the optimizer module)

    if isinstance(opt, LBFGS):
        raise ValueError(
            "by_name=True: LBFGS keeps one state for all its params (flat vectors), which cannot "
            "be matched by name; load it by position"
        )
    ours = _our_params(opt)
    saved = _read_saved(state_dict)
    saved_group_of = {name: i for i, (names, _) in enumerate(saved.groups) for name in names}
    misfits = {
        name: bad
        for name, (param, _) in ours.items()
        if name in saved_group_of and (bad := _misfits(opt, param, saved.state.get(name)))
    }
    missing = [n for n in ours if n not in saved_group_of or n in misfits]
    unexpected = [n for n in saved_group_of if n not in ours or n in misfits]
    if strict and (missing or unexpected):
        raise RuntimeError(_report(opt, ours, saved_group_of, misfits))

    groups = []
    for group, options in zip(opt.param_groups, _options(opt, ours, saved, saved_group_of)):
        groups.append({**options, "params": group["params"], "param_names": group["param_names"]})
    state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
    for name, (param, i) in ours.items():
        if name in saved.state and name in saved_group_of and name not in misfits:
            # the step's place, the state dtype and the 8-bit states follow the group the param
            # steps in from now on
            try:
                state[param] = _loaded_state(opt.rule, groups[i], param, saved.state[name], keep)
            except ValueError as e:  # (nothing has changed yet)
                raise ValueError(f"by_name=True: the saved state of {name!r}: {e}") from None
    state.update(saved.orphans)
    opt.__setstate__({"state": state, "param_groups": groups})
    return IncompatibleKeys(missing, unexpected)


def _our_params(opt: Optimizer) -> dict[str, tuple[torch.Tensor, int]]:
    """Each param of ``opt`` by name, with the index of its group."""
    ours: dict[str, tuple[torch.Tensor, int]] = {}
    for i, group in enumerate(opt.param_groups):
        names = group.get("param_names")
        if names is None:
            raise ValueError(
                f"by_name=True needs the optimizer's param names, but its param group {i} has no "
                "'param_names': build the optimizer from model.named_parameters() (or give each "
                "group's params as (name, tensor) pairs)"
            )
        for name, param in zip(names, group["params"]):
            if name in ours:
                raise ValueError(f"by_name=True: the optimizer names two params {name!r}")
            ours[name] = (param, i)
    return ours


def _read_saved(state_dict: dict[str, Any]) -> _Saved:
    """The saved groups and states by name, from any of the three layouts."""
    if _GROUPS not in state_dict or _STATE not in state_dict:
        if state_dict and all(
            isinstance(k, str) and k.startswith((f"{_STATE}.", f"{_GROUPS}.")) for k in state_dict
        ):
            return _read_flat(state_dict)
        raise ValueError(
            "by_name=True: the state dict has no 'state' and 'param_groups' (nor DCP's flattened "
            f"'state.<name>...' keys); its keys are {sorted(map(str, state_dict))[:8]}"
        )
    saved = _Saved()
    ids = [p for g in state_dict[_GROUPS] for p in g["params"]]
    by_ids = all(isinstance(p, int) for p in ids)
    if not by_ids and not all(isinstance(p, str) for p in ids):
        raise ValueError(
            "by_name=True: the state dict's groups list params neither all by int id "
            "(state_dict()) nor all by name (DCP's get_optimizer_state_dict)"
        )
    name_of: dict[Any, str] = {}
    seen: set[str] = set()
    for i, group in enumerate(state_dict[_GROUPS]):
        names = group["params"]  # DCP: the names are the ids
        if by_ids:
            names = group.get("param_names")
            if names is None:
                raise ValueError(
                    f"by_name=True needs the saved param names, but param group {i} of the state "
                    "dict has no 'param_names': save it from an optimizer built from "
                    "model.named_parameters()"
                )
            if len(names) != len(group["params"]):
                raise ValueError(
                    f"by_name=True: param group {i} of the state dict has {len(group['params'])} "
                    f"params but {len(names)} param_names"
                )
        for pid, name in zip(group["params"], names):
            if name in seen:
                raise ValueError(f"by_name=True: the state dict names two params {name!r}")
            seen.add(name)
            name_of[pid] = name
        options = {k: v for k, v in group.items() if k not in _NOT_OPTIONS}
        saved.groups.append((list(names), options))
    for key, value in state_dict[_STATE].items():
        if key in name_of:
            saved.state[name_of[key]] = value
        elif by_ids:
            saved.orphans[key] = value
        else:
            raise ValueError(
                f"by_name=True: the state dict holds state for {key!r}, which no group lists"
            )
    return saved


def _read_flat(state_dict: dict[str, Any]) -> _Saved:
    """DCP's flattened layout: options per param (``param_groups.<name>.<option>``, an option's
    name has no dot) and state per param (``state.<name>.<key>``, nested keys joined by dots).
    Params whose saved ``param_names`` are the same list (else whose options are equal) form a
    group."""
    options: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        if key.startswith(f"{_GROUPS}."):
            name, _, option = key[len(_GROUPS) + 1 :].rpartition(".")
            options.setdefault(name, {})[option] = value
    saved = _Saved()
    keys: list[Any] = []  # each group's identity: its param_names, else its options
    for name, opts in options.items():
        identity = tuple(opts["param_names"]) if "param_names" in opts else opts
        at = next((i for i, k in enumerate(keys) if _equal(k, identity)), None)
        if at is None:
            keys.append(identity)
            saved.groups.append(([], {k: v for k, v in opts.items() if k not in _NOT_OPTIONS}))
            at = len(keys) - 1
        saved.groups[at][0].append(name)
    longest_first = sorted(options, key=len, reverse=True)
    for key, value in state_dict.items():
        if not key.startswith(f"{_STATE}."):
            continue
        rest = key[len(_STATE) + 1 :]
        name = next((n for n in longest_first if rest.startswith(f"{n}.")), None)
        if name is None:
            raise ValueError(f"by_name=True: the state dict holds {key!r}, of no param it lists")
        *path, last = rest[len(name) + 1 :].split(".")
        node = saved.state.setdefault(name, {})
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return saved


def _equal(a: Any, b: Any) -> bool:
    """Whether two saved option values (or dicts, tuples of them) are the same."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool((a == b).all())
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _misfits(opt: Optimizer, param: torch.Tensor, value: Any) -> list[str]:
    """The tensors of a saved param state that cannot be the state of ``param``: a state the
    optimizer's rule declares like the param (``exp_avg``, ``momentum_buffer``, ...) must have
    its shape; any other must broadcast to it (Adafactor's row and column factors, a ``step``)."""
    if not isinstance(value, dict):
        return []
    from fuseopt.rule import ScalarState  # (rules import the optimizer module)

    rule = getattr(opt, "rule", None)
    like_param = {s.name for s in (rule.state if rule else ()) if not isinstance(s, ScalarState)}
    # 8-bit states saved compact: codes and scales checked as such (uint8 in the param's shape;
    # float32, one per block)
    bad = _quant_io.problems(rule, param, value)
    checked = {
        *_quant_io.compact_states(rule, value), *_quant_io.scale_keys(rule),
        *_quant_io.codes_keys(rule),
    }  # fmt: skip
    for key, v in value.items():
        if not isinstance(v, torch.Tensor) or key in checked:
            continue
        if key in like_param:
            fits = v.shape == param.shape
        else:
            trailing = zip(reversed(v.shape), reversed(param.shape))
            fits = v.dim() <= param.dim() and all(a in (1, b) for a, b in trailing)
        if not fits:
            bad.append(f"{key!r} of shape {tuple(v.shape)}")
    return bad


def _options(
    opt: Optimizer,
    ours: dict[str, tuple[torch.Tensor, int]],
    saved: _Saved,
    saved_group_of: dict[str, int],
) -> list[dict[str, Any]]:
    """Each of our groups' options after the load (see the module docstring)."""
    to_saved: defaultdict[int, set[int]] = defaultdict(set)
    to_ours: defaultdict[int, set[int]] = defaultdict(set)
    for name, (_, i) in ours.items():
        if name in saved_group_of:
            to_saved[i].add(saved_group_of[name])
            to_ours[saved_group_of[name]].add(i)
    one_to_one = all(len(s) == 1 for s in (*to_saved.values(), *to_ours.values()))
    options = []
    for i, group in enumerate(opt.param_groups):
        if one_to_one and i in to_saved:
            (j,) = to_saved[i]
            taken = deepcopy(saved.groups[j][1])
            # our storage options where the saved group has none (a torch checkpoint loaded
            # into a bfloat16-state or 8-bit optimizer keeps that format), as by position
            _storage.carry_options(group, taken)
            options.append(taken)
        else:
            options.append({k: v for k, v in group.items() if k not in _NOT_OPTIONS})
    return options


def _report(
    opt: Optimizer,
    ours: dict[str, Any],
    saved_group_of: dict[str, int],
    misfits: dict[str, list[str]],
) -> str:
    """The error of a strict load: what did not match, one line each."""
    lines = [
        f"Error(s) in loading the state dict of {type(opt).__name__} by name (nothing loaded):"
    ]
    missing = [n for n in ours if n not in saved_group_of]
    unexpected = [n for n in saved_group_of if n not in ours]
    if missing:
        names = ", ".join(map(repr, missing))
        lines.append(f"\tMissing param(s), in the optimizer but not in the state dict: {names}.")
    if unexpected:
        names = ", ".join(map(repr, unexpected))
        lines.append(f"\tUnexpected param(s), in the state dict but not in the optimizer: {names}.")
    for name, bad in misfits.items():
        shape = tuple(ours[name][0].shape)
        lines.append(
            f"\tShape mismatch for {name!r}: the saved {', '.join(bad)} cannot be the state of "
            f"a param of shape {shape}."
        )
    lines.append("strict=False loads the params that match and leaves the others fresh.")
    return "\n".join(lines)
