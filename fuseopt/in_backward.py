"""The step inside backward: each param steps as soon as its gradient is accumulated, and the
gradient is freed at once.

:func:`step_in_backward` registers a :meth:`torch.Tensor.register_post_accumulate_grad_hook` on
every param of an optimizer (the approach of torch's "optimizer step in backward" tutorial and of
``torch.distributed.optim._apply_optimizer_in_backward``), but keeps the one optimizer: its groups,
schedulers, ``state_dict`` and hooks work as usual, and one call undoes it. A training step then
never holds more than the grads still being computed: the whole set of grads never exists at
once (docs/in_backward.md measures it).

Each param's step is a step of a one-param copy of its group (the same options, read afresh at
every step, so a scheduler's lr reaches it), run through the same plan as :meth:`Optimizer.step`:
every check of :mod:`fuseopt._plan` (and the plan cache, keyed by that copy), the rule's first
pass where it has one, the same backends; so the numbers are those of the normal step.
"""

from __future__ import annotations

import functools
import weakref
from itertools import chain
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakTensorKeyDictionary

from fuseopt import _first_pass
from fuseopt._adafactor import Adafactor
from fuseopt._muon import Muon
from fuseopt.lbfgs import LBFGS
from fuseopt.optimizer import Optimizer, _profiled, _run_pre_hooks, _torch_optimizer
from fuseopt.sparse_adam import SparseAdam

__all__ = ["StepInBackward", "step_in_backward"]

# Optimizers without a rule whose step is a loop of independent per-param updates (their own
# checks included), so that a step of a one-param group is exactly that param's share of a step.
# (Adafactor's ``eps=(None, ...)`` takes eps1 from the first param's dtype: a one-param group
# takes it from its own, the same wherever a group has one dtype.)
_PER_PARAM_STEPS = frozenset({Muon._step, Adafactor._step, SparseAdam._step})

# param -> the handle that steps it (weakly: a param stepped by two handles would take two steps
# per backward, and the second would find no grad)
_OWNERS = WeakTensorKeyDictionary()
# id(optimizer) -> its active handle (an id of a collected optimizer may be reused: compare)
_ACTIVE: weakref.WeakValueDictionary[int, StepInBackward] = weakref.WeakValueDictionary()

_PREFIX = "step_in_backward"


def _kind(opt: Optimizer) -> str:
    """How a one-param step of ``opt`` runs: ``"plan"`` (a rule, the base step) or ``"groups"``
    (a known per-param step); raise for an optimizer whose step cannot run one param at a time."""
    cls = type(opt)
    name = cls.__name__
    if isinstance(opt, LBFGS):
        raise RuntimeError(
            f"{_PREFIX}: LBFGS cannot step inside backward: each step re-evaluates the model "
            "through its closure and searches along one direction over all params at once"
        )
    if cls.step is not Optimizer.step:
        raise RuntimeError(
            f"{_PREFIX}: {name} defines its own step(), which may read every param and grad at "
            "once: fuseopt cannot tell whether it can step one param at a time"
        )
    if opt.rule is None:
        if cls._step in _PER_PARAM_STEPS:
            return "groups"
        raise RuntimeError(
            f"{_PREFIX}: {name} has no elementwise rule and its _step is plain code that may "
            "read every param and grad at once: fuseopt cannot tell whether it can step one "
            "param at a time"
        )
    if cls._step is not Optimizer._step:
        raise RuntimeError(
            f"{_PREFIX}: {name}'s step does more than its rule per param (values kept per "
            "group, updated once per step): stepping one param at a time would advance them "
            "once per param"
        )
    if getattr(opt.rule, "shares_sums", False):
        raise RuntimeError(
            f"{_PREFIX}: {name}'s update reads sums over every param of the step (one step size "
            "for all of them), which do not exist until backward ends"
        )
    return "plan"


def _check_group(group: dict, index: int) -> None:
    """Options of a group that need every grad of the step at once, or autograd through it."""
    if group.get("max_grad_norm") is not None or group.get("skip_if_nonfinite"):
        option = "max_grad_norm" if group.get("max_grad_norm") is not None else "skip_if_nonfinite"
        raise RuntimeError(
            f"{_PREFIX}: param group {index} sets {option}: global clipping and skipping read "
            "every grad of the step before any param steps, but inside backward each param "
            "steps as soon as its own grad is ready. Step normally (opt.step()) to clip"
        )
    if group.get("differentiable"):
        raise RuntimeError(
            f"{_PREFIX}: param group {index} sets differentiable=True: a step that autograd "
            "records cannot run inside the backward pass that computes its grads"
        )


class StepInBackward:
    r"""What :func:`step_in_backward` returns: the handle of an optimizer stepping inside
    backward. ``handle.remove()`` (or leaving a ``with handle:`` block) restores the normal
    behaviour: grads accumulate and ``optimizer.step()`` steps.

    The handle holds the optimizer weakly, as the params' hooks hold the handle: an optimizer
    that is garbage-collected without :meth:`remove` makes the next backward raise, once, and
    removes the hooks (its params would otherwise go unstepped, or another optimizer would find
    no grads).
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{_PREFIX} takes a fuseopt optimizer, got {type(optimizer).__name__}")
        current = _ACTIVE.get(id(optimizer))
        if current is not None and current.optimizer is optimizer:
            raise RuntimeError(
                f"{_PREFIX}: this optimizer steps inside backward already (remove that handle "
                "first)"
            )
        self._kind = _kind(optimizer)
        self._optimizer = weakref.ref(optimizer)
        self._optimizer_id = id(optimizer)
        params = []
        seen: set[int] = set()
        for i, group in enumerate(optimizer.param_groups):
            _check_group(group, i)
            for p in group["params"]:
                if id(p) in seen:
                    raise RuntimeError(
                        f"{_PREFIX}: a param is listed twice in param group {i}: the normal step "
                        "steps it twice, a step inside backward once"
                    )
                seen.add(id(p))
                owner = _OWNERS.get(p)
                if owner is not None and owner() is not None and owner().active:
                    raise RuntimeError(
                        f"{_PREFIX}: a param of param group {i} steps inside backward with "
                        "another optimizer already"
                    )
                if p.grad is not None:
                    raise RuntimeError(
                        f"{_PREFIX}: a param of param group {i} holds a grad, which the next "
                        "backward would add to and step with; call optimizer.zero_grad() first"
                    )
                if p.requires_grad:  # (a frozen param gets no grad, and torch no hook on it)
                    params.append(p)
        self._active = True
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (group index, position)
        self._views: dict[int, tuple[dict, list]] = {}  # id(param) -> (its one-param group, [p])
        self._task: int | None = None  # the graph task (backward) whose step has begun
        self._stepped: set[int] = set()  # params stepped since the last optimizer.step()
        self._repeated = 0  # of those, steps of a param stepped already
        self._step_called = False  # whether the user calls optimizer.step() (a no-op) each time
        self._hooks: list[RemovableHandle] = []
        self._params = params  # (the hooked ones: a param may leave the groups meanwhile)
        for p in params:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
            _OWNERS[p] = weakref.ref(self)
        self._install_step()
        _ACTIVE[id(optimizer)] = self

    @property
    def optimizer(self) -> Optimizer | None:
        """The optimizer that steps inside backward (None once garbage-collected)."""
        return self._optimizer()

    @property
    def active(self) -> bool:
        """Whether the optimizer steps inside backward (until :meth:`remove`)."""
        return self._active

    def remove(self) -> None:
        r"""Stop stepping inside backward: remove the hooks from the params and restore
        ``optimizer.step``. Calling it again does nothing."""
        if not self._active:
            return
        self._active = False
        self._task = None
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for p in self._params:
            owner = _OWNERS.get(p)
            if owner is not None and owner() is self:
                del _OWNERS[p]
        self._params = []
        if _ACTIVE.get(self._optimizer_id) is self:
            del _ACTIVE[self._optimizer_id]
        opt = self.optimizer
        if opt is not None:
            if opt.__dict__.get("step") is self._step:
                if self._prior_step is None:
                    del opt.step
                else:
                    opt.step = self._prior_step
            # (a wrapper installed on top of ours stays: ours hands calls on once inactive)
            caches = opt.__dict__.get("_plan_caches")
            if caches:
                for view, _ in self._views.values():
                    caches.pop(id(view), None)
        self._views.clear()

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"StepInBackward({type(self.optimizer).__name__}, {state})"

    # -------------------------------------------------------------------------- optimizer.step
    def _install_step(self) -> None:
        """Put a ``step`` on the optimizer instance that does not step again (see
        :meth:`_user_step`), in front of the class's (and of a scheduler's wrapper, kept to be
        restored): the step hooks then run once per backward, never again from ``step()``."""
        opt = self.optimizer
        self._prior_step = opt.__dict__.get("step")
        prior, opt_ref, handle_ref = self._prior_step, weakref.ref(opt), weakref.ref(self)

        @functools.wraps(type(opt).step)
        def step(*args: Any, **kwargs: Any) -> Any:
            opt = opt_ref()
            handle = handle_ref()
            if handle is not None and handle.active:
                opt._opt_called = True
                return handle._user_step(*args, **kwargs)
            if prior is not None:
                return prior(*args, **kwargs)
            opt._opt_called = True
            return type(opt).step(opt, *args, **kwargs)

        # It records the call (``_opt_called``) as the schedulers' own wrapper does, so it carries
        # their mark: a scheduler made before or after does not warn that step() was replaced.
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self._step = step
        opt.step = step

    def _user_step(self, closure: Any = None) -> None:
        """``optimizer.step()`` while stepping inside backward: every param with a grad stepped
        already, so nothing is left to do; raise where something was not stepped, or stepped
        more often than the normal step would."""
        opt = self.optimizer
        if closure is not None:
            raise RuntimeError(
                f"{_PREFIX}: optimizer.step(closure): a closure re-evaluates the model and steps "
                "with all its grads at once; the params step inside backward already"
            )
        if (
            getattr(opt, "grad_scale", None) is not None
            or getattr(opt, "found_inf", None) is not None
        ):
            raise RuntimeError(
                f"{_PREFIX}: GradScaler cannot unscale grads that were stepped with, and freed, "
                "inside backward"
            )
        pending = [
            (i, j)
            for i, group in enumerate(opt.param_groups)
            for j, p in enumerate(group["params"])
            if p.grad is not None
        ]
        if pending:
            where = ", ".join(f"group {i} param {j}" for i, j in pending[:5])
            raise RuntimeError(
                f"{_PREFIX}: optimizer.step() found grads that were not stepped inside backward "
                f"({where}{', ...' if len(pending) > 5 else ''}): set by hand, or on params "
                "added or unfrozen after step_in_backward(). Remove the handle and call "
                "step_in_backward() again to cover them"
            )
        repeated, self._repeated = self._repeated, 0
        self._stepped.clear()
        self._step_called = True
        if repeated:
            raise RuntimeError(_accumulation_error(repeated))

    # ---------------------------------------------------------------------------- the backward
    def _on_grad(self, p: torch.Tensor) -> None:
        """The post-accumulate-grad hook of each param: step it, then free its grad."""
        if not self._active or p.grad is None:
            return
        opt = self.optimizer
        if opt is None:
            self.remove()
            raise RuntimeError(
                f"{_PREFIX}: the optimizer that steps these params inside backward was "
                "garbage-collected without handle.remove(): keep a reference to it while it "
                "trains (the hooks are now removed, and this backward's grads stay)"
            )
        task = torch._C._current_graph_task_id()
        try:
            if task != self._task:
                self._begin(opt, task)
            found = self._locate(opt, p)
            if found is None:  # (no longer one of the optimizer's params)
                return
            group, index, position = found
            _check_group(group, index)
            if id(p) in self._stepped:
                # a second step of this param since optimizer.step(): where the loop calls it
                # after every backward, this backward adds to grads that were stepped already
                if self._step_called:
                    raise RuntimeError(_accumulation_error(1))
                self._repeated += 1
            view = self._view(p, group, position)
            with _profiled(opt, "step"), torch.no_grad():
                self._step_one(view)
        except BaseException:
            self._task = None  # (this backward fails: the next one begins afresh)
            raise
        self._stepped.add(id(p))
        p.grad = None

    def _begin(self, opt: Optimizer, task: int) -> None:
        """The first grad of a backward: the step pre-hooks, and the end of the step queued for
        the end of this backward."""
        args: tuple = (opt,)
        if _torch_optimizer._global_optimizer_pre_hooks or opt._optimizer_step_pre_hooks:
            new_args, new_kwargs = _run_pre_hooks(opt, args, {})
            if new_kwargs or len(new_args) != 1 or new_args[0] is not opt:
                raise RuntimeError(
                    f"{_PREFIX}: a step pre-hook returned new arguments for step(); inside "
                    "backward there is no step() call to pass them to"
                )
        torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._end, task))
        self._task = task

    def _end(self, task: int) -> None:
        """The end of a backward that stepped: record the step, then the step post-hooks."""
        opt = self.optimizer
        if task != self._task or opt is None:  # (removed, or that backward failed)
            return
        self._task = None
        opt._record_step(True)
        opt._opt_called = True  # what a scheduler's wrapper records: the optimizer stepped
        opt._optimizer_step_code()
        args: tuple = (opt,)
        global_post = _torch_optimizer._global_optimizer_post_hooks
        for hook in chain(opt._optimizer_step_post_hooks.values(), global_post.values()):
            hook(opt, args, {})

    def _locate(self, opt: Optimizer, p: torch.Tensor) -> tuple[dict, int, int] | None:
        """``p``'s group now (``load_state_dict`` makes new group dicts), its index and ``p``'s
        position in it; None where ``p`` left the optimizer."""
        groups = opt.param_groups
        where = self._where.get(id(p))
        if where is not None:
            i, j = where
            if i < len(groups) and j < len(groups[i]["params"]) and groups[i]["params"][j] is p:
                return groups[i], i, j
        self._where = {
            id(q): (i, j) for i, group in enumerate(groups) for j, q in enumerate(group["params"])
        }
        where = self._where.get(id(p))
        return None if where is None else (groups[where[0]], *where)

    def _view(self, p: torch.Tensor, group: dict, position: int) -> dict:
        """``p``'s one-param group: ``group``'s options as they are now (a scheduler changes
        them between steps). One dict per param for the handle's life, so that the plan cache,
        keyed by the group dict, keeps each param's checked plan between steps."""
        view, params = self._views.get(id(p)) or self._views.setdefault(id(p), ({}, [p]))
        view.clear()
        view.update(group)
        view["params"] = params
        if "param_names" in group:
            view["param_names"] = [group["param_names"][position]]
        return view

    def _step_one(self, view: dict) -> None:
        """One step of the one-param group ``view``: the normal step's plan, checks and first
        pass, for this group alone."""
        opt = self.optimizer
        if self._kind == "plan":
            from fuseopt._plan import plan_group  # (the plan imports the optimizers' modules)

            plan = plan_group(opt, view)
            if plan is None:
                return
            _, skip = _first_pass.prepare([(view, plan)])
            if not skip:
                plan.run()
            return
        # a per-param step of plain code: its own step, on the one-param group alone
        groups = opt.param_groups
        opt.param_groups = [view]
        try:
            opt._step()
        finally:
            opt.param_groups = groups


def _accumulation_error(count: int) -> str:
    return (
        f"{_PREFIX}: {count} param step(s) since the last optimizer.step() stepped a param a "
        "second time: more than one backward ran between two optimizer.step() calls (gradient "
        "accumulation?). Inside backward every backward steps; to accumulate grads over "
        "several backward passes, step normally (remove the handle)"
    )


def step_in_backward(optimizer: Optimizer) -> StepInBackward:
    r"""Step each param of ``optimizer`` as soon as its gradient is accumulated, inside
    ``backward()``, and free that gradient at once.

    Each param's step is the optimizer's step of that param alone (the numbers of
    ``optimizer.step()``, bit for bit; with ``stochastic_rounding=True``, other random bits for
    the bfloat16 stores, as each param is a launch of its own), run by a
    :meth:`~torch.Tensor.register_post_accumulate_grad_hook` when autograd has accumulated the
    param's grad; the grad is then set to None. A training step never holds every grad at once:
    its peak memory drops by up to the size of the grads.

    Everything else stays the optimizer's: its param groups (a scheduler's lr reaches the next
    backward's steps), step counts and state (``state_dict`` / ``load_state_dict`` at any time
    between backward passes), ``zero_grad`` (harmless: the grads are None). The step hooks
    (:meth:`~fuseopt.Optimizer.register_step_pre_hook`, the global ones) run once per backward
    that steps: the pre-hooks when its first grad is ready, the post-hooks when it ends, with
    ``args == (optimizer,)`` and ``kwargs == {}``. ``optimizer.step()`` steps nothing: it returns
    None, so an unchanged training loop works, and raises where grads were left unstepped, with
    a closure, or where a param was stepped by two backward passes since the last call.

    Raises a ``RuntimeError`` for what cannot step one param at a time: ``max_grad_norm`` and
    ``skip_if_nonfinite`` (they read every grad first), ``differentiable=True``, LBFGS (a
    closure over all params), an update that reads sums over all params (Prodigy), a step that
    updates per-group values, or an optimizer whose own step fuseopt cannot see into.

    Args:
        optimizer (Optimizer): a fuseopt optimizer; its params must hold no grad.

    Returns:
        StepInBackward: ``handle.remove()`` restores the normal step; ``with handle:`` removes it
        on leaving the block.

    Example::

        >>> opt = fuseopt.AdamW(model.parameters(), lr=1e-3)
        >>> handle = fuseopt.step_in_backward(opt)
        >>> loss_fn(model(x), y).backward()  # every param stepped, every grad None
        >>> handle.remove()  # back to loss.backward(); opt.step()
    """
    return StepInBackward(optimizer)
