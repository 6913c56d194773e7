"""From a param group to backend calls: gather params with grads, create state, batch, dispatch.

Which backend runs is decided per call from the group's flags and never written into the group
(torch keeps the user's ``None``):

- ``differentiable=True`` or a sparse grad: reference (autograd sees the step; sparse math per tensor);
- ``fused=True``: the fused kernel of the device, or torch's error where there is none;
- ``foreach=True``: foreach;
- ``foreach=False`` or ``fused=False`` (and the other not True): reference, torch's for-loop;
- both None: numba on CPU (float32, float64, bfloat16, float16 and complex) when numba is
  importable, foreach on other devices, reference otherwise. This default differs from torch's
  (for-loop on CPU): fused is faster.

Triton (``kernels/triton_gpu.py``) is the fused backend of CUDA params (float32, float16, bfloat16,
float64), and their default when Triton is importable; ``FUSEOPT_FUSED_BACKEND=triton`` makes it
the fused backend of CPU params too (Triton's interpreter, ``TRITON_INTERPRET=1``: for tests).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from itertools import chain, compress, islice, repeat
from operator import attrgetter, is_, is_not, itemgetter

import numpy as np
import torch

from fuseopt import _dtensor, kernels
from fuseopt.kernels import numba_cpu, triton_gpu
from fuseopt.rule import Fill, FirstValue, Flags, ScalarState, Zeros, to_scalar

_CAPTURABLE_DEVICES = ["cuda", "xpu", "hpu"]
# C-level accessors for map() over a whole group (a Python loop costs ~50 ns more per call)
_GRAD, _DTYPE, _LAYOUT, _IS_CPU = (attrgetter(a) for a in ("grad", "dtype", "layout", "is_cpu"))
_DATA_PTR, _NUMEL = torch.Tensor.data_ptr, torch.Tensor.numel
_IS_CONTIGUOUS = torch.Tensor.is_contiguous


def scalar_dtype(fused: bool | None = None) -> torch.dtype:
    """dtype of the ``step`` tensor, as torch chooses it."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def check_fused(p: torch.Tensor) -> None:
    """torch's error for ``fused=True`` on a param the fused kernels do not cover."""
    if _triton(p):
        return
    if not (p.device.type == "cpu" and _fusable(p.dtype)):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of supported "
            "devices: ['cpu'] with dtype float32, float64, bfloat16 or float16 (or "
            "complex64/complex128), "
            f"but {p.dtype} and {p.device.type}"
        )


def _fusable(dtype: torch.dtype) -> bool:
    """Whether the CPU kernels cover params of ``dtype`` (complex runs on its real view)."""
    return dtype != torch.complex32 and numba_cpu.supports(dtype.to_real())


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (any dim order): the kernels walk its storage as a flat array."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _triton(p: torch.Tensor) -> bool:
    """Whether the Triton kernels are the fused (and default) implementation for ``p``."""
    return triton_gpu.wanted(p.device) and triton_gpu.supports(p.dtype.to_real())


def _backend(group: dict, p: torch.Tensor, sparse: bool) -> str:
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused:
        if sparse:
            raise RuntimeError("`fused=True` does not support sparse gradients")
        check_fused(p)
    if group.get("differentiable") or sparse:
        return "reference"
    if fused:
        return "triton" if _triton(p) else "numba"
    if foreach:
        return "foreach"
    if fused is None and foreach is None:
        if _triton(p):
            return "triton"
        if p.device.type == "cpu":
            return "numba" if _fusable(p.dtype) and numba_cpu.available() else "reference"
        return "foreach"
    return "reference"


def _like(t: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether ``t`` (a grad or state) has ``p``'s shape, dtype and device, as the fused kernels
    assume."""
    return t.shape == p.shape and t.dtype == p.dtype and t.device == p.device


def _contiguous(p: torch.Tensor, g: torch.Tensor, state: dict, names: list[str]) -> bool:
    """The fast path of the fused kernels' layout check: param, grad and state all contiguous,
    and the grad and state like the param."""
    if not (p.is_contiguous() and g.is_contiguous() and _like(g, p)):
        return False
    for n in names:
        t = state.get(n)
        if t is not None and not (t.is_contiguous() and _like(t, p)):
            return False
    return True


def _layout(p: torch.Tensor, g: torch.Tensor, state: dict, names: list[str], backend: str):
    """The slow path of the fused kernels' layout check: (backend, grad) for a non-contiguous param
    or a grad or state unlike it."""
    tensors = [state[n] for n in names if n in state]
    if not all(_like(t, p) for t in [g, *tensors]):
        # a wrong checkpoint, a grad set through .data: torch's math (its promotion or its error)
        return "reference", g
    if not _dense(p) or any(not _dense(t) or t.stride() != p.stride() for t in tensors):
        return "reference", g  # views with gaps: the flat kernel cannot walk them
    if g.stride() != p.stride() or not _dense(g):
        g = torch.empty_like(p).copy_(g)  # a grad laid out like the param
    return backend, g


def _real_views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.view_as_real(t) for t in tensors]


def _bump_steps(steps: list[torch.Tensor], as_tensors: bool) -> list:
    """Add 1 to every ``step`` tensor; return the new values (or the tensors themselves)."""
    if as_tensors:
        torch._foreach_add_(steps, 1)
        return steps  # stay on the device: no host sync
    values = numba_cpu.bump_steps(steps) if numba_cpu.available() else None
    if values is None:
        torch._foreach_add_(steps, 1)
        values = torch.stack(steps).tolist()  # one host read for the whole group
    return values


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
        if isinstance(spec, ScalarState):
            value = group[spec.key] if spec.key else spec.value
            device = p.device if spec.on_param_device or group.get("capturable") else "cpu"
            state[spec.name] = torch.as_tensor(value, dtype=scalar_dtype(), device=device).clone()
        elif isinstance(spec, Zeros):
            state[spec.name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif isinstance(spec, Fill):
            value = to_scalar(group[spec.key])
            if p.is_complex():  # the real and imaginary parts are two independent reals
                value = complex(value, value)
            state[spec.name] = torch.full_like(p, value, memory_format=torch.preserve_format)
    return state


def init_state(opt, group: dict, params) -> None:
    """Create the state of ``params`` now (torch's Adagrad does it at construction)."""
    specs = [s for s in opt.rule.state if s.wanted(group)]
    for p in params:
        if not opt.state[p]:
            opt.state[p].update(_new_state(opt.rule, group, p, specs))


def _by_step(entries: list, steps: list | None) -> dict:
    """Indices of ``entries`` grouped by step value (a tensor step stands for itself)."""
    out: dict = defaultdict(list)
    for i in range(len(entries)):
        out[None if steps is None else steps[i]].append(i)
    return out


def _scalar_hook(hook, group: dict, entries: list, steps, scalar_names: list[str]) -> None:
    for step, idx in _by_step(entries, steps).items():
        hook(group, step, {n: [entries[i][2][n] for i in idx] for n in scalar_names})


class _Plan:
    """A group's pointer table from its last one-pass step, reused while nothing it rests on changed.

    Rebuilding the table costs about 2 us of Python per param, which dominates a step over many small
    tensors. Each step still checks, in C-level passes over the group (``map``, no Python per
    param), that the same params have grads; that each param keeps its address, numel and
    contiguity; that the state tensors are the same objects at the same addresses; and that every
    grad is a dense, contiguous CPU tensor of the param's dtype and numel. Anything else makes
    :func:`_steady_step` check afresh.

    Identity is checked by ``id``: the plan holds weak references whose callbacks mark it dead
    when a param or state tensor is freed, before its ``id`` can be reused. So it keeps nothing
    alive, and a step creates no weak references.
    """

    __slots__ = (
        "dead",
        "refs",
        "ids",
        "mask",
        "names",
        "state_of",
        "at",
        "state_ids",
        "ptrs",
        "numels",
        "dtype",
        "tables",
        "steps",
    )

    def __init__(self, opt, group_params, mask, params, states: dict, steps: list, tables: tuple):
        self.mask = mask  # which params have grads; None when all do
        names = [*states, "step"] if steps else list(states)
        tensors = [*states.values(), steps] if steps else list(states.values())
        # state tensors param by param, as itemgetter(*names) gives them from the state dicts
        self.names = names
        self.state_of = itemgetter(*names) if names else None
        by_param = list(chain.from_iterable(zip(*tensors)))
        self.dead: list = []  # a callback appends here: a param or state tensor was freed
        self.refs = [weakref.ref(t, self.dead.append) for t in chain(group_params, by_param)]
        self.ids = list(map(id, group_params))
        self.state_ids = list(map(id, by_param))
        # where these params' states start in opt.state (_state_dicts checks the order each step)
        first = params[0]
        self.at = next((i for i, k in enumerate(opt.state) if k is first), None) if names else None
        self.ptrs = list(map(_DATA_PTR, chain(params, by_param)))
        self.numels = list(map(_NUMEL, params))
        self.dtype = params[0].dtype
        self.tables = tables  # numba_cpu.table(); the grad row is refilled every step
        self.steps = (np.array(list(map(_DATA_PTR, steps))), steps[0].dtype) if steps else None

    def _state_dicts(self, opt, params: list) -> list:
        """``opt.state[p]`` for each param (None where it has none). ``opt.state.get`` hashes each
        param through ``Tensor.__hash__``, a Python function: while the params sit in
        ``opt.state`` in order, reading its entries there takes no Python call per param."""
        if self.at is not None:
            stop = self.at + len(params)
            keys = list(islice(opt.state, self.at, stop))
            if len(keys) == len(params) and all(map(is_, keys, params)):
                return list(islice(opt.state.values(), self.at, stop))
        return list(map(opt.state.get, params))

    def match(self, opt, group: dict):
        """``(params, grads, grad data pointers, state tensors by name)`` of this step if the plan
        still holds, else None."""
        gps = group["params"]
        if self.dead or list(map(id, gps)) != self.ids:
            return None
        grads = list(map(_GRAD, gps))
        mask = list(map(is_not, grads, repeat(None)))
        if all(mask):
            if self.mask is not None:
                return None
            params = gps
        else:
            if mask != self.mask:
                return None
            params, grads = list(compress(gps, mask)), list(compress(grads, mask))
        tensors = []  # state tensors param by param
        if self.names:  # torch's SGD without momentum keeps no state
            try:
                states = self._state_dicts(opt, params)  # None: TypeError below
                tensors = list(map(self.state_of, states))
                if len(self.names) > 1:
                    tensors = list(chain.from_iterable(tensors))
            except (KeyError, TypeError):  # a state or one of its tensors is gone
                return None
            if list(map(id, tensors)) != self.state_ids:
                return None
        if (
            list(map(_DATA_PTR, chain(params, tensors))) != self.ptrs
            or list(map(_NUMEL, params)) != self.numels
            or not all(map(_IS_CONTIGUOUS, params))
            or not all(map(is_, map(_LAYOUT, grads), repeat(torch.strided)))
            or list(map(_NUMEL, grads)) != self.numels
            or not all(map(_IS_CONTIGUOUS, grads))
            or not all(map(is_, map(_DTYPE, grads), repeat(self.dtype)))
            or not all(map(_IS_CPU, grads))
        ):
            return None
        k = len(self.names)
        by_name = {n: tensors[i::k] for i, n in enumerate(self.names)}
        return params, grads, list(map(_DATA_PTR, grads)), by_name


def _steady_step(opt, group: dict, names: list[str]) -> bool:
    """The usual step: all on CPU in one real dtype that the fused kernel takes, grads dense and
    contiguous, states complete, contiguous and like their param. Returns False, having changed
    nothing, when any of that does not hold; the general path then runs.

    Per-param Python dominates a step over many small tensors: this path does only what every
    step needs (the checks, the pointers) and leaves first steps and odd layouts to the other.
    A :class:`_Plan` keeps the pointers between steps, so that most steps only check them.
    """
    rule = opt.rule
    plans = opt.__dict__.setdefault("_steady_plans", {})
    plan = plans.get(id(group))
    found = plan.match(opt, group) if plan is not None else None
    if plan is not None and found is None:
        del plans[id(group)]  # stale: checking it again next step would only cost time
    if found is not None and _backend(group, found[0][0], False) == "numba":
        params, grads, grad_ptrs, states = found
        if plan.steps is None:
            return _run_steady(rule, group, None, plan.tables, grad_ptrs, plan.dtype, names)
        values = numba_cpu.bump_at(*plan.steps)
        if values.min() == values.max():
            step = float(values[0])
            return _run_steady(rule, group, step, plan.tables, grad_ptrs, plan.dtype, names)
        _run_by_step(rule, group, values.tolist(), params, grads, {n: states[n] for n in names})
        return True

    params, grads, steps = [], [], []
    states: dict[str, list] = {n: [] for n in names}
    dtype = None
    keeps_state = rule.has_step or bool(names)  # torch's SGD without momentum keeps none
    dtensor = _dtensor.dtensor_type()  # None unless torch.distributed.tensor is imported
    for p in group["params"]:
        g = p.grad
        if g is None:
            continue
        if dtensor is not None and isinstance(p, dtensor):
            return False  # shards and placements: the general path
        state = opt.state.get(p) if keeps_state else {}
        if dtype is None:
            dtype = p.dtype
            if dtype.is_complex or not p.is_cpu or _backend(group, p, False) != "numba":
                return False
        if (
            (keeps_state and not state)
            or g.is_sparse
            or p.dtype != dtype
            or not p.is_cpu
            or any(n not in state for n in names)
            or not _contiguous(p, g, state, names)  # and grad and state like the param
        ):
            return False
        for n in names:
            states[n].append(state[n])
        params.append(p)
        grads.append(g)
        if rule.has_step:
            steps.append(state["step"])
    if not params:
        return False
    values = None
    if rule.has_step:
        values = numba_cpu.bump_steps(steps)  # None (and nothing bumped) for odd step tensors
        if values is None:
            return False
        if min(values) != max(values):  # params that joined the group later: one batch each
            _run_by_step(rule, group, values, params, grads, states)
            return True
    tables = numba_cpu.table(params, grads, states)
    gps = group["params"]
    mask = None if len(params) == len(gps) else [p.grad is not None for p in gps]
    plans[id(group)] = _Plan(opt, gps, mask, params, states, steps, tables)
    step = values[0] if values else None
    return _run_steady(rule, group, step, tables, tables[0][1], dtype, names)


def _run_steady(rule, group, step, tables, grad_ptrs, dtype, names) -> bool:
    """One launch over ``tables`` (:func:`numba_cpu.table`) with this step's ``grad_ptrs``."""
    ptrs = tables[0].copy()  # the plan's table stays as it is, should two threads step at once
    ptrs[1] = grad_ptrs
    flags = Flags(rule.flags(group, False, step, {}))
    operands = ("param", "grad", *names)
    scalars = rule.scalars(group, step, {})
    numba_cpu.launch(rule, flags, scalars, operands, dtype, (ptrs, *tables[1:]))
    return True


def _run_by_step(rule, group, values, params, grads, states) -> None:
    """One launch per step value: params that joined the group later are at other steps."""
    for value in sorted(set(values)):
        pick = [i for i, v in enumerate(values) if v == value]
        batch = {n: [ts[i] for i in pick] for n, ts in states.items()}
        picked = [grads[i] for i in pick]
        tables = numba_cpu.table([params[i] for i in pick], picked, batch)
        _run_steady(rule, group, value, tables, tables[0][1], params[0].dtype, list(batch))


def amp_scaling(opt) -> bool:
    """Whether every param of ``opt`` steps in the Triton kernels, which unscale grads and skip
    inf steps themselves: torch's ``_step_supports_amp_scaling``, read by GradScaler."""
    if opt.rule is None:
        return False
    try:
        return all(_backend(g, p, False) == "triton" for g in opt.param_groups for p in g["params"])
    except RuntimeError:  # fused=True on a param no fused kernel covers: step() will say so
        return False


def _amp(opt, rule, pending: list) -> tuple:
    """GradScaler's ``grad_scale`` and ``found_inf`` (attributes it sets on the optimizer around
    ``step``), checked before any change: only the Triton kernels take them, as in torch only the
    fused kernels do."""
    grad_scale, found_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    if (grad_scale is not None or found_inf is not None) and any(
        entry[2] != "triton" for entry in pending
    ):
        raise AssertionError("Expected grad_scale and found_inf to be None")
    return grad_scale, found_inf


def apply_rule(opt, group: dict) -> None:
    """One step of ``opt.rule`` on every param of ``group`` that has a grad."""
    rule = opt.rule
    all_specs = [s for s in rule.state if s.wanted(group)]
    scalar_names = [s.name for s in all_specs if isinstance(s, ScalarState)]
    specs = [s for s in all_specs if not isinstance(s, ScalarState)]  # what kernels see
    names = [s.name for s in specs]
    amp = (
        getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None
    )
    if not (scalar_names or amp or group.get("capturable")) and _steady_step(opt, group, names):
        return
    firsts = [s.name for s in specs if isinstance(s, FirstValue)]
    keeps_state = rule.has_step or bool(all_specs)  # torch's SGD without momentum keeps none
    capturable = bool(group.get("capturable"))
    # First every check that can fail, so that an error leaves params and state untouched.
    backends: dict[tuple, str] = {}
    pending = []  # (param, grad, backend, kind)
    for p in group["params"]:
        g = p.grad
        if g is None:
            continue
        sparse = g.is_sparse
        if sparse:
            if not rule.sparse_ok:
                raise RuntimeError(rule.sparse_error)
            rule.check_sparse(group, p, g)
        kind = (p.device, p.dtype, sparse)
        backend = backends.get(kind) or backends.setdefault(kind, _backend(group, p, sparse))
        if capturable:
            step = opt.state[p]["step"] if p in opt.state and opt.state[p] else None
            # (Triton on CPU is its interpreter, which runs the capturable kernels for the tests)
            if (p.device.type not in _CAPTURABLE_DEVICES and backend != "triton") or (
                step is not None and step.device != p.device
            ):
                raise AssertionError(
                    "If capturable=True, params and state_steps must be on supported devices: "
                    f"{_CAPTURABLE_DEVICES}."
                )
        pending.append((p, g, backend, kind))
    grad_scale, found_inf = _amp(opt, rule, pending)
    if found_inf is not None and scalar_names and found_inf.item():
        return  # host scalar state (NAdam's mu_product) must not advance: one host read here
    entries = []  # (param, grad, state, first, backend, kind)
    for p, g, backend, kind in pending:
        state = opt.state[p] if keeps_state else {}
        if keeps_state and not state:
            state.update(_new_state(rule, group, p, all_specs))
        if backend == "numba" and _dtensor.is_dtensor(p):  # FSDP2: the kernel runs on shards
            backend = _dtensor.fused_backend(p, g, state, names)
        elif backend in ("numba", "triton") and not _contiguous(p, g, state, names):
            backend, g = _layout(p, g, state, names, backend)
        first = bool(firsts) and any(n not in state for n in firsts)
        entries.append((p, g, state, first, backend, kind))
    if not entries:
        return
    if (
        group.get("differentiable")
        and rule.has_step
        and any(e[2]["step"].requires_grad for e in entries)
    ):
        raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
    # capturable and differentiable compute host scalars from the step tensors, as torch does
    on_tensors = capturable or bool(group.get("differentiable"))
    if rule.has_step and not on_tensors:
        # fused=True keeps the steps on the GPU: the Triton kernels take scalars computed there,
        # as in the capturable case, instead of reading the steps back to the host
        on_tensors = all(e[4] == "triton" and not e[2]["step"].is_cpu for e in entries)
    steps = _bump_steps([e[2]["step"] for e in entries], on_tensors) if rule.has_step else None

    if scalar_names:
        _scalar_hook(rule.before, group, entries, steps, scalar_names)
        # one host read per scalar state for the whole group; batches split by value
        values = [torch.stack([e[2][n] for e in entries]).tolist() for n in scalar_names]
        svs = [tuple(v) for v in zip(*values)]
    else:
        svs = [()] * len(entries)

    # Entries that share backend, kind, first-step-ness, step and scalar states run as one batch.
    # Usually that is all of them: then the group is one batch, without a key per param.
    batches: dict[tuple, tuple[list, list]] = {}
    kinds = {(e[3], e[4], e[5]) for e in entries}
    if (
        len(kinds) == 1
        and not entries[0][5][2]  # not sparse
        and not on_tensors
        and (steps is None or min(steps) == max(steps))
        and svs.count(svs[0]) == len(svs)
    ):
        _, _, _, first, backend, kind = entries[0]
        batches[(backend, kind, first, None, svs[0])] = (
            [None if steps is None else steps[0]],
            entries,
        )
    else:
        for i, entry in enumerate(entries):
            p, g, state, first, backend, kind = entry
            step = None if steps is None else steps[i]
            if kind[2] and rule.sparse_update is not None:
                rule.sparse_update(group, p, g, state, step)
                continue
            key_step = id(step) if on_tensors else step
            if on_tensors and backend == "triton" and not rule.flags_read_step:
                key_step = "stacked"  # device steps of a whole batch, one launch
            key = (backend, kind, first, key_step, svs[i])
            batch_steps, batch = batches.setdefault(key, ([], []))
            batch_steps.append(step)
            batch.append(entry)

    for (backend, (_, dtype, _), first, key_step, sv), (batch_steps, batch) in batches.items():
        sv = dict(zip(scalar_names, sv))
        step = batch_steps[0]
        if key_step == "stacked" and len(batch) > 1:
            # the rule's scalars, computed on a 1-D tensor of steps, give one value per param
            step = torch.stack(batch_steps)
        flags = Flags(rule.flags(group, first, step, sv))
        scalars = rule.scalars(group, step, sv)
        if firsts:
            for p, g, state, *_ in batch:
                for name in firsts:
                    if name not in state:  # like the grad: torch's first buffer is a clone of it
                        state[name] = torch.empty_like(g if g.is_sparse else p)
        params = [e[0] for e in batch]
        grads = [e[1] for e in batch]
        states = {n: [e[2][n] for e in batch] for n in names}
        if backend == "numba" and _dtensor.any_dtensor(params):  # FSDP2: the kernel runs on shards
            shards = [_dtensor.local_shards(e[0], e[1], e[2], names) for e in batch]
            params, grads = [s[0] for s in shards], [s[1] for s in shards]
            states = {n: [s[2][n] for s in shards] for n in names}
        if dtype.is_complex:  # as torch: complex math is real math on the (re, im) view
            params, grads = _real_views(params), _real_views(grads)
            states = {n: _real_views(ts) for n, ts in states.items()}
        if backend == "triton":
            kernels.get(backend).run(
                rule, flags, scalars, params, grads, states, grad_scale, found_inf
            )
        else:
            kernels.get(backend).run(rule, flags, scalars, params, grads, states)
    if found_inf is not None and rule.has_step:
        # as torch's fused optimizers: a skipped step does not count
        steps_ = [e[2]["step"] for e in entries]
        torch._foreach_sub_(steps_, [found_inf.to(s.device) for s in steps_])
    if scalar_names:
        _scalar_hook(rule.after, group, entries, steps, scalar_names)
