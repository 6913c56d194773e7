"""The fault-injection table: what a user, or a bad checkpoint, does to an optimizer between two
steps, applied alike to torch.optim and to each fuseopt implementation.

Each :class:`Fault` is a mutation (``apply(opt, params)``, run on both sides) and the algorithms
it applies to. A case is (fault, algorithm, implementation): both optimizers take two steps, the
fault is applied, and both take a third step (and a fourth if the third succeeded). fuseopt's
outcome must be torch's: the same exception type, or the same params and state within the
parity tolerance. When fuseopt raises, nothing may have changed: params, every state tensor and
the step counters are as before that step. Where fuseopt deliberately differs from torch, the
fault says so and why (``expect``).

The cases run in child processes (``python tests/faults.py CASE...``, one JSON line per case),
so a crash is a failed case, not a dead test run: ``test_faults.py``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fuseopt
from fuseopt import _quant
from fuseopt._plan import storage_problem

# The implementations, and which of torch's each is compared with: torch's fused where it has one
# (else its for-loop), torch's CPU default (the for-loop) for fuseopt's default.
IMPLS = {
    "forloop": (dict(foreach=False), dict(foreach=False)),
    "foreach": (dict(foreach=True), dict(foreach=True)),
    "fused": (dict(fused=True), dict(fused=True)),
    "default": ({}, dict(foreach=False)),
    # clipping inside the fused step (its norm pass reads the grads the plan checked), against
    # torch's clip_grad_norm_(foreach=True) before each of its steps; expectations as "fused"
    "fused_clip": (dict(fused=True, max_grad_norm=1.0), dict(fused=True)),
    # the finiteness pass over the grads before the fused step (skip_if_nonfinite; the grads
    # here are finite, so torch's plain step is the oracle); expectations as "fused"
    "fused_skip": (dict(fused=True, skip_if_nonfinite=True), dict(fused=True)),
    # bfloat16 states of float32 params (fuseopt._storage: float32 math, one rounding per store),
    # against torch's for-loop with its float32 states rounded to bfloat16 after every step
    # (:class:`_RoundedStates`); on the fused kernels (expectations as "fused") and the for-loop
    "fused_bf16_state": (dict(fused=True, state_dtype=torch.bfloat16), dict(foreach=False)),
    "forloop_bf16_state": (dict(foreach=False, state_dtype=torch.bfloat16), dict(foreach=False)),
    # 8-bit states (fuseopt._quant; min_8bit_size=0 in the group: every param quantizes), against
    # torch's for-loop with its states quantized and dequantized after every step
    # (:class:`_QuantizedStates`), on the fused kernels (expectations as "fused") and the for-loop
    "fused_8bit_state": (dict(fused=True, state_bits=8), dict(foreach=False)),
    "forloop_8bit_state": (dict(foreach=False, state_bits=8), dict(foreach=False)),
}
STORAGE = {"fused_bf16_state", "forloop_bf16_state"}  # the states are compared as bfloat16
BITS = ("fused_8bit_state", "forloop_8bit_state")  # 8-bit states: compared dequantized (a tuple:
# the case ids must come in the same order in every pytest-xdist worker)
EIGHT_BIT = {"SGD", "Adam", "AdamW"}  # the algorithms of the table that offer them
CLIP = 1.0
TORCH_FUSED = {"SGD", "Adam", "AdamW", "Adagrad"}
# Each algorithm with options that give it every kind of state it can keep.
BASE = {
    "SGD": dict(lr=0.1, momentum=0.9),
    "Adam": dict(lr=0.1),
    "AdamW": dict(lr=0.1, amsgrad=True),
    "Adadelta": dict(lr=0.5),
    "Adagrad": dict(lr=0.1),
    "Adamax": dict(lr=0.1),
    "ASGD": dict(lr=0.1, t0=1),
    "NAdam": dict(lr=0.1),
    "RAdam": dict(lr=0.1),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Rprop": dict(lr=0.01),
}
WITH_STEP = [name for name in BASE if name != "SGD"]
SHAPES = [(4, 3), (5,), (3, 3), (4, 3)]
TOL = dict(rtol=1e-5, atol=1e-6)


def _tensor_keys(opt, p) -> list[str]:
    """The state keys of ``p`` that hold tensors shaped like it (not ``step``, scalars)."""
    return [k for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape]


def _each_state(fn: Callable) -> Callable:
    """A mutation of each tensor state of the first param."""

    def apply(opt, params):
        for k in _tensor_keys(opt, params[0]):
            fn(opt.state[params[0]], k)

    return apply


def _set_step(value) -> Callable:
    def apply(opt, params):
        opt.state[params[0]]["step"] = value() if callable(value) else value

    return apply


def _set_group(**options) -> Callable:
    def apply(opt, params):
        for group in opt.param_groups:
            group.update(options)

    return apply


def _repoint_same_address(make) -> Callable:
    """Free a state's storage, then give the tensor a new one (``make``, often at the address
    just freed: what fooled a cache that checked addresses only)."""

    def fn(state, k):
        t = state[k]
        shape = t.shape
        t.set_(torch.empty(0, dtype=t.dtype))
        t.set_(make(shape).to(t.dtype))

    return _each_state(fn)


def _data_same_address(make) -> Callable:
    def fn(state, k):
        t = state[k]
        shape = t.shape
        t.data = torch.empty(0, dtype=t.dtype)
        t.data = make(shape).to(t.dtype) if make(shape).is_floating_point() else make(shape)

    return _each_state(fn)


def _load_other(donor_name: str, donor_kwargs: dict) -> Callable:
    """Load another algorithm's state dict (a wrong checkpoint) into the optimizer."""

    def apply(opt, params):
        lib = fuseopt if isinstance(opt, fuseopt.Optimizer) else torch.optim
        twins = [p.detach().clone().requires_grad_() for p in params]
        donor = getattr(lib, donor_name)(twins, **donor_kwargs)
        for t in twins:
            t.grad = torch.ones_like(t)
        donor.step()
        opt.load_state_dict(donor.state_dict())

    return apply


def _grad(fn: Callable) -> Callable:
    def apply(opt, params):
        fn(params[0])

    return apply


def _overlap_params(opt, params):
    # the second param becomes a view of the first one's storage (its first 5 elements)
    params[1].data = params[0].data.view(-1)[:5]


def _share_state(opt, params):
    # the last param (same shape as the first) steps the first one's state tensors
    for k in _tensor_keys(opt, params[0]):
        opt.state[params[3]][k] = opt.state[params[0]][k]


@dataclass
class Fault:
    """A mutation between steps, the algorithms (with options) it applies to, and when (before the
    third step's grads are set, or after). ``expect``: what fuseopt does instead of torch's
    outcome ("error": raise; "forloop": torch's for-loop numbers or error; "runs": step where
    torch raises; "steps": step where torch steps, its numbers not an oracle), by
    "algorithm/implementation", algorithm or implementation, with ``why``."""

    name: str
    apply: Callable
    algorithms: dict[str, dict] = field(default_factory=lambda: dict(BASE))
    after_grads: bool = False
    expect: dict[str, str] = field(default_factory=dict)
    why: str = ""
    impls: tuple[str, ...] | None = None  # the implementations it applies to (None: all)


_FOREACH_FUSED_ORDER = (
    "torch's foreach and fused steps of a tensor listed twice depend on their internal op order "
    "(they differ from its for-loop and from each other); every fuseopt implementation steps it "
    "twice, one update after the other, as torch's for-loop"
)
_LOOP = "fuseopt's fused kernel hands params it cannot take to torch's for-loop math"
_UNSAFE = (
    "torch's fused kernels walk a state or grad of another shape as if it had the param's "
    "(past its end, or scrambled); fuseopt raises, as torch's for-loop does"
)
_LAYOUT = "torch's fused kernels walk a tensor with gaps, or transposed, as if laid out like its param"
_ROUNDS_TWICE = (
    "a bfloat16 (or 8-bit) state is rounded (quantized) at every store, so at each of the two "
    "updates of a param stepped twice in one step; the oracle (torch's float32 states, rounded "
    "or quantized after the step) rounds once"
)
_UNSAFE_GRAD = (
    "torch's fused kernels read a grad of another shape past its end; fuseopt broadcasts it, "
    "as torch's for-loop does"
)

_BITS = (
    "8-bit codes (uint8) and their scales are read only as what K10 allows: codes or scales of "
    "another dtype, shape or size are an error on every fuseopt path (torch's float32 state of "
    "the same fault would step)"
)
_BITS_LOOP = "an 8-bit state laid out otherwise takes the for-loop (K10), with its numbers"


def _each_8bit(fn: Callable) -> Callable:
    """A mutation ``fn(state, name, absmax key)`` of each 8-bit state of the first param (none
    on torch's side, or where the state is kept in full precision)."""

    def apply(opt, params):
        state = opt.state[params[0]]
        for k in [k for k in state if _quant.absmax_key(k) in state]:
            fn(state, k, _quant.absmax_key(k))

    return apply


def _square_8bit(fn: Callable) -> Callable:
    """``fn(state, name, absmax key)`` on each 8-bit state of the square param (3, 3)."""

    def apply(opt, params):
        state = opt.state[params[2]]
        for k in [k for k in state if _quant.absmax_key(k) in state]:
            fn(state, k, _quant.absmax_key(k))

    return apply


_EIGHT = {n: BASE[n] for n in sorted(EIGHT_BIT)}
# faults of the 8-bit states' own tensors (their codes, their scales): on the 8-bit
# implementations only (torch keeps none)
BITS_FAULTS = [
    Fault("absmax_resize_", _each_8bit(lambda s, k, a: s[a].resize_(3)), _EIGHT,
          expect={i: "error" for i in BITS}, why=_BITS, impls=tuple(BITS)),
    Fault("absmax_storage_shrunk",
          _each_8bit(lambda s, k, a: s[a].untyped_storage().resize_(0)), _EIGHT,
          expect={i: "error" for i in BITS}, why=_BITS + " (K4)", impls=tuple(BITS)),
    Fault("absmax_float64", _each_8bit(lambda s, k, a: s.__setitem__(a, s[a].double())), _EIGHT,
          expect={i: "error" for i in BITS}, why=_BITS, impls=tuple(BITS)),
    Fault("absmax_missing", _each_8bit(lambda s, k, a: s.pop(a)), _EIGHT,
          expect={i: "error" for i in BITS}, why=_BITS + " (a KeyError, as torch's)",
          impls=tuple(BITS)),
    Fault("absmax_aliases_codes",
          _each_8bit(lambda s, k, a: s.__setitem__(a, s[k].view(-1)[:4].view(torch.float32))),
          _EIGHT, expect={i: "steps" for i in BITS},
          why="scales that are the bytes of their own codes: the kernel never takes them (K10, "
          "K5); the for-loop steps them, writing the codes, then the scales over them (a state "
          "the user broke: no oracle gives its numbers)", impls=tuple(BITS)),
    Fault("codes_float32", _each_8bit(lambda s, k, a: s.__setitem__(k, s[k].float())), _EIGHT,
          expect={i: "error" for i in BITS}, why=_BITS, impls=tuple(BITS)),
    Fault("codes_transposed", _each_8bit(lambda s, k, a: s.__setitem__(k, s[k].t())), _EIGHT,
          expect={i: "error" for i in BITS}, why=_BITS, impls=tuple(BITS)),
    Fault("codes_not_contiguous",
          _square_8bit(lambda s, k, a: s.__setitem__(k, s[k].t().contiguous().t())), _EIGHT,
          expect={"fused_8bit_state": "forloop"}, why=_BITS_LOOP, impls=tuple(BITS)),
    Fault("absmax_strided",
          _each_8bit(lambda s, k, a: s.__setitem__(a, torch.stack([s[a], s[a]], 1)[:, 0])),
          _EIGHT, expect={"fused_8bit_state": "forloop"}, why=_BITS_LOOP, impls=tuple(BITS)),
    Fault("param_not_contiguous_8bit",
          lambda opt, ps: setattr(ps[2], "data", ps[2].data.t().contiguous().t()), _EIGHT,
          expect={"fused_8bit_state": "forloop"},
          why=_BITS_LOOP + " (a param made non-contiguous after its 8-bit states)",
          impls=tuple(BITS)),
]

FAULTS = [
    Fault("momentum_warmup", _set_group(momentum=0.9),
          {"SGD": dict(lr=0.1), "RMSprop": dict(lr=0.01)}),
    Fault("amsgrad_on", _set_group(amsgrad=True), {"Adam": dict(lr=0.1), "AdamW": dict(lr=0.1)}),
    Fault("centered_on", _set_group(centered=True), {"RMSprop": dict(lr=0.01)}),
    Fault("betas_malformed", _set_group(betas=(0.9,)),
          {n: BASE[n] for n in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam")}),
    Fault("state_key_missing", _each_state(lambda s, k: s.pop(k)),
          expect={"SGD/fused": "forloop"},
          why="torch's fused SGD fails (TypeError) on a momentum buffer missing from a "
          "checkpoint; its for-loop, as fuseopt, starts a new one"),
    Fault("state_other_size", _each_state(lambda s, k: s.__setitem__(k, torch.zeros(5))),
          expect={"fused": "error"}, why=_UNSAFE),
    Fault("state_broadcastable_shape",
          _each_state(lambda s, k: s.__setitem__(k, s[k].unsqueeze(0).clone())),
          expect={"fused": "error", "ASGD": "error", "Rprop": "error"},
          why="a state of another shape is an error on every fuseopt path; torch's for-loop "
          "happens to run ASGD with one (no update reads ax), and fails Rprop with an IndexError"),
    Fault("state_bfloat16", _each_state(lambda s, k: s.__setitem__(k, s[k].bfloat16())),
          expect={"fused": "forloop", "foreach": "forloop", **dict.fromkeys(BITS, "error")},
          why="fuseopt hands params with cast states to torch's for-loop math (its foreach "
          "rounds some of their mixed-dtype ops otherwise); " + _BITS),
    Fault("state_float16", _each_state(lambda s, k: s.__setitem__(k, s[k].half())),
          expect={"fused": "forloop", **dict.fromkeys(BITS, "error")}, why=_LOOP + "; " + _BITS),
    Fault("state_float64", _each_state(lambda s, k: s.__setitem__(k, s[k].double())),
          expect={"fused": "forloop", **dict.fromkeys(BITS, "error")}, why=_LOOP + "; " + _BITS),
    Fault("state_meta", _each_state(lambda s, k: s.__setitem__(k, s[k].to("meta"))),
          expect={i: "error" for i in IMPLS},
          why="torch's for-loop skips or garbles the update of a param whose state is on the "
          "meta device (it holds no data) without an error (SGD, ASGD)"),
    Fault("state_set_bigger_same_address",
          _repoint_same_address(lambda shape: torch.zeros(shape.numel() + 7)),
          expect={"fused": "error"}, why=_UNSAFE),
    Fault("state_set_smaller_same_address",
          _repoint_same_address(lambda shape: torch.zeros(shape.numel() - 2)),
          expect={"fused": "error"}, why=_UNSAFE),
    Fault("state_data_smaller_same_address",
          _data_same_address(lambda shape: torch.zeros(shape.numel() - 1)),
          expect={"fused": "error"}, why=_UNSAFE),
    Fault("state_data_int32_same_address",
          _data_same_address(lambda shape: torch.zeros(shape, dtype=torch.int32)),
          expect={"fused": "forloop"}, why=_LOOP),
    Fault("state_t_", _each_state(lambda s, k: s[k].t_()),
          expect={"fused": "error"}, why=_UNSAFE),
    Fault("state_t_square",
          lambda opt, ps: [opt.state[ps[2]][k].t_() for k in _tensor_keys(opt, ps[2])],
          expect={"fused": "forloop"}, why=_LAYOUT),
    Fault("state_resize_", _each_state(lambda s, k: s[k].resize_(s[k].numel() + 5)),
          expect={"fused": "error"}, why=_UNSAFE),
    Fault("state_resize_0", _each_state(lambda s, k: s[k].resize_(0)),
          expect={"fused": "error"}, why=_UNSAFE),
    Fault("state_as_strided_repeats", _each_state(lambda s, k: s[k].as_strided_(s[k].shape, (0, 1))),
          expect={"fused": "error"},
          why="torch's fused kernels write a tensor whose elements repeat; its for-loop refuses"),
    Fault("state_with_gaps",
          _each_state(lambda s, k: s.__setitem__(k, torch.zeros(2 * s[k].numel(), dtype=s[k].dtype)[::2].view(s[k].shape).copy_(s[k]))),
          expect={"fused": "forloop"}, why=_LAYOUT),
    Fault("state_storage_shrunk", _each_state(lambda s, k: s[k].untyped_storage().resize_(8)),
          expect={i: "error" for i in IMPLS},
          why="torch reads and writes past the storage (heap corruption, or garbage)"),
    Fault("state_shared_by_two_params", _share_state,
          expect={"foreach": "forloop", "fused": "forloop",
                  **dict.fromkeys(STORAGE | set(BITS), "steps")},
          why=_FOREACH_FUSED_ORDER + "; " + _ROUNDS_TWICE),
    Fault("param_listed_twice", lambda opt, ps: opt.param_groups[0]["params"].append(ps[0]),
          expect={"foreach": "forloop", "fused": "forloop",
                  **dict.fromkeys(STORAGE | set(BITS), "steps")},
          why=_FOREACH_FUSED_ORDER + "; " + _ROUNDS_TWICE),
    Fault("params_overlap", _overlap_params, expect={"foreach": "forloop"},
          why="torch's foreach applies each op to every param before the next op, so params "
          "that share memory see each other's half-made updates; fuseopt steps them one after "
          "the other, as torch's for-loop and fused do"),
    Fault("param_view_float16",
          lambda opt, ps: setattr(ps[0], "data", ps[0].data.view(torch.float16)),
          expect={"fused": "error"}, why=_UNSAFE),
    Fault("param_reshaped", lambda opt, ps: setattr(ps[0], "data", ps[0].data.view(3, 4)),
          expect={"fused": "error"}, why=_UNSAFE),
    Fault("param_neg_view", lambda opt, ps: setattr(ps[0], "data", torch._neg_view(-ps[0].data)),
          expect={"fused": "forloop"}, why=_LOOP),
    Fault("grad_other_shape", _grad(lambda p: setattr(p.grad, "data", torch.ones(5))),
          after_grads=True,
          expect={"fused": "error"}, why=_UNSAFE),
    Fault("grad_broadcasts", _grad(lambda p: setattr(p.grad, "data", torch.full((3,), 0.5))),
          after_grads=True,
          expect={"fused": "forloop", "Rprop/forloop": "runs", "Rprop/default": "runs",
                  "Rprop/fused": "runs"},
          why=_UNSAFE_GRAD + "; torch's Rprop raises an IndexError (a boolean mask of another "
          "shape), fuseopt broadcasts as for every other algorithm"),
    Fault("grad_neg_view", _grad(lambda p: setattr(p, "grad", torch._neg_view(-p.grad))),
          after_grads=True, expect={"fused": "forloop", "fused_clip": "runs"},
          why=_LOOP + "; clip_grad_norm_ scales the grads in place, which torch refuses on a "
          "negative view, where fuseopt's clipping never writes a grad"),
    Fault("grad_float64", _grad(lambda p: setattr(p.grad, "data", p.grad.double())),
          after_grads=True,
          expect={"fused": "forloop", **{
              f"{a}/{i}": "runs" for a in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop")
              for i in STORAGE | set(BITS)}},
          why=_LOOP + "; a storage format (state_dtype) computes in float32 from a grad of any "
          "floating dtype, where torch's in-place ops refuse a float64 grad for some algorithms "
          "(lerp_, addcdiv_ with a float32 tensor)"),
    Fault("grad_with_gaps",
          _grad(lambda p: setattr(p, "grad", torch.zeros(2 * p.numel())[::2].view(p.shape).copy_(p.grad))),
          after_grads=True, expect={"fused": "forloop"}, why=_LAYOUT),
    Fault("step_empty", _set_step(lambda: torch.tensor([])), {n: BASE[n] for n in WITH_STEP}),
    Fault("step_two_elements", _set_step(lambda: torch.tensor([3.0, 3.0])),
          {n: BASE[n] for n in WITH_STEP}),
    Fault("step_nan", _set_step(lambda: torch.tensor(float("nan"))), {n: BASE[n] for n in WITH_STEP}),
    Fault("step_python_number", _set_step(3), {n: BASE[n] for n in WITH_STEP},
          expect={"ASGD": "error"},
          why="torch's ASGD steps with a number for its step and never counts it; fuseopt raises "
          "torch's 'API has changed' error, as torch does for every other algorithm"),
    Fault("step_int64", _set_step(lambda: torch.tensor(2)), {n: BASE[n] for n in WITH_STEP},
          expect={"fused": "forloop"}, why=_LOOP),
    Fault("load_adam_into_sgd", _load_other("Adam", dict(lr=0.1)), {"SGD": BASE["SGD"]}),
    Fault("load_sgd_into_adam", _load_other("SGD", dict(lr=0.1, momentum=0.9)),
          {"Adam": BASE["Adam"], "AdamW": BASE["AdamW"]}),
    *BITS_FAULTS,
]
BY_NAME = {f.name: f for f in FAULTS}


def applies(algo: str, kwargs: dict, impl: str) -> bool:
    """Whether ``algo`` with ``kwargs`` can be built for ``impl``: a storage format only where
    the algorithm keeps elementwise state with its options, 8-bit states only where it offers
    them (else it is an error at construction)."""
    if impl in STORAGE | set(BITS) and algo == "SGD" and not kwargs.get("momentum"):
        return False
    return not (impl in BITS and algo not in EIGHT_BIT)


def cases() -> list[str]:
    """Every case id: ``fault/algorithm/implementation`` (see :func:`applies`)."""
    return [
        f"{f.name}/{algo}/{impl}"
        for f in FAULTS
        for algo, kwargs in f.algorithms.items()
        for impl in (f.impls or IMPLS)
        if applies(algo, kwargs, impl)
    ]


# ------------------------------------------------------------------------------ running a case
def _params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def _set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.5).to(p.dtype)


def _copy(v):
    if not torch.is_tensor(v):
        return v
    if storage_problem(v) is not None:  # reading it would go past its storage
        return "(unreadable)"
    return v.detach().clone()


def _snapshot(opt, params) -> list:
    """Copies of params and every state value (steps included), in a fixed order."""
    out = [p.detach().clone() for p in params]
    for p in params:
        for k, v in sorted(opt.state.get(p, {}).items()):
            out.append((k, _copy(v)))
    return out


def _unchanged(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            (kx, x), (ky, y) = x, y
            if kx != ky:
                return False
        if torch.is_tensor(x):
            if x.device.type == "meta" or y.device.type == "meta":
                continue
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(
                x.nan_to_num(0.123), y.nan_to_num(0.123)
            ):
                return False
        elif x != y and x == x:
            return False
    return True


class _RoundedStates:
    """torch's optimizer as the oracle of bfloat16 states: float32 states whose values are
    rounded to bfloat16 after every step. A state that a fault made bfloat16 is the same format
    (made float32 before the step); one of another dtype keeps it (fuseopt hands it to torch's
    for-loop math)."""

    def __init__(self, opt, params):
        self.opt, self.params = opt, params
        self._round()

    def __getattr__(self, name):
        return getattr(self.opt, name)

    def _round(self):
        with torch.no_grad():
            for state in self.opt.state.values():
                for k, v in state.items():
                    if torch.is_tensor(v) and v.dtype == torch.float32 and k != "step" and v.dim():
                        v.copy_(v.bfloat16())

    def step(self):
        for state in self.opt.state.values():
            for k, v in list(state.items()):
                if torch.is_tensor(v) and v.dtype == torch.bfloat16:
                    state[k] = v.float()
        self.opt.step()
        self._round()


class _QuantizedStates(_RoundedStates):
    """torch's optimizer as the oracle of 8-bit states: its float32 states that fuseopt keeps in
    8 bits (``signs``: ``{name: signed}``) are quantized and dequantized after every step
    (:mod:`fuseopt._quant`'s spec, what fuseopt's for-loop stores)."""

    def __init__(self, opt, params, signs):
        self.signs = signs
        super().__init__(opt, params)

    def _round(self):
        with torch.no_grad():
            for state in self.opt.state.values():
                for k, v in state.items():
                    signed = self.signs.get(k)
                    if signed is not None and torch.is_tensor(v) and v.dtype == torch.float32:
                        v.copy_(_quant.dequantize(*_quant.quantize(v, signed), signed))

    def step(self):
        self.opt.step()
        self._round()


class _Clipped:
    """A torch optimizer whose ``step`` clips the grads of ``params`` first, as its users do."""

    def __init__(self, opt, params):
        self.opt, self.params = opt, params

    def __getattr__(self, name):
        return getattr(self.opt, name)

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, CLIP, foreach=True)
        self.opt.step()


def _step(opt) -> str | None:
    """Step; the exception's type name, or None."""
    try:
        opt.step()
    except Exception as e:  # the type is the outcome compared
        return type(e).__name__
    return None


def _close(ours_opt, theirs_opt, ours, theirs) -> str | None:
    """Where fuseopt's params and state differ from torch's, or None (a bfloat16 state of
    fuseopt's against a float32 one of :class:`_RoundedStates`: as float32, to one bfloat16
    ulp, which a float32 difference of an ulp may cross)."""
    for i, (p, q) in enumerate(zip(ours, theirs)):
        try:
            torch.testing.assert_close(p.detach(), q.detach(), equal_nan=True, **TOL)
        except AssertionError as e:
            return f"param {i}: {str(e)[:300]}"
        mine, yours = ours_opt.state.get(p, {}), theirs_opt.state.get(q, {})
        for k, v in yours.items():
            w = mine.get(k)
            absmax = mine.get(_quant.absmax_key(k))
            if torch.is_tensor(w) and w.dtype == torch.uint8 and torch.is_tensor(absmax):
                signed = _signs(ours_opt).get(k, True)  # (8-bit: compared dequantized)
                w = _quant.dequantize(w, absmax, signed)
            if torch.is_tensor(v) and v.device.type != "meta":
                tol = TOL
                if torch.is_tensor(w) and w.dtype == torch.bfloat16 and v.dtype == torch.float32:
                    w, tol = w.float(), dict(rtol=2**-7, atol=1e-6)
                try:
                    torch.testing.assert_close(w, v, equal_nan=True, check_dtype=True, **tol)
                except (AssertionError, TypeError) as e:
                    return f"state {k!r} of param {i}: {str(e)[:300]}"
    return None


def _signs(opt) -> dict[str, bool]:
    """``{state name: signed}`` of the states ``opt``'s algorithm may keep in 8 bits."""
    rule = getattr(opt, "rule", None)
    return {s.name: s.signed for s in getattr(rule, "state", ()) if s.signed is not None}


def _mutate(fault, ours_opt, ours, theirs_opt, theirs) -> str | None:
    """Apply the fault to both; None, or the outcome where applying it raises (a checkpoint
    that does not load): "both raise ..." when the types agree and fuseopt changed nothing."""
    before = _snapshot(ours_opt, ours)
    try:
        fault.apply(theirs_opt, theirs)
        yours = None
    except Exception as e:  # the type is the outcome compared
        yours = type(e).__name__
    try:
        fault.apply(ours_opt, ours)
        mine = None
    except Exception as e:
        mine = type(e).__name__
    if mine is None and yours is None:
        return None
    if mine != yours:
        return f"applying the fault: fuseopt {mine}, torch {yours}"
    if not _unchanged(before, _snapshot(ours_opt, ours)):
        return f"applying the fault raised {mine} after changing the state"
    return f"both raise {mine} when the fault is applied"


def run_case(case: str) -> dict:
    """One case: ``{"case", "ok", "detail"}``."""
    fault_name, algo, impl = case.split("/")
    fault = BY_NAME[fault_name]
    kwargs = fault.algorithms[algo]
    as_impl = "fused" if impl.startswith("fused_") else impl  # (whose expectations apply)
    if impl.startswith("forloop_"):
        as_impl = "forloop"
    keys = (f"{algo}/{impl}", f"{algo}/{as_impl}", algo, impl, as_impl)
    expect = next((fault.expect[k] for k in keys if k in fault.expect), None)
    ours_flags, torch_flags = IMPLS[impl]
    if impl in STORAGE and algo == "Rprop":  # (its step sizes start at lr: one bfloat16 holds)
        kwargs = dict(kwargs, lr=2**-7)
    if expect == "forloop" or (as_impl == "fused" and algo not in TORCH_FUSED):
        torch_flags = dict(foreach=False)
    ours, theirs = _params(), _params()
    # (8-bit: every param of the table quantizes, however small)
    groups = [{"params": ours, "min_8bit_size": 0}] if impl in BITS else ours
    ours_opt = getattr(fuseopt, algo)(groups, **kwargs, **ours_flags)
    theirs_opt = getattr(torch.optim, algo)(theirs, **kwargs, **torch_flags)
    if impl == "fused_clip":
        theirs_opt = _Clipped(theirs_opt, theirs)
    if impl in STORAGE:
        theirs_opt = _RoundedStates(theirs_opt, theirs)
    if impl in BITS:
        theirs_opt = _QuantizedStates(theirs_opt, theirs, _signs(ours_opt))
    for step in range(2):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        ours_opt.step()
        theirs_opt.step()
    for step in (2, 3):
        if step == 2 and not fault.after_grads:
            failed = _mutate(fault, ours_opt, ours, theirs_opt, theirs)
            if failed:
                return dict(case=case, ok=failed.startswith("both"), detail=failed)
        _set_grads(ours, step)
        _set_grads(theirs, step)
        if step == 2 and fault.after_grads:
            fault.apply(ours_opt, ours)
            fault.apply(theirs_opt, theirs)
        before = _snapshot(ours_opt, ours)
        mine = _step(ours_opt)
        yours = "(not compared)" if expect == "error" else _step(theirs_opt)
        if expect == "error":
            if mine is None:
                return dict(case=case, ok=False, detail=f"expected an error ({fault.why})")
        elif expect == "steps":
            if mine is not None or yours is not None:
                return dict(case=case, ok=False, detail=f"fuseopt: {mine}, torch: {yours}")
            return dict(case=case, ok=True, detail=f"both step ({fault.why})")
        elif expect == "runs":
            if mine is not None or yours is None:
                return dict(case=case, ok=False, detail=f"fuseopt: {mine}, torch: {yours}")
            return dict(case=case, ok=True, detail=f"fuseopt steps, torch raises {yours}")
        elif mine != yours:
            return dict(case=case, ok=False, detail=f"fuseopt: {mine}, torch: {yours}")
        if mine is not None:
            if not _unchanged(before, _snapshot(ours_opt, ours)):
                return dict(case=case, ok=False, detail=f"{mine} after changing the state")
            return dict(case=case, ok=True, detail=f"both raise {mine}")
        differs = _close(ours_opt, theirs_opt, ours, theirs)
        if differs:
            return dict(case=case, ok=False, detail=f"step {step + 1}: {differs}")
    return dict(case=case, ok=True, detail="same numbers")


def main(argv: list[str]) -> None:
    """Run the cases named in ``argv``; print one JSON line per case as it ends."""
    warnings.simplefilter("ignore")
    abort_in = os.environ.get("FUSEOPT_FAULTS_ABORT_IN")  # the runner's own test
    for case in argv:
        print("START " + case, flush=True)
        if case == abort_in:
            os.abort()
        try:
            result = run_case(case)
        except Exception:  # a bug in the harness or an unexpected exception: a failed case
            result = dict(case=case, ok=False, detail=traceback.format_exc()[-2000:])
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
