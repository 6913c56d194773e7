"""Foreach backend: the rule evaluated once on tensor lists with ``torch._foreach_*`` ops.

:class:`TensorList` maps Python operators onto foreach ops, so the same ``update`` that runs on
single tensors runs here on whole lists; results are written back with ``_foreach_copy_``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fuseopt import _storage
from fuseopt._dtensor import any_dtensor
from fuseopt.kernels.reference import pack, unpack


class TensorList(list):
    """A list of same-device, same-dtype tensors with elementwise operators (foreach ops)."""

    def _bin(self, op, other):
        return TensorList(op(self, other))

    def __neg__(self):
        return TensorList(torch._foreach_neg(self))

    def __add__(self, o):
        return self._bin(torch._foreach_add, o)

    __radd__ = __add__

    def __sub__(self, o):
        return self._bin(torch._foreach_sub, o)

    def __rsub__(self, o):  # scalar - x: exact negation, then one rounding, as torch's rsub
        return TensorList(torch._foreach_add(torch._foreach_neg(self), o))

    def __mul__(self, o):
        return self._bin(torch._foreach_mul, o)

    __rmul__ = __mul__

    def __truediv__(self, o):
        return self._bin(torch._foreach_div, o)

    def __rtruediv__(self, o):
        return TensorList([o / t for t in self])


class ForeachOps:
    """The ops vocabulary on :class:`TensorList` s."""

    @staticmethod
    def add(a, b, alpha=1):
        """``a + alpha * b`` (``alpha`` a value per tensor: one ATen add per tensor, as foreach
        ops take one alpha)."""
        if isinstance(alpha, list):
            return TensorList(map(lambda x, y, w: torch.add(x, y, alpha=w), a, b, alpha))
        return TensorList(torch._foreach_add(a, b, alpha=alpha))

    @staticmethod
    def addcmul(a, b, c, value=1):
        """``a + value * b * c``."""
        return TensorList(torch._foreach_addcmul(a, b, c, value=value))

    @staticmethod
    def addcdiv(a, b, c, value=1):
        """``a + value * b / c``."""
        if not any_dtensor(a):
            return TensorList(torch._foreach_addcdiv(a, b, c, value=value))
        # DTensor (FSDP2) has a sharding rule for the in-place op only: the same numbers, in place
        # on a copy.
        out = torch._foreach_clone(a)
        torch._foreach_addcdiv_(out, b, c, value=value)
        return TensorList(out)

    @staticmethod
    def lerp(a, b, w):
        """``a + w * (b - a)``."""
        return TensorList(torch._foreach_lerp(a, b, w))

    @staticmethod
    def sqrt(a):
        """Square root."""
        return TensorList(torch._foreach_sqrt(a))

    @staticmethod
    def maximum(a, b):
        """Elementwise maximum."""
        return TensorList(torch._foreach_maximum(a, b))

    @staticmethod
    def abs(a):
        """Absolute value."""
        return TensorList(torch._foreach_abs(a))

    @staticmethod
    def sign(a):
        """``torch.sign``."""
        return TensorList(torch._foreach_sign(a))

    @staticmethod
    def clamp(a, lo, hi):
        """``torch.clamp`` with scalar bounds."""
        return TensorList(torch._foreach_clamp_max(torch._foreach_clamp_min(a, lo), hi))

    # No foreach ops exist for masks: these run per tensor (Rprop only).
    @staticmethod
    def gt(a, b):
        """The masks ``a > b``."""
        return TensorList(torch.gt(x, y) for x, y in zip(a, _each(b, len(a))))

    @staticmethod
    def lt(a, b):
        """The masks ``a < b``."""
        return TensorList(torch.lt(x, y) for x, y in zip(a, _each(b, len(a))))

    @staticmethod
    def eq(a, b):
        """The masks ``a == b``."""
        return TensorList(torch.eq(x, y) for x, y in zip(a, _each(b, len(a))))

    @staticmethod
    def where(cond, a, b):
        """``a`` where ``cond`` holds, else ``b``."""
        n = len(cond)
        return TensorList(map(torch.where, cond, _each(a, n), _each(b, n)))

    @staticmethod
    def minimum(a, b):
        """Elementwise minimum."""
        return TensorList(torch._foreach_minimum(a, b))

    @staticmethod
    def detach(a):
        """``a`` (foreach steps never record autograd: ``differentiable`` takes the for-loop)."""
        return a


def _each(x, n: int) -> list:
    """``x`` as one value per tensor: a TensorList as is, a scalar repeated."""
    return x if isinstance(x, list) else [x] * n


def run(launch) -> None:
    """Apply the rule of ``launch`` (a :class:`fuseopt._plan.Launch`) to all its tensors at once,
    writing params and states in place."""
    names = launch.operands[2:-1] if launch.kahan else launch.operands[2:]  # (the rule's)
    state = {n: TensorList(ts) for n, ts in zip(names, launch.tensors[2:])}
    p = TensorList(launch.tensors[0])
    if launch.wide:  # a storage format: computed in float32, each result rounded as written
        _run_wide(launch, p, state, names)
        return
    # (a scalar with a value per tensor, e.g. LARS's trust ratio: foreach ops take a list)
    s = SimpleNamespace(
        **{
            k: v.tolist() if isinstance(v, torch.Tensor) and v.dim() == 1 else v
            for k, v in launch.scalars.items()
        }
    )
    out = launch.rule.apply(ForeachOps, launch.flags, s, p, TensorList(launch.tensors[1]), **state)
    targets, values = [], []
    for name, value in out.items():
        target = p if name == "param" else state.get(name)
        if value is not None and value is not target:
            targets.extend(target)
            values.extend(value)
    if any_dtensor(targets):
        for target, value in zip(targets, values):  # DTensor has no rule for _foreach_copy_
            target.copy_(value)
    elif targets:
        torch._foreach_copy_(targets, values)


def _widened(ts: list) -> TensorList:
    """``ts`` in float32 (those stored otherwise copied; the others as they are)."""
    return TensorList(t if t.dtype == _storage.COMPUTE else t.to(_storage.COMPUTE) for t in ts)


def _run_wide(launch, p: TensorList, state: dict, names) -> None:
    """:func:`run` of a ``wide`` launch (:mod:`fuseopt._storage`): the rule on float32 copies of
    the operands stored in other dtypes, each result rounded once as it is written back
    (stochastically for bfloat16 where ``sr``), as the fused kernels compute."""
    s = SimpleNamespace(
        **{
            k: v.tolist() if isinstance(v, torch.Tensor) and v.dim() == 1 else v
            for k, v in launch.scalars.items()
        }
    )
    rng = _storage.seed_generator(launch.scalars["sr_seed"]) if launch.sr else None
    quant = dict(launch.quant)
    wide = {n: _widened(ts) for n, ts in state.items() if n not in quant}
    if quant:  # 8-bit states: their float32 values (the scales in the params' state dicts)
        read = [unpack({n: state[n][i] for n in quant}, home, quant)
                for i, home in enumerate(launch.states)]  # fmt: skip
        wide.update({n: TensorList(r[n] for r in read) for n in quant})
    out = launch.rule.apply(
        ForeachOps, launch.flags, s, _widened(p), _widened(launch.tensors[1]), **wide
    )
    for name, value in out.items():
        targets = p if name == "param" else state.get(name)
        if value is None or value is (wide.get(name) if name != "param" else None):
            continue
        if name in quant:
            for home, v in zip(launch.states, value):
                pack(home, name, v, quant[name])
            continue
        if name == "param" and launch.kahan:  # (the compensations: the last operand)
            for target, v, comp in zip(targets, value, launch.tensors[-1]):
                _storage.kahan_write(target, v, comp)
            continue
        for target, v in zip(targets, value):
            if v is not target:
                _storage.write(target, v, rng)
