"""The one-pass path of a usual step (``_dispatch._steady_step``) and its hand-over to the general
path: each case it declines must still step exactly as torch.optim does."""

from __future__ import annotations

import pytest
import torch
from conftest import clone_params, error_of

import fuseopt
from fuseopt import _dispatch

FUSED_TOL = dict(rtol=1e-5, atol=1e-6)  # fused kernels vs torch's for-loop (see test_parity)


@pytest.fixture
def steady_calls(monkeypatch):
    """The results of every ``_steady_step`` call."""
    calls = []
    real = _dispatch._steady_step

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr(_dispatch, "_steady_step", spy)
    return calls


def _params(n=3, size=50):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(size, generator=gen).requires_grad_() for _ in range(n)]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def test_first_step_goes_the_general_way_then_the_steady_one(steady_calls):
    params = _params()
    opt = fuseopt.Adam(params, lr=0.1)
    for step in range(3):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    assert steady_calls == [False, True, True]  # the first step creates the state


def test_params_at_different_steps_run_as_one_batch_each(steady_calls):
    """A param that gets its first grad later has a smaller step count: its bias corrections
    differ, so it must not share the launch (torch's numbers prove it)."""
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
        opt.step()
        ref.step()
    assert True in steady_calls
    assert [opt.state[p]["step"].item() for p in ours] == [5.0, 5.0, 3.0]
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **FUSED_TOL)


@pytest.mark.parametrize("case", ["strided_state", "sparse_grad_error", "mixed_dtypes"])
def test_declined_cases_step_like_torch(case, steady_calls):
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
    assert steady_calls[1:] == [False, False]
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p, q, **FUSED_TOL)


# ------------------------------------------------------------------------- the plan between steps
@pytest.fixture
def plan_hits(monkeypatch):
    """For every step that had a plan: whether it still held."""
    hits = []
    real = _dispatch._Plan.match

    def spy(self, opt, group):
        found = real(self, opt, group)
        hits.append(found is not None)
        return found

    monkeypatch.setattr(_dispatch._Plan, "match", spy)
    return hits


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


# after the change: whether the plan made at step 2 holds at steps 3, 4 and 5
@pytest.mark.parametrize(
    "change, hits",
    [
        (_swap_state_tensor, [True, False, True, True]),
        (_swap_state_tensor_keep_old, [True, False, True, True]),
        # the plan reads the states by lookup from then on
        (_reorder_state, [True, True, True, True]),
        (_swap_state_data, [True, False, True, True]),
        (_swap_param_data, [True, False, True, True]),
        # new groups: no plan at step 3, a new one from step 4
        (_load_state_dict, [True, True, True]),
        # the pointers hold; the steps differ from then on: one launch per step value
        (_rewind_one_step, [True, True, True, True]),
        # that param starts again at step 1: no plan is made for params at different steps
        (_reset_state, [True, False]),
    ],
)
def test_plan_sees_every_change_between_steps(change, hits, plan_hits):
    """Between two steps the user changes what the plan's pointers rest on; the next step must
    see it (torch's numbers prove it)."""
    ours = _params(n=4)
    theirs = clone_params(ours)
    opt = fuseopt.Adam(ours, lr=0.1)
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
def test_plan_checks_this_steps_grads(case, plan_hits):
    """Grads are new tensors every step: the plan checks each one (presence, layout, dtype)."""
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


def test_plan_keeps_no_tensor_alive():
    """The plan refers to params and states weakly: clearing the state frees its memory."""
    import gc
    import weakref

    params = _params(n=2)
    opt = fuseopt.Adam(params, lr=0.1)
    for step in range(3):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    assert opt._steady_plans  # a plan was made
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
    expected = error_of(ref.step)
    assert error_of(opt.step) == expected
