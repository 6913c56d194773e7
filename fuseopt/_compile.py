"""The step inside a ``torch.compile`` graph: one opaque custom op, ``fuseopt::step``.

dynamo cannot trace the step's host side (the plan's checks, numba's dispatcher, Triton's
launcher), and what that side reads (step counts, a scheduler's lr) would become guards that
recompile the caller's graph every step. So the traced code of ``step`` ends in one call of a
``torch.library`` custom op: dynamo records it as one node, and at run time the op runs the whole
eager step (plan, checks, kernels) on the optimizer. ``fullgraph=True`` then compiles a function
that calls ``opt.step()``, and a whole training step stays one graph around it.

What the op declares to the graph: it writes the params and reads their grads. The graph may hand
it other tensors than the live ones (functionalization's copies of the params; a grad the graph
computed, which dynamo assigns to ``.grad`` only after the graph returns), so the op steps with
what the graph gives: the params' values are copied in and back out, the grads swapped in for the
step. The optimizer's state (moments, step counts) and its options are not inputs: the op updates
and reads them as the eager step does, so a read or write of a state tensor, or an in-place write
of a tensor lr, in the same compiled function is not ordered with the step (docs/optim.md).

The optimizer is named by ``id``: dynamo guards the id of the object a traced ``id()`` reads, so a
graph runs only on the optimizer it was traced for, and the op finds it in a registry of live
optimizers (weak references; filled at construction and unpickling).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from itertools import chain
from operator import attrgetter, is_
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fuseopt.optimizer import Optimizer

_GRAD = attrgetter("grad")
_LIVE: weakref.WeakValueDictionary[int, Optimizer] = weakref.WeakValueDictionary()


def register(opt: Optimizer) -> None:
    """Make ``opt`` findable by the op (called by ``Optimizer.__init__`` and ``__setstate__``)."""
    _LIVE[id(opt)] = opt


def groups(opt: Optimizer) -> list[dict]:
    """``opt.param_groups``, read so that dynamo does not see it: dynamo intercepts that attribute
    of any ``torch.optim.Optimizer`` (it marks every param static, sets ``capturable`` on CUDA
    groups, and guards every option's value: a float lr that a scheduler changes would recompile
    the graph every step). A subclass that keeps its groups elsewhere (a property) is read as it
    says."""
    found = opt.__dict__.get("param_groups")
    return opt.param_groups if found is None else found


def graph_step(opt: Optimizer) -> None:
    """The step of ``opt`` as dynamo traces it: the op, on the params and their grads (which
    become the graph's inputs to it); a differentiable step runs eagerly, in a graph break."""
    from fuseopt.optimizer import _apply_step

    if any(group.get("differentiable") for group in groups(opt)):
        # autograd must see the step's ops: the op has no derivative formula
        torch.compiler.disable(_apply_step)(opt)
        return
    params = [p for group in groups(opt) for p in group["params"]]
    grads = [p.grad for p in params]
    with torch.no_grad():
        torch.ops.fuseopt.step(id(opt), params, grads)


# The op is defined with torch.library's low-level API rather than ``torch.library.custom_op``:
# the latter wraps the kernel in Python autograd and version-counter layers that cost ~0.7 us per
# tensor argument (measured: 400 params, 0.28 ms against 0.08 ms a call), more than the step's own
# host side. Nothing here needs them: the op runs under no_grad and has no derivative, and it
# bumps no version counter, as the eager fused step (and torch's ``fused=True``) bumps none.
_LIB = torch.library.Library("fuseopt", "DEF")
# cudagraph_unsafe: a CUDA graph (mode="reduce-overhead") would replay the kernels the op launched
# once, without its host side (the checks, the step counts it reads): inductor keeps it outside.
_LIB.define(
    "step(int optimizer, Tensor(a!)[] params, Tensor?[] grads) -> ()",
    tags=(torch.Tag.cudagraph_unsafe,),
)


def _step(optimizer: int, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """One step of the optimizer with ``id`` ``optimizer``, on the tensors the graph gives."""
    from fuseopt.optimizer import _apply_step

    opt = _LIVE.get(optimizer)
    if opt is None:
        raise RuntimeError(
            "fuseopt::step: the optimizer this graph was compiled for no longer exists"
        )
    live = list(chain.from_iterable(group["params"] for group in opt.param_groups))
    if len(params) != len(live):
        raise RuntimeError(
            "fuseopt::step: the optimizer's params changed since this graph was compiled"
        )
    # (only what differs is swapped or copied: usually nothing, found without a Python call per
    # param; a grad's setter costs a microsecond per param)
    copies, swaps = [], []
    if not all(map(is_, live, params)):
        copies = [(p, given) for p, given in zip(live, params) if given is not p]
    current = list(map(_GRAD, live))
    if not all(map(is_, current, grads)):
        swaps = [(p, now, g) for p, now, g in zip(live, current, grads) if now is not g]
    try:
        with torch.no_grad():
            for p, given in copies:
                p.copy_(given)
        for p, _, g in swaps:
            p.grad = g
        _apply_step(opt)
    finally:
        for p, saved, _ in swaps:
            p.grad = saved
    with torch.no_grad():
        for p, given in copies:
            given.copy_(p)
    if hasattr(opt.step, "_wrapped_by_lr_sched"):
        # the record a scheduler's wrapper of ``step`` keeps (see lr_scheduler): dynamo drops
        # the wrapper's store, made on an optimizer it reached through a weak reference
        opt._opt_called = True


_LIB.impl("step", _step, "CompositeExplicitAutograd")


@torch.library.register_fake("fuseopt::step", lib=_LIB)
def _(optimizer: int, params: Sequence, grads: Sequence) -> None:
    return None
