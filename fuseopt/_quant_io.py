"""Checkpoints of 8-bit states (``state_bits=8``): the two forms ``state_dict`` saves, and what
``load_state_dict`` makes of either.

An 8-bit state ``name`` of a param is held as two entries of its state (:mod:`fuseopt._quant`):
``name``, uint8 codes in the param's shape, and ``name + "_absmax"``, the float32 scale of each
block of 256 elements.

- The default form is torch's layout: each 8-bit state dequantized, under its own key, in the
  dtype a full-precision state of that param takes in its group (the group's ``state_dtype``,
  else the param's), and no ``_absmax`` keys. ``torch.optim`` loads and continues from it.
- The compact form (``state_dict(compact=True)``) holds the codes and scales as stored, the codes
  under ``name + "_codes"``: a load gives back exactly the state saved. (Under ``name`` itself,
  ``torch.optim`` would load the codes, cast to floats, as the state's values and step on them;
  without a ``name`` it raises a ``KeyError`` at its step. A compact state with its codes under
  ``name``, as the first compact checkpoints held them, loads here too.)

On load each state is brought to the format of the group it loads into (after the load: the
saved group's options, with ours where it has none): a full-precision state of an 8-bit state is
quantized, a compact one of a state kept in full precision (a group without ``state_bits``, a
param under ``min_8bit_size``) is dequantized, and a compact one of an 8-bit state is taken as
is, once its codes and scales are checked to be those of the param. A dequantized state
quantizes back to codes within one step of the saved ones, not always to the same: the largest
magnitude of a block whose largest element is negative dequantizes to ``-0.99296875 * absmax``
(the signed map has no -1), so its requantized block has a smaller scale.
"""

from __future__ import annotations

from typing import Any

import torch

from fuseopt import _quant, _storage

__all__ = [
    "signed_states", "compact_states", "scale_keys", "codes_keys", "saved", "problems", "loaded",
]  # fmt: skip


def signed_states(rule) -> dict[str, bool]:
    """``{state name: signed}`` for every state ``rule`` may keep in 8 bits, in any group."""
    if rule is None:
        return {}
    return {s.name: s.signed for s in rule.state if getattr(s, "signed", None) is not None}


def scale_keys(rule) -> dict[str, str]:
    """``{absmax key: state name}`` of the states ``rule`` may keep in 8 bits."""
    return {_quant.absmax_key(name): name for name in signed_states(rule)}


def codes_key(name: str) -> str:
    """The key of the codes of the 8-bit state ``name`` in a compact state dict."""
    return f"{name}_codes"


def codes_keys(rule) -> dict[str, str]:
    """``{codes key: state name}`` of the states ``rule`` may keep in 8 bits."""
    return {codes_key(name): name for name in signed_states(rule)}


def _held_form(rule, value: dict) -> tuple[dict, dict[str, str]]:
    """A saved param state with its compact codes back under their state's key (in place of
    ``name + "_codes"``), and ``{state name: the saved key}`` for the messages; as it is where
    it holds no ``_codes`` key (a state saved under both keys keeps both: :func:`problems`)."""
    renamed = {k: n for k, n in codes_keys(rule).items() if k in value and n not in value}
    if not renamed:
        return value, {}
    return {renamed.get(k, k): v for k, v in value.items()}, {n: k for k, n in renamed.items()}


def compact_states(rule, value: dict) -> dict[str, bool]:
    """``{state name: signed}`` of the states of ``value`` (a saved or held param state) held as
    codes and scales: those whose ``_absmax`` key is present."""
    return {n: s for n, s in signed_states(rule).items() if _quant.absmax_key(n) in value}


def saved(rule, group: dict, p: torch.Tensor, state: dict, compact: bool) -> dict:
    """The entry of ``p``'s ``state`` in a state dict: as it is held where it has no 8-bit state,
    or where ``compact`` with each 8-bit state's codes under ``name + "_codes"``; else each 8-bit
    state dequantized to the dtype of ``p``'s full-precision states in ``group`` and its
    ``_absmax`` key left out (torch's layout)."""
    held = compact_states(rule, state) if isinstance(state, dict) else {}
    if not held:
        return state
    if compact:  # (the codes under their own key: see the module's docstring)
        return {(codes_key(k) if k in held else k): v for k, v in state.items()}
    dtype = _storage.state_dtype(group, p)
    scales = {_quant.absmax_key(n) for n in held}
    out = {}
    for key, value in state.items():
        if key in held:
            absmax = state[_quant.absmax_key(key)]
            out[key] = _quant.dequantize(value, absmax, held[key]).to(dtype)
        elif key not in scales:
            out[key] = value
    return out


def _what(v: Any) -> str:
    """A saved value, in words, for an error."""
    if torch.is_tensor(v):
        return f"{v.dtype} of shape {tuple(v.shape)}"
    return type(v).__name__


def problems(rule, p: torch.Tensor, value: Any) -> list[str]:
    """What keeps the compact 8-bit states in ``value`` (a saved param state) from being states
    of ``p``: codes that are not uint8 in ``p``'s shape, scales that are not float32 with one
    element per block, a scale without its codes or codes without their scale. Empty where
    all is well (or the state holds none)."""
    if not isinstance(value, dict):
        return []
    bad = [
        f"{k!r} and {n!r} (8-bit codes beside another value of the same state)"
        for k, n in codes_keys(rule).items()
        if k in value and n in value
    ]
    value, saved_as = _held_form(rule, value)
    offered = signed_states(rule)
    scale_of = scale_keys(rule)
    for key, v in value.items():
        if key in scale_of and scale_of[key] not in value:
            codes = codes_key(scale_of[key])
            bad.append(f"{key!r} (8-bit scales without their codes {codes!r})")
        elif (
            key in offered
            and torch.is_tensor(v)
            and v.dtype == torch.uint8
            and _quant.absmax_key(key) not in value
        ):
            bad.append(
                f"{saved_as.get(key, key)!r} (uint8: 8-bit codes without their scales "
                f"{_quant.absmax_key(key)!r})"
            )
    want = _quant.layout(p)

    def fits(t, half: str) -> bool:
        return torch.is_tensor(t) and (t.dtype, tuple(t.shape)) == want[half]

    for name in compact_states(rule, value):
        codes, absmax = value.get(name), value[_quant.absmax_key(name)]
        if codes is not None and not fits(codes, "codes"):
            key = saved_as.get(name, name)
            bad.append(f"{key!r} ({_what(codes)}; 8-bit codes are uint8 in the param's shape)")
        n = _quant.blocks(p.numel())
        if not fits(absmax, "absmax"):
            bad.append(
                f"{_quant.absmax_key(name)!r} ({_what(absmax)}; 8-bit scales are float32 of "
                f"shape ({n},), one per block of {_quant.BLOCK} of the param's {p.numel()} "
                "elements)"
            )
    return bad


def loaded(rule, group: dict, p: torch.Tensor, value: dict) -> tuple[dict, set]:
    """A saved param state ``value`` brought to the format ``group`` (the group ``p`` is loaded
    into, after the load) asks of ``p``: ``(state, final)``, the state in ``value``'s order and
    the keys of its 8-bit entries, made final here (codes and scales on ``p``'s device), which
    the usual cast must leave alone; the other tensors are cast by it, a dequantized state
    included (float32 here). Raises ``ValueError`` where :func:`problems` finds any, or where a
    full-precision state to quantize is not shaped like ``p`` or not floating."""
    bad = problems(rule, p, value)
    if bad:
        raise ValueError(
            f"the saved {', '.join(bad)} cannot be the state of a param of shape {tuple(p.shape)}"
        )
    value, _ = _held_form(rule, value)
    held = compact_states(rule, value)
    want = _quant.quantized(rule, group, p)
    if not held and not want:
        return value, set()
    scales = {_quant.absmax_key(n) for n in held}
    out: dict = {}
    final: set = set()
    for key, v in value.items():
        if key in scales:
            name = scale_keys(rule)[key]
            if name in want:  # (held codes and scales keep their places)
                out[key] = v.to(device=p.device).contiguous()
                final.add(key)
            continue  # (else dequantized with its codes)
        if key in want:
            if key in held:
                out[key] = v.to(device=p.device).contiguous()
                final.add(key)
            else:
                if not (torch.is_tensor(v) and v.is_floating_point() and v.shape == p.shape):
                    raise ValueError(
                        f"the saved {key!r} ({_what(v)}) cannot be quantized as the 8-bit state "
                        f"of a param of shape {tuple(p.shape)}: a floating tensor of that shape "
                        "is needed"
                    )
                codes, absmax = _quant.quantize(
                    v.to(device=p.device, dtype=torch.float32), want[key]
                )
                out[key], out[_quant.absmax_key(key)] = codes, absmax  # (scales after codes)
                final.update((key, _quant.absmax_key(key)))
        elif key in held:
            absmax = value[_quant.absmax_key(key)].to(p.device)
            out[key] = _quant.dequantize(v.to(p.device), absmax, held[key])
        else:
            out[key] = v
    return out, final
