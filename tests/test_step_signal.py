"""Skipping a step whose grads are not finite (``skip_if_nonfinite=``), and the step-ran signal
(``opt.stepped``, ``opt.steps_taken``) that trainers and schedulers read after ``step()``.

The oracle of a skipped step is torch.optim's run without that step: fuseopt's for-loop and
foreach are bitwise torch's for-loop, fused within the fused parity tolerance (test_parity).
"""

from __future__ import annotations

import pytest
import torch
from algorithms import ALGORITHMS, BY_NAME
from conftest import clone_params, make_grads, make_params

import fuseopt

IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
TOL = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(4, 3), (7,), (), "transposed", (70_001,)]
BAD = 2  # the step whose grads hold an inf and a NaN


def _snapshot(opt, params):
    return [p.detach().clone() for p in params] + [
        v.clone() for p in params for v in opt.state[p].values() if torch.is_tensor(v)
    ]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
def test_a_nonfinite_step_changes_nothing_and_does_not_count(algo, impl):
    """Step ``BAD`` has an inf and a NaN grad: params, state and step counts stay as they were,
    ``stepped`` is False and ``steps_taken`` does not grow; the run equals torch's without it."""
    kwargs = dict(momentum=0.9) if algo.name == "SGD" else {}
    params = make_params(torch.float32, shapes=SHAPES)
    ref_params = clone_params(params)
    grads = make_grads(params, 5)
    grads[BAD][1][3] = float("inf")
    grads[BAD][4][100] = float("nan")
    ours = algo.ours(params, **kwargs, **IMPLS[impl], skip_if_nonfinite=True)
    theirs = algo.theirs(ref_params, **kwargs, foreach=False)
    for i, step_grads in enumerate(grads):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        before = _snapshot(ours, params)
        ours.step()
        if i == BAD:
            assert not ours.stepped and _same(before, _snapshot(ours, params))
        else:
            assert ours.stepped
            theirs.step()
    assert ours.steps_taken == len(grads) - 1
    same = torch.equal if impl != "fused" else lambda a, b: _close(a, b)
    assert all(same(p.detach(), q.detach()) for p, q in zip(params, ref_params))
    mine, yours = ours.state_dict()["state"], theirs.state_dict()["state"]
    for i, state in yours.items():
        for key, value in state.items():
            assert same(torch.as_tensor(mine[i][key]), torch.as_tensor(value)), key


def _close(a, b) -> bool:
    torch.testing.assert_close(a, b, **TOL)
    return True


@pytest.mark.parametrize("impl", list(IMPLS))
def test_one_guarded_group_with_a_nonfinite_grad_skips_every_group(impl):
    """A step is all or nothing: a NaN in a group that sets the flag skips the other groups too;
    a NaN only in a group that does not set it is stepped with (torch's NaNs there)."""
    a, b = torch.ones(3, requires_grad=True), torch.ones(4, requires_grad=True)
    opt = fuseopt.Adam(
        [{"params": [a], "skip_if_nonfinite": True}, {"params": [b]}], lr=0.1, **IMPLS[impl]
    )
    a.grad, b.grad = torch.tensor([1.0, float("nan"), 1.0]), torch.ones(4)
    opt.step()
    assert not opt.stepped and torch.equal(b, torch.ones(4)) and not opt.state
    a.grad, b.grad = torch.ones(3), torch.tensor([1.0, float("nan"), 1.0, 1.0])
    opt.step()
    assert opt.stepped and torch.isnan(b[1]) and not torch.isnan(a).any()


@pytest.mark.parametrize("impl", list(IMPLS))
def test_with_clipping_the_norm_decides_and_is_reported(impl):
    """With ``max_grad_norm`` too, a finite total norm settles the check (no second pass); a NaN
    grad makes it NaN: the step is skipped and ``grad_norm`` says why."""
    params = make_params(torch.float32, shapes=[(5, 4), (300,)])
    opt = fuseopt.AdamW(params, max_grad_norm=1.0, skip_if_nonfinite=True, **IMPLS[impl])
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.stepped and torch.isfinite(opt.grad_norm)
    params[1].grad[7] = float("-inf")
    before = _snapshot(opt, params)
    opt.step()
    assert not opt.stepped and not torch.isfinite(opt.grad_norm)
    assert _same(before, _snapshot(opt, params)) and opt.steps_taken == 1


def test_a_finite_overflowing_norm_is_not_a_skip():
    """float64 grads whose squares overflow: the norm is inf, yet every grad is finite, so the
    exact check runs and the step is taken (as clip_grad_norm_ would scale by 0)."""
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = fuseopt.SGD([p], lr=1.0, max_grad_norm=1.0, skip_if_nonfinite=True, fused=True)
    p.grad = torch.full((4,), 1e300, dtype=torch.float64)
    opt.step()
    assert opt.stepped and torch.isinf(opt.grad_norm)


def test_signal_without_grads_and_before_any_step():
    p = torch.zeros(3, requires_grad=True)
    opt = fuseopt.Adam([p])
    assert (opt.stepped, opt.steps_taken) == (False, 0)
    opt.step()  # no grad: nothing to update
    assert (opt.stepped, opt.steps_taken) == (False, 0)
    p.grad = torch.ones(3)
    opt.step()
    assert (opt.stepped, opt.steps_taken) == (True, 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: fuseopt.Adafactor(ps, lr=0.01),
        lambda ps: fuseopt.SparseAdam(ps, lr=0.01),
        lambda ps: fuseopt.Muon(ps[:1], lr=0.01),
    ],
    ids=["Adafactor", "SparseAdam", "Muon"],
)
def test_signal_of_the_optimizers_in_plain_code(make):
    params = [torch.zeros(4, 3, requires_grad=True), torch.zeros(3, requires_grad=True)]
    opt = make(params)
    opt.step()
    assert not opt.stepped
    for p in params:
        p.grad = torch.ones_like(p)
        if isinstance(opt, fuseopt.SparseAdam):
            p.grad = p.grad.to_sparse()
    opt.step()
    assert opt.stepped and opt.steps_taken == 1


def test_lbfgs_signal():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = fuseopt.LBFGS([x])

    def closure():
        opt.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.stepped and opt.steps_taken == 1


def test_scheduler_advances_only_with_the_optimizer_under_grad_scaler():
    """The documented recipe: GradScaler skips ``step`` when it finds an inf (it never calls
    it); the scheduler steps only when ``steps_taken`` grew."""
    model = torch.nn.Linear(3, 1)
    opt = fuseopt.SGD(model.parameters(), lr=0.1)
    sched = fuseopt.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    lrs = []
    for i in range(4):
        opt.zero_grad()
        loss = model(torch.ones(2, 3)).sum() * (float("inf") if i == 1 else 1.0)
        scaler.scale(loss).backward()
        before = opt.steps_taken
        scaler.step(opt)
        scaler.update()
        if opt.steps_taken > before:
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.05, 0.05, 0.025, 0.0125]
    assert opt.steps_taken == 3


def test_triton_kernels_skip_on_grad_scalers_found_inf(monkeypatch):
    """Where the kernels read GradScaler's ``found_inf`` themselves (Triton; here through its
    interpreter), the signal reads it lazily: no host read at the step."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    p = torch.zeros(5, requires_grad=True)
    opt = fuseopt.Adam([p], fused=True)
    for found in (0.0, 1.0, 0.0):
        p.grad = torch.ones(5)
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(found)
        opt.step()
        assert opt.stepped == (found == 0.0)
    assert opt.steps_taken == 2


def test_bad_flag_is_a_clear_error():
    with pytest.raises(TypeError, match="skip_if_nonfinite must be a bool"):
        BY_NAME["Adam"].ours([torch.zeros(2, requires_grad=True)], skip_if_nonfinite="yes")
