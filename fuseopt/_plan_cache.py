"""A group's plan from an earlier step, reused while every fact it rests on holds.

Checking a param afresh costs microseconds of Python; over many small tensors that is most of a
step. So for a group whose step was checked in full and ran in one round (one dtype, real
contiguous CPU tensors, standard steps, no state made in that step), :class:`PlanCache` keeps
which backend took each param and the facts of its tensors (:mod:`fuseopt._facts`: never the
tensors, so nothing is kept alive), and at every later step re-establishes K1-K6 of
:mod:`fuseopt._plan` by reading every one of those facts again, in bulk:

- K1: the same operand names and the same ``fused``/``foreach`` options; the same params (by
  id), the same of them with grads, and each one's state holds a tensor under each name (not
  necessarily the same object: the facts below are what the kernel relies on);
- K2-K4 and K6 for params, states and steps: every fact (address, dtype, device, layout,
  contiguity, storage size and offset, shape) as when the step was checked in full, and no
  negative bit (real dtypes have no conjugate bit);
- K2-K4 for this step's grads: the params' dtype, device, layout, contiguity and shape, no
  negative bit, and inside their storage;
- K5: this step's grads reach no memory that a param, state or step occupies (those kept their
  addresses and sizes, so they still do not overlap one another).

What the full check concluded from those facts then holds again: each param's backend, that it
needs no rounding (one dtype) and no round of its own. A group that ran on numba alone gets its
address table back with this step's grad addresses, its step values and scalar states computed
in bulk (no Python per param); any other gets its entries back, and
:func:`~fuseopt._plan.plan_group` plans their steps, scalar states and launches as in a full
check. Anything else drops the cache, and the step takes the full check.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain, compress, islice, repeat
from operator import attrgetter, is_, is_not, itemgetter

import numpy as np
import torch

from fuseopt import _dtensor, _facts, _quant, _storage
from fuseopt._plan import Entry, GroupPlan, Launch, launch_flags, nan_safe, scalar_states
from fuseopt.kernels import numba_cpu

_GRAD = attrgetter("grad")
_NEG, _NUMEL = torch.Tensor.is_neg, torch.Tensor.numel
_CONTIGUOUS = torch.Tensor.is_contiguous
# the columns a grad shares with its param: dtype, CPU, strided, contiguous, dim and sizes
_LIKE = [1, 2, 3, 4, *range(7, _facts.NFACTS)]
_CACHED = ("numba", "foreach", "reference")  # backends whose entries the cache can give back


def _options(group: dict) -> tuple:
    """The group options that choose backends and operands: the same at every cached step."""
    keys = (
        "fused", "foreach", "state_dtype", "stochastic_rounding", "kahan_sum", "state_bits",
        "min_8bit_size",
    )  # fmt: skip
    return tuple(group.get(k) for k in keys)


def _operand_names(launches: list, names: list) -> list:
    """The state operands of the launches: the rule's, ``kahan_comp`` where they carry one, and
    the scales of 8-bit states (every launch of a cached group is alike: one dtype per operand,
    one backend kind, the same 8-bit states; K10 rests on the scales' facts as on the codes')."""
    out = list(names)
    if launches and launches[0].kahan:
        out.append(_storage.KAHAN)
    if launches and launches[0].quant:
        out += [_quant.absmax_key(n) for n, _ in launches[0].quant]
    return out


class PlanCache:
    """See the module docstring."""

    __slots__ = (
        "names", "options", "ids", "mask", "getters", "steps", "at", "facts", "expect",
        "itemsize", "numels", "starts", "stops", "step_ptrs", "step_dtype", "launch",
        "backends", "kind", "scalar_names", "ndims", "wide", "kahan", "operand_names", "quant",
    )  # fmt: skip

    @staticmethod
    def plan(opt, group: dict, names: list, scalar_names: list) -> GroupPlan | list[Entry] | None:
        """This step of ``group`` from its cache, if it has one that still holds: the plan of its
        numba launch, or its entries (see the module docstring)."""
        caches = opt.__dict__.get("_plan_caches")
        cache = caches.get(id(group)) if caches else None
        if cache is None:
            return None
        plan = cache._plan(opt, group, names, scalar_names)
        if plan is None:
            del caches[id(group)]  # stale: checking it again next step would only cost time
        return plan

    @staticmethod
    def remember(opt, group: dict, names: list, scalar_names: list, entries: list, plan: GroupPlan):
        """Keep what the full check of ``plan`` found for ``group``, where the cache can
        re-check it."""
        made, _, launches = plan.rounds[0]
        gps = group["params"]
        params = [e.param for e in entries]
        states = [e.state for e in entries]
        has_step = opt.rule.has_step
        if (
            made
            or any(e.first for e in entries)  # a first value not in the state yet
            or any(e.backend not in _CACHED or e.odd or e.kind[2] for e in entries)
            or len(entries) != len({id(p) for p in gps if p.grad is not None})
            or any(p.layout != torch.strided or p.is_complex() or not p.is_cpu for p in params)
            or any(e.grad.layout != torch.strided or _dtensor.is_dtensor(e.param) for e in entries)
            or len({p.dtype for p in params}) > 1
            or not all(map(_CONTIGUOUS, chain(params, (e.grad for e in entries))))
            or len({launch.quant for launch in launches}) > 1  # (8-bit and full-precision)
            or not all(_CONTIGUOUS(s[n]) for s in states for n in _operand_names(launches, names))
            or (has_step and len({s["step"].dtype for s in states}) > 1)
            or (has_step and not all(_facts.standard_step(s["step"]) for s in states))
            or any(p.dim() > _facts.MAXDIM for p in params)
            or len({launch.dtypes for launch in launches}) > 1  # (states of several dtypes)
            or any(e.extra for e in entries)
        ):
            return
        cache = PlanCache()
        cache.names, cache.scalar_names = names, scalar_names
        cache.options = _options(group)
        cache.ids = list(map(id, gps))
        mask = [p.grad is not None for p in gps]
        cache.mask = None if all(mask) else mask
        # (a compensated bfloat16 param's kahan_comp: an operand after the rule's states)
        cache.kahan = bool(launches) and launches[0].kahan
        cache.quant = launches[0].quant if launches else ()
        cache.operand_names = all_names = _operand_names(launches, names)
        cache.getters = [itemgetter(n) for n in all_names]
        cache.steps = itemgetter("step") if has_step else None
        first = params[0]
        keeps = names or has_step
        cache.at = next((i for i, k in enumerate(opt.state) if k is first), None) if keeps else None
        tensors = cache._tensors(params, states)
        cache.facts = _facts.read_python(tensors)  # (the full check's own accessors)
        cache.expect = cache.facts[: len(params)][:, _LIKE]
        cache.itemsize = first.element_size()
        numels = tuple(map(_NUMEL, params))
        cache.numels = np.array(numels, dtype=np.int64)
        spans = sorted(s for s in map(_facts.span, tensors) if s is not None)
        cache.starts = np.array([s[0] for s in spans], dtype=np.int64)
        cache.stops = np.array([s[1] for s in spans], dtype=np.int64)
        cache.step_ptrs = cache.facts[len(tensors) - len(states) :, 0].copy() if has_step else None
        cache.step_dtype = states[0]["step"].dtype if has_step else None
        cache.backends = [e.backend for e in entries]
        cache.ndims = tuple(p.dim() for p in params)
        cache.kind = entries[0].kind
        cache.wide = (launches[0].wide, launches[0].sr)  # (the facts keep each tensor's dtype)
        cache.launch = None
        if all(launch.backend == "numba" for launch in launches):
            n = len(params)  # numba launches only: their address table
            table = cache.facts[: (1 + len(all_names)) * n, 0].reshape(1 + len(all_names), n)
            table = np.insert(table, 1, np.zeros(n, dtype=np.int64), axis=0)  # the grads' row
            cache.launch = (("param", "grad", *all_names), launches[0].dtypes, numels, table)
        opt.__dict__.setdefault("_plan_caches", {})[id(group)] = cache

    def _tensors(self, params: list, states: list) -> list:
        """Params, then each state name's tensors (the launch's rows), then the steps."""
        out = list(params)
        for getter in self.getters:
            out.extend(map(getter, states))
        if self.steps is not None:
            out.extend(map(self.steps, states))
        return out

    def _state_dicts(self, opt, params: list) -> list:
        """``opt.state[p]`` for each param. ``opt.state.get`` hashes each param through
        ``Tensor.__hash__``, a Python function: while the params sit in ``opt.state`` in order,
        reading its entries there takes no Python call per param."""
        if self.at is not None:
            stop = self.at + len(params)
            keys = list(islice(opt.state, self.at, stop))
            if len(keys) == len(params) and all(map(is_, keys, params)):
                return list(islice(opt.state.values(), self.at, stop))
        return list(map(opt.state.get, params))

    def _plan(self, opt, group: dict, names: list, scalar_names: list) -> GroupPlan | list | None:
        """Re-establish K1-K6 (see the module docstring); the plan, or None where anything
        moved."""
        gps = group["params"]
        options = _options(group)
        if (
            names != self.names
            or scalar_names != self.scalar_names
            or options != self.options
            or list(map(id, gps)) != self.ids
        ):
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
        try:
            states = self._state_dicts(opt, params) if self.at is not None else None
            tensors = self._tensors(params, states) if states is not None else list(params)
            everything = tensors + grads
            if any(map(_NEG, everything)):
                return None
            facts = _facts.read(everything)  # RuntimeError: a tensor without storage
        except (KeyError, TypeError, RuntimeError):  # (a state gone, a non-tensor)
            return None
        kept, g = facts[: len(tensors)], facts[len(tensors) :]
        if not (np.array_equal(kept, self.facts) and np.array_equal(g[:, _LIKE], self.expect)):
            return None
        size = self.numels * self.itemsize
        if ((g[:, 6] * self.itemsize + size) > g[:, 5]).any():  # K4: inside their storage
            return None
        # K5: a grad starting inside, or running into, a range the launch writes
        grad_ptrs = g[:, 0]
        some = size > 0
        if some.any() and len(self.starts):
            starts, stops = grad_ptrs[some], grad_ptrs[some] + size[some]
            at = np.searchsorted(self.starts, starts, side="right")
            inside = (at > 0) & (self.stops[np.maximum(at - 1, 0)] > starts)
            nxt = self.starts[np.minimum(at, len(self.starts) - 1)]
            if (inside | ((at < len(self.starts)) & (nxt < stops))).any():
                return None
        if self.launch is not None:
            return self._launches(opt, group, grad_ptrs, states)
        return self._entries(params, grads, states)

    def _entries(self, params: list, grads: list, states: list | None) -> list[Entry]:
        """The entries of this step: each param on the backend the full check chose for it."""
        entries = []
        names, kind = self.operand_names, self.kind
        if states is None:  # (the rule keeps no state under these options)
            states = [{} for _ in params]
        for p, g, state, backend in zip(params, grads, states, self.backends):
            e = Entry(p, g, state, backend, kind)
            e.wide = bool(self.wide[0])
            e.quant = self.quant
            if self.steps is not None:
                e.step = state["step"]
            if backend == "numba":  # (real, contiguous, one dtype: the tensors themselves)
                e.views = (p, g, {n: state[n] for n in names})
            entries.append(e)
        return entries

    def _launches(self, opt, group: dict, grad_ptrs: np.ndarray, states) -> GroupPlan:
        """The plan: the kept launch with this step's grads, one per step value and scalar
        states (usually one)."""
        rule = opt.rule
        plan = GroupPlan(opt, group, rule)
        table = self.launch[3].copy()  # the kept one stays as it is, should two threads step
        table[1] = grad_ptrs
        n = table.shape[1]
        bumps = []
        if self.steps is None:
            values = [None] * n
        else:
            steps, dtype = self.step_ptrs, self.step_dtype
            values = numba_cpu.bumped(numba_cpu.read_at(steps, dtype), dtype)
            bumps.append(lambda: numba_cpu.bump_at(steps, dtype))
        svs = [()] * n
        if self.scalar_names:
            svs, plan.after = scalar_states(rule, group, states, values, self.scalar_names, None)
        if svs.count(svs[0]) == n and (not rule.reads_step or values.count(values[0]) == n):
            launches = [self._launch(rule, group, values[0], svs[0], table, None)]  # (NaN: below)
        else:  # params that joined later, a step rewound: a launch per value
            by_value: dict = defaultdict(list)
            for i, (v, sv) in enumerate(zip(values, svs)):
                by_value[nan_safe(v) if rule.reads_step else None, sv].append(i)
            launches = [
                self._launch(rule, group, values[idx[0]], svs[idx[0]], table, idx)
                for idx in by_value.values()
            ]
        plan.rounds.append(([], bumps, launches))
        return plan

    def _launch(self, rule, group, step, sv, table, idx) -> Launch:
        """The kept launch at ``step`` and scalar states ``sv``, over the tensors ``idx`` (None:
        all of them)."""
        operands, dtypes, numels, _ = self.launch
        sv = dict(zip(self.scalar_names, sv))
        flags = launch_flags(rule, group, False, step, sv)
        launch = Launch("numba", rule, flags, rule.scalars(group, step, sv), operands, [[]])
        launch.dtype, launch.dtypes = dtypes[0], dtypes
        launch.wide, launch.sr = self.wide
        launch.kahan, launch.quant = self.kahan, self.quant
        if idx is None:
            launch.numels, launch.table, launch.ndims = numels, table, self.ndims
        else:
            launch.numels = tuple(numels[i] for i in idx)
            launch.table = np.ascontiguousarray(table[:, idx])
            launch.ndims = tuple(self.ndims[i] for i in idx)
        # (compiled before anything changes)
        numba_cpu.kernel(rule, flags, operands, dtypes, True, launch.sr, launch.kahan, self.quant)
        return launch
