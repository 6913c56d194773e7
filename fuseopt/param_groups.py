"""Parameter groups from a model, for any optimizer: ``fuseopt.param_groups(model, weight_decay)``.

The rules are timm's (``param_groups_weight_decay``, ``param_groups_layer_decay``) and, as an
option, Hugging Face Trainer's decay/no-decay split; they are re-stated in
:func:`param_groups`'s docstring and in docs/param_groups.md. Neither library is needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from numbers import Real
from typing import Any

import torch
from torch import nn

__all__ = ["param_groups"]

#: timm's ``group_matcher`` suffix that puts a param in the layer before it (a ViT's final norm)
_MATCH_PREVIOUS = 99999
#: Trainer's name rule (transformers 5.25; 4.x had the first three): searched in the lowercase name
_HF_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
_SPLITS = ("timm", "hf")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    lr: float | None = None,
    no_weight_decay: Iterable[str] = (),
    split: str = "timm",
    layer_decay: float | None = None,
    layer_id: Callable[[str], int] | None = None,
    lr_scales: Mapping[str, float] | None = None,
    weight_decay_scales: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    r"""Return the param groups of ``model`` for an optimizer: weight decay only where it belongs,
    and optionally a learning rate per layer or per name pattern.

    Each group is a dict with ``params`` (tensors), ``param_names`` (their names in
    ``model.named_parameters()``, so that the optimizer's state dict is named and loads by name),
    ``weight_decay`` and, where ``lr`` is given, ``lr``: pass the list to any torch.optim or
    fuseopt optimizer. Params with ``requires_grad=False`` are left out; every other param is in
    exactly one group.

    **No weight decay** (``weight_decay=0.0`` in its group) for a param that

    * (``split="timm"``, timm's ``param_groups_weight_decay``) has at most one dimension (biases,
      norm layers' scales and shifts) or a name ending in ``.bias``, or is named by
      ``model.no_weight_decay()`` where the model has that method (timm's convention, which its
      ``create_optimizer_v2`` reads: e.g. a ViT's ``pos_embed``);
    * (``split="hf"``, Hugging Face Trainer's ``get_decay_parameter_names``) is inside an
      :class:`~torch.nn.LayerNorm` below ``model``, or whose lowercase name contains ``bias``,
      ``layernorm`` or ``rmsnorm`` or has a part ``norm`` or ``*_norm``;
    * either way, matches a pattern of ``no_weight_decay``.

    **Layer-wise lr decay** (``layer_decay``, timm's ``param_groups_layer_decay``): every param
    gets a layer id; with ``L`` the largest id, a param of layer ``i`` gets the lr
    ``lr * layer_decay ** (L - i)``, so the head trains at ``lr`` and the layers below it at ever
    smaller rates. The ids come from, in this order of precedence:

    * ``layer_id(name)``, where given;
    * the model's ``group_matcher(coarse=False)`` (timm's interface: a dict of regular expressions
      whose numbered groups order the params; ``(99999,)`` as a suffix joins the layer before;
      unmatched params form the last layer), exactly as timm reads it;
    * else the model's numbered blocks: a param whose name has a numeric part
      (``blocks.3.mlp.fc1.weight``, ``layer2.0.conv1.weight``) belongs to the block named up to
      that part; params before the first block are layer 0, each block in order of appearance
      the next layer, and a param without a number after some blocks the layer after the last
      of them (a ViT's final norm and head, a ResNet's ``fc``). Where timm's ViT matcher puts the
      final norm with the last block, this rule puts it with the head.

    The ids are found over all params, frozen ones included, so freezing changes no lr.

    Groups come in the order their first param appears in ``model.named_parameters()``; with
    neither layer decay nor scales, the two groups come in their source's order (timm: without
    decay first; Trainer: with decay first). Empty groups are left out.

    Args:
        model (torch.nn.Module): the model whose params are grouped.
        weight_decay (float): the weight decay of the params that get one.
        lr (float, optional): the base learning rate, required with ``layer_decay`` or
            ``lr_scales``: each group's ``lr`` is ``lr`` times its scales. Without it the groups
            have no ``lr`` and take the optimizer's (default: None)
        no_weight_decay (iterable of str, optional): names or :mod:`fnmatch` patterns
            (``"*.pos_embed"``) of params without weight decay whatever their shape; each must
            match a param (default: ())
        split (str, optional): ``"timm"`` or ``"hf"``: the rule above (default: ``"timm"``)
        layer_decay (float, optional): in (0, 1]: the lr factor from one layer to the one below
            (default: None, no layer decay)
        layer_id (Callable[[str], int], optional): a param's layer id (an int >= 0) from its name,
            for models without numbered blocks or ``group_matcher`` (default: None)
        lr_scales (Mapping[str, float], optional): pattern -> factor on the lr of the params it
            matches (``{"head.*": 10.0}``); a param matching several gets their product, times
            its layer decay factor (default: None)
        weight_decay_scales (Mapping[str, float], optional): pattern -> factor on the weight decay
            of the params it matches that have one (default: None)

    Returns:
        list of dict: the param groups.

    Example:
        >>> # xdoctest: +SKIP
        >>> groups = fuseopt.param_groups(vit, weight_decay=0.05, lr=1e-3, layer_decay=0.75)
        >>> opt = fuseopt.AdamW(groups, lr=1e-3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {torch.typename(model)}")
    _check_number("weight_decay", weight_decay)
    if lr is not None:
        _check_number("lr", lr, "Invalid learning rate")
    if split not in _SPLITS:
        raise ValueError(f"split must be 'timm' or 'hf', but got {split!r}")
    if layer_decay is not None and not (_is_number(layer_decay) and 0.0 < layer_decay <= 1.0):
        raise ValueError(f"Invalid layer_decay value: {layer_decay} (it must be in (0, 1])")
    if layer_id is not None and layer_decay is None:
        raise ValueError("layer_id is given but layer_decay is None: layer ids only scale the lr")
    if layer_id is not None and not callable(layer_id):
        raise TypeError(f"layer_id must be a callable name -> int, but got {layer_id!r}")
    if lr is None and (layer_decay is not None or lr_scales):
        which = "layer_decay" if layer_decay is not None else "lr_scales"
        raise ValueError(f"{which} needs lr: each group's lr is lr times its scale")

    named = list(model.named_parameters())
    names = [name for name, _ in named]
    given = _patterns("no_weight_decay", no_weight_decay, names)
    lr_by = _scales("lr_scales", lr_scales, names)
    wd_by = _scales("weight_decay_scales", weight_decay_scales, names)
    own = getattr(model, "no_weight_decay", None) if split == "timm" else None
    skip = [*given, *(own() if callable(own) else ())]
    in_layernorm = _in_layernorm(model) if split == "hf" else ()
    layers = None if layer_decay is None else _layer_ids(model, names, layer_id)
    top = None if layers is None else max(layers.values())

    groups: dict[tuple, dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        if any(fnmatchcase(name, pattern) for pattern in skip):
            decays = False
        elif split == "timm":
            decays = not (param.ndim <= 1 or name.endswith(".bias"))
        else:
            decays = not (name in in_layernorm or _HF_NO_DECAY_NAMES.search(name.lower()))
        lr_scale = _product(lr_by, name)
        if layers is not None:
            lr_scale *= layer_decay ** (top - layers[name])
        wd_scale = _product(wd_by, name) if decays else 0.0
        key = (None if layers is None else layers[name], decays, lr_scale, wd_scale)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "weight_decay": weight_decay * wd_scale}
            if lr is not None:
                groups[key]["lr"] = lr * lr_scale
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    if not groups:
        raise ValueError("model has no param that requires grad: there is nothing to optimize")
    if layers is None and not lr_by and not wd_by:  # the two groups in their source's order
        decay_first = split == "hf"
        return [groups[k] for k in sorted(groups, key=lambda k: k[1] != decay_first)]
    return list(groups.values())


def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_number(name: str, value: Any, message: str | None = None) -> None:
    """torch's check of a hyperparameter: a finite number >= 0."""
    if not _is_number(value) or value < 0:
        raise ValueError(f"{message or f'Invalid {name} value'}: {value}")


def _patterns(arg: str, patterns: Iterable[str], names: list[str]) -> list[str]:
    """``patterns`` as a list, each checked to match a param (a typo must not pass silently)."""
    if isinstance(patterns, str) or not isinstance(patterns, Iterable):
        raise TypeError(f"{arg} must be an iterable of names or patterns, but got {patterns!r}")
    patterns = list(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{arg} must hold str names or patterns, but got {pattern!r}")
        if not any(fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"{arg}: {pattern!r} matches no param of the model")
    return patterns


def _scales(arg: str, scales: Mapping[str, float] | None, names: list[str]) -> dict[str, float]:
    if scales is None:
        return {}
    if not isinstance(scales, Mapping):
        raise TypeError(f"{arg} must be a mapping of pattern -> factor, but got {scales!r}")
    _patterns(arg, scales, names)
    for pattern, factor in scales.items():
        if not _is_number(factor) or factor < 0:
            raise ValueError(f"Invalid {arg} factor for {pattern!r}: {factor}")
    return dict(scales)


def _product(scales: dict[str, float], name: str) -> float:
    out = 1.0
    for pattern, factor in scales.items():
        if fnmatchcase(name, pattern):
            out *= factor
    return out


def _in_layernorm(model: nn.Module) -> set[str]:
    """The names of the params inside a LayerNorm below ``model`` (Trainer's type rule)."""
    prefixes = tuple(
        f"{name}." for name, m in model.named_modules() if name and isinstance(m, nn.LayerNorm)
    )
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def _layer_ids(
    model: nn.Module, names: list[str], layer_id: Callable[[str], int] | None
) -> dict[str, int]:
    """Each param's layer id (see :func:`param_groups`), checked to give more than one layer."""
    matcher = getattr(model, "group_matcher", None)
    if layer_id is not None:
        source = "layer_id"
        ids = {}
        for name in names:
            value = layer_id(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"layer_id({name!r}) returned {value!r}: it must be an int >= 0")
            ids[name] = value
    elif callable(matcher):
        source = "the model's group_matcher"
        ids = _matcher_ids(matcher(coarse=False), names)
    else:
        source = "the model has no numbered blocks (names such as 'blocks.0.mlp.weight')"
        ids = _block_ids(names)
    if len(set(ids.values())) < 2:
        raise ValueError(
            f"layer_decay: {source} puts every param in one layer, so no lr would decay; pass "
            "layer_id, a function from a param's name to its layer"
        )
    return ids


def _block_ids(names: list[str]) -> dict[str, int]:
    """Layer ids from numbered blocks: 0 before the first, then one per block in order."""
    ids: dict[str, int] = {}
    blocks: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        if at is None:  # not in a block: with the stem, or after the blocks seen so far
            ids[name] = len(blocks) + 1 if blocks else 0
        else:
            ids[name] = blocks.setdefault(".".join(parts[: at + 1]), len(blocks) + 1)
    return ids


def _matcher_ids(spec: Any, names: list[str]) -> dict[str, int]:
    """Layer ids from a timm ``group_matcher``: a dict ``{group: regex or [(regex, suffix)]}`` or
    a callable ``name -> ordinal``. Each name gets an ordinal (the group's position, the regex's
    numbered groups, the suffix), unmatched names ``(inf,)``; the ordinals, sorted, number the
    layers, an ordinal ending in 99999 staying in the layer before."""
    if callable(spec):
        ordinal = spec
    else:
        rules = []
        for position, entry in enumerate(spec.values()):
            if entry is None:
                continue
            for pattern, suffix in entry if isinstance(entry, (list, tuple)) else [(entry, None)]:
                rules.append((re.compile(pattern), position, tuple(suffix or ())))

        def ordinal(name: str) -> tuple:
            for regex, position, suffix in rules:
                found = regex.match(name)
                if found:
                    return (position, *(float(g) for g in found.groups()), *suffix)
            return (math.inf,)

    ordinals = {}
    for name in names:
        value = ordinal(name)
        ordinals[name] = tuple(map(float, value)) if isinstance(value, Iterable) else (value,)
    layer_of: dict[tuple, int] = {}
    layer = -1
    for value in sorted(set(ordinals.values())):
        if layer < 0 or value[-1] != _MATCH_PREVIOUS:
            layer += 1
        layer_of[value] = layer
    return {name: layer_of[value] for name, value in ordinals.items()}
