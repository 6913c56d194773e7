"""Pure schedules: factories returning ``step -> value`` functions (after optax's schedules).

A schedule keeps no state: its value at a step depends on the step alone, so training resumes
exactly from any step. Steps are non-negative ints or floats; values are Python floats. Schedulers
wrap these functions; the functions themselves never touch an optimizer.

Example::

    >>> lr = warmup_cosine(peak=1e-3, total_steps=1000, warmup_steps=100)
    >>> lr(0), lr(100), lr(1000)
    (0.0, 0.001, 0.0)
"""

from __future__ import annotations

import math
import numbers
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Schedule", "constant", "linear", "cosine", "warmup_cosine", "wsd", "join"]

Schedule = Callable[[float], float]

# WSD's cooldown when ``decay_steps`` is not given: the last 20% of training, the length Hägele et
# al. (2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations") found to
# match a cosine schedule.
_DEFAULT_DECAY_FRACTION = 0.2

# Easings: the fraction of the way from the first value to the last, at a fraction of the steps.
_EASINGS: dict[str, Callable[[float], float]] = {
    "linear": lambda t: t,
    "cosine": lambda t: 0.5 * (1.0 - math.cos(math.pi * t)),
    "sqrt": math.sqrt,
}


def _is_real(x: Any) -> bool:
    # bool is an int to Python, but True as a step count or value is always a mistake
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _value(name: str, x: Any) -> float:
    """``x`` as a float; it must be a finite real number."""
    if not _is_real(x):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _count(name: str, x: Any, low: int, high: int | None = None) -> int:
    """``x`` as an int; it must be an integer in ``[low, high]``."""
    if not isinstance(x, numbers.Integral) or isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    x = int(x)
    if x < low or (high is not None and x > high):
        bound = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{name} must satisfy {bound}, got {x}")
    return x


def _step(step: Any) -> float:
    """A schedule's argument: a real number >= 0."""
    if not _is_real(step):
        raise TypeError(f"step must be a real number, got {type(step).__name__}")
    if not step >= 0:  # written so that NaN fails too
        raise ValueError(f"step must be >= 0, got {step}")
    return step


def _lerp(a: float, b: float, t: float) -> float:
    """The value a fraction ``t`` in [0, 1] of the way from ``a`` to ``b``.

    ``b`` exactly at ``t == 1``; rounding may not land on it, so results are clamped to the
    segment: a schedule never leaves its range and a monotone ``t`` stays monotone.
    """
    if t >= 1.0:
        return b
    v = a + (b - a) * t
    return min(max(v, min(a, b)), max(a, b))


def _ramp(a: float, b: float, steps: int, step: float, easing: Callable[[float], float]) -> float:
    """From ``a`` at step 0 to ``b`` at ``steps`` along ``easing``; ``b`` from there on."""
    if step >= steps:  # also steps == 0: no ramp at all
        return b
    return _lerp(a, b, easing(step / steps))


def constant(value: float) -> Schedule:
    """Schedule returning ``value`` at every step.

    Args:
        value (float): the value.
    """
    value = _value("value", value)

    def schedule(step: float) -> float:
        _step(step)
        return value

    return schedule


def linear(start: float, end: float, steps: int) -> Schedule:
    """Schedule going linearly from ``start`` at step 0 to ``end`` at ``steps``, then ``end``.

    Args:
        start (float): value at step 0.
        end (float): value at ``steps`` and after.
        steps (int): length of the ramp, >= 0 (0: ``end`` from step 0).
    """
    start, end = _value("start", start), _value("end", end)
    steps = _count("steps", steps, 0)

    def schedule(step: float) -> float:
        return _ramp(start, end, steps, _step(step), _EASINGS["linear"])

    return schedule


def cosine(start: float, end: float, steps: int) -> Schedule:
    """Schedule following a half cosine from ``start`` at step 0 to ``end`` at ``steps``.

    The value at step ``s <= steps`` is
    ``end + (start - end) * (1 + cos(pi * s / steps)) / 2``; it is ``end`` after ``steps``.

    Args:
        start (float): value at step 0.
        end (float): value at ``steps`` and after.
        steps (int): length of the decay, >= 0 (0: ``end`` from step 0).
    """
    start, end = _value("start", start), _value("end", end)
    steps = _count("steps", steps, 0)

    def schedule(step: float) -> float:
        return _ramp(start, end, steps, _step(step), _EASINGS["cosine"])

    return schedule


def warmup_cosine(
    peak: float,
    total_steps: int,
    warmup_steps: int = 0,
    start: float = 0.0,
    end: float = 0.0,
) -> Schedule:
    """Linear warm-up from ``start`` to ``peak``, then a half cosine to ``end``, then ``end``.

    Args:
        peak (float): value at ``warmup_steps``, where the cosine starts.
        total_steps (int): step at which ``end`` is reached, >= 1.
        warmup_steps (int): length of the warm-up, in ``[0, total_steps]`` (default: 0).
        start (float): value at step 0 when there is a warm-up (default: 0.0).
        end (float): value at ``total_steps`` and after (default: 0.0).
    """
    peak, start, end = _value("peak", peak), _value("start", start), _value("end", end)
    total_steps = _count("total_steps", total_steps, 1)
    warmup_steps = _count("warmup_steps", warmup_steps, 0, total_steps)
    decay_steps = total_steps - warmup_steps

    def schedule(step: float) -> float:
        step = _step(step)
        if step < warmup_steps:
            return _ramp(start, peak, warmup_steps, step, _EASINGS["linear"])
        return _ramp(peak, end, decay_steps, step - warmup_steps, _EASINGS["cosine"])

    return schedule


def wsd(
    peak: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay_steps: int | float | None = None,
    start: float = 0.0,
    end: float = 0.0,
    decay: str = "linear",
) -> Schedule:
    """Warmup-stable-decay: linear warm-up to ``peak``, a plateau at ``peak``, a final decay.

    The decay takes the last ``decay_steps`` steps before ``total_steps`` to reach ``end``; the
    value is ``end`` from ``total_steps`` on. With ``t`` the fraction of the decay done, the decay
    follows ``t`` (``"linear"``), ``(1 - cos(pi * t)) / 2`` (``"cosine"``) or ``sqrt(t)``
    (``"sqrt"``, the "1 - sqrt" cooldown) of the way from ``peak`` to ``end``.

    Args:
        peak (float): value of the plateau.
        total_steps (int): step at which ``end`` is reached, >= 1.
        warmup_steps (int): length of the warm-up, in ``[0, total_steps]`` (default: 0).
        decay_steps (int, float or None): length of the decay: an int in
            ``[0, total_steps - warmup_steps]``, or a float in ``(0, 1]``: that fraction of
            ``total_steps``, rounded (default: None, i.e. 0.2).
        start (float): value at step 0 when there is a warm-up (default: 0.0).
        end (float): value at ``total_steps`` and after (default: 0.0).
        decay (str): shape of the decay: ``"linear"``, ``"cosine"`` or ``"sqrt"``
            (default: ``"linear"``).
    """
    peak, start, end = _value("peak", peak), _value("start", start), _value("end", end)
    total_steps = _count("total_steps", total_steps, 1)
    warmup_steps = _count("warmup_steps", warmup_steps, 0, total_steps)
    if decay_steps is None:
        decay_steps = _DEFAULT_DECAY_FRACTION
    if isinstance(decay_steps, float):
        if not 0.0 < decay_steps <= 1.0:
            raise ValueError(
                f"decay_steps as a fraction of total_steps must be in (0, 1], got {decay_steps}"
            )
        # at least one step: a fraction asks for some decay, however short the run
        decay_steps = max(1, round(decay_steps * total_steps))
        if warmup_steps + decay_steps > total_steps:
            raise ValueError(
                f"warmup_steps + decay_steps must be <= total_steps ({total_steps}), got "
                f"{warmup_steps} + {decay_steps} (decay_steps from the fraction)"
            )
    else:
        decay_steps = _count("decay_steps", decay_steps, 0, total_steps - warmup_steps)
    if decay not in _EASINGS:
        raise ValueError(f"decay must be one of {', '.join(map(repr, _EASINGS))}, got {decay!r}")
    easing = _EASINGS[decay]
    decay_start = total_steps - decay_steps

    def schedule(step: float) -> float:
        step = _step(step)
        if step < warmup_steps:
            return _ramp(start, peak, warmup_steps, step, _EASINGS["linear"])
        if step < decay_start:
            return peak
        return _ramp(peak, end, decay_steps, step - decay_start, easing)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[float]) -> Schedule:
    """Schedule running ``schedules`` one after another, switching at ``boundaries``.

    Schedule ``i`` runs from ``boundaries[i - 1]`` (step 0 for the first) until ``boundaries[i]``,
    and sees its own step count: the step minus ``boundaries[i - 1]``, so it starts at 0.

    Args:
        schedules (sequence of callables): at least one schedule.
        boundaries (sequence of numbers): ``len(schedules) - 1`` steps, >= 0 and strictly
            increasing.
    """
    schedules, boundaries = list(schedules), list(boundaries)
    if not schedules:
        raise ValueError("schedules must hold at least one schedule, got none")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"schedules[{i}] must be callable, got {type(s).__name__}")
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"boundaries must hold exactly len(schedules) - 1 = {len(schedules) - 1} steps, "
            f"got {len(boundaries)}"
        )
    for i, b in enumerate(boundaries):
        if not _is_real(b):
            raise TypeError(f"boundaries[{i}] must be a real number, got {type(b).__name__}")
        if not 0 <= b < math.inf:
            raise ValueError(f"boundaries[{i}] must be finite and >= 0, got {b}")
        if i and not boundaries[i - 1] < b:
            raise ValueError(
                f"boundaries must be strictly increasing, got boundaries[{i - 1}] = "
                f"{boundaries[i - 1]} >= boundaries[{i}] = {b}"
            )
    offsets = [0, *boundaries]

    def schedule(step: float) -> float:
        i = bisect_right(boundaries, _step(step))  # the boundary itself starts the next one
        return float(schedules[i](step - offsets[i]))

    return schedule
