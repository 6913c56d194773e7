"""The elementwise update rule: an algorithm's math, written once for every backend.

A :class:`Rule` declares the per-param state it keeps (:class:`Zeros`, :class:`Fill`,
:class:`Clone`, :class:`FirstValue` tensors, and :class:`ScalarState` host scalars), the static
choices of a batch (``flags``: each combination is one kernel variant), the per-step host scalars
(``scalars``: Python doubles computed as torch computes them, passed to kernels at run time) and
the ``update`` itself: plain arithmetic on operands through an ops vocabulary with ATen's formulas
(``lerp``, ``addcmul``, ``addcdiv``, ``add(alpha=)``, ``sqrt``, ``maximum``, ``sign``, ``where``,
...; see :class:`fuseopt.kernels.reference.TorchOps`). Backends evaluate ``update`` on tensors
(reference), tensor lists (foreach) or symbols (traced into numba kernels).

A rule whose update needs sums over its tensors first (LARS's and Lamb's norms) names them in
:meth:`Rule.reduce`; the step's first pass (:mod:`fuseopt._first_pass`) computes them per tensor,
after every group is checked and before anything changes, and :meth:`Rule.tensor_scalars` turns
each launch's sums into per-tensor scalars. Where the scalars of every launch depend on the sums
of the whole step (Prodigy's one step size over every group), :meth:`Rule.step_scalars` receives
the sums of every launch at once (``shares_sums``), returns each launch's scalars, and may hand
back what the step writes outside its tensors (group values), written only where the step runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Rule", "Zeros", "Fill", "Clone", "FirstValue", "ScalarState", "Flags", "to_scalar",
    "with_fused",
]  # fmt: skip


@dataclass(frozen=True)
class StateSpec:
    """A state tensor kept per param, under torch's key ``name``, when ``when(group)`` holds.
    ``signed`` says which 8-bit map it may be stored in (``state_bits=8``, :mod:`fuseopt._quant`):
    True for values of either sign, False for values never negative, None where the algorithm
    does not offer 8-bit storage of it."""

    name: str
    when: Callable[[dict], bool] | None = None
    signed: bool | None = None

    def wanted(self, group: dict) -> bool:
        """Whether a param of ``group`` keeps this state."""
        return self.when is None or bool(self.when(group))


@dataclass(frozen=True)
class Zeros(StateSpec):
    """State initialised to zeros like the param (e.g. Adam's ``exp_avg``)."""


@dataclass(frozen=True)
class Fill(StateSpec):
    """State initialised to the group option ``key`` like the param (e.g. Adagrad's ``sum``), or
    like the first grad with ``like_grad`` (torch's Rprop: its dtype where a grad's differs)."""

    key: str = ""
    like_grad: bool = False


@dataclass(frozen=True)
class Clone(StateSpec):
    """State initialised to a copy of the param, in its layout (e.g. Prodigy's ``p0``, the
    starting point), when the state is made."""


@dataclass(frozen=True)
class ScalarState(StateSpec):
    """A per-param 0-dim tensor kept on the host side (e.g. NAdam's ``mu_product``).

    It starts at ``value`` (or the group option ``key``), is updated by the rule's ``before`` /
    ``after`` hooks with tensor ops (so it rounds as torch's does), and its values reach ``flags``
    and ``scalars`` as Python floats; with ``differentiable=True``, where ``in_graph``, as the
    0-dim tensor itself (torch computes with it there: autograd flows through it). Kernels never
    see it.
    """

    value: float = 0.0
    key: str = ""
    on_param_device: bool = False  # torch keeps some (ASGD's) beside the param
    in_graph: bool = False


@dataclass(frozen=True)
class FirstValue(StateSpec):
    """State created by the first update that writes it (e.g. SGD's ``momentum_buffer``).

    While it is missing, the rule's ``flags`` see ``first=True`` and ``update`` must not read it.
    """


def to_scalar(x: Any) -> Any:
    """A 1-element tensor hyperparameter as a 0-dim tensor (as torch's ``_to_scalar``)."""
    return x.view(()) if hasattr(x, "dim") and x.dim() != 0 else x


def with_fused(defaults: dict, fused: bool | None) -> dict:
    """``defaults`` plus a ``fused`` key where the user gave one.

    torch has no ``fused`` option for this algorithm, so its groups lack the key; fuseopt keeps the
    groups identical unless ``fused=True``/``False`` is asked for explicitly.
    """
    return defaults if fused is None else dict(defaults, fused=fused)


class Flags(dict):
    """Static choices of a batch (hashable); read as attributes inside ``update``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


class Rule:
    """Base class of elementwise update rules; see the module docstring."""

    state: tuple[StateSpec, ...] = ()
    #: whether torch keeps a per-param ``step`` tensor for this algorithm (SGD does not)
    has_step: bool = True
    #: whether ``update`` supports sparse grads (reference backend only); else this error is raised
    sparse_ok: bool = False
    sparse_error: str = "this optimizer does not support sparse gradients"
    #: whether ``flags`` reads the step count (RAdam): then capturable params with tensor steps
    #: cannot share one launch (their flags could differ) and each runs alone
    flags_read_step: bool = False
    #: whether ``flags``/``scalars`` read the step count at all (torch's Adadelta, RMSprop and
    #: Rprop only count steps: a malformed ``step`` tensor is bumped, never read)
    reads_step: bool = True
    #: whether torch's ``differentiable=True`` computes the per-step scalars from the step tensors
    #: (Adam, AdamW) rather than from the step read as a number (its other algorithms)
    differentiable_on_tensors: bool = False

    def flags(self, group: dict, first: bool, step: Any, sv: dict) -> dict:
        """Static choices for a batch.

        ``first`` is True while a :class:`FirstValue` is missing; ``step`` is the step count (None
        if the rule keeps none); ``sv`` maps each :class:`ScalarState` to its value.
        """
        return {}

    def scalars(self, group: dict, step: Any, sv: dict) -> dict:
        """Per-step host scalars, from the group's options, the step count and scalar state."""
        return {}

    def before(self, group: dict, step: Any, sv: dict[str, list]) -> None:
        """Update :class:`ScalarState` tensors (lists over params at ``step``) before the update."""

    def after(self, group: dict, step: Any, sv: dict[str, list]) -> None:
        """Update :class:`ScalarState` tensors (lists over params at ``step``) after the update."""

    #: plain code for a sparse grad, ``(group, param, grad, state, step) -> None``, where the rule's
    #: vocabulary does not carry over to sparse tensors (Adagrad); None: ``update`` handles it
    sparse_update = None

    def update(self, ops, f: Flags, s, param, grad, **state) -> dict:
        """Return the new ``param`` and state values (a dict; a None value is not written)."""
        raise NotImplementedError

    def reduces(self, f: Flags) -> bool:
        """Whether :meth:`reduce` names per-tensor sums under the flags ``f`` (the step then
        runs its first pass over the batch; none by default)."""
        return False

    def reduce(self, ops, f: Flags, s, param, grad, **state) -> dict:
        """Per-element expressions whose sums over each tensor the step needs before its update
        (e.g. LARS's ``param * param``, ``grad * grad``): ``{name: expression}``, computed in a
        first pass that writes nothing; :meth:`tensor_scalars` turns the sums into per-tensor
        scalars that :meth:`update` reads from ``s``. The default: none."""
        return {}

    def tensor_scalars(self, group: dict, f: Flags, sums: dict, ndims, scalars: dict) -> dict:
        """Per-tensor scalars from the sums of :meth:`reduce` (1-D float64 tensors, one value per
        tensor of a batch), each param's ``ndims`` and the batch's ``scalars``: ``{name: 1-D
        tensor}``, read in :meth:`update` as ``s.<name>`` (each tensor its own value)."""
        return {}

    #: whether the scalars of a launch depend on the sums of the whole step (Prodigy's one step
    #: size over every group): the first pass then calls :meth:`step_scalars` at every step,
    #: with every launch, whether it reduces or not
    shares_sums: bool = False

    def step_scalars(self, groups: list[dict], batches: list[tuple]) -> tuple | None:
        """The scalars of every launch of a step, from the sums of all of them.

        ``groups``: the optimizer's param groups (every one, with grads or not); ``batches``: one
        ``(group, flags, scalars, sums, ndims)`` per launch of the step, groups in order, where
        ``sums`` are the launch's :meth:`reduce` sums (1-D float64 tensors, a value per tensor;
        ``{}`` where it has none) and ``ndims`` its params' dims. Called once per step where a
        launch has sums (or the rule ``shares_sums``), after every group is planned and checked,
        before anything changes: raising here changes nothing.

        Returns ``(scalars, commit)``: for each batch a dict of scalars added to the launch's (as
        :meth:`tensor_scalars` returns them), and None or a function that writes what the step
        changes outside its tensors (group values), called only where the step then runs; or
        None: skip the step, which changes nothing (``opt.stepped`` is False). The default:
        :meth:`tensor_scalars` of each launch on its own sums."""
        out = []
        for group, f, scalars, sums, ndims in batches:
            if sums:
                out.append(self.tensor_scalars(group, f, sums, torch.tensor(ndims), scalars))
            else:
                out.append({})
        return out, None

    # (``/``: a state may be named ``s``, as Prodigy's, without meeting the argument ``s``)
    def apply(self, ops, f: Flags, s, param, grad, /, **state) -> dict:
        """:meth:`update` on the grad as the step-wide options leave it (what every backend
        calls, see :meth:`grad_in`)."""
        return self.update(ops, f, s, param, self.grad_in(f, s, grad), **state)

    def reduce_apply(self, ops, f: Flags, s, param, grad, /, **state) -> dict:
        """:meth:`reduce` on the grad as :meth:`apply` gives it to :meth:`update`."""
        return self.reduce(ops, f, s, param, self.grad_in(f, s, grad), **state)

    @staticmethod
    def grad_in(f: Flags, s, grad):
        """The grad as the step-wide options leave it: with ``f.unscale`` (GradScaler's),
        divided by its scale, as torch's fused kernels divide it; with ``f.clip``
        (``max_grad_norm``), times the step's clip coefficient, the product ``clip_grad_norm_``
        would have stored in the grad."""
        if f.get("unscale"):
            grad = grad / s.grad_scale
        if f.get("clip"):
            grad = grad * s.clip_coef
        return grad

    def check_sparse(self, group: dict, param, grad) -> None:
        """Raise torch's error for a sparse ``grad`` the rule cannot step with this group's
        options; runs before any state changes. Dense grads need no check."""
