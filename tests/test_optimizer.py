"""The base-class API of ``fuseopt.Optimizer``, checked against ``torch.optim.Optimizer``.

Most tests build the same optimizer in both libraries on identical (cloned) params, drive both the
same way and compare: param groups, state, state dicts, errors (type and message), hooks, repr.
Numeric comparisons use ``foreach=False`` on both sides, where fuseopt runs torch's for-loop math,
and are bitwise (``torch.equal``).
"""

from __future__ import annotations

import copy
import inspect
import pickle
import re
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fuseopt
from fuseopt.optimizer import required as fuse_required

torch_optimizer_module = sys.modules["torch.optim.optimizer"]

SHAPES = [(3, 2), (4,), (2, 2)]

# (name, fuseopt class, torch class, kwargs): the optimizers the state-dict tests run on.
CASES = [
    ("sgd_momentum", fuseopt.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("adam_amsgrad", fuseopt.Adam, torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
    ("adamw", fuseopt.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
]
CASE_IDS = [c[0] for c in CASES]


# --------------------------------------------------------------------------------------- helpers
def make_params(
    seed: int = 0, shapes=SHAPES, dtype=torch.float32, device="cpu"
) -> list[torch.Tensor]:
    """Drawn on the CPU, then moved: the same values on every device."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).to(device).requires_grad_() for s in shapes]


def clone(params) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def names_for(params) -> list[str]:
    return [f"layer{i}.weight" for i in range(len(params))]


def set_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)


def build_pair(fuse_cls, torch_cls, kwargs, *, named=False, groups=False, seed=0, device="cpu"):
    """(fuseopt optimizer, its params, torch optimizer, its params) on equal params."""
    ours = make_params(seed, device=device)
    theirs = clone(ours)

    def spec(params):
        items = list(zip(names_for(params), params)) if named else list(params)
        if groups:
            return [{"params": items[:1]}, {"params": items[1:], "lr": 0.05}]
        return items

    return fuse_cls(spec(ours), **kwargs), ours, torch_cls(spec(theirs), **kwargs), theirs


def run_steps(opt, params, steps: int, first_seed: int = 100) -> None:
    for i in range(steps):
        set_grads(params, first_seed + i)
        opt.step()


def assert_tensors_equal(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.device == y.device and x.shape == y.shape
        assert torch.equal(x, y), (x, y)


def assert_value_equal(a, b) -> None:
    """Equal values, tensors compared bitwise with dtype/device/shape, containers recursively."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), (a, b)
        assert_tensors_equal([a], [b])
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert list(a) == list(b)
        for k in a:
            assert_value_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_value_equal(x, y)
    else:
        assert type(a) is type(b) and a == b, (a, b)


def assert_state_dicts_equal(ours: dict, theirs: dict) -> None:
    """Same structure (keys and their order everywhere) and bitwise-equal tensors."""
    assert list(ours) == list(theirs) == ["state", "param_groups"]
    assert_value_equal(ours["param_groups"], theirs["param_groups"])
    assert_value_equal(ours["state"], theirs["state"])


def assert_states_equal(opt_a, params_a, opt_b, params_b) -> None:
    """Per-param state equal, matched by param position (params are different tensors)."""
    for pa, pb in zip(params_a, params_b, strict=True):
        assert (pa in opt_a.state) == (pb in opt_b.state)
        if pa in opt_a.state:
            assert_value_equal(opt_a.state[pa], opt_b.state[pb])


def group_options(opt) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def raised(fn) -> BaseException:
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def assert_same_error(build) -> BaseException:
    """``build(lib)`` raises the same exception type and message for torch.optim and fuseopt."""
    expected = raised(lambda: build(torch.optim))
    with pytest.raises(type(expected), match=f"^{re.escape(str(expected))}$") as info:
        build(fuseopt)
    assert type(info.value) is type(expected)
    return expected


@pytest.fixture
def hook_handles():
    """Handles of global hooks registered by a test: removed even when it fails."""
    handles = []
    yield handles
    for handle in handles:
        handle.remove()


# ------------------------------------------------------------------------------- 1. the guard
TORCH_PUBLIC = sorted(n for n in dir(torch.optim.Optimizer) if not n.startswith("_"))
TORCH_METHODS = [n for n in TORCH_PUBLIC if inspect.isroutine(getattr(torch.optim.Optimizer, n))]


def _underlying(cls, name):
    """The plain function behind ``cls.name`` (unwrapping static/class methods and wrappers)."""
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, staticmethod | classmethod):
        raw = raw.__func__
    return inspect.unwrap(raw)


def test_fuseopt_optimizer_subclasses_torch_optimizer():
    assert issubclass(fuseopt.Optimizer, torch.optim.Optimizer)
    for cls in (fuseopt.SGD, fuseopt.Adam, fuseopt.AdamW):
        assert issubclass(cls, fuseopt.Optimizer)
        assert isinstance(cls(make_params()), torch.optim.Optimizer)


def test_public_non_method_attributes_are_only_type_aliases():
    # The guard below checks the routines; the other public names must stay the typing aliases.
    others = set(TORCH_PUBLIC) - set(TORCH_METHODS)
    assert others == {"OptimizerPreHook", "OptimizerPostHook"}
    assert {"step", "zero_grad", "state_dict", "load_state_dict", "add_param_group"} <= set(
        TORCH_METHODS
    )


@pytest.mark.parametrize("name", TORCH_METHODS)
@pytest.mark.parametrize("cls", [fuseopt.Optimizer, fuseopt.SGD, fuseopt.Adam, fuseopt.AdamW])
def test_no_public_method_resolves_to_torch(cls, name):
    owner = next(k for k in cls.__mro__ if name in vars(k))
    assert owner is not torch.optim.Optimizer, f"{cls.__name__}.{name} is torch's"
    ours, theirs = _underlying(cls, name), _underlying(torch.optim.Optimizer, name)
    assert ours is not theirs
    assert ours.__module__.startswith("fuseopt"), ours.__module__
    assert getattr(cls, name) is not getattr(torch.optim.Optimizer, name)
    # The public signature is torch's (parameter names, kinds and defaults; not annotations),
    # plus keyword-only options with defaults (load_state_dict's by_name, strict): every call
    # written for torch's still binds the same way.
    ours, theirs = _shape(getattr(cls, name)), _shape(getattr(torch.optim.Optimizer, name))
    assert ours[: len(theirs)] == theirs, name
    for _, kind, default in ours[len(theirs) :]:
        assert kind is inspect.Parameter.KEYWORD_ONLY and default is not inspect.Parameter.empty


def _shape(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _raise(*args, **kwargs):
    raise AssertionError("torch.optim.Optimizer's implementation was called")


class _CustomStep(fuseopt.Optimizer):
    """A user optimizer on fuseopt's base, with its own ``step``."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    def step(self, closure=None):
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])


def test_construction_never_calls_torch_init_nor_patches_step(monkeypatch):
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", _raise)
    monkeypatch.setattr(torch.optim.Optimizer, "_patch_step_function", _raise)
    classes = (fuseopt.Optimizer, fuseopt.SGD, fuseopt.Adam, fuseopt.AdamW, _CustomStep)
    before = {cls: cls.__dict__.get("step") for cls in classes}
    base_step = fuseopt.Optimizer.step
    cases = ((fuseopt.SGD, {"momentum": 0.9}), (fuseopt.Adam, {}), (fuseopt.AdamW, {}))
    for cls, kwargs in (*cases, (_CustomStep, {})):
        params = make_params()
        opt = cls(params, **kwargs)
        assert "step" not in vars(opt)
        set_grads(params, 1)
        opt.step()  # a step neither needs torch's __init__ nor patches anything
        opt.zero_grad()
        opt.load_state_dict(opt.state_dict())
        copy.deepcopy(opt)
    assert {cls: cls.__dict__.get("step") for cls in classes} == before
    assert fuseopt.Optimizer.step is base_step
    # The built-in optimizers inherit the base step: none defines its own.
    for cls in (fuseopt.SGD, fuseopt.Adam, fuseopt.AdamW):
        assert cls.step is fuseopt.Optimizer.step


def test_step_runs_hooks_once_per_call():
    params = make_params()
    opt = fuseopt.SGD(params, lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    set_grads(params, 0)
    for _ in range(3):
        opt.step()
    assert calls == ["pre", "post"] * 3


def test_profiler_sees_step_and_zero_grad_ranges_like_torch(monkeypatch):
    """Under a profiler, step and zero_grad open torch's named ranges, with torch's scope; without
    one they open none (that costs ~6 us a step)."""

    def ranges(lib):
        params = make_params()
        opt = lib.Adam(params, lr=0.1)
        set_grads(params, 0)
        opt.step()  # the first step: state made outside the profiled one
        with torch.profiler.profile() as prof:
            opt.step()
            opt.zero_grad()
        return sorted((e.name, e.scope) for e in prof.events() if e.name.startswith("Optimizer."))

    ours = ranges(fuseopt)
    assert ours == ranges(torch.optim)
    assert [name for name, _ in ours] == [
        "Optimizer.step#Adam.step",
        "Optimizer.zero_grad#Adam.zero_grad",
    ]


def test_custom_subclass_step_runs_hooks_like_torch():
    """A user optimizer overriding ``step`` gets the step hooks, as in torch.optim."""

    def make(base):
        class PlainSGD(base):
            def __init__(self, params, lr=0.1):
                super().__init__(params, dict(lr=lr))

            def step(self, closure=None):
                loss = closure() if closure is not None else None
                with torch.no_grad():
                    for group in self.param_groups:
                        for p in group["params"]:
                            if p.grad is not None:
                                p.add_(p.grad, alpha=-group["lr"])
                return loss

        return PlainSGD

    results = []
    for base in (fuseopt.Optimizer, torch.optim.Optimizer):
        params = make_params()
        opt = make(base)(params)
        calls = []
        opt.register_step_pre_hook(lambda o, a, k, calls=calls: calls.append(("pre", len(a), k)))
        opt.register_step_post_hook(lambda o, a, k, calls=calls: calls.append(("post", len(a))))
        set_grads(params, 3)
        loss = opt.step(closure=lambda: 7.0)
        results.append((calls, loss, [p.detach().clone() for p in params]))
    (ours_calls, ours_loss, ours_p), (theirs_calls, theirs_loss, theirs_p) = results
    assert len(ours_calls) == 2
    assert [c[:2] for c in ours_calls] == [c[:2] for c in theirs_calls]
    assert list(ours_calls[0][2]) == list(theirs_calls[0][2]) == ["closure"]
    assert ours_loss == theirs_loss == 7.0
    assert_tensors_equal(ours_p, theirs_p)


# ------------------------------------------------------------------------------------ 2. params
def test_iterable_of_tensors_and_defaults():
    ours, theirs = make_params(), make_params()
    fo = fuseopt.Adam(iter(ours), lr=0.02)  # any iterable, consumed once
    to = torch.optim.Adam(iter(theirs), lr=0.02)
    assert len(fo.param_groups) == 1
    assert all(a is b for a, b in zip(fo.param_groups[0]["params"], ours, strict=True))
    assert list(fo.param_groups[0]) == list(to.param_groups[0])
    assert group_options(fo) == group_options(to)
    assert fo.defaults == to.defaults
    assert fo.defaults is not fo.param_groups[0]
    assert isinstance(fo.state, type(to.state)) and len(fo.state) == 0


def test_single_dict_and_tensor_in_group():
    p = make_params()
    fo = fuseopt.SGD([{"params": p[0]}], lr=0.1)  # a tensor as a group's params
    to = torch.optim.SGD([{"params": clone(p)[0]}], lr=0.1)
    assert fo.param_groups[0]["params"] == [p[0]]
    assert group_options(fo) == group_options(to)


def test_named_params_keep_param_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    twin = copy.deepcopy(model)
    fo = fuseopt.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    to = torch.optim.SGD(twin.named_parameters(), lr=0.1, momentum=0.9)
    names = [n for n, _ in model.named_parameters()]
    assert fo.param_groups[0]["param_names"] == names
    assert all(
        a is b for a, b in zip(fo.param_groups[0]["params"], model.parameters(), strict=True)
    )
    assert list(fo.param_groups[0]) == list(to.param_groups[0])
    sd_ours, sd_theirs = fo.state_dict(), to.state_dict()
    assert sd_ours["param_groups"][0]["param_names"] == names
    assert_state_dicts_equal(sd_ours, sd_theirs)


def test_named_param_groups_with_options():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    twin = copy.deepcopy(model)

    def spec(m):
        return [
            {"params": [("weight", m.weight)], "lr": 0.5},
            {"params": [("bias", m.bias)], "weight_decay": 0.1},
        ]

    fo, to = fuseopt.Adam(spec(model), lr=0.01), torch.optim.Adam(spec(twin), lr=0.01)
    assert [g["param_names"] for g in fo.param_groups] == [["weight"], ["bias"]]
    assert [list(g) for g in fo.param_groups] == [list(g) for g in to.param_groups]
    assert group_options(fo) == group_options(to)
    assert_state_dicts_equal(fo.state_dict(), to.state_dict())


def test_param_groups_per_group_options_and_backfill():
    ours = make_params()
    theirs = clone(ours)

    def spec(ps):
        return [
            {"params": ps[:1]},
            {"params": ps[1:2], "lr": 0.5, "betas": (0.8, 0.9)},
            {"params": ps[2:], "amsgrad": True, "weight_decay": 0.25},
        ]

    fo = fuseopt.Adam(spec(ours), lr=0.01, eps=1e-6)
    to = torch.optim.Adam(spec(theirs), lr=0.01, eps=1e-6)
    assert group_options(fo) == group_options(to)
    assert [list(g) for g in fo.param_groups] == [list(g) for g in to.param_groups]
    assert fo.param_groups[0]["lr"] == 0.01 and fo.param_groups[1]["lr"] == 0.5
    assert fo.param_groups[1]["betas"] == (0.8, 0.9)
    assert fo.param_groups[2]["amsgrad"] is True and fo.param_groups[0]["amsgrad"] is False
    assert all(g["eps"] == 1e-6 for g in fo.param_groups)


def _needs_lr(lib, marker=None):
    """An optimizer class on ``lib``'s base whose ``lr`` is required (``marker``: which one)."""
    if marker is None:
        marker = fuse_required if lib is fuseopt else torch_optimizer_module.required

    class NeedsLR(lib.Optimizer):
        def __init__(self, params, lr=marker, momentum=0.0):
            super().__init__(params, dict(lr=lr, momentum=momentum))

    return NeedsLR


def _param_in_two_groups(lib):
    p = make_params()
    return lib.SGD([{"params": p[:2]}, {"params": p[1:]}], lr=0.1)


def _named_then_unnamed(lib):
    p = make_params()
    return lib.SGD([{"params": [("a", p[0])]}, {"params": [p[1]]}], lr=0.1)


def _unnamed_then_named(lib):
    p = make_params()
    return lib.SGD([{"params": [p[0]]}, {"params": [("b", p[1])]}], lr=0.1)


def _non_leaf(lib):
    x = torch.randn(3, requires_grad=True)
    return lib.SGD([x * 2], lr=0.1)


ERROR_CASES = {
    "empty_list": (lambda lib: lib.SGD([], lr=0.1), ValueError, "empty parameter list"),
    "empty_generator": (lambda lib: lib.Adam(iter([])), ValueError, "empty parameter list"),
    "tensor_not_iterable": (
        lambda lib: lib.SGD(torch.randn(3, requires_grad=True), lr=0.1),
        TypeError,
        "should be an iterable of Tensors or dicts, but got torch.FloatTensor",
    ),
    "param_in_two_groups": (_param_in_two_groups, ValueError, "more than one parameter group"),
    "non_leaf": (_non_leaf, ValueError, "can't optimize a non-leaf Tensor"),
    "mixed_named_in_group": (
        lambda lib: lib.SGD([("a", make_params()[0]), make_params()[1]], lr=0.1),
        ValueError,
        "Some param names are missing",
    ),
    "named_then_unnamed_group": (
        _named_then_unnamed,
        ValueError,
        "cannot add param group without names",
    ),
    "unnamed_then_named_group": (_unnamed_then_named, ValueError, "cannot add param group with"),
    "set_of_params": (
        lambda lib: lib.SGD([{"params": set(make_params())}], lr=0.1),
        TypeError,
        "ordering of tensors in sets",
    ),
    "non_tensor_param": (
        lambda lib: lib.SGD([make_params()[0], 1.5], lr=0.1),
        TypeError,
        "optimizer can only optimize Tensors, but one of the params is float",
    ),
    "group_not_dict": (
        lambda lib: lib.SGD(make_params(), lr=0.1).add_param_group([make_params(1)[0]]),
        TypeError,
        "param_group must be a dict",
    ),
    "required_option_missing": (
        lambda lib: _needs_lr(lib)(make_params()),
        ValueError,
        "didn't specify a value of required optimization parameter lr",
    ),
    "required_option_missing_in_added_group": (
        lambda lib: _needs_lr(lib)([{"params": make_params(), "lr": 0.1}]).add_param_group(
            {"params": make_params(1)}
        ),
        ValueError,
        "required optimization parameter lr",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_param_errors_match_torch(case):
    build, exc_type, fragment = ERROR_CASES[case]
    expected = assert_same_error(build)
    assert type(expected) is exc_type
    assert fragment in str(expected)


def test_torch_required_marker_also_required():
    """A fuseopt optimizer written with torch.optim's ``required`` (ported code) checks it too."""
    marker = torch_optimizer_module.required
    expected = assert_same_error(lambda lib: _needs_lr(lib, marker)(make_params()))
    assert "required optimization parameter lr" in str(expected)


def test_required_option_given_per_group():
    cls = _needs_lr(fuseopt)
    params = make_params()
    opt = cls([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.2}])
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    assert all(g["momentum"] == 0.0 for g in opt.param_groups)
    assert repr(fuse_required) == repr(torch_optimizer_module.required) == "<required parameter>"


def test_failed_add_param_group_leaves_groups_unchanged():
    params = make_params()
    opt = fuseopt.SGD(params[:1], lr=0.1)
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": params[:2]})
    assert opt.param_groups == before


@pytest.mark.parametrize("lib", [torch.optim, fuseopt], ids=["torch", "fuseopt"])
def test_duplicate_params_warn(lib):
    p = make_params()
    with pytest.warns(UserWarning, match=r"duplicate parameters; in future, this will cause"):
        opt = lib.SGD([p[0], p[1], p[0]], lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 3


def test_duplicate_params_state_dict_ids_match_torch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(lr=0.1, momentum=0.9, foreach=False)
        fo, ours, to, theirs = build_pair(fuseopt.SGD, torch.optim.SGD, kwargs)
        a, b, c = ours
        fo.param_groups[0]["params"] = [a, b, a]
        fo.add_param_group({"params": [c, c]})
        a, b, c = theirs
        to.param_groups[0]["params"] = [a, b, a]
        to.add_param_group({"params": [c, c]})
    run_steps(fo, ours, 2)
    run_steps(to, theirs, 2)
    sd_ours, sd_theirs = fo.state_dict(), to.state_dict()
    assert [g["params"] for g in sd_ours["param_groups"]] == [[2, 1, 2], [4, 4]]
    assert_state_dicts_equal(sd_ours, sd_theirs)
    # and the ids load back: each library loads the other's state dict
    fo.load_state_dict(copy.deepcopy(sd_theirs))
    to.load_state_dict(copy.deepcopy(sd_ours))
    assert_states_equal(fo, ours, to, theirs)
    assert_state_dicts_equal(fo.state_dict(), to.state_dict())


def test_non_leaf_params_allowed_when_differentiable_or_retaining_grad():
    for lib in (torch.optim, fuseopt):
        x = torch.randn(3, requires_grad=True)
        lib.SGD([x * 2], lr=0.1, differentiable=True)
        y = x * 3
        y.retain_grad()
        lib.SGD([y], lr=0.1)


# ------------------------------------------------ 3. add_param_group, zero_grad, step, repr
def test_add_param_group_mid_training():
    kwargs = dict(lr=0.01, foreach=False)
    fo, ours, to, theirs = build_pair(fuseopt.Adam, torch.optim.Adam, kwargs)
    new_ours = make_params(7, shapes=[(2, 3), (5,)])
    new_theirs = clone(new_ours)
    for opt, params in ((fo, ours), (to, theirs)):
        run_steps(opt, params, 2)
    fo.add_param_group({"params": new_ours, "lr": 0.5})
    to.add_param_group({"params": new_theirs, "lr": 0.5})
    assert group_options(fo) == group_options(to)
    assert fo.param_groups[1]["betas"] == fo.defaults["betas"]
    assert fo.param_groups[1]["lr"] == 0.5
    assert all(p not in fo.state for p in new_ours)  # state comes with the first step
    all_ours, all_theirs = ours + new_ours, theirs + new_theirs
    for i in range(3):
        set_grads(all_ours, 50 + i)
        set_grads(all_theirs, 50 + i)
        fo.step()
        to.step()
    assert [fo.state[p]["step"].item() for p in ours] == [5.0] * len(ours)
    assert [fo.state[p]["step"].item() for p in new_ours] == [3.0] * len(new_ours)
    assert_tensors_equal(all_ours, all_theirs)
    assert_states_equal(fo, all_ours, to, all_theirs)
    assert_state_dicts_equal(fo.state_dict(), to.state_dict())


@pytest.mark.parametrize("foreach", [False, True, None])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none, foreach):
    results = []
    for lib in (fuseopt, torch.optim):
        params = make_params()
        opt = lib.SGD(params, lr=0.1, foreach=foreach)
        set_grads(params, 0)
        params[2].grad = None
        grads = [p.grad for p in params]
        x = torch.randn(2, 2, requires_grad=True)
        params[1].grad = (x.sum() * torch.ones(4)).requires_grad_()  # a grad with a grad_fn
        grads[1] = params[1].grad
        opt.zero_grad(set_to_none=set_to_none)
        results.append(params)
        if set_to_none:
            assert all(p.grad is None for p in params)
        else:
            assert params[0].grad is grads[0] and params[1].grad is grads[1]  # in place
            assert params[2].grad is None
            for p in params[:2]:
                assert torch.count_nonzero(p.grad) == 0
                assert p.grad.grad_fn is None and not p.grad.requires_grad
    ours, theirs = results
    for a, b in zip(ours, theirs):
        assert (a.grad is None) == (b.grad is None)


def test_zero_grad_default_sets_to_none():
    params = make_params()
    opt = fuseopt.Adam(params)
    set_grads(params, 0)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize(
    "fuse_cls,torch_cls", [(fuseopt.SGD, torch.optim.SGD), (fuseopt.Adam, torch.optim.Adam)]
)
def test_step_with_closure_under_no_grad(fuse_cls, torch_cls):
    results = []
    for cls in (fuse_cls, torch_cls):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        opt = cls(model.parameters(), lr=0.1, foreach=False)
        x, y = torch.randn(5, 3), torch.randn(5, 1)
        seen = []

        def closure(model=model, opt=opt, seen=seen, x=x, y=y):
            seen.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        with torch.no_grad():
            losses = [opt.step(closure) for _ in range(3)]
        assert seen == [True, True, True]
        assert all(isinstance(loss, torch.Tensor) and loss.requires_grad for loss in losses)
        results.append(([loss.item() for loss in losses], list(model.parameters())))
    (ours_losses, ours_p), (theirs_losses, theirs_p) = results
    assert ours_losses == theirs_losses
    assert_tensors_equal(ours_p, theirs_p)


def test_step_without_closure_returns_none_and_keeps_grad_mode():
    params = make_params()
    opt = fuseopt.Adam(params)
    set_grads(params, 0)
    assert opt.step() is None
    with torch.no_grad():
        opt.step()
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert opt.step(lambda: 3.5) == 3.5


@pytest.mark.parametrize("name,fuse_cls,torch_cls,kwargs", CASES, ids=CASE_IDS)
def test_params_without_grad_are_skipped(name, fuse_cls, torch_cls, kwargs):
    kwargs = dict(kwargs, foreach=False)
    fo, ours, to, theirs = build_pair(fuse_cls, torch_cls, kwargs)
    before = [p.detach().clone() for p in ours]
    for opt, params in ((fo, ours), (to, theirs)):
        for i in range(3):
            set_grads(params, 10 + i)
            params[1].grad = None
            opt.step()
    assert ours[1] not in fo.state and theirs[1] not in to.state
    assert torch.equal(ours[1], before[1])
    assert not torch.equal(ours[0], before[0])
    assert_tensors_equal(ours, theirs)
    assert_states_equal(fo, ours, to, theirs)
    assert_state_dicts_equal(fo.state_dict(), to.state_dict())


@pytest.mark.parametrize("name,fuse_cls,torch_cls,kwargs", CASES, ids=CASE_IDS)
def test_group_without_any_grad(name, fuse_cls, torch_cls, kwargs):
    kwargs = dict(kwargs, foreach=False)
    fo, ours, to, theirs = build_pair(fuse_cls, torch_cls, kwargs, groups=True)
    before = [p.detach().clone() for p in ours]
    for opt, params in ((fo, ours), (to, theirs)):
        for i in range(2):
            set_grads(params[:1], 20 + i)  # the second group never gets a grad
            opt.step()
    assert all(p not in fo.state for p in ours[1:])
    assert_tensors_equal(ours[1:], before[1:])
    assert_tensors_equal(ours, theirs)
    assert_state_dicts_equal(fo.state_dict(), to.state_dict())


def test_step_with_no_grads_at_all():
    fo, ours, to, theirs = build_pair(fuseopt.Adam, torch.optim.Adam, {})
    before = [p.detach().clone() for p in ours]
    assert fo.step() is None
    assert len(fo.state) == 0
    assert_tensors_equal(ours, before)
    assert_state_dicts_equal(fo.state_dict(), to.state_dict())


REPR_CASES = [
    (fuseopt.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9), False, False),
    (fuseopt.Adam, torch.optim.Adam, dict(amsgrad=True), False, True),
    (fuseopt.AdamW, torch.optim.AdamW, dict(lr=0.01), True, True),
    (fuseopt.Adam, torch.optim.Adam, dict(lr=torch.tensor(0.01)), True, False),
]


@pytest.mark.parametrize("fuse_cls,torch_cls,kwargs,named,groups", REPR_CASES)
def test_repr_matches_torch(fuse_cls, torch_cls, kwargs, named, groups):
    fo, _, to, _ = build_pair(fuse_cls, torch_cls, kwargs, named=named, groups=groups)
    ours, theirs = repr(fo), repr(to)
    assert ours.startswith(fuse_cls.__name__ + " (\nParameter Group 0\n")
    assert ours.replace(fuse_cls.__name__, "X", 1) == theirs.replace(torch_cls.__name__, "X", 1)
    assert ("\n\nParameter Group 1\n" in ours) == groups


def test_repr_custom_subclass_and_no_groups():
    class MyAdam(fuseopt.Adam):
        pass

    class TheirAdam(torch.optim.Adam):
        pass

    params = make_params()
    fo, to = MyAdam(params), TheirAdam(clone(params))
    assert repr(fo).startswith("MyAdam (\n")
    assert repr(fo).replace("MyAdam", "X", 1) == repr(to).replace("TheirAdam", "X", 1)
    fo.param_groups.clear()
    to.param_groups.clear()
    assert repr(fo) == "MyAdam ()" and repr(to) == "TheirAdam ()"


# -------------------------------------------------------------------------------- 4. state dict
@pytest.mark.parametrize("groups", [False, True], ids=["one_group", "two_groups"])
@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
@pytest.mark.parametrize("name,fuse_cls,torch_cls,kwargs", CASES, ids=CASE_IDS)
def test_state_dict_structure_matches_torch(name, fuse_cls, torch_cls, kwargs, named, groups):
    kwargs = dict(kwargs, foreach=False)
    fo, ours, to, theirs = build_pair(fuse_cls, torch_cls, kwargs, named=named, groups=groups)
    assert_state_dicts_equal(fo.state_dict(), to.state_dict())  # before any step: no state
    run_steps(fo, ours, 3)
    run_steps(to, theirs, 3)
    sd_ours, sd_theirs = fo.state_dict(), to.state_dict()
    assert_state_dicts_equal(sd_ours, sd_theirs)
    assert list(sd_ours["state"]) == list(range(len(ours)))
    assert ("param_names" in sd_ours["param_groups"][0]) == named
    assert sd_ours["param_groups"][0]["params"] == ([0] if groups else [0, 1, 2])
    if fuse_cls is not fuseopt.SGD:
        step = sd_ours["state"][0]["step"]
        assert step.dtype == torch.float32 and step.device.type == "cpu" and step.dim() == 0
        assert step.item() == 3.0
    # The state dict references the live state (as torch): no copy is made.
    assert sd_ours["state"][0] is fo.state[ours[0]]


@pytest.mark.parametrize("name,fuse_cls,torch_cls,kwargs", CASES[1:], ids=CASE_IDS[1:])
def test_state_dict_step_dtype_follows_default_dtype(name, fuse_cls, torch_cls, kwargs):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fo, ours, to, theirs = build_pair(fuse_cls, torch_cls, dict(kwargs, foreach=False))
        run_steps(fo, ours, 1)
        run_steps(to, theirs, 1)
    finally:
        torch.set_default_dtype(previous)
    assert fo.state[ours[0]]["step"].dtype == torch.float64
    assert_state_dicts_equal(fo.state_dict(), to.state_dict())


def _fingerprint(opt):
    return copy.deepcopy((opt.state_dict(), [g["params"] for g in opt.param_groups]))


@pytest.mark.parametrize("name,fuse_cls,torch_cls,kwargs", CASES, ids=CASE_IDS)
def test_load_state_dict_mismatch_raises_and_changes_nothing(name, fuse_cls, torch_cls, kwargs):
    kwargs = dict(kwargs, foreach=False)
    fo, ours, to, theirs = build_pair(fuse_cls, torch_cls, kwargs)
    run_steps(fo, ours, 2)
    run_steps(to, theirs, 2)
    two_groups, p2, _, _ = build_pair(fuse_cls, torch_cls, kwargs, groups=True)
    run_steps(two_groups, p2, 1)
    shorter = fuse_cls(make_params(3)[:2], **kwargs)
    run_steps(shorter, shorter.param_groups[0]["params"], 1)
    for bad, message in (
        (two_groups.state_dict(), "loaded state dict has a different number of parameter groups"),
        (
            shorter.state_dict(),
            "loaded state dict contains a parameter group that doesn't match the size of "
            "optimizer's group",
        ),
    ):
        before = _fingerprint(fo)
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            fo.load_state_dict(bad)
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            to.load_state_dict(copy.deepcopy(bad))
        assert_value_equal(_fingerprint(fo), before)
    # Still the same optimizer: it continues exactly as torch's.
    run_steps(fo, ours, 2, first_seed=200)
    run_steps(to, theirs, 2, first_seed=200)
    assert_tensors_equal(ours, theirs)


def test_load_state_dict_casts_state_but_keeps_step():
    results = []
    for lib in (fuseopt, torch.optim):
        src_params = make_params(dtype=torch.float64)
        src = lib.Adam(src_params, lr=0.01, amsgrad=True, foreach=False)
        run_steps(src, src_params, 2)
        sd = src.state_dict()
        assert sd["state"][0]["exp_avg"].dtype == torch.float64
        sd["state"][0]["step"] = sd["state"][0]["step"].to(torch.float64)
        sd["state"][1]["extra_int"] = torch.tensor([1, 2])  # cast too: the param is floating
        dst_params = make_params(dtype=torch.float32)
        dst = lib.Adam(dst_params, lr=0.01, amsgrad=True, foreach=False)
        dst.load_state_dict(sd)
        state = dst.state[dst_params[0]]
        assert state["exp_avg"].dtype == state["max_exp_avg_sq"].dtype == torch.float32
        assert state["step"].dtype == torch.float64  # step is never cast without fused/capturable
        assert dst.state[dst_params[1]]["step"].dtype == torch.float32
        assert dst.state[dst_params[1]]["extra_int"].dtype == torch.float32
        # loading copies: the source's state is left as it was
        assert state["exp_avg"].data_ptr() != sd["state"][0]["exp_avg"].data_ptr()
        results.append(dst.state_dict())
    assert_state_dicts_equal(*results)


def test_load_state_dict_fused_group_casts_step_to_float32():
    results = []
    for lib in (fuseopt, torch.optim):
        params = make_params()
        opt = lib.Adam(params, lr=0.01, foreach=False)
        run_steps(opt, params, 1)
        sd = opt.state_dict()
        for s in sd["state"].values():
            s["step"] = s["step"].to(torch.float64)
        fused_params = make_params()
        fused = lib.Adam(fused_params, lr=0.01, fused=True)
        sd["param_groups"][0]["fused"] = True
        sd["param_groups"][0]["foreach"] = None
        fused.load_state_dict(sd)
        assert fused.state[fused_params[0]]["step"].dtype == torch.float32
        results.append(fused.state_dict())
    assert_state_dicts_equal(*results)


def test_load_state_dict_old_checkpoint_with_number_step():
    """A ``step`` saved as a Python number (older torch) is loaded as a tensor, as torch does."""
    results = []
    for lib in (fuseopt, torch.optim):
        params = make_params()
        opt = lib.Adam(params, lr=0.01, foreach=False)
        run_steps(opt, params, 2)
        sd = copy.deepcopy(opt.state_dict())
        for s in sd["state"].values():
            s["step"] = int(s["step"].item())
        new_params = [p.detach().clone().requires_grad_() for p in params]
        new = lib.Adam(new_params, lr=0.01, foreach=False)
        new.load_state_dict(sd)
        step = new.state[new_params[0]]["step"]
        assert torch.is_tensor(step) and step.dtype == torch.float32 and step.item() == 2.0
        run_steps(new, new_params, 2, first_seed=300)
        results.append((new.state_dict(), new_params))
    assert_state_dicts_equal(results[0][0], results[1][0])
    assert_tensors_equal(results[0][1], results[1][1])


def test_load_state_dict_param_names_override_or_kept():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    for lib in (fuseopt, torch.optim):
        named = lib.SGD(model.named_parameters(), lr=0.1)
        renamed = named.state_dict()
        renamed["param_groups"][0]["param_names"] = ["w", "b"]
        named.load_state_dict(renamed)
        assert named.param_groups[0]["param_names"] == ["w", "b"]
        unnamed_sd = lib.SGD(model.parameters(), lr=0.3).state_dict()
        named.load_state_dict(unnamed_sd)
        assert named.param_groups[0]["param_names"] == ["w", "b"]  # kept when not saved
        assert named.param_groups[0]["lr"] == 0.3


@pytest.mark.parametrize("direction", ["torch_to_fuseopt", "fuseopt_to_torch"])
@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
@pytest.mark.parametrize("name,fuse_cls,torch_cls,kwargs", CASES, ids=CASE_IDS)
def test_state_dict_interchange(name, fuse_cls, torch_cls, kwargs, named, direction, device):
    kwargs = dict(kwargs, foreach=False)
    # A reference torch run of 8 steps, and a run that switches library after 3 steps.
    _, _, reference, ref_params = build_pair(
        fuse_cls, torch_cls, kwargs, named=named, groups=True, device=device
    )
    run_steps(reference, ref_params, 8)
    first_cls, second_cls = (
        (torch_cls, fuse_cls) if direction == "torch_to_fuseopt" else (fuse_cls, torch_cls)
    )
    fo, ours, to, theirs = build_pair(
        fuse_cls, torch_cls, kwargs, named=named, groups=True, device=device
    )
    first, first_params = (to, theirs) if first_cls is torch_cls else (fo, ours)
    run_steps(first, first_params, 3)
    saved = pickle.loads(pickle.dumps(first.state_dict()))
    second_params = clone(first_params)
    spec = list(zip(names_for(second_params), second_params)) if named else second_params
    second = second_cls(
        [{"params": spec[:1]}, {"params": spec[1:], "lr": 123.0}], **dict(kwargs, lr=456.0)
    )
    second.load_state_dict(saved)
    assert group_options(second) == group_options(reference)  # options come from the save
    run_steps(second, second_params, 5, first_seed=103)
    assert_tensors_equal(second_params, ref_params)
    assert_state_dicts_equal(second.state_dict(), reference.state_dict())


# ------------------------------------------------------------------------------------- 5. hooks
def test_step_hooks_order_and_args_match_torch(hook_handles):
    logs = {}
    for lib in (fuseopt, torch.optim):
        params = make_params()
        opt = lib.SGD(params, lr=0.1)
        log = logs.setdefault(lib.__name__, [])
        this = opt

        def record(tag, log=log, this=this):
            def hook(o, args, kwargs):
                if o is this:  # global hooks see every optimizer's steps
                    log.append((tag, args[0] is o, len(args), sorted(kwargs)))

            return hook

        register_pre = torch_optimizer_module.register_optimizer_step_pre_hook
        register_post = torch_optimizer_module.register_optimizer_step_post_hook
        if lib is fuseopt:
            register_pre = fuseopt.optimizer.register_optimizer_step_pre_hook
            register_post = fuseopt.optimizer.register_optimizer_step_post_hook
        opt.register_step_post_hook(record("post1"))
        opt.register_step_pre_hook(record("pre1"))
        hook_handles.append(register_pre(record("global_pre")))
        hook_handles.append(register_post(record("global_post")))
        opt.register_step_pre_hook(record("pre2"))
        opt.register_step_post_hook(record("post2"))
        set_grads(params, 0)
        opt.step()
        opt.step(lambda: 1.0)
        opt.step(closure=lambda: 2.0)
        opt.step(None)
    ours, theirs = logs["fuseopt"], logs["torch.optim"]
    assert ours == theirs
    order = ["global_pre", "pre1", "pre2", "post1", "post2", "global_post"]
    assert [t[0] for t in ours] == order * 4
    assert [t[2:] for t in ours[::6]] == [(1, []), (2, []), (1, ["closure"]), (2, [])]
    assert all(t[1] for t in ours)


@pytest.mark.parametrize("registered_through", ["torch", "fuseopt"])
def test_global_hooks_are_torchs_one_registry(registered_through, hook_handles):
    """The global step hooks have one registry, torch.optim's: a hook registered through either
    module fires for fuseopt's and torch's optimizers alike, in the order of registration, and
    its handle removes it for both."""
    module = fuseopt.optimizer if registered_through == "fuseopt" else torch_optimizer_module
    seen = []
    pre = module.register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("pre1", type(o))))
    post = module.register_optimizer_step_post_hook(lambda o, a, k: seen.append(("post", type(o))))
    hook_handles += [pre, post]
    hook_handles.append(
        torch_optimizer_module.register_optimizer_step_pre_hook(
            lambda o, a, k: seen.append(("pre2", type(o)))
        )
    )
    params = make_params()
    opts = [fuseopt.Adam(params, lr=0.1), torch.optim.Adam(make_params(), lr=0.1)]
    for opt in opts:
        set_grads([p for g in opt.param_groups for p in g["params"]], 0)
        opt.step()
    kinds = [type(o) for o in opts]
    assert seen == [(tag, kind) for kind in kinds for tag in ("pre1", "pre2", "post")]
    pre.remove()
    post.remove()
    seen.clear()
    for opt in opts:
        opt.step()
    assert seen == [("pre2", kind) for kind in kinds]


def test_global_hook_handles_remove():
    calls = []
    pre = fuseopt.optimizer.register_optimizer_step_pre_hook(lambda *a: calls.append("pre"))
    post = fuseopt.optimizer.register_optimizer_step_post_hook(lambda *a: calls.append("post"))
    try:
        params = make_params()
        opt = fuseopt.Adam(params)
        set_grads(params, 0)
        opt.step()
        assert calls == ["pre", "post"]
    finally:
        pre.remove()
        post.remove()
    opt.step()
    assert calls == ["pre", "post"]


def test_pre_hook_can_replace_closure():
    losses = {}
    for lib in (fuseopt, torch.optim):
        params = make_params()
        opt = lib.Adam(params, foreach=False)
        set_grads(params, 0)

        def swap(o, args, kwargs):
            return (args[0], lambda: 42.0), kwargs

        handle = opt.register_step_pre_hook(swap)
        seen_args = []
        post = opt.register_step_post_hook(lambda o, a, k, seen=seen_args: seen.append(a[1]()))
        losses[lib.__name__] = (opt.step(lambda: 1.0), seen_args[0])
        handle.remove()
        post.remove()
        assert opt.step(lambda: 1.0) == 1.0
        # kwargs can be replaced too
        handle = opt.register_step_pre_hook(lambda o, a, k: ((o,), {"closure": lambda: 5.0}))
        assert opt.step() == 5.0
    assert losses["fuseopt"] == losses["torch.optim"] == (42.0, 42.0)


@pytest.mark.parametrize("bad", [1.0, (1, 2, 3), [(), {}]], ids=["float", "triple", "list"])
def test_pre_hook_bad_return_raises(bad):
    for lib in (fuseopt, torch.optim):
        params = make_params()
        opt = lib.SGD(params, lr=0.1)
        set_grads(params, 0)
        before = [p.detach().clone() for p in params]
        opt.register_step_pre_hook(lambda o, a, k: bad)
        with pytest.raises(
            RuntimeError, match=r"must return None or a tuple of \(new_args, new_kwargs\), but got"
        ):
            opt.step()
        assert_tensors_equal(params, before)  # nothing stepped


def test_step_hook_handles_remove():
    params = make_params()
    opt = fuseopt.SGD(params, lr=0.1)
    calls = []
    h1 = opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    h2 = opt.register_step_post_hook(lambda *a: calls.append("post"))
    set_grads(params, 0)
    opt.step()
    h1.remove()
    opt.step()
    h2.remove()
    opt.step()
    assert calls == ["pre", "post", "post"]
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_post_hook_sees_state_after_step():
    params = make_params()
    opt = fuseopt.Adam(params)
    steps = []
    opt.register_step_pre_hook(lambda o, a, k: steps.append(len(o.state)))
    opt.register_step_post_hook(lambda o, a, k: steps.append(o.state[params[0]]["step"].item()))
    set_grads(params, 0)
    opt.step()
    assert steps == [0, 1.0]


def test_state_dict_hooks_match_torch():
    dicts = {}
    for lib in (fuseopt, torch.optim):
        params = make_params()
        opt = lib.SGD(params, lr=0.1, momentum=0.9, foreach=False)
        run_steps(opt, params, 1)
        calls = []
        opt.register_state_dict_pre_hook(lambda o, calls=calls: calls.append("pre_a"))
        opt.register_state_dict_pre_hook(lambda o, calls=calls: calls.append("pre_b"), prepend=True)

        def post_inplace(o, sd, calls=calls):
            calls.append("post_inplace")
            sd["extra"] = 1  # in place, returns None

        def post_new(o, sd, calls=calls):
            calls.append("post_new")
            return {"state": sd["state"], "param_groups": sd["param_groups"], "seen": sd["extra"]}

        opt.register_state_dict_post_hook(post_new)
        opt.register_state_dict_post_hook(post_inplace, prepend=True)
        sd = opt.state_dict()
        assert calls == ["pre_b", "pre_a", "post_inplace", "post_new"]
        assert sd["seen"] == 1 and "extra" not in sd
        dicts[lib.__name__] = sd
    assert_value_equal(dicts["fuseopt"], dicts["torch.optim"])


def test_state_dict_hook_handles_remove():
    opt = fuseopt.SGD(make_params(), lr=0.1)
    calls = []
    pre = opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    post = opt.register_state_dict_post_hook(lambda o, sd: {"replaced": True})
    assert opt.state_dict() == {"replaced": True}
    pre.remove()
    post.remove()
    assert list(opt.state_dict()) == ["state", "param_groups"]
    assert calls == ["pre"]


def test_load_state_dict_hooks_match_torch():
    finals = {}
    for lib in (fuseopt, torch.optim):
        params = make_params()
        opt = lib.SGD(params, lr=0.1, momentum=0.9, foreach=False)
        run_steps(opt, params, 1)
        saved = opt.state_dict()
        calls = []

        def pre_inplace(o, sd, calls=calls):
            calls.append("pre_inplace")
            sd["marker"] = True  # a shallow copy: the caller's dict is untouched

        def pre_replace(o, sd, calls=calls):
            calls.append(("pre_replace", sd.get("marker")))
            new = copy.deepcopy(sd)
            new["param_groups"][0]["lr"] = 0.5
            return new

        def pre_after(o, sd, calls=calls):
            calls.append(("pre_after", sd["param_groups"][0]["lr"]))

        def post(o, calls=calls):
            calls.append(("post", o.param_groups[0]["lr"]))

        opt.register_load_state_dict_pre_hook(pre_replace)
        opt.register_load_state_dict_pre_hook(pre_inplace, prepend=True)
        opt.register_load_state_dict_pre_hook(pre_after)
        h = opt.register_load_state_dict_post_hook(post)
        opt.register_load_state_dict_post_hook(lambda o, calls=calls: calls.append("first"), True)
        opt.load_state_dict(saved)
        assert "marker" not in saved and saved["param_groups"][0]["lr"] == 0.1
        assert calls == [
            "pre_inplace",
            ("pre_replace", True),
            ("pre_after", 0.5),
            "first",
            ("post", 0.5),
        ]
        h.remove()
        calls.clear()
        opt.load_state_dict(saved)
        assert [c if isinstance(c, str) else c[0] for c in calls] == [
            "pre_inplace",
            "pre_replace",
            "pre_after",
            "first",
        ]
        finals[lib.__name__] = opt.state_dict()
    assert_state_dicts_equal(finals["fuseopt"], finals["torch.optim"])


def test_hooks_are_not_pickled_and_unpickled_optimizer_has_hook_dicts():
    params = make_params()
    opt = fuseopt.SGD(params, lr=0.1)
    opt.register_step_pre_hook(print)
    opt.register_state_dict_post_hook(print)
    clone_opt = pickle.loads(pickle.dumps(opt))
    for name in (
        "_optimizer_step_pre_hooks",
        "_optimizer_step_post_hooks",
        "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks",
        "_optimizer_load_state_dict_pre_hooks",
        "_optimizer_load_state_dict_post_hooks",
    ):
        assert isinstance(getattr(clone_opt, name), OrderedDict)
        assert len(getattr(clone_opt, name)) == 0


# ------------------------------------------ 6. the load_state_dict pre-hook examples of the docs
def _train(model, opt, steps: int, seed: int, in_features: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, in_features, generator=gen)
        model(x).pow(2).mean().backward()
        opt.step()


def _loaded_options(optimizer, state_dict, index=0):
    """Our optimizer's own state dict, with the saved group options (lr, momentum...) put in."""
    adapted = copy.deepcopy(optimizer.state_dict())
    for key, value in state_dict["param_groups"][index].items():
        if key not in ("params", "param_names"):
            adapted["param_groups"][index][key] = value
    return adapted


def _copy_state(entry: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in entry.items()}


def _remap_by_names(lookup: dict):
    """A pre-hook giving each param the saved state of ``lookup[its name]`` (one group)."""

    def hook(optimizer, state_dict):
        adapted = _loaded_options(optimizer, state_dict)
        ours = optimizer.state_dict()["param_groups"][0]
        saved = state_dict["param_groups"][0]
        for param_id, name in zip(ours["params"], ours["param_names"]):
            source = lookup.get(name)
            if source not in saved["param_names"]:
                continue  # a new param: keeps the state it has (none), trained from scratch
            saved_id = saved["params"][saved["param_names"].index(source)]
            if saved_id in state_dict["state"]:
                adapted["state"][param_id] = _copy_state(state_dict["state"][saved_id])
        return adapted

    return hook


class OneExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(x)


class TwoExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(3, 4)

    def forward(self, x):
        return (self.fc1(x) + self.fc2(x)) / 2


def test_docs_example_duplicate_expert_state():
    torch.manual_seed(0)
    model = OneExpert()
    opt = fuseopt.SGD(model.named_parameters(), lr=0.01, momentum=0.9)
    _train(model, opt, 3, seed=1, in_features=3)
    saved = pickle.loads(pickle.dumps(opt.state_dict()))  # as torch.save / torch.load

    model2 = TwoExperts()
    for expert in (model2.fc1, model2.fc2):  # both experts start from the trained fc
        expert.load_state_dict(model.fc.state_dict())
    opt2 = fuseopt.SGD(model2.named_parameters(), lr=0.5, momentum=0.5)
    lookup = {
        "fc1.weight": "fc.weight",
        "fc1.bias": "fc.bias",
        "fc2.weight": "fc.weight",
        "fc2.bias": "fc.bias",
    }
    opt2.register_load_state_dict_pre_hook(_remap_by_names(lookup))
    opt2.load_state_dict(saved)

    g = opt2.param_groups[0]
    assert g["param_names"] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert g["lr"] == 0.01 and g["momentum"] == 0.9  # the saved options
    for new_name, new_param in model2.named_parameters():
        old_param = dict(model.named_parameters())[lookup[new_name]]
        ours, theirs = opt2.state[new_param], opt.state[old_param]
        assert torch.equal(ours["momentum_buffer"], theirs["momentum_buffer"])
        assert ours["momentum_buffer"].data_ptr() != theirs["momentum_buffer"].data_ptr()
    buffers = [opt2.state[p]["momentum_buffer"] for p in (model2.fc1.weight, model2.fc2.weight)]
    assert buffers[0].data_ptr() != buffers[1].data_ptr()  # each expert its own copy

    # Each expert resumes as the single expert would: same grads, same update.
    x = torch.randn(4, 3)
    expected = copy.deepcopy(model)
    expected_opt = fuseopt.SGD(expected.named_parameters(), lr=0.01, momentum=0.9)
    expected_opt.load_state_dict(opt.state_dict())
    expected_opt.zero_grad()
    (expected(x).pow(2).mean() / 2).backward()  # each expert sees half the output's grad
    expected_opt.step()
    opt2.zero_grad()
    model2(x).pow(2).mean().backward()
    opt2.step()
    for expert in (model2.fc1, model2.fc2):
        assert torch.allclose(expert.weight, expected.fc.weight, rtol=0, atol=1e-7)
        assert torch.allclose(expert.bias, expected.fc.bias, rtol=0, atol=1e-7)


class Model1(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return self.fc(x) + x


class ModelBypass(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bypass = nn.Linear(5, 5, bias=False)
        torch.nn.init.eye_(self.bypass.weight)

    def forward(self, x):
        return self.fc(x) + self.bypass(x)


def test_docs_example_new_bypass_layer_gets_fresh_state():
    torch.manual_seed(0)
    model = Model1()
    opt = fuseopt.SGD(model.named_parameters(), lr=0.01, momentum=0.9)
    _train(model, opt, 3, seed=2, in_features=5)
    saved = pickle.loads(pickle.dumps(opt.state_dict()))

    model2 = ModelBypass()
    model2.fc.load_state_dict(model.fc.state_dict())
    opt2 = fuseopt.SGD(model2.named_parameters(), lr=0.01, momentum=0.9)
    lookup = {"fc.weight": "fc.weight", "fc.bias": "fc.bias", "bypass.weight": None}
    opt2.register_load_state_dict_pre_hook(_remap_by_names(lookup))
    opt2.load_state_dict(saved)

    assert opt2.param_groups[0]["param_names"] == ["fc.weight", "fc.bias", "bypass.weight"]
    assert model2.bypass.weight not in opt2.state  # the new layer starts from scratch
    for name in ("weight", "bias"):
        ours = opt2.state[getattr(model2.fc, name)]["momentum_buffer"]
        assert torch.equal(ours, opt.state[getattr(model.fc, name)]["momentum_buffer"])

    # Training resumes: fc continues with its momentum, bypass gets its first buffer (its grad).
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 5, generator=gen)
    opt2.zero_grad()
    model2(x).pow(2).mean().backward()
    bypass_grad = model2.bypass.weight.grad.clone()
    fc_buffer = opt2.state[model2.fc.weight]["momentum_buffer"].clone()
    fc_grad = model2.fc.weight.grad.clone()
    opt2.step()
    assert torch.equal(opt2.state[model2.bypass.weight]["momentum_buffer"], bypass_grad)
    expected = fc_buffer * 0.9 + fc_grad
    assert torch.allclose(opt2.state[model2.fc.weight]["momentum_buffer"], expected, atol=1e-7)


def test_docs_example_match_state_by_names_when_order_changed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    named = list(model.named_parameters())
    opt = fuseopt.Adam(
        [{"params": named[:2], "lr": 0.01}, {"params": named[2:], "lr": 0.02}], foreach=False
    )
    _train(model, opt, 3, seed=3, in_features=3)
    saved = pickle.loads(pickle.dumps(opt.state_dict()))

    # The same model, its params given in another order within each group.
    model2 = copy.deepcopy(model)
    named2 = list(model2.named_parameters())
    opt2 = fuseopt.Adam(
        [{"params": named2[1::-1], "lr": 0.5}, {"params": named2[:1:-1], "lr": 0.5}],
        foreach=False,
    )

    def names_matching(optimizer, state_dict):
        ours = optimizer.state_dict()
        assert len(state_dict["param_groups"]) == len(ours["param_groups"])
        adapted = copy.deepcopy(ours)
        for index, (mine, theirs) in enumerate(
            zip(ours["param_groups"], state_dict["param_groups"])
        ):
            assert len(mine["params"]) == len(theirs["params"])
            adapted = _merge_options(adapted, state_dict, index)
            for param_id, name in zip(mine["params"], mine["param_names"]):
                saved_id = theirs["params"][theirs["param_names"].index(name)]
                if saved_id in state_dict["state"]:
                    adapted["state"][param_id] = copy.deepcopy(state_dict["state"][saved_id])
        return adapted

    def _merge_options(adapted, state_dict, index):
        for key, value in state_dict["param_groups"][index].items():
            if key not in ("params", "param_names"):
                adapted["param_groups"][index][key] = value
        return adapted

    # Without the hook, loading by position gives params the state of another param (or fails).
    plain = fuseopt.Adam([{"params": named2[1::-1]}, {"params": named2[:1:-1]}], foreach=False)
    plain.load_state_dict(saved)
    assert plain.state[model2[0].weight]["exp_avg"].shape != model2[0].weight.shape

    opt2.register_load_state_dict_pre_hook(names_matching)
    opt2.load_state_dict(saved)
    assert [g["lr"] for g in opt2.param_groups] == [0.01, 0.02]
    for (name, p), (name2, p2) in zip(named, named2):
        assert name == name2
        assert_value_equal(opt2.state[p2], opt.state[p])

    # Both continue identically (same grads, same per-param math).
    for i in range(3):
        gen = torch.Generator().manual_seed(40 + i)
        x = torch.randn(4, 3, generator=gen)
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    assert_tensors_equal(list(model2.parameters()), list(model.parameters()))


# ---------------------------------------------------------------------- 7. deepcopy and pickle
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name,fuse_cls,torch_cls,kwargs", CASES, ids=CASE_IDS)
def test_copy_mid_training_continues_identically(name, fuse_cls, torch_cls, kwargs, how):
    params = make_params()
    opt = fuse_cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}], **kwargs)
    run_steps(opt, params, 3)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        twin = pickle.loads(pickle.dumps(opt))
    assert type(twin) is type(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(a is not b for a, b in zip(params, twin_params, strict=True))
    assert_tensors_equal(twin_params, params)
    # the state is keyed by the copied params and equal, but not shared
    assert set(map(id, twin.state)) == set(map(id, twin_params))
    assert_states_equal(twin, twin_params, opt, params)
    for p, q in zip(params, twin_params):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert value.data_ptr() != twin.state[q][key].data_ptr()
    assert group_options(twin) == group_options(opt)
    assert twin.defaults == opt.defaults
    for i in range(4):
        set_grads(params, 500 + i)
        set_grads(twin_params, 500 + i)
        opt.step()
        twin.step()
    assert_tensors_equal(twin_params, params)
    assert_state_dicts_equal(twin.state_dict(), opt.state_dict())


def test_setstate_backfills_missing_options():
    """An optimizer pickled by an older version lacks newer options: unpickling adds defaults."""
    restored = {}
    for lib in (fuseopt, torch.optim):
        params = make_params()
        opt = lib.Adam(params, lr=0.01, maximize=True, foreach=False)
        run_steps(opt, params, 2)
        assert list(opt.__getstate__()) == ["defaults", "state", "param_groups"]
        for group in opt.param_groups:
            del group["maximize"]
            del group["decoupled_weight_decay"]
        del opt.defaults["differentiable"]
        twin = pickle.loads(pickle.dumps(opt))
        assert twin.param_groups[0]["maximize"] is False  # the default, not the saved True
        assert twin.param_groups[0]["decoupled_weight_decay"] is False
        assert twin.defaults["differentiable"] is False
        assert twin.param_groups[0]["lr"] == 0.01
        twin_params = twin.param_groups[0]["params"]
        run_steps(twin, twin_params, 2, first_seed=900)
        restored[lib.__name__] = (group_options(twin), twin.state_dict(), twin_params)
    ours, theirs = restored["fuseopt"], restored["torch.optim"]
    assert ours[0] == theirs[0]
    assert_state_dicts_equal(ours[1], theirs[1])
    assert_tensors_equal(ours[2], theirs[2])


def test_load_state_dict_backfills_missing_options_like_torch():
    results = []
    for lib in (fuseopt, torch.optim):
        params = make_params()
        opt = lib.Adam(params, lr=0.01, foreach=False)
        run_steps(opt, params, 1)
        sd = copy.deepcopy(opt.state_dict())
        for group in sd["param_groups"]:
            for key in ("maximize", "amsgrad", "foreach", "capturable", "fused"):
                del group[key]
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["maximize"] is False
        assert opt.param_groups[0]["amsgrad"] is False
        results.append(group_options(opt))
    assert results[0] == results[1]


ELEMENTWISE = [
    "SGD", "Adam", "AdamW", "Adagrad", "Adamax", "ASGD", "Adadelta", "NAdam", "RAdam", "RMSprop",
    "Rprop",
]  # fmt: skip


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_load_state_dict_gives_torchs_groups(name, legacy):
    """torch's state dict loaded into fuseopt gives back the groups it holds (no ``fused`` key
    where torch has no such option); one saved without its flags (``legacy``: an older torch)
    gets the ones torch's ``__setstate__`` fills in, with torch's values (SGD ``fused=False``,
    RMSprop ``momentum=0``)."""
    params = make_params()
    saved_by = getattr(torch.optim, name)(params, lr=0.01)
    set_grads(params, 0)
    saved_by.step()
    sd = copy.deepcopy(saved_by.state_dict())
    if legacy:
        for group in sd["param_groups"]:
            for key in [k for k, v in group.items() if v is None or isinstance(v, bool)]:
                del group[key]
            group.pop("momentum", None)
    loaded = {}
    for lib in (fuseopt, torch.optim):
        opt = getattr(lib, name)(clone(params), lr=0.5)
        opt.load_state_dict(copy.deepcopy(sd))
        loaded[lib.__name__] = opt.state_dict()["param_groups"]
    assert loaded["fuseopt"] == loaded["torch.optim"]
    if not legacy:
        assert loaded["fuseopt"] == sd["param_groups"]


def test_adamw_load_forces_decoupled_weight_decay():
    results = []
    for lib in (fuseopt, torch.optim):
        params = make_params()
        adam = lib.Adam(params, lr=0.01, weight_decay=0.1)
        adamw = lib.AdamW(clone(params), lr=0.01, weight_decay=0.1)
        adamw.load_state_dict(adam.state_dict())
        assert adamw.param_groups[0]["decoupled_weight_decay"] is True
        results.append(group_options(adamw))
    assert results[0] == results[1]


# ---------------------------------------------------------------------- 8. torch's schedulers
def test_torch_step_lr_drives_fuseopt():
    results = []
    for lib in (fuseopt, torch.optim):
        params = make_params()
        opt = lib.SGD(
            [{"params": params[:1]}, {"params": params[1:], "lr": 0.2}],
            lr=0.1,
            momentum=0.9,
            foreach=False,
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        lrs = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
            for i in range(5):
                set_grads(params, 700 + i)
                opt.step()
                sched.step()
                lrs.append([g["lr"] for g in opt.param_groups])
        assert opt.param_groups[0]["initial_lr"] == 0.1
        assert sched.get_last_lr() == lrs[-1]
        results.append((lrs, params, opt.state_dict(), sched.state_dict()))
    (lrs_ours, p_ours, sd_ours, sched_ours), (lrs_theirs, p_theirs, sd_theirs, sched_theirs) = (
        results
    )
    assert lrs_ours == lrs_theirs
    assert (
        lrs_ours[0] == [0.1, 0.2]
        and lrs_ours[1] == [0.05, 0.1]
        and lrs_ours[-1]
        == [
            0.025,
            0.05,
        ]
    )
    assert_tensors_equal(p_ours, p_theirs)
    assert_state_dicts_equal(sd_ours, sd_theirs)
    assert sched_ours == sched_theirs


def test_scheduler_warns_when_optimizer_step_skipped():
    """torch's scheduler detects fuseopt's step calls (it wraps the instance's ``step``)."""
    params = make_params()
    opt = fuseopt.SGD(params, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.warns(UserWarning, match=r"lr_scheduler.step\(\)` before `optimizer.step\(\)"):
        sched.step()
    assert "step" not in vars(type(opt))  # the class is untouched


def test_empty_param_group_matches_torch():
    """A group with no params is kept, numbered and skipped, as torch does."""
    ours_p = make_params()
    theirs_p = clone(ours_p)
    ours = fuseopt.Adam([{"params": []}, {"params": ours_p, "lr": 0.1}], foreach=False)
    theirs = torch.optim.Adam([{"params": []}, {"params": theirs_p, "lr": 0.1}], foreach=False)
    for step in range(3):
        set_grads(ours_p, step)
        set_grads(theirs_p, step)
        ours.step()
        theirs.step()
    assert_tensors_equal(ours_p, theirs_p)
    assert_state_dicts_equal(ours.state_dict(), theirs.state_dict())
    assert ours.state_dict()["param_groups"][0]["params"] == []
