"""The step plan: what one ``optimizer.step()`` will do, all of it checked before anything changes.

:func:`plan_step` reads the optimizer (groups, grads, state, options) and raises on anything that
cannot step; it changes nothing. :meth:`GroupPlan.run` then attaches the state it prepared,
advances the step counters and scalar states, and makes one call per batch to a backend of
:mod:`fuseopt.kernels`. A step that fails leaves params, state and counters as they were.

**What a fused kernel may assume.** The kernels read and write raw addresses, so this module is
the one place that establishes, at every step and before any address is read:

- K1 *operands*: the launch's operands are ``param``, ``grad`` and the states that the group's
  options call for now, and each of those states exists;
- K2 *kind*: every tensor is strided, on the launch's device (the host's for numba), of its
  operand's dtype in the launch (``Launch.dtypes``, the kernel's pointer types: the param's
  dtype for param and grad; for each state the param's, or, in a group with a storage format
  (:mod:`fuseopt._storage`), the group's ``state_dtype``; complex params: their real views),
  without the negative or conjugate bit;
- K3 *layout*: every grad and state has its param's shape and strides, and the param is dense
  (no gaps, no overlap): the kernel walks the three as flat arrays of the same length;
- K4 *bounds*: every tensor's storage holds each byte its shape, strides and offset address;
- K5 *no aliasing*: no memory that a launch writes (params, states) is reached through another
  tensor of the launch (grads are only read: they may share memory among themselves);
- K6 *counters*: a ``step`` that the host bumps through its address is a CPU float32/float64
  tensor of one element, with K2 and K4.
- K7 *reductions* (``max_grad_norm``, ``skip_if_nonfinite``, a rule's ``reduce``: LARS, Lamb):
  the first pass (:mod:`fuseopt._first_pass`) runs after every group is planned and reads, through
  the numba launches' address tables, only rows those launches hold (the grads for the norms;
  a rule's sums read its operands), so K1-K5 of those launches are its assumptions too; it
  writes nothing but a float64 slot per chunk of a host array it allocates.
- K8 *per-tensor scalars*: a scalar with a value per tensor (a rule's ``tensor_scalars``)
  reaches a kernel as a table with exactly one row per tensor of the launch
  (:func:`~fuseopt.kernels.numba_cpu.scalar_table` raises otherwise), which the kernel indexes
  by the chunk's tensor.
- K9 *storage formats*: a launch whose operands differ in dtype (``wide``) holds only entries
  whose tensors K2 admits (a grad of another dtype, or a state of a third one, is ``odd``: torch's
  for-loop math); stochastic rounding reads no memory beyond its operands (its random bits are
  a function of the launch's seed, a runtime scalar, and each element's index).
- K10 *8-bit states* (``state_bits=8``, :mod:`fuseopt._quant`): an 8-bit state of a kernel
  entry is two operands, its codes (uint8, the param's shape, contiguous: the param is
  contiguous too, so that blocks of :data:`~fuseopt._quant.BLOCK` run in the flat order of
  both) and its ``absmax`` (float32, contiguous, exactly ``blocks(numel)`` elements), on the
  param's device, K4 for both, and neither reaching memory of the other nor of any other tensor
  of the launch (K5: :func:`~fuseopt._facts.bits_problem`). A launch starts every tensor at its
  element 0 and cuts it into chunks of a multiple of a block, so that a chunk holds whole blocks.
  The kernels' maps are module-owned constants whose sizes are checked when they are built
  (:mod:`fuseopt.kernels._numba_ops`; Triton's ``_quant_maps``, one copy per device); a code
  (below 256) is the only index a kernel forms into them. Codes of another dtype or shape, an
  ``absmax`` of another dtype or size, or one missing are errors on every path
  (:func:`_check_bits`); an 8-bit state that only no longer fits a kernel (a param made
  non-contiguous, codes or scales laid out otherwise or sharing memory) takes the for-loop.

A step checked in full establishes K2-K5 and K10 per param (:func:`~fuseopt._facts.entry_check`,
:func:`~fuseopt._facts.bits_problem`, with its grad and state) and K6 per counter
(:func:`~fuseopt._facts.standard_step`); a group seen
before is re-checked by :mod:`fuseopt._plan_cache`, which reads every fact of every tensor again
(:mod:`fuseopt._facts`). A param that fails K2, K3 or K5 within itself takes the for-loop
implementation (torch's ops decide: its numbers, or its error), a grad merely laid out otherwise
is copied into its param's layout, and a tensor that fails K4 is an error on every path. Params
whose memory overlaps run in successive rounds, one after the other, as torch's for-loop steps
them.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from operator import attrgetter

import numpy as np
import torch

from fuseopt import _dtensor, _first_pass, _quant, _storage, kernels
from fuseopt._dispatch import CAPTURABLE_DEVICES, KERNELS, backend_for, empty_codes, new_state
from fuseopt._facts import (
    STEP_DTYPES,
    bits_problem,
    broadcasts,
    entry_check,
    overlap,
    self_overlapping,
    span,
    standard_step,
    storage_problem,
)  # fmt: skip
from fuseopt.kernels import numba_cpu
from fuseopt.rule import FirstValue, Flags, ScalarState, Zeros

_DTYPE = attrgetter("dtype")


# --------------------------------------------------------------------------------- the entries
class Entry:
    """One param of a group with a grad, as this step will step it."""

    __slots__ = (
        "param", "grad", "state", "backend", "kind", "views", "odd", "round",
        "first", "step", "step_value", "sv", "wide", "extra", "quant",
    )  # fmt: skip

    def __init__(self, param, grad, state, backend, kind):
        self.param, self.grad, self.state = param, grad, state
        self.backend, self.kind = backend, kind
        self.views = None  # (param, grad, {name: state}) as a kernel walks them
        self.odd = False  # for-loop with in-place rounding: its tensors differ in dtype
        self.wide = False  # a storage format: computed in float32, each operand its own dtype
        self.extra = None  # {name: tensor} a storage format adds to an existing state (attached
        # when the step runs): a loaded bfloat16 param's first ``kahan_comp``
        self.round = 0
        self.first = False
        self.step = None  # the step tensor
        self.step_value = None  # its value once bumped (a float, or a tensor on the device)
        self.sv = ()
        self.quant = ()  # ((name, signed), ...): its 8-bit states (fuseopt._quant)

    def tensor(self, name: str):
        """The state tensor ``name`` this step reads (one the step will attach included)."""
        t = self.state.get(name)
        return self.extra.get(name) if t is None and self.extra else t


def _step_tensor(state: dict, read: bool) -> torch.Tensor:
    """torch's errors for a ``step`` that a checkpoint or a user made unusable (one that is
    never ``read`` may hold any number of elements: torch only adds 1 to it)."""
    step = state["step"]  # KeyError, as torch
    if not torch.is_tensor(step):
        raise RuntimeError(
            "API has changed, `state_steps` argument must contain a list of singleton tensors"
        )
    if read and step.numel() != 1:
        raise RuntimeError(f"a Tensor with {step.numel()} elements cannot be converted to Scalar")
    return step


def _check_state(rule, specs, state: dict, p: torch.Tensor, where: str) -> None:
    """Errors for a state that lacks a key the options call for (torch's KeyError), or holds a
    tensor torch's ops would fail on mid-step: another shape or device, repeated elements, a
    storage too small for it; and torch's errors for an unusable ``step``."""
    for spec in specs:
        if isinstance(spec, FirstValue) and spec.name not in state:
            continue
        t = state[spec.name]  # KeyError naming the key, as torch
        if isinstance(spec, ScalarState):
            continue
        if not torch.is_tensor(t):
            raise RuntimeError(
                f"{where}: state {spec.name!r} is a {type(t).__name__}, not a Tensor"
            )
        if self_overlapping(t):
            raise RuntimeError(
                f"{where}: state {spec.name!r}: unsupported operation: more than one element of "
                "the written-to tensor refers to a single memory location"
            )
        if t.shape != p.shape:
            raise RuntimeError(
                f"{where}: state {spec.name!r} has shape {tuple(t.shape)}, but the param has "
                f"shape {tuple(p.shape)}"
            )
        if t.device != p.device:
            raise RuntimeError(
                f"{where}: state {spec.name!r} is on {t.device}, but the param is on {p.device}"
            )
        problem = storage_problem(t)
        if problem:
            raise RuntimeError(f"{where}: state {spec.name!r}: {problem}")
    if rule.has_step:
        _step_tensor(state, rule.reads_step)


def _check_bits(rule, group, specs, state: dict, p: torch.Tensor, where: str) -> dict:
    """``{name: signed}`` for the 8-bit states of ``p`` at this step: those its state holds as
    codes (an ``absmax`` beside them, or uint8 codes), and a first value the group would make
    8-bit; errors (K10) for codes or scales that no path can read: another dtype, shape,
    device, a missing ``absmax``."""
    wanted = layout = None  # (what the group would keep in 8 bits, and how: made if needed)
    out = {}
    for spec in specs:
        signed = getattr(spec, "signed", None)
        if signed is None:
            continue
        name, key = spec.name, _quant.absmax_key(spec.name)
        codes = state.get(name)
        if codes is None:  # (a missing Zeros state raised in _check_state)
            if wanted is None:
                wanted = _quant.quantized(rule, group, p)
            if name in wanted:
                out[name] = signed
            continue
        if key not in state and not (torch.is_tensor(codes) and codes.dtype == torch.uint8):
            continue  # a full-precision state
        absmax = state[key]  # KeyError naming the key, as torch's for a missing state
        layout = layout or _quant.layout(p)
        for what, t in (("codes", codes), ("absmax", absmax)):
            dtype, shape = layout[what]
            label = name if what == "codes" else key
            if not torch.is_tensor(t):
                raise RuntimeError(
                    f"{where}: state {label!r} is a {type(t).__name__}, not a Tensor"
                )
            if t.dtype != dtype or t.shape != shape or t.device != p.device:
                raise RuntimeError(
                    f"{where}: 8-bit state {name!r}: its {what} {label!r} must be {dtype} of shape "
                    f"{tuple(shape)} on {p.device}, got {t.dtype} of shape {tuple(t.shape)} on "
                    f"{t.device}"
                )
            if self_overlapping(t):
                raise RuntimeError(
                    f"{where}: state {label!r}: unsupported operation: more than one element of "
                    "the written-to tensor refers to a single memory location"
                )
            problem = storage_problem(t)
            if problem:
                raise RuntimeError(f"{where}: state {label!r}: {problem}")
        out[name] = signed
    return out


def _views(entry: Entry, names: list[str]):
    """(param, grad, states) as the kernel walks them: local shards, real views."""
    p, g = entry.param, entry.grad
    tensors = {n: entry.tensor(n) for n in names if entry.tensor(n) is not None}
    if _dtensor.is_dtensor(p):
        p, g, tensors = _dtensor.local_shards(p, g, tensors, list(tensors))
    if p.is_complex():  # as torch: complex math is real math on the (re, im) view
        p, g = torch.view_as_real(p), torch.view_as_real(g)
        tensors = {n: torch.view_as_real(t) for n, t in tensors.items()}
    return p, g, tensors


def _collect(opt, group: dict, rule, specs, names) -> tuple[list[Entry], dict]:
    """Every check of every param, grad and state of ``group`` that does not depend on the other
    params: the entries, and the new states made for params without one (not yet in
    ``opt.state``)."""
    capturable = bool(group.get("capturable"))
    # torch's SGD without momentum keeps none (a compensated bfloat16 param keeps its kahan_comp)
    keeps_state = rule.has_step or bool(specs) or bool(group.get("kahan_sum"))
    backends: dict[tuple, str] = {}
    entries: list[Entry] = []
    pending: dict[int, tuple] = {}  # id(param) -> (param, its new state): one if listed twice
    for i, p in enumerate(group["params"]):
        g = p.grad
        if g is None:
            continue
        sparse = g.is_sparse
        if sparse:
            if not rule.sparse_ok:
                raise RuntimeError(rule.sparse_error)
            rule.check_sparse(group, p, g)
        kind = (p.device, p.dtype, sparse)
        backend = backends.get(kind) or backends.setdefault(kind, backend_for(group, p, sparse))
        where = f"param {i} of the group"
        for what, t in (("param", p), ("grad", g)):
            problem = storage_problem(t)
            if problem:
                raise RuntimeError(f"{where}: the {what}: {problem}")
        if self_overlapping(p):
            raise RuntimeError(
                f"{where}: unsupported operation: more than one element of the written-to "
                "param refers to a single memory location"
            )
        if not sparse and g.shape != p.shape and not broadcasts(g.shape, p.shape):
            raise RuntimeError(  # (torch broadcasts a grad that fits its param)
                f"{where}: the grad has shape {tuple(g.shape)}, the param {tuple(p.shape)}"
            )
        state = opt.state.get(p) if keeps_state else {}
        if keeps_state and not state:
            state = pending.get(id(p), (None, None))[1]
            if state is None:
                state = new_state(rule, group, p, specs, g)
                pending[id(p)] = (p, state)
        elif keeps_state:
            _check_state(rule, specs, state, p, where)
        kahan = _storage.kahan(group, p)
        if kahan and _storage.KAHAN in state:  # (checked as the rule's states are)
            _check_state(rule, [Zeros(_storage.KAHAN)], state, p, where)
        if capturable:
            step = state.get("step")
            # (Triton on CPU is its interpreter, which runs the capturable kernels for the tests)
            if (p.device.type not in CAPTURABLE_DEVICES and backend != "triton") or (
                step is not None and step.device != p.device
            ):
                raise AssertionError(
                    "If capturable=True, params and state_steps must be on supported devices: "
                    f"{CAPTURABLE_DEVICES}."
                )
        entry = Entry(p, g, state, backend, kind)
        if rule.has_step:
            entry.step = state["step"]
        entry.quant = tuple(_check_bits(rule, group, specs, state, p, where).items())
        # (8-bit states: dequantized to float32, the rule in float32, as a storage format)
        entry.wide = _storage.widened(group, p) or bool(entry.quant)
        if kahan and _storage.KAHAN not in state:  # (a checkpoint without one: none to carry)
            entry.extra = {_storage.KAHAN: torch.zeros_like(p, memory_format=torch.preserve_format)}
        _route(entry, [*names, _storage.KAHAN] if kahan else names, where, group.get("state_dtype"))
        entries.append(entry)
    return entries, pending


def _route(entry: Entry, names: list[str], where: str, state_dtype=None) -> None:
    """Settle ``entry``'s backend from its tensors: a kernel takes it only where K2, K3, K5, K6
    and K10 hold; the for-loop otherwise (foreach: torch's error where torch's foreach has one).
    A state of the group's ``state_dtype`` is of its kind where the entry is ``wide``."""
    p, g, state = entry.param, entry.grad, entry.state
    if entry.kind[2]:  # sparse: the rule's own per-tensor code
        return
    quant = dict(entry.quant)
    # (an 8-bit state's codes and scales are checked by K10, below and in _check_bits)
    tensors = [entry.tensor(n) for n in names if entry.tensor(n) is not None and n not in quant]
    also = state_dtype if entry.wide else None  # (a storage format: fp32 math, own dtypes)
    odd = any(t.dtype != p.dtype or t.device != p.device for t in (g, *tensors)) and not (
        # a storage format computes in float32 whatever the grad's dtype (the for-loop's
        # float32 copy of it; a kernel takes grads of the param's dtype only, K2)
        entry.wide
        and g.device == p.device
        and g.is_floating_point()
        and all(t.dtype in (p.dtype, also) and t.device == p.device for t in tensors)
    )
    step = entry.step
    if entry.backend == "foreach":
        if step is not None and not step.is_floating_point():
            raise RuntimeError(  # torch's foreach groups the steps with the params, as floats
                f"{where}: foreach=True needs a floating-point step, not {step.dtype}"
            )
        if any(t.is_neg() or t.is_conj() for t in (p, *tensors)):
            raise RuntimeError(  # torch's foreach ops refuse to write through such a view
                f"{where}: foreach=True cannot write a param or state with the negative or "
                "conjugate bit set; materialize it (resolve_neg, resolve_conj)"
            )
        for t in (g, *tensors):
            mixed = {p.dtype, torch.bfloat16, also} | ({*STEP_DTYPES} if t.is_cpu else set())
            if t.dtype not in mixed:  # torch's foreach groups tensors with these rules
                raise RuntimeError(
                    f"{where}: Tensors of the same index must be on the same device and the "
                    "same dtype except `step` tensors that can be CPU and float32/64, and "
                    "optimizer states that can be bfloat16 for mixed-precision training"
                )
        if odd or g.shape != p.shape:
            # torch's foreach steps these one by one (its in-place ops rounding each result, a
            # grad broadcast): its for-loop's math
            entry.backend = "reference"
    entry.odd = odd
    if entry.backend not in KERNELS:
        return
    if quant and (_dtensor.is_dtensor(p) or p.dtype not in _storage.PARAM_DTYPES):
        entry.backend = "reference"  # (the kernels quantize in float32, on whole tensors)
        return
    if _dtensor.is_dtensor(p) and not _dtensor.shards_fit(p, g, state, names, also):
        entry.backend = "foreach"  # (FSDP2: a kernel runs on local shards sharded alike)
        return
    if entry.odd or (entry.step is not None and not _kernel_step(entry)):
        entry.backend = "reference"
        return
    kp, kg, kstates = _views(entry, [n for n in names if n not in quant])
    problem, kg = entry_check(kp, kg, kstates, also)
    if entry.backend == "numba" and not kp.is_cpu:  # K2: numba's kernels read host memory
        problem = f"a numba kernel on a tensor of device {kp.device}"
    if problem is None and quant:  # K10
        packed = {
            n: (state[n], state[_quant.absmax_key(n)]) for n in quant if state.get(n) is not None
        }
        problem = bits_problem(kp, kg, [kp, *kstates.values()], packed)
        for n, (codes, absmax) in packed.items():
            kstates[n], kstates[_quant.absmax_key(n)] = codes, absmax
    if problem is not None:
        entry.backend = "reference"
        return
    entry.views = (kp, kg, kstates)


def _kernel_step(entry: Entry) -> bool:
    """Whether a kernel entry's ``step`` is one its backend can take: K6 on the host, or a
    device tensor the Triton kernels read (fused, capturable)."""
    step = entry.step
    if entry.backend == "triton" and not step.is_cpu:
        return step.dtype in STEP_DTYPES
    return standard_step(step)


# ---------------------------------------------------------------------------------- the rounds
def _rounds(entries: list[Entry]) -> int:
    """K5 between params: give each entry a round, after every earlier entry whose memory
    overlaps its own (a param listed twice, views of one storage that overlap, a state shared
    by two params). Returns the number of rounds (1 when nothing overlaps, as usual)."""
    spans = []  # (start, stop, entry index, written)
    for i, e in enumerate(entries):
        for t, written in chain(
            ((e.param, True), (e.grad, False)),
            ((t, True) for t in e.state.values() if torch.is_tensor(t) and t.dim() > 0),
        ):
            s = span(t._local_tensor if _dtensor.is_dtensor(t) else t)
            if s is not None:
                spans.append((s[0], s[1], i, written))
    if len(spans) < 2:
        return 1
    spans.sort()
    starts = np.fromiter((s[0] for s in spans), np.int64, len(spans))
    stops = np.maximum.accumulate(np.fromiter((s[1] for s in spans), np.int64, len(spans)))
    if not (starts[1:] < stops[:-1]).any():
        return 1  # no two ranges overlap
    after: dict[int, set[int]] = defaultdict(set)  # entry -> earlier entries it must follow
    for k, (start, _, i, written) in enumerate(spans):
        j = k - 1
        while j >= 0 and stops[j] > start:  # every earlier range that may reach this one
            s0, s1, i2, written2 = spans[j]
            if s1 > start and i2 != i and (written or written2):
                after[max(i, i2)].add(min(i, i2))
            j -= 1
    for i, e in enumerate(entries):
        e.round = 1 + max((entries[j].round for j in after[i]), default=-1)
    return 1 + max(e.round for e in entries)


# ----------------------------------------------------------------------------------- launches
class Launch:
    """One backend call: ``rule`` over a batch of tensors, with everything the backend reads.

    ``tensors`` holds one list per operand (``operands``: param, grad, then states, then a
    bfloat16 param's ``kahan_comp``, then the scales of 8-bit states) in batch order; for a
    kernel, what the kernel walks, checked here (K1-K5). ``states`` holds the params' state
    dicts for the for-loop, which reads them when it runs (a
    :class:`~fuseopt.rule.FirstValue` it creates there), and ``odd`` whether each param's
    tensors differ in dtype (the for-loop then rounds as torch's in-place ops do).
    :meth:`address_table` reads a kernel's data addresses, one row per operand.
    """

    __slots__ = (
        "backend", "rule", "flags", "scalars", "operands", "tensors", "states", "odd", "numels",
        "dtype", "table", "grad_scale", "found_inf", "grads", "real_view", "shards", "ndims",
        "dtypes", "wide", "sr", "kahan", "quant",
    )  # fmt: skip

    def __init__(self, backend, rule, flags, scalars, operands, tensors):
        self.backend, self.rule, self.flags, self.scalars = backend, rule, flags, scalars
        self.operands, self.tensors = operands, tensors
        self.states = self.odd = self.table = None
        self.numels = tuple(map(torch.Tensor.numel, tensors[0]))
        self.dtype = tensors[0][0].dtype if tensors[0] else None
        # each operand's dtype (a kernel's: its tensors share it, K2), the param's where not known
        self.dtypes = tuple(
            ts[0].dtype if ts and ts[0] is not None else self.dtype for ts in tensors
        )
        # a storage format (:mod:`fuseopt._storage`): computed in float32, stochastically rounded
        # bfloat16 stores where ``sr`` (the seed, ``scalars["sr_seed"]``, drawn when it runs)
        self.wide = self.sr = False
        self.kahan = False  # the operand after the rule's states is a bfloat16 param's
        # compensation (kahan_comp)
        # 8-bit states (``state_bits=8``): ``((name, signed), ...)``. The operand ``name`` holds
        # the codes (uint8; ``signed``: the signed dynamic map, else the unsigned one); a kernel
        # launch ends with one operand per 8-bit state, in this order, its float32 scales
        # (``absmax_key(name)``, one per block of 256, K10). The for-loop and foreach read the
        # scales from ``states``.
        self.quant = ()
        self.grad_scale = self.found_inf = None
        # the params' own grads, and whether the kernel walks real views of complex params or
        # DTensor shards instead of them (the clipping norm pass reads these)
        self.grads, self.real_view, self.shards = None, False, False
        self.ndims = None  # each param's dim (a rule's per-tensor scalars may depend on it)

    def address_table(self) -> np.ndarray:
        """The data addresses of a kernel launch's tensors (``operands`` x tensors), read now,
        after the checks and after the states it creates exist."""
        if self.table is None:
            self.table = np.array(
                [list(map(torch.Tensor.data_ptr, ts)) for ts in self.tensors], dtype=np.int64
            ).reshape(len(self.tensors), len(self.numels))
        return self.table


def kernel_launch(
    rule, flags, scalars, params: list, grads: list, states: dict[str, list], backend="numba"
) -> Launch:
    """A :class:`Launch` of a fused kernel over plain lists of tensors (weight averaging, the
    kernels' tests), after K2-K5; ``ValueError`` naming the tensor where they do not hold."""
    n = len(params)
    if len(grads) != n or any(len(ts) != n for ts in states.values()):
        raise ValueError(
            f"kernel launch: {n} params, {len(grads)} grads, "
            f"{[len(ts) for ts in states.values()]} states: one of each per param"
        )
    if any(p.dtype != params[0].dtype or p.device != params[0].device for p in params):
        raise ValueError("kernel launch: params of several dtypes or devices")
    fixed = []
    for i, (p, g) in enumerate(zip(params, grads)):
        tensors = {name: ts[i] for name, ts in states.items()}
        for t in (p, g, *tensors.values()):
            if t.shape != p.shape:
                shapes = f"shape {tuple(t.shape)}, its param's is {tuple(p.shape)}"
                raise ValueError(f"kernel launch, tensor {i}: {shapes}")
            if storage_problem(t):
                raise ValueError(f"kernel launch, tensor {i}: {storage_problem(t)}")
        problem, g = entry_check(p, g, tensors)
        if problem is not None:
            raise ValueError(f"kernel launch, tensor {i}: {problem}")
        fixed.append(g)
    written = sorted(s for s in map(span, chain(params, *states.values())) if s is not None)
    read = [s for s in map(span, fixed) if s is not None]
    if any(a[1] > b[0] for a, b in zip(written, written[1:])) or any(
        overlap(g, w) for g in read for w in written
    ):
        raise ValueError("kernel launch: it would write memory that another of its tensors reads")
    launch = Launch(backend, rule, flags, scalars, ("param", "grad", *states), [params, fixed])
    launch.tensors.extend(states.values())
    return launch


# -------------------------------------------------------------------------------------- plans
class GroupPlan:
    """What :func:`plan_group` prepared for one group; :meth:`run` carries it out."""

    __slots__ = (
        "opt", "group", "rule", "attach", "rounds", "after", "found_inf", "steps", "extras",
    )  # fmt: skip

    def __init__(self, opt, group, rule):
        self.opt, self.group, self.rule = opt, group, rule
        self.attach: list = []  # (param, new state) for params without state
        self.extras: list = []  # (state, name, tensor) added to existing states (Entry.extra)
        # per round: (new states' tensors to attach, step bumps, launches)
        self.rounds: list[tuple[list, list, list[Launch]]] = []
        self.after: list = []  # (scalar-state tensors, their new values), after the launches
        self.found_inf = None
        self.steps: list = []  # the step tensors (GradScaler's correction)

    def run(self) -> None:
        """Carry the step out: nothing here depends on the contents of the group any more."""
        for p, new in self.attach:  # the very dicts the launches write first values into
            self.opt.state[p] = new
        for state, name, tensor in self.extras:
            state[name] = tensor
        for made, bumps, launches in self.rounds:
            for state, name, tensor in made:
                state[name] = tensor
            for bump in bumps:
                bump()
            for launch in launches:
                if launch.sr:  # (drawn now: a step that fails before this draws nothing)
                    launch.scalars["sr_seed"] = _storage.draw_seed(self.opt)
                if launch.backend == "sparse":
                    for p, g, state, step in launch.states:
                        self.rule.sparse_update(self.group, p, g, state, step)
                else:
                    kernels.get(launch.backend).run(launch)
        if self.found_inf is not None and self.steps:
            # as torch's fused optimizers: a skipped step does not count
            found = self.found_inf
            torch._foreach_sub_(self.steps, [found.to(s.device) for s in self.steps])
        for targets, values in self.after:
            if torch.is_grad_enabled():  # differentiable: autograd has no _foreach_copy_
                for target, value in zip(targets, values):
                    target.copy_(value)
            else:
                torch._foreach_copy_(targets, values)


def _amp(opt, group: dict, entries: list[Entry]) -> tuple:
    """GradScaler's ``grad_scale`` and ``found_inf`` (attributes it sets on the optimizer around
    ``step``): only the fused kernels take them, as in torch (numba's on the host: a CPU
    ``found_inf`` skips the step before anything changes, ``grad_scale`` divides the grads as the
    kernel reads them; Triton's on the device)."""
    grad_scale, found_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    if grad_scale is None and found_inf is None:
        return None, None
    # (torch's error where the options do not ask for fused kernels; a param the kernels cannot
    # take goes to the for-loop math, which unscales and skips as the kernel would)
    if any(backend_for(group, e.param, e.kind[2]) not in KERNELS for e in entries):
        raise AssertionError("Expected grad_scale and found_inf to be None")
    if grad_scale is not None and _first_pass.clips(group):
        raise RuntimeError(
            "max_grad_norm needs unscaled grads: GradScaler unscales them itself for an "
            "optimizer that clips; do not set grad_scale on it"
        )
    return grad_scale, found_inf


def nan_safe(value):
    """A dict key for a step value: every NaN is the same key (NaN != NaN)."""
    return ("nan",) if isinstance(value, float) and value != value else value


def plan_group(opt, group: dict) -> GroupPlan | None:
    """Check everything one step of ``group`` needs and prepare it, changing nothing; None when
    no param of the group has a grad."""
    rule = opt.rule
    all_specs = [s for s in rule.state if s.wanted(group)]
    scalar_names = [s.name for s in all_specs if isinstance(s, ScalarState)]
    # scalar states torch computes with as tensors under differentiable=True
    in_graph = tuple(
        s.name
        for s in all_specs
        if isinstance(s, ScalarState) and s.in_graph and group.get("differentiable")
    )
    specs = [s for s in all_specs if not isinstance(s, ScalarState)]  # what kernels see
    names = [s.name for s in specs]  # K1: the operands after param and grad
    firsts = [s.name for s in specs if isinstance(s, FirstValue)]
    grad_scale, found_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    amp = grad_scale is not None or found_inf is not None
    cacheable = not (amp or group.get("capturable") or group.get("differentiable"))
    cached = None
    if cacheable:
        from fuseopt._plan_cache import PlanCache  # (it imports this module)

        cached = PlanCache.plan(opt, group, names, scalar_names)
        if isinstance(cached, GroupPlan):
            return cached
    if cached is not None:  # entries whose facts are as a full check found them: one round
        entries, pending, n_rounds = cached, {}, 1
    else:
        entries, pending = _collect(opt, group, rule, all_specs, names)
        if not entries:
            return None
        if (
            group.get("differentiable")
            and rule.has_step
            and any(e.step.requires_grad for e in entries)
        ):
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
        n_rounds = _rounds(entries)
    grad_scale, found_inf = _amp(opt, group, entries)
    on_host = any(e.backend != "triton" for e in entries)
    if found_inf is not None and (scalar_names or on_host) and found_inf.item():
        # one host read: host scalar state (NAdam's mu_product) must not advance, and numba's
        # kernels skip on the host (a CPU tensor: no device to wait for)
        return None
    unscale = float(grad_scale) if grad_scale is not None and on_host else None
    plan = GroupPlan(opt, group, rule)
    plan.attach = list(pending.values())
    plan.extras = [(e.state, n, t) for e in entries if e.extra for n, t in e.extra.items()]
    # capturable computes the per-step scalars from the step tensors, as torch does, and so does
    # differentiable where torch's does (Adam, AdamW; its other algorithms read the step as a
    # number there); fused=True on the GPU too (the Triton kernels read them: no host read)
    on_tensors = bool(
        group.get("capturable") or (group.get("differentiable") and rule.differentiable_on_tensors)
    )
    # fused=True on a GPU: the Triton kernels read device steps, with no host read; their
    # scalars are then computed from the float32 step tensors widened to float64, as torch's
    # fused kernels compute them in double (capturable and differentiable keep torch's own:
    # the step's dtype)
    widen = False
    if rule.has_step and not on_tensors:
        on_tensors = widen = all(map(_device_step, entries))
    if found_inf is not None and rule.has_step:
        plan.found_inf, plan.steps = found_inf, [e.step for e in entries]
    # id(state) -> its scalar states as they stand after a round (when there are several)
    scalar_state: dict[int, dict] | None = {} if n_rounds > 1 else None
    steps: dict = {}  # id(step tensor) -> its value after the rounds planned so far
    for r in range(n_rounds):
        batch = [e for e in entries if e.round == r] if n_rounds > 1 else entries
        if rule.has_step:
            bumps = _plan_steps(batch, on_tensors, rule.reads_step, steps, cached is not None)
        else:
            bumps = []
        if scalar_names:
            states, values = [e.state for e in batch], [e.step_value for e in batch]
            if widen:  # (scalar states read the host anyway: their hooks get the step as
                # a number, as torch's for-loop computes them; torch has no fused NAdam, ASGD)
                values = [v.item() for v in values]
            svs, writes = scalar_states(
                rule, group, states, values, scalar_names, scalar_state, in_graph
            )
            for e, sv in zip(batch, svs):
                e.sv = sv
            plan.after.extend(writes)
        new_firsts: list = []
        made = defaultdict(dict)  # id(state) -> the FirstValue tensors made in this round
        for e in batch:
            # as torch's for-loop, which reads every state before the first update: a param
            # listed twice is on its first step in both rounds (the later buffer is kept)
            e.first = bool(firsts) and any(n not in e.state for n in firsts)
            if e.first and e.backend != "reference":  # (the for-loop clones its first value)
                have = made[id(e.state)]
                quant = dict(e.quant)
                for n in firsts:
                    if n not in e.state and n in quant:  # codes and scales, written in full
                        key = _quant.absmax_key(n)
                        have[n], have[key] = empty_codes(e.param)
                        new_firsts += [(e.state, n, have[n]), (e.state, key, have[key])]
                    elif n not in e.state:  # (empty_like preserves a dense layout)
                        dtype = _storage.state_dtype(group, e.param)
                        have[n] = torch.empty_like(e.param, dtype=dtype)
                        new_firsts.append((e.state, n, have[n]))
        launches = _launches(
            rule, group, batch, names, scalar_names, on_tensors, made, unscale, widen
        )
        for launch in launches:
            launch.grad_scale, launch.found_inf = grad_scale, found_inf
        plan.rounds.append((new_firsts, bumps, launches))
    if cacheable and cached is None and not pending and n_rounds == 1:
        PlanCache.remember(opt, group, names, scalar_names, entries, plan)
    return plan


def _plan_steps(
    batch: list[Entry], on_tensors: bool, read: bool, standing: dict, standard: bool = False
) -> list:
    """Each entry's step value once bumped (``entry.step_value``; None where the rule reads
    none), computed without changing the step tensors; returns the bumps that
    :meth:`GroupPlan.run` makes. A round never holds one step tensor twice (a param listed twice
    is in two rounds): ``standing`` holds each one's value after the rounds planned so far.
    ``standard``: every step is known to hold K6 (the plan cache re-established it)."""
    if on_tensors:
        steps = [e.step for e in batch]
        new = torch._foreach_add([standing.get(id(s), s) for s in steps], 1)  # out of place
        for e, v in zip(batch, new):
            e.step_value = standing[id(e.step)] = v
        return [lambda: torch._foreach_copy_(steps, new)]
    bumps = []
    standard = [True] * len(batch) if standard else [standard_step(e.step) for e in batch]
    for dtype in STEP_DTYPES:
        same = [e for e, ok in zip(batch, standard) if ok and e.step.dtype == dtype]
        if not same:
            continue
        ptrs = np.fromiter((e.step.data_ptr() for e in same), np.int64, len(same))
        values = numba_cpu.read_at(ptrs, dtype)
        for i, e in enumerate(same):
            values[i] = standing.get(id(e.step), values[i])
        for e, v in zip(same, numba_cpu.bumped(values, dtype)):
            e.step_value = standing[id(e.step)] = v
        bumps.append(lambda ptrs=ptrs, dtype=dtype: numba_cpu.bump_at(ptrs, dtype))
    others = [e for e, ok in zip(batch, standard) if not ok]
    if others:  # an integer or 16-bit step, or one elsewhere: torch's own arithmetic
        targets = [e.step for e in others]
        new = [standing.get(id(t), t) + 1 for t in targets]
        for e, v in zip(others, new):
            e.step_value = v.item() if read else None
            standing[id(e.step)] = v
        bumps.append(lambda: [t.copy_(v) for t, v in zip(targets, new)])
    if not read:
        for e in batch:
            e.step_value = None
    return bumps


def scalar_states(
    rule, group, states: list, steps: list, names: list[str], standing: dict | None,
    tensors: tuple = (),
):  # fmt: skip
    """Scalar states (NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``) of the params whose state
    dicts are ``states``, at step values ``steps``, as the rule's hooks make them, computed on
    copies: ``(values, writes)``, each param's values as its launch reads them (a tuple in
    ``names`` order), and ``(targets, new values)`` that :meth:`GroupPlan.run` copies after the
    launches. ``standing`` holds, per state dict, the copies left by an earlier round, and gets
    this round's (None: a step of one round). The states named in ``tensors`` are read as the
    0-dim tensors themselves (``differentiable=True``: autograd flows through them)."""
    values: list = [()] * len(states)
    writes = []
    prior = standing or {}
    if steps and not torch.is_tensor(steps[0]) and steps.count(steps[0]) == len(steps):
        groups = [range(len(steps))]  # (as usual: one step value)
    else:
        by_step: dict = defaultdict(list)
        for i, v in enumerate(steps):
            by_step[("tensor", i) if torch.is_tensor(v) else nan_safe(v)].append(i)
        groups = list(by_step.values())
    for idx in groups:
        step = steps[idx[0]]
        # (a KeyError naming a missing key, as torch's)
        now = {n: [prior.get(id(states[i]), states[i])[n] for i in idx] for n in names}
        work = {n: _stacked(ts) for n, ts in now.items()}
        rule.before(group, step, work)
        read = []
        for n, ts in work.items():
            if n in tensors:  # (a copy: the after hook below updates ``work`` in place)
                read.append([t.clone() for t in (ts[0].unbind() if len(ts) < len(idx) else ts)])
            else:
                read.append((ts[0] if len(ts) < len(idx) else torch.stack(ts)).tolist())
        for i, sv in zip(idx, zip(*read)):
            values[i] = sv
        rule.after(group, step, work)
        for n, ts in work.items():  # one tensor per param again
            if len(ts) < len(now[n]):
                work[n] = list(ts[0].unbind())
        if standing is not None:
            for k, i in enumerate(idx):
                standing[id(states[i])] = {n: work[n][k] for n in names}
        writes.extend(([states[i][n] for i in idx], work[n]) for n in names)
    return values, writes


def _stacked(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of ``ts`` for a rule's hooks, which apply elementwise ops to each tensor of a list:
    one 1-D tensor of all the values where ``ts`` are 0-dim tensors of one dtype and device (as
    usual, and then one op updates them all, each rounded in its dtype); else a copy of each."""
    if len(ts) > 1 and len(set(map(_DTYPE, ts))) == 1 and ts[0].dim() == 0:
        try:
            return [torch.stack(ts)]
        except RuntimeError:  # other devices or shapes
            pass
    return torch._foreach_clone(ts)


def _device_step(e: Entry) -> bool:
    """Whether ``e`` takes a Triton kernel that reads its ``step`` on the device."""
    return e.backend == "triton" and not e.step.is_cpu


def _launches(
    rule, group, batch, names, scalar_names, on_tensors, made, unscale=None, widen=False
) -> list[Launch]:
    """The round's launches: entries that share backend, kind, first-step-ness, odd-ness, step and
    scalar states run as one (usually all of them), each with its flags and scalars; all but
    Triton's (which read the scale on the device) divide the grads by ``unscale`` (GradScaler's
    scale) where it is given; ``widen``: the scalars from the device steps in float64."""
    keyed: dict[tuple, list[Entry]] = {}
    for e in batch:
        if on_tensors:
            key_step = id(e)
            if e.backend == "triton" and not rule.flags_read_step:
                key_step = "stacked"  # device steps of a whole batch, one launch
        else:
            key_step = nan_safe(e.step_value)
        # (a launch's operands share a dtype each: K2)
        dtypes = tuple(e.state[n].dtype if n in e.state else None for n in names)
        kahan = e.wide and not e.odd and _storage.kahan(group, e.param)
        if kahan:
            dtypes += (e.tensor(_storage.KAHAN).dtype,)
        key = (e.backend, e.kind, e.first, e.odd, key_step, e.sv, e.wide, dtypes, kahan, e.quant)
        keyed.setdefault(key, []).append(e)
    launches = []
    operands = ("param", "grad", *names)
    sr = bool(group.get("stochastic_rounding"))
    for (backend, kind, first, odd, key_step, sv, wide, _, kahan, quant), es in keyed.items():
        sparse = kind[2]
        wide = wide and not odd  # (a tensor of another dtype: torch's in-place rounding)
        # (a compensated bfloat16 param: its ``kahan_comp``, the operand after the rule's)
        ops = (*operands, _storage.KAHAN) if kahan else operands
        all_names = [*names, _storage.KAHAN] if kahan else names
        if backend in KERNELS and quant:  # (K10: each 8-bit state's scales, the last operands)
            scales = [_quant.absmax_key(n) for n, _ in quant]
            ops, all_names = (*ops, *scales), [*all_names, *scales]
        sv = dict(zip(scalar_names, sv))
        step = es[0].step_value
        if key_step == "stacked" and len(es) > 1:
            # the rule's scalars, computed on a 1-D tensor of steps, give one value per param
            step = torch.stack([e.step_value for e in es])
        if widen:
            step = step.to(torch.float64)
        unscaled = unscale is not None and backend != "triton"
        flags = launch_flags(rule, group, first, step, sv, unscaled)
        scalars = rule.scalars(group, step, sv)
        if unscaled:
            scalars["grad_scale"] = unscale
        if backend in KERNELS:
            views = [_with_firsts(e, made.get(id(e.state)), all_names) for e in es]
            tensors = [list(ts) for ts in zip(*views)] if views else [[] for _ in ops]
            launch = Launch(backend, rule, flags, scalars, ops, tensors)
            launch.wide, launch.sr = wide and _storage.state_dtype(group, es[0].param), wide and sr
            launch.kahan, launch.quant = kahan, quant
            if backend == "numba":  # compiled before any change
                numba_cpu.kernel(rule, flags, ops, launch.dtypes, True, launch.sr, kahan, quant)
        elif sparse and rule.sparse_update is not None:  # the rule's own per-tensor code
            launch = Launch("sparse", rule, flags, scalars, (), [[e.param for e in es]])
            launch.states = [(e.param, e.grad, e.state, e.step_value) for e in es]
        else:
            tensors = [[e.param for e in es], [e.grad for e in es]]
            for n in all_names:
                tensors.append(
                    [
                        e.tensor(n) if e.tensor(n) is not None else made[id(e.state)].get(n)
                        for e in es
                    ]
                )
            if backend == "foreach" and es[0].param.is_complex():  # real math on (re, im)
                tensors = [[torch.view_as_real(t) for t in ts] for ts in tensors]
            launch = Launch(backend, rule, flags, scalars, ops, tensors)
            launch.wide, launch.sr = wide and _storage.state_dtype(group, es[0].param), wide and sr
            launch.kahan, launch.quant = kahan, quant
            launch.states = [e.state for e in es]
            launch.odd = [e.odd for e in es]
            if any(launch.odd):  # torch's ops may refuse these dtypes: find out now
                kernels.get("reference").check(launch)
        launch.grads = [e.grad for e in es]
        launch.ndims = tuple(e.param.dim() for e in es)
        launch.real_view = es[0].param.is_complex()
        launch.shards = any(_dtensor.is_dtensor(e.param) for e in es)
        launches.append(launch)
    return launches


def launch_flags(rule, group: dict, first: bool, step, sv: dict, unscale: bool = False) -> Flags:
    """A launch's flags: the rule's, and the step-wide ones: ``clip`` (the group's
    ``max_grad_norm``: the grads times the step's clip coefficient, see :mod:`fuseopt._first_pass`) and
    ``unscale`` (GradScaler's: the grads divided by its scale)."""
    flags = rule.flags(group, first, step, sv)
    if _first_pass.clips(group):
        flags = dict(flags, clip=True)
    if unscale:
        flags = dict(flags, unscale=True)
    return Flags(flags)


def _with_firsts(e: Entry, made: dict | None, names: list[str]) -> list:
    """The kernel operands of ``e`` in operand order: its checked views, and the views of the
    :class:`~fuseopt.rule.FirstValue` states made for it this step (like the param: K3 holds)."""
    kp, kg, kstates = e.views
    out = [kp, kg]
    for n in names:
        t = kstates.get(n)
        if t is None:
            t = made[n]
            if _dtensor.is_dtensor(t):
                t = t.to_local()
            if t.is_complex():
                t = torch.view_as_real(t)
        out.append(t)
    return out


def plan_step(opt) -> tuple[list[tuple[dict, GroupPlan]], torch.Tensor | None, bool]:
    """Plans for every group of ``opt`` with grads, all checked before any group steps; the
    total grad norm of the groups that clip (None: none clips); and whether the step is skipped
    (a non-finite grad where ``skip_if_nonfinite``). The last two come from one read-only pass
    over the grads (:mod:`fuseopt._first_pass`), after the checks and before anything changes."""
    plans = []
    for group in opt.param_groups:
        with torch.set_grad_enabled(bool(group.get("differentiable", False))):
            plan = plan_group(opt, group)
        if plan is not None:
            plans.append((group, plan))
    with torch.no_grad():
        grad_norm, skip = _first_pass.prepare(plans)
    return plans, grad_norm, skip
