"""The step plan (``fuseopt._plan``): the full check of a first step, the cache that re-checks a
group's facts at every later step, and the hand-over between them; each case must still step
exactly as torch.optim does. (Faults that would crash a kernel are in ``test_faults.py``.)"""

from __future__ import annotations

import pytest
import torch
from conftest import clone_params, error_of

import fuseopt
from fuseopt._plan_cache import PlanCache

FUSED_TOL = dict(rtol=1e-5, atol=1e-6)  # fused kernels vs torch's for-loop (see test_parity)


@pytest.fixture
def plan_hits(monkeypatch):
    """For every step that found a cache: whether it still held."""
    hits = []
    real = PlanCache._plan

    def spy(self, *args):
        found = real(self, *args)
        hits.append(found is not None)
        return found

    monkeypatch.setattr(PlanCache, "_plan", spy)
    return hits


def _params(n=3, size=50):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(size, generator=gen).requires_grad_() for _ in range(n)]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def test_first_step_is_checked_in_full_then_the_cache_holds(plan_hits):
    params = _params()
    opt = fuseopt.Adam(params, lr=0.1)
    for step in range(3):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    # the first step creates the state; the second is checked in full and kept; the third reuses it
    assert plan_hits == [True]


def test_params_at_different_steps_run_as_one_batch_each(plan_hits, monkeypatch):
    """A param that gets its first grad later has a smaller step count: its bias corrections
    differ, so it must not share the launch (torch's numbers prove it)."""
    from fuseopt.kernels import numba_cpu

    launches = []
    run = numba_cpu.run
    monkeypatch.setattr(numba_cpu, "run", lambda launch: launches.append(launch) or run(launch))
    ours = _params()
    theirs = clone_params(ours)
    opt = fuseopt.Adam(ours, lr=0.1)
    ref = torch.optim.Adam(theirs, lr=0.1, foreach=False)
    for step in range(5):
        for i, (p, q, g) in enumerate(zip(ours, theirs, _grads(ours, step))):
            if i == 2 and step < 2:
                p.grad = q.grad = None  # frozen for two steps
            else:
                p.grad, q.grad = g.clone(), g.clone()
        launches.clear()
        opt.step()
        ref.step()
    assert plan_hits[-1] is True  # the cache holds with two step values
    assert sorted(launch.numels for launch in launches) == [(50,), (50, 50)]
    assert [opt.state[p]["step"].item() for p in ours] == [5.0, 5.0, 3.0]
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **FUSED_TOL)


@pytest.mark.parametrize("case", ["strided_state", "sparse_grad_error", "mixed_dtypes"])
def test_declined_cases_step_like_torch(case, plan_hits):
    params = _params()
    if case == "mixed_dtypes":
        params[1] = params[1].detach().double().requires_grad_()
    theirs = clone_params(params)
    opt = fuseopt.Adagrad(params, lr=0.1, weight_decay=0.1)
    ref = torch.optim.Adagrad(theirs, lr=0.1, weight_decay=0.1, foreach=False)
    for step in range(3):
        for p, q, g in zip(params, theirs, _grads(params, step)):
            p.grad, q.grad = g.to(p.dtype), g.to(p.dtype)
        if step == 1 and case == "strided_state":
            # a state made elsewhere (a checkpoint) may be laid out differently
            s = opt.state[params[0]]["sum"]
            spread = torch.zeros(2 * s.numel())
            spread[::2] = s
            opt.state[params[0]]["sum"] = spread[::2]  # every other element of a buffer
            assert not opt.state[params[0]]["sum"].is_contiguous()
        if step == 2 and case == "sparse_grad_error":
            params[0].grad = params[0].grad.to_sparse()
            before = [p.detach().clone() for p in params]
            with pytest.raises(RuntimeError, match="weight_decay option is not compatible"):
                opt.step()
            assert all(torch.equal(p, b) for p, b in zip(params, before)), "nothing applied"
            return
        opt.step()
        ref.step()
    assert plan_hits == ([False] if case == "strided_state" else [])  # never kept since
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p, q, **FUSED_TOL)


# ------------------------------------------------------------------------- the plan between steps
def _swap_state_tensor(opt, params, ours):
    opt.state[params[1]]["exp_avg"] = opt.state[params[1]]["exp_avg"].clone() * 0.5
    return lambda ref, theirs: ref.state[theirs[1]].__setitem__(
        "exp_avg", ref.state[theirs[1]]["exp_avg"].clone() * 0.5
    )


def _swap_state_tensor_keep_old(opt, params, ours):
    # kept alive (as long as the param): no weak-reference callback fires
    params[1].old_exp_avg = opt.state[params[1]]["exp_avg"]
    return _swap_state_tensor(opt, params, ours)


def _reorder_state(opt, params, ours):
    opt.state[params[0]] = opt.state.pop(params[0])  # same tensors; opt.state no longer in order
    return lambda ref, theirs: None


def _swap_state_data(opt, params, ours):
    t = opt.state[params[1]]["exp_avg_sq"]
    t.data = t.data.clone() * 2.0  # same tensor object, new storage: the old one is freed
    return lambda ref, theirs: ref.state[theirs[1]]["exp_avg_sq"].mul_(2.0)


def _swap_param_data(opt, params, ours):
    params[0].data = params[0].data.clone() + 1.0
    return lambda ref, theirs: theirs[0].data.add_(1.0)


def _reset_state(opt, params, ours):
    del opt.state[params[2]]  # as a user resetting one param's moments
    return lambda ref, theirs: ref.state.pop(theirs[2])


def _load_state_dict(opt, params, ours):
    opt.load_state_dict(opt.state_dict())  # new state tensors, same values
    return lambda ref, theirs: None


def _rewind_one_step(opt, params, ours):
    opt.state[params[0]]["step"].sub_(1.0)  # in place: the steps now differ
    return lambda ref, theirs: ref.state[theirs[0]]["step"].sub_(1.0)


# after the change: whether the cache kept at step 2 holds at steps 3, 4 and 5
@pytest.mark.parametrize(
    "change, hits",
    [
        (_swap_state_tensor, [True, False, True, True]),
        (_swap_state_tensor_keep_old, [True, False, True, True]),
        # the cache reads the states by lookup from then on
        (_reorder_state, [True, True, True, True]),
        (_swap_state_data, [True, False, True, True]),
        (_swap_param_data, [True, False, True, True]),
        # new groups: no cache at step 3, a new one from step 4
        (_load_state_dict, [True, True, True]),
        # the pointers hold; the steps differ from then on: one launch per step value
        (_rewind_one_step, [True, True, True, True]),
        # that param starts again at step 1 (a new state: checked in full), then its own launch
        (_reset_state, [True, False, True]),
    ],
)
@pytest.mark.parametrize("impl", [{}, dict(foreach=True), dict(foreach=False)])
def test_cache_sees_every_change_between_steps(change, hits, impl, plan_hits):
    """Between two steps the user changes what the cache's addresses rest on; the next step must
    see it (torch's numbers prove it). The fused launch and the foreach and for-loop entries are
    cached alike."""
    ours = _params(n=4)
    theirs = clone_params(ours)
    opt = fuseopt.Adam(ours, lr=0.1, **impl)
    ref = torch.optim.Adam(theirs, lr=0.1, foreach=False)
    for step in range(6):
        if step == 3:
            change(opt, ours, ours)(ref, theirs)
        for p, q, g in zip(ours, theirs, _grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, **FUSED_TOL)
    for p, q in zip(ours, theirs):
        for name, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][name], value, **FUSED_TOL)
    assert plan_hits == hits


@pytest.mark.parametrize("case", ["no_grad", "strided_grad", "double_grad_data", "sparse_grad"])
def test_cache_checks_this_steps_grads(case, plan_hits):
    """Grads are new tensors every step: the cache checks each one (presence, layout, dtype)."""
    ours = _params(n=3, size=16)
    theirs = clone_params(ours)
    opt = fuseopt.Adagrad(ours, lr=0.1)
    ref = torch.optim.Adagrad(theirs, lr=0.1, foreach=False)
    for step in range(4):
        grads = _grads(ours, step)
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 3:
            if case == "no_grad":
                ours[1].grad = theirs[1].grad = None
            elif case == "strided_grad":
                wide = torch.zeros(2 * grads[0].numel())
                wide[::2] = grads[0]
                ours[0].grad = wide[::2]
            elif case == "double_grad_data":
                ours[0].grad.data = grads[0].double()  # .data skips the grad setter's checks
                theirs[0].grad.data = grads[0].double()  # torch's for-loop promotes
            else:
                ours[0].grad = grads[0].to_sparse()
                theirs[0].grad = grads[0].to_sparse()
        opt.step()
        ref.step()
    assert plan_hits == [True, True, False]  # made at step 1
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **FUSED_TOL)


@pytest.mark.parametrize("name, impl", [("NAdam", {}), ("ASGD", {}), ("NAdam", dict(foreach=True))])
def test_cache_with_scalar_states_steps_like_torch(name, impl, plan_hits):
    """Scalar states (NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``) are computed every step
    from the cached group's states: params that joined later and a rewound step each get their
    own values, as torch's per-param ones."""
    ours = _params(n=4)
    theirs = clone_params(ours)
    kwargs = dict(lr=0.1, t0=2.0) if name == "ASGD" else dict(lr=0.1)
    opt = getattr(fuseopt, name)(ours, **kwargs, **impl)
    ref = getattr(torch.optim, name)(theirs, **kwargs, foreach=False)
    for step in range(7):
        for i, (p, q, g) in enumerate(zip(ours, theirs, _grads(ours, step))):
            frozen = i == 3 and step < 2  # joins at step 2
            p.grad, q.grad = (None, None) if frozen else (g.clone(), g.clone())
        if step == 5:
            opt.state[ours[0]]["step"].sub_(2.0)
            ref.state[theirs[0]]["step"].sub_(2.0)
        opt.step()
        ref.step()
    assert plan_hits.count(True) >= 3
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **FUSED_TOL)
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, **FUSED_TOL)


@pytest.mark.parametrize("switch", [dict(foreach=True), dict(fused=False), dict(foreach=False)])
def test_cache_follows_the_implementation_options(switch, plan_hits, monkeypatch):
    """``foreach`` and ``fused`` set on a group mid-run take effect at the next step (the cache
    keeps the options it was made under)."""
    from fuseopt import kernels

    ran = []
    real = kernels.get
    monkeypatch.setattr(kernels, "get", lambda backend: ran.append(backend) or real(backend))
    params = _params()
    opt = fuseopt.Adam(params, lr=0.1)
    for step in range(5):
        if step == 3:
            opt.param_groups[0].update(switch)
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        ran.clear()
        opt.step()
    assert ran == (["foreach"] if switch.get("foreach") else ["reference"])
    assert plan_hits == [True, False, True]


def test_cache_keeps_no_tensor_alive():
    """The cache keeps addresses and facts, no tensor: clearing the state frees its memory."""
    import gc
    import weakref

    params = _params(n=2)
    opt = fuseopt.Adam(params, lr=0.1)
    for step in range(3):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    assert opt._plan_caches  # a cache was kept
    moments = [weakref.ref(opt.state[p]["exp_avg"]) for p in params]
    opt.state.clear()
    gc.collect()
    assert all(m() is None for m in moments)


@pytest.mark.parametrize("bad", ["numel", "dtype"])
def test_state_unlike_its_param_never_reaches_the_kernel(bad):
    """A state tensor of another size or dtype (a wrong checkpoint) would make the flat kernel
    read or write outside it: such params take torch's own math, which raises torch's error."""
    params = _params(n=2)
    opt = fuseopt.Adam(params, lr=0.1)
    ref = torch.optim.Adam(clone_params(params), lr=0.1, foreach=False)
    for o, ps in ((opt, params), (ref, [p for g in ref.param_groups for p in g["params"]])):
        for p, g in zip(ps, _grads(ps, 0)):
            p.grad = g
        o.step()
        s = o.state[ps[0]]
        s["exp_avg"] = torch.zeros(3) if bad == "numel" else s["exp_avg"].double()
    kind, message = error_of(opt.step)
    assert kind is error_of(ref.step)[0] is RuntimeError
    if bad == "numel":
        assert "'exp_avg'" in message  # fuseopt names the state (torch: the sizes only)


# ----------------------------------------------------------------- options and state, changed
def _twins(n=3, size=(4, 3)):
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(size, generator=gen).requires_grad_() for _ in range(n)]
    return ours, clone_params(ours)


def _step_both(opt, ref, ours, theirs, step):
    for p, q, g in zip(ours, theirs, _grads(ours, step)):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref.step()


@pytest.mark.parametrize("impl", ["default", "fused", "foreach", "forloop"])
@pytest.mark.parametrize(
    "name, kwargs, change",
    [
        ("SGD", dict(lr=0.1), dict(momentum=0.9)),  # a momentum warm-up from 0
        ("RMSprop", dict(lr=0.01), dict(momentum=0.9)),
        ("RMSprop", dict(lr=0.01), dict(centered=True)),
        ("Adam", dict(lr=0.1), dict(amsgrad=True)),
        ("AdamW", dict(lr=0.1), dict(amsgrad=True)),
    ],
)
def test_options_switched_on_mid_run_step_like_torch(name, kwargs, change, impl):
    """The kernel's operands are re-derived from the options every step. An option switched on
    mid-run gives torch's outcome on every implementation: SGD starts a momentum buffer (its
    first value is the grad), torch's other algorithms raise a KeyError naming the state key
    their existing state lacks (and fuseopt then changes nothing)."""
    flags = {"default": {}, "fused": dict(fused=True), "foreach": dict(foreach=True),
             "forloop": dict(foreach=False)}[impl]  # fmt: skip
    ours, theirs = _twins()
    opt = getattr(fuseopt, name)(ours, **kwargs, **flags)
    ref = getattr(torch.optim, name)(theirs, **kwargs, foreach=False)
    for step in range(6):
        if step == 3:
            for o in (opt, ref):
                o.param_groups[0].update(change)
            for p, q, g in zip(ours, theirs, _grads(ours, step)):
                p.grad, q.grad = g.clone(), g.clone()
            before = [p.detach().clone() for p in ours]
            expected = error_of(ref.step) if name != "SGD" else None
            if expected is not None:
                assert error_of(opt.step)[0] is expected[0] is KeyError
                assert all(torch.equal(p, b) for p, b in zip(ours, before))
                return
        _step_both(opt, ref, ours, theirs, step)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, **FUSED_TOL)
    assert set(opt.state[ours[0]]) == set(ref.state[theirs[0]])


@pytest.mark.parametrize("impl", [{}, dict(fused=True), dict(foreach=True), dict(foreach=False)])
def test_a_failing_group_leaves_every_group_unchanged(impl):
    """Every group is checked before any steps: a malformed option in the second group leaves
    the first group's params, state and step counters as they were (torch raises the same
    ValueError, after stepping the first group)."""
    ours, theirs = _twins(n=2)
    opt = fuseopt.Adam([{"params": [ours[0]]}, {"params": [ours[1]]}], lr=0.1, **impl)
    ref = torch.optim.Adam([{"params": [theirs[0]]}, {"params": [theirs[1]]}], lr=0.1)
    _step_both(opt, ref, ours, theirs, 0)
    for o in (opt, ref):
        o.param_groups[1]["betas"] = (0.9,)
    for p, q, g in zip(ours, theirs, _grads(ours, 1)):
        p.grad, q.grad = g.clone(), g.clone()
    before = [p.detach().clone() for p in ours]
    state = {k: v.clone() for k, v in opt.state[ours[0]].items()}
    assert error_of(opt.step)[0] is error_of(ref.step)[0] is ValueError
    assert all(torch.equal(p, b) for p, b in zip(ours, before))
    assert all(torch.equal(opt.state[ours[0]][k], v) for k, v in state.items())


# ----------------------------------------------------------------------------------- aliasing
@pytest.mark.parametrize("impl", [{}, dict(fused=True), dict(foreach=True), dict(foreach=False)])
def test_a_param_listed_twice_steps_twice(impl):
    """torch warns and applies both updates: SGD ``[p, p]`` reaches -20 after 10 steps of grad 1
    and lr 1, on every path; the fused kernel never races over the two (a tensor of many
    chunks, so that two threads would meet in it)."""
    p = torch.zeros(1 << 18, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = fuseopt.SGD([p, p], lr=1.0, **impl)
    for _ in range(10):
        p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(p.detach(), torch.full_like(p, -20.0))


@pytest.mark.parametrize("impl", [{}, dict(fused=True), dict(foreach=True), dict(foreach=False)])
@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_a_param_listed_twice_steps_as_torchs_for_loop(name, impl):
    """Each of the two updates counts its own step and sees the other's state, as in torch's
    for-loop (torch's foreach and fused differ from it and from each other here)."""
    kwargs = dict(lr=0.1, momentum=0.9) if name in ("SGD", "RMSprop") else dict(lr=0.1)
    ours, theirs = _twins(n=2)
    with pytest.warns(UserWarning):
        opt = getattr(fuseopt, name)([ours[0], ours[1], ours[0]], **kwargs, **impl)
    with pytest.warns(UserWarning):
        ref = getattr(torch.optim, name)([theirs[0], theirs[1], theirs[0]], **kwargs, foreach=False)
    for step in range(4):
        _step_both(opt, ref, ours, theirs, step)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **FUSED_TOL)
    for k, v in ref.state[theirs[0]].items():
        torch.testing.assert_close(opt.state[ours[0]][k], v, **FUSED_TOL)


@pytest.mark.parametrize("impl", [{}, dict(fused=True), dict(foreach=True), dict(foreach=False)])
def test_params_whose_storage_overlaps_step_in_order(impl):
    """Two leaf params over overlapping parts of one buffer: the second steps after the first,
    reading what the first wrote, as torch's implementations all do."""

    def make():
        base = torch.zeros(1 << 17)
        return base, [
            base[: 1 << 16].detach().requires_grad_(),
            base[1 << 15 :].detach().requires_grad_(),
        ]

    base, ours = make()
    ref_base, theirs = make()
    opt = fuseopt.SGD(ours, lr=0.5, momentum=0.5, **impl)
    ref = torch.optim.SGD(theirs, lr=0.5, momentum=0.5, foreach=False)
    for step in range(3):
        for p, q in zip(ours, theirs):
            g = torch.arange(p.numel(), dtype=torch.float32) / p.numel() + step
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(base, ref_base)


def test_kernel_launch_refuses_what_the_kernel_cannot_take():
    """The one direct way to a kernel (weight averaging, tests) checks as the plan does."""
    from fuseopt import kernels
    from fuseopt._averaging import _EMA
    from fuseopt.rule import Flags

    a, b = torch.zeros(8), torch.ones(8)
    run = lambda avgs, cur: kernels.run("numba", _EMA, Flags(), {"weight": 0.5}, avgs, cur, {})
    for avgs, cur, match in (
        ([a], [b, b], "one of each"),
        ([a], [torch.ones(9)], "shape"),
        ([a[:4], a[2:6]], [b[:4], b[:4]], "would write memory"),
        ([a], [a], "share memory"),
        ([a], [torch._neg_view(b)], None),  # a grad's bit resolved by a copy: accepted
    ):
        if match is None:
            run(avgs, cur)
            assert torch.equal(a, torch.full_like(a, -0.5))
        else:
            with pytest.raises(ValueError, match=match):
                run(avgs, cur)
