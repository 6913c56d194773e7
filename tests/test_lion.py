"""Lion against its oracle, ``lion-pytorch``'s ``Lion`` (its default per-param update), on every
implementation and dtype; cautious Lion against lion-pytorch's math masked by
``pytorch-optimizer``'s ``apply_cautious`` and against ``pytorch-optimizer``'s
``Lion(cautious=True)``; state dicts across implementations and from lion-pytorch; errors; and the
cautious first pass under hostile layouts, in child processes.

Tolerances: the update is ``lr * sign(c)``, exact in every backend, and the momentum is
``mul`` then ``add(alpha=)`` as lion-pytorch's (fused: one FMA-like rounding of torch's
vectorised add), so params and momenta agree to an ulp or two of the dtype: float32 ``rtol=1e-5,
atol=1e-6`` and float64 ``rtol=1e-12, atol=1e-14`` (torch's fused-vs-for-loop bounds; measured: 0
and at most 2 ulps). A sign that differs where ``c`` cancels to a few ulps of zero would move an
element by ``2 lr``, far outside them: the cases are seeded and measured to have none.
pytorch-optimizer's Lion interpolates with ``lerp``, so its ``c`` differs from lion-pytorch's by
an ulp: in float32 one element of these cases flips sign (measured), so it is compared in
float64 only.
"""

from __future__ import annotations

import copy

import layout_faults
import pytest
import torch
from conftest import (
    assert_bfloat16_close,
    assert_refuses_sparse_grads,
    clone_params,
    make_grads,
    make_params,
)

from fuseopt.lion import Lion

lion_pytorch = pytest.importorskip("lion_pytorch")
pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
BaseOptimizer = pytest.importorskip("pytorch_optimizer.base.optimizer").BaseOptimizer

IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
}
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
SHAPES = [(20, 10), (10,), (), (5, 4, 3), (0, 3), "transposed", (70_001,)]
STEPS = 20
LR = 0.01
# name -> (our kwargs, lion-pytorch's kwargs); maximize: lion-pytorch gets the negated grads
CONFIGS = {
    "default": ({}, {}),
    "weight-decay": (dict(weight_decay=0.1),) * 2,
    "decoupled": (dict(weight_decay=0.5, decoupled_weight_decay=True),) * 2,
    "betas-maximize": (dict(betas=(0.8, 0.95), maximize=True), dict(betas=(0.8, 0.95))),
    "betas-edges": (dict(betas=(0.0, 1.0), weight_decay=0.01),) * 2,
}


def _feed(pairs, step_grads, negate=False):
    for (p, q), g in zip(pairs, step_grads):
        p.grad, q.grad = g.clone(), (-g if negate else g).clone()


def _run_against(make_ours, make_theirs, dtype, steps=STEPS, shapes=SHAPES, negate=False):
    params = make_params(dtype, shapes=shapes)
    ref_params = clone_params(params)
    ours, theirs = make_ours(params), make_theirs(ref_params)
    for step_grads in make_grads(params, steps):
        _feed(zip(params, ref_params), step_grads, negate)
        ours.step()
        theirs.step()
        for p, g in zip(params, step_grads):  # never written
            assert torch.equal(p.grad, g)
    return ours, params, theirs, ref_params


def _compare(ours, params, theirs, ref_params, tol, state_of=lambda state: state["exp_avg"]):
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)
        torch.testing.assert_close(ours.state[p]["exp_avg"], state_of(theirs.state[q]), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_lion_is_lion_pytorchs(config, impl, dtype):
    kwargs, theirs = CONFIGS[config]
    out = _run_against(
        lambda ps: Lion(ps, lr=LR, **kwargs, **IMPLS[impl]),
        lambda ps: lion_pytorch.Lion(ps, lr=LR, **theirs),
        dtype, negate=kwargs.get("maximize", False),
    )  # fmt: skip
    _compare(*out, TOL[dtype])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bfloat16(impl):
    """bfloat16: lion-pytorch rounds the momentum to bfloat16 after each op (its product, then
    its sum), fuseopt's fused kernel computes in float32 and rounds once; where that moves ``c``
    across zero an element steps the other way (2 lr). Over all elements, 99.9% within 2**-6
    (measured: 99.994%), none beyond 2**-4 (a flip, rounded to bfloat16: 2**-5 measured).
    Without weight decay: lion-pytorch's bfloat16 decay ``p * (1 - lr * wd)`` rounds back to
    ``p`` for most elements (a change under half an ulp), where the fused kernel rounds the
    decayed and stepped param once; 43% of the elements then differ by an ulp or more."""
    out = _run_against(
        lambda ps: Lion(ps, lr=LR, **IMPLS[impl]), lambda ps: lion_pytorch.Lion(ps, lr=LR),
        torch.bfloat16, steps=5,
    )  # fmt: skip
    _, params, _, ref_params = out
    assert_bfloat16_close(params, ref_params, share=0.999, worst=2**-4)


def test_decoupled_decay_follows_the_schedule():
    """lion-pytorch's ``decoupled_weight_decay``: the decay is ``lr / init_lr * weight_decay``,
    ``init_lr`` the constructor's lr, also for a group with its own lr (lion-pytorch keeps one
    ``init_lr`` per optimizer); a scheduler's lr scales it."""
    params = make_params(torch.float32, shapes=[(6, 5), (7,), (70_001,)])
    ref_params = clone_params(params)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.002}]
    kwargs = dict(lr=LR, weight_decay=0.5, decoupled_weight_decay=True)
    ours = Lion(groups(params), **kwargs, fused=True)
    theirs = lion_pytorch.Lion(groups(ref_params), **kwargs)
    assert [g["init_lr"] for g in ours.param_groups] == [LR, LR]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (ours, theirs)]
    for step_grads in make_grads(params, 8):
        _feed(zip(params, ref_params), step_grads)
        for o, s in zip((ours, theirs), scheds):
            o.step()
            s.step()
    _compare(ours, params, theirs, ref_params, TOL[torch.float32])


def _cautious_oracle(params, states, lr, betas, weight_decay, maximize):
    """One cautious Lion step per param: lion-pytorch's update, masked by pytorch-optimizer's
    ``apply_cautious``."""
    b1, b2 = betas
    for p in params:
        grad = -p.grad if maximize else p.grad
        exp_avg = states.setdefault(p, dict(exp_avg=torch.zeros_like(p)))["exp_avg"]
        p.mul_(1 - lr * weight_decay)
        update = exp_avg.clone().mul_(b1).add(grad, alpha=1 - b1).sign_()
        BaseOptimizer.apply_cautious(update, grad)
        p.add_(update, alpha=-lr)
        exp_avg.mul_(b2).add_(grad, alpha=1 - b2)


class _Oracle:
    def __init__(self, params, **kwargs):
        self.params, self.kwargs, self.state = params, kwargs, {}

    @torch.no_grad()
    def step(self):
        _cautious_oracle(self.params, self.state, **self.kwargs)


CAUTIOUS = {
    "default": {},
    "weight-decay": dict(weight_decay=0.1),
    "maximize-betas": dict(maximize=True, betas=(0.8, 0.9)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("config", list(CAUTIOUS))
def test_cautious_is_the_masked_lion_step(config, impl, dtype):
    kwargs = CAUTIOUS[config]
    oracle = dict(dict(betas=(0.9, 0.99), weight_decay=0.0, maximize=False), **kwargs)
    out = _run_against(
        lambda ps: Lion(ps, lr=LR, cautious=True, **kwargs, **IMPLS[impl]),
        lambda ps: _Oracle(ps, lr=LR, **oracle), dtype,
    )  # fmt: skip
    _compare(*out, TOL[dtype])


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("config", list(CAUTIOUS))
def test_cautious_is_pytorch_optimizers(config, impl):
    """pytorch-optimizer's own cautious Lion (float64: see the module docstring)."""
    kwargs = CAUTIOUS[config]
    out = _run_against(
        lambda ps: Lion(ps, lr=LR, cautious=True, **kwargs, **IMPLS[impl]),
        lambda ps: pytorch_optimizer.Lion(ps, lr=LR, cautious=True, **kwargs), torch.float64,
    )  # fmt: skip
    _compare(*out, TOL[torch.float64])


def test_cautious_masks_the_update():
    """By hand: the elements whose update's sign is not the grad's do not move, the others move
    by lr * n / (k + 1)."""
    w = torch.zeros(4, requires_grad=True)
    opt = Lion([w], lr=0.1, betas=(0.5, 0.99), cautious=True, fused=True)
    opt.state[w]["exp_avg"] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    w.grad = torch.tensor([1.0, 1.0, -0.5, -3.0])  # c = 1, 0, 0.25, -2: kept 1st and 4th
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, 0.0, 0.0, 0.1]) * 4 / 3)


def test_triton_kernels(monkeypatch):
    """The fused kernels on CUDA (here Triton's interpreter), plain and cautious (the counts
    reach the kernel as a per-tensor scalar table)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    shapes = [(20, 10), (10,), (), "transposed", (300,)]
    out = _run_against(
        lambda ps: Lion(ps, lr=LR, weight_decay=0.1, betas=(0.8, 0.95), fused=True),
        lambda ps: lion_pytorch.Lion(ps, lr=LR, weight_decay=0.1, betas=(0.8, 0.95)),
        torch.float32, shapes=shapes,
    )  # fmt: skip
    _compare(*out, TOL[torch.float32])
    oracle = dict(betas=(0.9, 0.99), weight_decay=0.1, maximize=True)
    out = _run_against(
        lambda ps: Lion(ps, lr=LR, weight_decay=0.1, maximize=True, cautious=True, fused=True),
        lambda ps: _Oracle(ps, lr=LR, **oracle), torch.float32, shapes=shapes,
    )  # fmt: skip
    _compare(*out, TOL[torch.float32])


def test_in_step_clipping():
    """``max_grad_norm``: as ``clip_grad_norm_`` then lion-pytorch's step (grads unwritten)."""
    params = make_params(torch.float32, shapes=SHAPES)
    ref_params = clone_params(params)
    ours = Lion(params, lr=LR, max_grad_norm=1.0, fused=True)
    theirs = lion_pytorch.Lion(ref_params, lr=LR)
    for step_grads in make_grads(params, 5):
        _feed(zip(params, ref_params), step_grads)
        ours.step()
        norm = torch.nn.utils.clip_grad_norm_(ref_params, 1.0, foreach=True)
        theirs.step()
        torch.testing.assert_close(ours.grad_norm, norm, **TOL[torch.float32])
        for p, g in zip(params, step_grads):
            assert torch.equal(p.grad, g)
    _compare(ours, params, theirs, ref_params, TOL[torch.float32])


@pytest.mark.parametrize("first", list(IMPLS))
@pytest.mark.parametrize("second", list(IMPLS))
def test_state_dict_interchange_across_implementations(first, second):
    """Save after 3 steps on one implementation, load into another, 3 more: as 6 on one
    (cautious, decoupled decay: the first pass and ``init_lr`` carry over)."""
    kwargs = dict(lr=LR, weight_decay=0.5, decoupled_weight_decay=True, cautious=True)
    params = make_params(torch.float32, shapes=SHAPES)
    twins = clone_params(params)
    straight = Lion(twins, **kwargs, **IMPLS[second])
    opt = Lion(params, **kwargs, **IMPLS[first])
    for i, step_grads in enumerate(make_grads(params, 6)):
        if i == 3:
            saved = copy.deepcopy(opt.state_dict())
            opt = Lion(params, lr=1.0, **IMPLS[second])
            opt.load_state_dict(saved)
        _feed(zip(params, twins), step_grads)
        opt.step()
        straight.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    assert list(saved["state"][0]) == ["exp_avg"]
    group = saved["param_groups"][0]
    assert group["init_lr"] == LR and group["cautious"] is True and "use_triton" not in group


def test_loads_lion_pytorchs_state_dict():
    """A state dict of lion-pytorch (groups: lr, betas, weight_decay) loads and continues as
    lion-pytorch does; decoupled decay divides by this optimizer's lr, as lion-pytorch keeps its
    own ``init_lr``."""
    params = make_params(torch.float32, shapes=SHAPES)
    ref_params = clone_params(params)
    kwargs = dict(weight_decay=0.5, decoupled_weight_decay=True)
    theirs = lion_pytorch.Lion(ref_params, lr=LR, **kwargs)
    grads = make_grads(params, 6)
    for step_grads in grads[:3]:
        _feed(zip(ref_params, ref_params), step_grads)
        theirs.step()
    with torch.no_grad():
        for p, q in zip(params, ref_params):
            p.copy_(q)
    ours = Lion(params, lr=LR, **kwargs)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # (torch shares the tensors)
    assert ours.param_groups[0]["init_lr"] == LR and ours.param_groups[0]["maximize"] is False
    for step_grads in grads[3:]:
        _feed(zip(params, ref_params), step_grads)
        ours.step()
        theirs.step()
    _compare(ours, params, theirs, ref_params, TOL[torch.float32])


def test_use_triton_is_the_fused_kernel():
    opt = Lion([torch.zeros(3, requires_grad=True)], use_triton=True)
    assert opt.param_groups[0]["fused"] is True and "use_triton" not in opt.param_groups[0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
        (dict(lr=0.0), ValueError, "Invalid learning rate: 0.0 .Lion's must be positive"),
        (dict(lr=torch.tensor(0.1)), TypeError, "lr must be a number"),
        (dict(betas=(1.5, 0.9)), ValueError, r"Invalid beta parameter at index 0: 1.5 \(in \[0"),
        (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1: -0.1"),
        (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
        (dict(cautious=1), TypeError, "cautious must be a bool"),
        (dict(decoupled_weight_decay="yes"), TypeError, "decoupled_weight_decay must be a bool"),
        (dict(use_triton=True, fused=False), ValueError, "use_triton=True asks for the fused"),
        (dict(use_triton=True, foreach=True), ValueError, "use_triton=True asks for the fused"),
        (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True`"),
        (dict(max_grad_norm=-1.0), ValueError, "Invalid max_grad_norm value"),
        (dict(weight_decouple=False), TypeError, "unexpected keyword argument 'weight_decouple'"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Lion([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_sparse_grads_are_refused_before_anything_changes():
    assert_refuses_sparse_grads(lambda params: Lion(params, foreach=False))


@pytest.mark.parametrize("fault", list(layout_faults.FAULTS))
def test_cautious_first_pass_under_layout_faults(fault):
    """See tests/layout_faults.py: never a crash, always foreach's outcome."""
    make = (
        "__import__('fuseopt.lion').lion.Lion(ps, lr=0.01, weight_decay=0.1, cautious=True, **impl)"
    )
    layout_faults.check(fault, make, "exp_avg")
