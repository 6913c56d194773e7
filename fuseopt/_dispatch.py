"""From a param group to backend calls: gather params with grads, create state, batch, dispatch.

Which backend runs is decided per call from the group's flags and never written into the group
(torch keeps the user's ``None``):

- ``differentiable=True`` or a sparse grad: reference (autograd sees the step; sparse math per tensor);
- ``fused=True``: the fused kernel of the device, or torch's error where there is none;
- ``foreach=True``: foreach;
- ``foreach=False`` or ``fused=False`` (and the other not True): reference, torch's for-loop;
- both None: numba on CPU for float32/float64 when numba is importable, foreach on other devices,
  reference otherwise. This default differs from torch's (for-loop on CPU): fused is faster.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from fuseopt import kernels
from fuseopt.kernels import numba_cpu
from fuseopt.rule import Fill, FirstValue, Flags, Zeros

_CAPTURABLE_DEVICES = ["cuda", "xpu", "hpu"]


def scalar_dtype(fused: bool | None = None) -> torch.dtype:
    """dtype of the ``step`` tensor, as torch chooses it."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def check_fused(p: torch.Tensor) -> None:
    """torch's error for ``fused=True`` on a param the fused kernels do not cover."""
    if not (p.device.type == "cpu" and numba_cpu.supports(p.dtype)):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of supported "
            f"devices: ['cpu'] with dtype float32 or float64, but {p.dtype} and {p.device.type}"
        )


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (any dim order): the kernels walk its storage as a flat array."""
    expected = 1
    for size, stride in sorted((s, st) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _backend(group: dict, p: torch.Tensor, sparse: bool) -> str:
    fused, foreach = group.get("fused"), group.get("foreach")
    if group.get("differentiable") or sparse:
        return "reference"
    if fused:
        return "numba"
    if foreach:
        return "foreach"
    if fused is None and foreach is None:
        if p.device.type == "cpu":
            return "numba" if numba_cpu.supports(p.dtype) and numba_cpu.available() else "reference"
        return "foreach"
    return "reference"


def _new_state(rule, group: dict, p: torch.Tensor, specs) -> dict:
    state = {}
    if rule.has_step:
        on_device = bool(group.get("capturable") or group.get("fused"))
        state["step"] = (
            torch.zeros((), dtype=scalar_dtype(group.get("fused")), device=p.device)
            if on_device
            else torch.tensor(0.0, dtype=scalar_dtype())
        )
    for spec in specs:
        if isinstance(spec, Zeros):
            state[spec.name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif isinstance(spec, Fill):
            state[spec.name] = torch.full_like(
                p, group[spec.key], memory_format=torch.preserve_format
            )
    return state


def apply_rule(opt, group: dict) -> None:
    """One step of ``opt.rule`` on every param of ``group`` that has a grad."""
    rule = opt.rule
    specs = [s for s in rule.state if s.wanted(group)]
    firsts = [s.name for s in specs if isinstance(s, FirstValue)]
    capturable = bool(group.get("capturable"))
    entries = []  # (param, grad, state dict, first)
    for p in group["params"]:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse and not rule.sparse_ok:
            raise RuntimeError(rule.sparse_error)
        # only touch opt.state for rules that keep state: torch's SGD without momentum keeps none
        state = opt.state[p] if rule.has_step or specs else {}
        if not state and (rule.has_step or specs):
            if group.get("fused"):
                check_fused(p)
            state.update(_new_state(rule, group, p, specs))
        if capturable and (
            p.device.type not in _CAPTURABLE_DEVICES or state["step"].device.type != p.device.type
        ):
            raise AssertionError(
                "If capturable=True, params and state_steps must be on supported devices: "
                f"{_CAPTURABLE_DEVICES}."
            )
        if group.get("differentiable") and rule.has_step and state["step"].requires_grad:
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
        first = any(name not in state for name in firsts)
        entries.append((p, g, state, first))
    if not entries:
        return

    steps = None
    if rule.has_step:
        step_tensors = [e[2]["step"] for e in entries]
        torch._foreach_add_(step_tensors, 1)
        # capturable keeps steps on the device (no host sync); else one read for the whole group
        steps = step_tensors if capturable else torch.stack(step_tensors).tolist()

    batches: dict[tuple, list] = defaultdict(list)
    for i, (p, g, state, first) in enumerate(entries):
        step = None if steps is None else steps[i]
        sparse = g.is_sparse
        backend = _backend(group, p, sparse)
        if backend == "numba":
            if group.get("fused"):
                if sparse:
                    raise RuntimeError("`fused=True` does not support sparse gradients")
                check_fused(p)
            if not _dense(p) or any(
                not _dense(v) or v.stride() != p.stride() for k, v in state.items() if k != "step"
            ):
                backend = "reference"  # views with gaps: the flat kernel cannot walk them
            elif g.stride() != p.stride() or not _dense(g):
                g = torch.empty_like(p).copy_(g)  # grad laid out like the param
        key_step = id(step) if capturable else step
        batches[(backend, p.device, p.dtype, first, key_step)].append((p, g, state, step))

    for (backend, _, _, first, _), batch in batches.items():
        flags = Flags(rule.flags(group, first))
        scalars = rule.scalars(group, batch[0][3])
        params, grads, states = [], [], defaultdict(list)
        for p, g, state, _ in batch:
            for name in firsts:
                if name not in state:
                    state[name] = torch.empty_like(p, memory_format=torch.preserve_format)
            complex_ = torch.is_complex(p)
            params.append(torch.view_as_real(p) if complex_ else p)
            grads.append(torch.view_as_real(g) if complex_ else g)
            for spec in specs:
                v = state[spec.name]
                states[spec.name].append(torch.view_as_real(v) if complex_ else v)
        kernels.get(backend).run(rule, flags, scalars, params, grads, dict(states))
