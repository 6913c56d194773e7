"""Reference backend: the rule evaluated per tensor with torch ops; the oracle for the fast backends.

The vocabulary maps one to one onto ATen ops, so this path is bitwise equal to torch.optim's
for-loop implementation. It is also the ``differentiable=True`` path: ``update`` is out of place and
the write-back (``copy_``) is recorded by autograd.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


class TorchOps:
    """The ops vocabulary on tensors (see :mod:`fuseopt.kernels.trace` for the traced meaning)."""

    add = staticmethod(torch.add)  # a + alpha * b
    addcmul = staticmethod(torch.addcmul)  # a + value * b * c
    addcdiv = staticmethod(torch.addcdiv)  # a + value * b / c
    lerp = staticmethod(torch.lerp)  # a + w * (b - a)
    sqrt = staticmethod(torch.sqrt)
    maximum = staticmethod(torch.maximum)
    minimum = staticmethod(torch.minimum)
    abs = staticmethod(torch.abs)
    sign = staticmethod(torch.sign)
    clamp = staticmethod(torch.clamp)
    gt = staticmethod(torch.gt)
    lt = staticmethod(torch.lt)
    eq = staticmethod(torch.eq)
    where = staticmethod(torch.where)


def run(rule, flags, scalars: dict, params: list, grads: list, states: dict[str, list]) -> None:
    """Apply ``rule`` to each tensor in turn, writing params and state in place."""
    s = SimpleNamespace(**scalars)
    differentiable = torch.is_grad_enabled()
    for i, (p, g) in enumerate(zip(params, grads)):
        state = {k: v[i] for k, v in states.items()}
        if differentiable:
            # autograd may save the inputs for backward: the write-back below must not touch them
            out = rule.update(
                TorchOps, flags, s, p.clone(), g, **{k: v.clone() for k, v in state.items()}
            )
        else:
            out = rule.update(TorchOps, flags, s, p, g, **state)
        for name, value in out.items():
            target = p if name == "param" else state.get(name)
            if value is not None and value is not target:
                target.copy_(value)
