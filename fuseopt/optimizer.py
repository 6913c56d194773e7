"""The optimizer base class: param groups, state, hooks, ``state_dict`` and the ``step`` template.

Everything here is fuseopt's own code. ``Optimizer`` subclasses ``torch.optim.Optimizer`` only as a
type marker, so that ``isinstance`` checks in torch's schedulers, GradScaler, distributed
checkpointing and torch.compile accept it; it never calls that class's ``__init__`` (which would
patch ``step``) and overrides every public method.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from fuseopt import _compile, _quant_io, _storage

__all__ = ["Optimizer", "register_optimizer_step_pre_hook", "register_optimizer_step_post_hook"]

# The global step hooks have one registry, torch.optim's: tools register through torch's API and
# expect every optimizer's steps, and a hook registered through fuseopt sees torch's optimizers
# too. Its two dicts are read at every step through the module (never copied).
_torch_optimizer = sys.modules[torch.optim.Optimizer.__module__]

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class _RequiredParameter:
    """Marks an option that every param group must give (e.g. ``lr`` of an optimizer without default)."""

    def __repr__(self) -> str:
        return "<required parameter>"


required = _RequiredParameter()
# torch's own marker means the same: a custom optimizer ported to fuseopt may still use it.
_REQUIRED_MARKERS = (
    required,
    getattr(sys.modules[torch.optim.Optimizer.__module__], "required", required),
)


_NO_RANGE = contextlib.nullcontext()


def _profiled(opt: Optimizer, method: str):
    """torch's profiler range ``Optimizer.<method>#<class>.<method>`` while a profiler runs, else
    nothing: entering a ``record_function`` costs ~6 us, ~40 us with cold caches, every step."""
    if not torch.compiler.is_compiling() and torch.autograd._profiler_enabled():
        name = opt.__class__.__name__
        return torch.autograd.profiler.record_function(f"Optimizer.{method}#{name}.{method}")
    return _NO_RANGE


def _run_pre_hooks(opt: Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The global then the instance step pre-hooks; each may return new ``(args, kwargs)``."""
    global_hooks = _torch_optimizer._global_optimizer_pre_hooks
    for hook in chain(global_hooks.values(), opt._optimizer_step_pre_hooks.values()):
        result = hook(opt, args, kwargs)
        if result is None:
            continue
        if not (isinstance(result, tuple) and len(result) == 2):
            raise RuntimeError(
                f"{opt.__class__.__name__}.step pre-hook must return None or a tuple "
                f"of (new_args, new_kwargs), but got {result}."
            )
        args, kwargs = result
    return args, kwargs


def _add_hook(hooks: OrderedDict, hook: Callable, prepend: bool = False) -> RemovableHandle:
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    if prepend:
        hooks.move_to_end(handle.id, last=False)
    return handle


def register_optimizer_step_pre_hook(hook: Callable) -> RemovableHandle:
    r"""Register a pre hook common to all optimizers, fuseopt's and torch.optim's: the same
    registry as :func:`torch.optim.optimizer.register_optimizer_step_pre_hook`.

    The hook has the signature ``hook(optimizer, args, kwargs) -> None or (new_args, new_kwargs)``.

    Args:
        hook (Callable): called before every optimizer's ``step``.

    Returns:
        :class:`torch.utils.hooks.RemovableHandle`: ``handle.remove()`` unregisters the hook.
    """
    return _torch_optimizer.register_optimizer_step_pre_hook(hook)


def register_optimizer_step_post_hook(hook: Callable) -> RemovableHandle:
    r"""Register a post hook common to all optimizers, fuseopt's and torch.optim's: the same
    registry as :func:`torch.optim.optimizer.register_optimizer_step_post_hook`.

    The hook has the signature ``hook(optimizer, args, kwargs) -> None``.

    Args:
        hook (Callable): called after every optimizer's ``step``.

    Returns:
        :class:`torch.utils.hooks.RemovableHandle`: ``handle.remove()`` unregisters the hook.
    """
    return _torch_optimizer.register_optimizer_step_post_hook(hook)


def _apply_step(opt: Optimizer) -> None:
    """Plan every group, then run the plans: every group is checked before anything changes, so
    a step that fails changes nothing."""
    from fuseopt._plan import plan_step  # the plan imports this module's users

    plans, grad_norm, skip = plan_step(opt)
    if not skip:
        for group, plan in plans:
            with torch.set_grad_enabled(bool(group.get("differentiable", False))):
                plan.run()
    if grad_norm is not None:
        opt.grad_norm = grad_norm
    ran = bool(plans) and not skip
    opt._record_step(ran, next((p.found_inf for _, p in plans if p.found_inf is not None), None))


class Optimizer(torch.optim.Optimizer):
    r"""Base class for all fuseopt optimizers, with the API of :class:`torch.optim.Optimizer`.

    Subclasses either name an elementwise :class:`~fuseopt.rule.Rule` in ``rule`` (the base then does
    the whole step) or override :meth:`_step`.

    Args:
        params (iterable): an iterable of :class:`torch.Tensor` s, of ``(name, tensor)`` pairs, or of
            :class:`dict` s (param groups). Specifies what Tensors should be optimized.
        defaults (dict): default values of optimization options, used where a param group does not
            give them.
    """

    rule = None  # the elementwise update rule; None for optimizers that override ``_step``
    #: the total grad norm of the last step that clipped (``max_grad_norm``), a 0-dim tensor
    grad_norm: torch.Tensor | None = None
    # what ``stepped`` and ``steps_taken`` read (not in state dicts: a loaded optimizer starts
    # counting again)
    _ran_last = False
    _steps_ran = 0
    _found_inf_last: torch.Tensor | None = None  # GradScaler's, read by the last step's kernels
    _skipped_on_device: torch.Tensor | None = None  # of those, the steps they skipped

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        torch._C._log_api_usage_once("python.optimizer")
        self.defaults = defaults
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or dicts, "
                "but got " + torch.typename(params)
            )
        self.state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []
        param_groups = list(params)
        if len(param_groups) == 0:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        for group in param_groups:
            self.add_param_group(group)
        if defaults.get("fused"):  # torch checks these after the groups, in this order
            if defaults.get("differentiable"):
                raise RuntimeError("`fused` does not support `differentiable`")
            if defaults.get("foreach"):
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self._warned_capturable_if_run_uncaptured = True
        _compile.register(self)

    # ----------------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "state": self.state, "param_groups": self.param_groups}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if self.rule is not None and self.rule.has_step:
            for p_state in state["state"].values():
                if p_state and "step" not in p_state:
                    raise KeyError("step")  # as torch, before anything changes
        self.__dict__.update(state)
        _compile.register(self)
        # new groups and state (load_state_dict): the plans kept between steps are stale
        self.__dict__.pop("_plan_caches", None)
        for name in _HOOK_DICTS:
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())
        self.defaults.setdefault("differentiable", False)
        # Groups saved by an older version lack newer options: back-fill the ones torch's
        # __setstate__ does (a group without a hyperparameter, from another algorithm's
        # checkpoint, fails at the step with torch's KeyError)
        for key, value in self._backfilled().items():
            for group in self.param_groups:
                group.setdefault(key, value)
        self._tensor_steps()
        self._after_setstate()

    def _tensor_steps(self) -> None:
        """Make a ``step`` saved as a number (old checkpoints) a tensor, as torch's optimizers do."""
        if self.rule is None or not self.rule.has_step:
            return
        from fuseopt._dispatch import scalar_dtype  # the dispatcher imports this module

        for group in self.param_groups:
            on_device = bool(group.get("capturable") or group.get("fused"))
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "step" not in state or torch.is_tensor(state["step"]):
                    continue
                value = float(state["step"])
                if on_device:
                    dtype = scalar_dtype(group.get("fused"))
                    state["step"] = torch.tensor(value, dtype=dtype, device=p.device)
                else:
                    state["step"] = torch.tensor(value, dtype=scalar_dtype())

    def _after_setstate(self) -> None:
        """Per-algorithm fix-ups after unpickling or loading (e.g. AdamW forces decoupled decay)."""

    #: the options torch's ``__setstate__`` gives a loaded group that lacks them, and their
    #: values (None: the flags of the signature, for algorithms torch.optim does not have)
    _setstate_defaults: dict[str, Any] | None = None

    @classmethod
    def _backfilled(cls) -> dict[str, Any]:
        """The options a loaded group gets where it lacks them (see ``_setstate_defaults``)."""
        if cls._setstate_defaults is not None:
            return cls._setstate_defaults
        defaults = cls._signature_defaults().items()
        return {
            k: v
            for k, v in defaults
            if (v is None or isinstance(v, bool)) and k not in _storage.OPTIONS  # (when asked)
        }

    @classmethod
    def _signature_defaults(cls) -> dict[str, Any]:
        params = inspect.signature(cls.__init__).parameters.values()
        return {
            p.name: p.default
            for p in params
            if p.default is not inspect.Parameter.empty and p.name not in ("self", "params")
        }

    def __repr__(self) -> str:
        # torch's layout: each group opens with a newline and every option line ends with one, so
        # groups are separated by a blank line and no groups give "Name ()".
        parts = [self.__class__.__name__, " ("]
        for i, group in enumerate(self.param_groups):
            parts.append(f"\nParameter Group {i}\n")
            parts.extend(f"    {key}: {group[key]}\n" for key in sorted(group) if key != "params")
        parts.append(")")
        return "".join(parts)

    # ------------------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        r"""Add a param group to the :class:`Optimizer` s ``param_groups``.

        Useful when fine-tuning: frozen layers can be made trainable and added as training goes on.

        Args:
            param_group (dict): the Tensors to optimize (``"params"``), with group-specific options.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the ordering "
                "of tensors in sets will change between runs. Please use a list instead."
            )
        else:
            params = list(params)
        names = [p[0] for p in params if isinstance(p, tuple)]
        param_group["params"] = [p[1] if isinstance(p, tuple) else p for p in params]
        if names:
            if len(names) != len(params):
                raise ValueError(
                    "all optimizer params should be with/without names. Some param names are missing"
                )
            param_group["param_names"] = names

        for param in param_group["params"]:
            if not isinstance(param, torch.Tensor):
                raise TypeError(
                    "optimizer can only optimize Tensors, but one of the params is "
                    + torch.typename(param)
                )
            if not self.defaults.get("differentiable", None) and not (
                param.is_leaf or param.retains_grad
            ):
                raise ValueError("can't optimize a non-leaf Tensor")

        for name, default in self.defaults.items():
            if any(default is marker for marker in _REQUIRED_MARKERS) and name not in param_group:
                raise ValueError(
                    "parameter group didn't specify a value of required optimization parameter "
                    + name
                )
            param_group.setdefault(name, default)

        params = param_group["params"]
        if len(params) != len(set(params)):
            warnings.warn(
                "optimizer contains a parameter group with duplicate parameters; in future, this will "
                "cause an error; see github.com/pytorch/pytorch/issues/40967 for more information",
                stacklevel=3,
            )
        seen: set[torch.Tensor] = set()
        for group in self.param_groups:
            seen.update(group["params"])
            if ("param_names" in param_group) != ("param_names" in group):
                which = "with names" if "param_names" in param_group else "without names"
                raise ValueError(
                    "all optimizer param groups should be with/without names. "
                    f"cannot add param group {which} to the optimizer"
                )
        if not seen.isdisjoint(params):
            raise ValueError("some parameters appear in more than one parameter group")
        _storage.added(self, param_group)  # state_dtype, stochastic_rounding, kahan_sum
        self.param_groups.append(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        r"""Reset the gradients of all optimized :class:`torch.Tensor` s.

        Args:
            set_to_none (bool, optional): set the grads to None instead of zero; saves memory, and
                optimizers skip params whose grad is None (default: True)
        """
        dense: defaultdict[tuple, list[torch.Tensor]] = defaultdict(list)
        with _profiled(self, "zero_grad"):
            for group in _compile.groups(self):  # (as dynamo may trace it: see ``groups``)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if set_to_none:
                        p.grad = None
                        continue
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    if p.grad.is_sparse:
                        p.grad.zero_()
                    else:
                        dense[(p.grad.device, p.grad.dtype)].append(p.grad)
            for grads in dense.values():
                torch._foreach_zero_(grads)

    # ------------------------------------------------------------------------------------ step
    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler's question: does ``step`` unscale grads and skip inf steps itself (reading
        the ``grad_scale`` and ``found_inf`` attributes GradScaler sets)? Yes where every param
        runs the fused Triton kernels; torch answers yes for its fused optimizers."""
        from fuseopt._dispatch import amp_scaling  # the dispatcher imports this module

        return amp_scaling(self)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        r"""Perform a single optimization step.

        Args:
            closure (Callable, optional): a closure that re-evaluates the model and returns the loss;
                it runs with gradients enabled.
        """
        if self.rule is not None:
            return self._step(closure)  # (it records what it did: see ``stepped``)
        loss = self._step(closure)
        self._record_plain_step()
        return loss

    def _record_plain_step(self) -> None:
        """:meth:`_record_step` after the step of an optimizer without a rule (plain code): it
        ran where a param has a grad."""
        groups = _compile.groups(self)
        self._record_step(any(p.grad is not None for g in groups for p in g["params"]))

    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The algorithm's step, without hooks: evaluate the closure, then apply the rule per group."""
        if self.rule is None:
            raise NotImplementedError(f"{self.__class__.__name__} does not define a step")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():  # dynamo is tracing this code
            _compile.graph_step(self)
        else:
            _apply_step(self)
        return loss

    def _record_step(self, ran: bool, found_inf: torch.Tensor | None = None) -> None:
        """Record what the step just taken did: whether it ran the update (``ran``), and
        GradScaler's ``found_inf`` where the kernels skip on it themselves (read lazily: on a
        device it is not brought to the host now)."""
        self._ran_last = ran
        self._found_inf_last = found_inf if ran else None
        if ran:
            self._steps_ran += 1
            if found_inf is not None:
                skipped = found_inf.detach().to(torch.int64)
                prior = self._skipped_on_device
                self._skipped_on_device = skipped if prior is None else prior + skipped

    @property
    def stepped(self) -> bool:
        """Whether the last :meth:`step` updated the params: False where it found no grad, where
        ``skip_if_nonfinite`` skipped it, or where GradScaler's ``found_inf`` did (a step
        GradScaler skips without calling :meth:`step` leaves this as the previous step set it:
        compare :attr:`steps_taken` before and after ``scaler.step``)."""
        if not self._ran_last:
            return False
        return self._found_inf_last is None or not bool(self._found_inf_last.item())

    @property
    def steps_taken(self) -> int:
        """The number of :meth:`step` calls that updated the params since construction (or
        unpickling): a scheduler that must advance only with the optimizer steps when this
        grows."""
        skipped = self._skipped_on_device
        return self._steps_ran - (0 if skipped is None else int(skipped.item()))

    @staticmethod
    def profile_hook_step(func: Callable) -> Callable:
        """Return ``func`` (a ``step(self, ...)`` function) made to run the step hooks around it.

        The wrapper opens the profiler range ``Optimizer.step#<class>.step``, runs the global then
        the instance pre-hooks (a hook may return new ``(args, kwargs)``, ``args[0]`` being the
        optimizer), calls ``func``, then the instance then the global post-hooks. fuseopt applies it
        once per class, when the class is defined (to :meth:`step` and to any ``step`` a subclass
        defines), never when an optimizer is constructed.
        """

        @functools.wraps(func)
        def hooked_step(*args: Any, **kwargs: Any) -> Any:
            opt = args[0]
            with _profiled(opt, "step"):
                # (the checks spare the usual step, without hooks, two chains: ~10 us cold)
                if _torch_optimizer._global_optimizer_pre_hooks or opt._optimizer_step_pre_hooks:
                    args, kwargs = _run_pre_hooks(opt, args, kwargs)
                out = func(*args, **kwargs)
                opt._optimizer_step_code()
                global_post = _torch_optimizer._global_optimizer_post_hooks
                if opt._optimizer_step_post_hooks or global_post:
                    for hook in chain(
                        opt._optimizer_step_post_hooks.values(), global_post.values()
                    ):
                        hook(opt, args, kwargs)
            return out

        hooked_step.hooked = True  # type: ignore[attr-defined]  # torch's "already wrapped" mark
        return hooked_step

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A subclass that defines its own ``step`` (as a torch.optim custom optimizer does) gets the
        # hooks too: torch wraps such a ``step`` at construction; fuseopt does it here, once.
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if inspect.isfunction(step) and not getattr(step, "hooked", False):
            cls.step = Optimizer.profile_hook_step(step)

    def _optimizer_step_code(self) -> None:
        """Entry point for ``torch.profiler``'s Python tracer, called after each step (as torch)."""

    # ------------------------------------------------------------------------------------- hooks
    def register_step_pre_hook(self, hook: Callable) -> RemovableHandle:
        r"""Register a hook called before :meth:`step`.

        The hook has the signature ``hook(optimizer, args, kwargs) -> None or (new_args, new_kwargs)``;
        returned args and kwargs replace those that ``step`` is called with.

        Args:
            hook (Callable): the hook.

        Returns:
            :class:`torch.utils.hooks.RemovableHandle`: ``handle.remove()`` unregisters the hook.
        """
        return _add_hook(self._optimizer_step_pre_hooks, hook)

    def register_step_post_hook(self, hook: Callable) -> RemovableHandle:
        r"""Register a hook called after :meth:`step`, as ``hook(optimizer, args, kwargs) -> None``.

        Args:
            hook (Callable): the hook.

        Returns:
            :class:`torch.utils.hooks.RemovableHandle`: ``handle.remove()`` unregisters the hook.
        """
        return _add_hook(self._optimizer_step_post_hooks, hook)

    def register_state_dict_pre_hook(
        self, hook: Callable, prepend: bool = False
    ) -> RemovableHandle:
        r"""Register a hook called as ``hook(optimizer) -> None`` before :meth:`state_dict`.

        Args:
            hook (Callable): the hook.
            prepend (bool): run it before the hooks already registered (default: False)

        Returns:
            :class:`torch.utils.hooks.RemovableHandle`: ``handle.remove()`` unregisters the hook.
        """
        return _add_hook(self._optimizer_state_dict_pre_hooks, hook, prepend)

    def register_state_dict_post_hook(
        self, hook: Callable, prepend: bool = False
    ) -> RemovableHandle:
        r"""Register a hook called as ``hook(optimizer, state_dict) -> state_dict or None``.

        It runs after :meth:`state_dict` built the dict; a returned dict replaces it.

        Args:
            hook (Callable): the hook.
            prepend (bool): run it before the hooks already registered (default: False)

        Returns:
            :class:`torch.utils.hooks.RemovableHandle`: ``handle.remove()`` unregisters the hook.
        """
        return _add_hook(self._optimizer_state_dict_post_hooks, hook, prepend)

    def register_load_state_dict_pre_hook(
        self, hook: Callable, prepend: bool = False
    ) -> RemovableHandle:
        r"""Register a hook called as ``hook(optimizer, state_dict) -> state_dict or None``.

        It runs before :meth:`load_state_dict` loads (on a shallow copy of the given dict); a returned
        dict is loaded instead.

        Args:
            hook (Callable): the hook.
            prepend (bool): run it before the hooks already registered (default: False)

        Returns:
            :class:`torch.utils.hooks.RemovableHandle`: ``handle.remove()`` unregisters the hook.
        """
        return _add_hook(self._optimizer_load_state_dict_pre_hooks, hook, prepend)

    def register_load_state_dict_post_hook(
        self, hook: Callable, prepend: bool = False
    ) -> RemovableHandle:
        r"""Register a hook called as ``hook(optimizer) -> None`` after :meth:`load_state_dict`.

        Args:
            hook (Callable): the hook.
            prepend (bool): run it before the hooks already registered (default: False)

        Returns:
            :class:`torch.utils.hooks.RemovableHandle`: ``handle.remove()`` unregisters the hook.
        """
        return _add_hook(self._optimizer_load_state_dict_post_hooks, hook, prepend)

    # -------------------------------------------------------------------------------- state dict
    def state_dict(self, *, compact: bool = False) -> dict[str, Any]:
        r"""Return the optimizer's state as a :class:`dict`, in torch.optim's format.

        ``state`` maps integer param ids to each param's state; ``param_groups`` lists the groups
        with their options, ``params`` as ids (and ``param_names`` where the group was built from
        named parameters). Ids number the params in group order.

        8-bit states (``state_bits=8``) are saved dequantized, in torch's layout: each under its
        own key, in the dtype of the param's full-precision states (the group's ``state_dtype``,
        else the param's), so that ``torch.optim`` loads them. Loading them back into an 8-bit
        optimizer quantizes them again, to codes within one step of the saved ones.

        Args:
            compact (bool, keyword-only): save 8-bit states as they are held, the uint8 codes
                under ``<key>_codes`` and the float32 scales of its blocks under
                ``<key>_absmax``: a quarter of the bytes, and a load gives back exactly the
                state saved (fuseopt only: torch.optim loads it but its step raises a
                ``KeyError`` for ``<key>``) (default: False)
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        # torch's numbering: a param's id is a position in the flat list of all groups' params;
        # a param met in an earlier group keeps its id, else it takes the position of its last
        # occurrence in its group (so a duplicate within a group shifts the ids of what follows).
        ids: dict[int, int] = {}
        groups = []
        position = 0
        group_of: dict[int, dict[str, Any]] = {}  # (each param's first group, as its id)
        for group in self.param_groups:
            for p in group["params"]:
                group_of.setdefault(id(p), group)
            packed = {k: v for k, v in group.items() if k != "params"}
            new_ids = {}
            for p in group["params"]:
                if id(p) not in ids:
                    new_ids[id(p)] = position
                position += 1
            ids.update(new_ids)
            packed["params"] = [ids[id(p)] for p in group["params"]]
            groups.append(packed)
        state = {
            (ids[id(k)] if isinstance(k, torch.Tensor) else k): (
                _quant_io.saved(self.rule, group_of[id(k)], k, v, compact)
                if isinstance(k, torch.Tensor) and id(k) in group_of
                else v
            )
            for k, v in self.state.items()
        }
        state_dict = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(
        self,
        state_dict: dict[str, Any],
        *,
        by_name: bool = False,
        strict: bool = True,
        keep_state_dtype: bool = False,
    ) -> Any:
        r"""Load an optimizer state saved by :meth:`state_dict` (of fuseopt or of torch.optim).

        By default the load is torch's, by position: group count and sizes must match, else
        ``ValueError`` and nothing changes; the saved groups' options replace ours. State tensors
        are moved to each param's device, and floating ones cast to its dtype; ``step`` is kept as
        saved (moved to the param's device as float32 where the group is ``fused`` or
        ``capturable``). In a group with a ``state_dtype`` (ours, kept where the saved group has
        none: a torch checkpoint loads into a bfloat16-state optimizer), the state tensors shaped
        like the param are cast to that dtype instead: the format the group asks for. Likewise
        with ``state_bits=8`` (ours where the saved group has none): a full-precision state of a
        param that keeps 8-bit states is quantized, and a compact one
        (``state_dict(compact=True)``: codes and scales) is taken as saved, or dequantized where
        the param keeps full precision; codes or scales that cannot be the param's raise
        ``ValueError`` and nothing changes. The load hooks run before and after, either way.

        Args:
            state_dict (dict): optimizer state, as returned by :meth:`state_dict`, or a name-keyed
                one from ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``
                (with ``by_name=True``).
            by_name (bool, keyword-only): match saved params to ours by the names in each group's
                ``param_names`` (an optimizer built from ``model.named_parameters()``), not by
                position: groups may be split, merged or reordered, params added or removed
                (docs/checkpoints.md says what happens to the groups' options) (default: False)
            strict (bool, keyword-only): with ``by_name``, raise ``RuntimeError`` (and change
                nothing) where a param of either side has no match or a saved state does not fit
                its param's shape; with False, load what matches and leave the rest fresh
                (default: True)
            keep_state_dtype (bool, keyword-only): keep each floating state tensor in its saved
                dtype (moved to the param's device only), where torch casts it to the param's
                dtype (torch issue #43706: float32 moments of bfloat16 params would become
                bfloat16); 8-bit states keep their group's format (default: False)

        Returns:
            None for the positional load; with ``by_name``, a named tuple
            ``(missing_keys, unexpected_keys)`` of param names, as
            :meth:`torch.nn.Module.load_state_dict` returns.
        """
        if not strict and not by_name:
            raise ValueError("strict=False applies to by_name=True; the positional load is strict")
        state_dict = state_dict.copy()  # shallow, as nn.Module does
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if by_name:
            from fuseopt._by_name import load_by_name  # it imports this module

            loaded = load_by_name(self, state_dict, strict=strict, keep=keep_state_dtype)
        else:
            loaded = self._load_by_position(state_dict, keep_state_dtype)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
        return loaded

    def _load_by_position(self, state_dict: dict[str, Any], keep: bool = False) -> None:
        """torch's load: the saved groups and params, in order, are ours (and our storage
        options where a saved group has none)."""
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of "
                "optimizer's group"
            )
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
            )
        )
        group_of = {}  # each saved param's group, with our storage options where it has none
        for g, saved in zip(groups, saved_groups):
            _storage.carry_options(g, saved)
            for pid in saved["params"]:
                group_of.setdefault(pid, saved)
        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for k, v in state_dict["state"].items():
            if k in id_map:
                try:
                    state[id_map[k]] = _loaded_state(self.rule, group_of[k], id_map[k], v, keep)
                except ValueError as e:  # (nothing has changed yet)
                    raise ValueError(f"loaded state dict: the state of param {k!r}: {e}") from None
            else:
                state[k] = v  # state of no param is kept as is (torch does so for old checkpoints)
        for group, saved in zip(groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
        self.__setstate__({"state": state, "param_groups": saved_groups})


def _loaded_state(rule, group: dict[str, Any], param: torch.Tensor, value: Any, keep: bool) -> Any:
    """A copy of a loaded param state ``value`` for ``param``, in the format of ``group`` (the
    group it steps in after the load): its 8-bit states quantized or dequantized as the group
    asks (:mod:`fuseopt._quant_io`; ``ValueError`` for codes and scales that cannot be the
    param's), the rest cast as :func:`_cast_state` casts it."""
    on_device = bool(group.get("fused")) or bool(group.get("capturable"))
    sd = group.get("state_dtype")
    if not isinstance(value, dict) or rule is None:
        return _cast_state(param, value, on_device, keep=keep, state_dtype=sd)
    value, final = _quant_io.loaded(rule, group, param, value)
    return {
        k: v if k in final else _cast_state(param, v, on_device, k, keep=keep, state_dtype=sd)
        for k, v in value.items()
    }


def _cast_state(
    param: torch.Tensor, value: Any, on_device_step: bool, key: Any = None, *,
    keep: bool = False, state_dtype: torch.dtype | None = None,
) -> Any:  # fmt: skip
    """A copy of a loaded param state ``value`` for ``param``, as torch's load makes it: tensors
    moved to the param's device, floating ones cast to its dtype, except ``step``, kept as saved
    or, where ``on_device_step`` (a ``fused`` or ``capturable`` group), made float32 on the
    param's device; dicts and other iterables copied element by element. ``state_dtype``: the
    group's storage format (:mod:`fuseopt._storage`), the dtype of the tensors shaped like the
    param; ``keep``: floating tensors keep their saved dtype."""
    if isinstance(value, torch.Tensor):
        if key == "step":
            if on_device_step:
                return value.to(dtype=torch.float32, device=param.device)
            return value
        if param.is_floating_point() and not (keep and value.is_floating_point()):
            dtype = _storage.loaded_dtype(param, value, key, state_dtype)
            return value.to(dtype=dtype, device=param.device)
        return value.to(device=param.device)
    if isinstance(value, dict):
        return {
            k: _cast_state(param, v, on_device_step, k, keep=keep, state_dtype=state_dtype)
            for k, v in value.items()
        }
    if isinstance(value, Iterable) and not isinstance(value, str):
        return type(value)(
            _cast_state(param, v, on_device_step, keep=keep, state_dtype=state_dtype) for v in value
        )
    return value


# The base ``step`` runs the hooks: wrapped once here, at import (subclasses' own ``step`` in
# ``__init_subclass__``); constructing an optimizer patches nothing.
Optimizer.step = Optimizer.profile_hook_step(Optimizer.step)
