"""ADOPT against its oracle, ``pytorch-optimizer``'s ``ADOPT`` (its for-loop, ``foreach=False``),
with its ``cautious`` and ``stable_adamw`` variants, on every implementation and dtype; the first
step (the second moment only); state dicts across implementations, ``clip_lambda`` kept out of
them; errors; and the first pass (cautious counts, StableAdamW's RMS) under hostile layouts, in
child processes.

Tolerances: float32 ``rtol=1e-5, atol=1e-6``, float64 ``rtol=1e-12, atol=1e-14`` (torch's
fused-vs-for-loop bounds). The for-loop and foreach are the reference's ops and bitwise equal to
it without a first pass; the fused kernel's ``sqrt`` is correctly rounded where torch's
vectorised one is within an ulp, and its ``lerp`` and division round as ATen's scalar code: 1-2
ulps after 20 steps (measured: at most 2.4e-7 in float32, 4.4e-16 in float64). The first
pass's sums are float64 where the reference's mask count and mean are in the param's dtype: the
rescaling and the RMS differ by a rounding of that dtype (measured: 2 ulps of the params).
"""

from __future__ import annotations

import copy
import io
import pickle

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

from fuseopt.adopt import ADOPT, default_clip

reference = pytest.importorskip("pytorch_optimizer")

IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
}
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
SHAPES = [(20, 10), (10,), (), (5, 4, 3), (0, 3), "transposed", (70_001,)]
STEPS = 20
LR = 0.01


def _half(step):  # a module-level clipping bound: pickles
    return 0.5


CONFIGS = {
    "default": {},
    "coupled": dict(weight_decay=0.1),
    "decoupled": dict(weight_decay=0.1, weight_decouple=True),
    "fixed-maximize": dict(
        weight_decay=0.01, weight_decouple=True, fixed_decay=True, maximize=True
    ),
    "no-clip-betas": dict(clip_lambda=None, betas=(0.8, 0.99), eps=1e-3),
    "clip-lambda": dict(clip_lambda=_half, betas=(0.5, 0.5)),
    "cautious": dict(cautious=True, weight_decay=0.1),
    "stable": dict(stable_adamw=True, weight_decay=0.01, weight_decouple=True),
    "cautious-stable-maximize": dict(cautious=True, stable_adamw=True, maximize=True),
}


def _run(kwargs, impl, dtype, steps=STEPS, shapes=SHAPES, **extra):
    params = make_params(dtype, shapes=shapes)
    ref_params = clone_params(params)
    ours = ADOPT(params, lr=LR, **kwargs, **IMPLS[impl], **extra)
    theirs = reference.ADOPT(ref_params, lr=LR, foreach=False, **kwargs)
    for step_grads in make_grads(params, steps):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for p, g in zip(params, step_grads):  # never written (the reference writes them)
            assert torch.equal(p.grad, g)
    return ours, params, theirs, ref_params


def _compare(ours, params, theirs, ref_params, tol):
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_adopt_is_pytorch_optimizers(config, impl, dtype):
    out = _run(CONFIGS[config], impl, dtype)
    _compare(*out, TOL[dtype])
    assert all(float(out[0].state[p]["step"]) == STEPS for p in out[1])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bfloat16(impl):
    """bfloat16: the reference rounds each op to bfloat16, the fused kernel computes in float32
    and rounds once (the for-loop and foreach are the reference's ops): 99% of the elements
    within 2**-6, none beyond 2**-3."""
    _, params, _, ref_params = _run(dict(weight_decay=0.01), impl, torch.bfloat16, steps=5)
    assert_bfloat16_close(params, ref_params)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_the_first_step_only_sets_the_second_moment(impl):
    """Step 1: ``v = g^2`` (the coupled decay's grad), the first moment stays 0 and the param
    moves only by a decoupled decay; step 2 divides by ``sqrt(v_1)`` and clips to 2**0.25."""
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    opt = ADOPT([w], lr=0.1, betas=(0.5, 0.9), weight_decay=0.5, **IMPLS[impl])
    w.grad = torch.tensor([1.0, 1.0, -4.0])
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0, 3.0]))
    assert torch.equal(opt.state[w]["exp_avg"], torch.zeros(3))
    assert torch.equal(opt.state[w]["exp_avg_sq"], torch.tensor([1.5, 0.0, -2.5]) ** 2)
    w.grad = torch.tensor([3.0, 1.0, 2.5])  # + 0.5 w: 3.5, 0, 4
    opt.step()
    normed = torch.tensor([3.5 / 1.5, 0.0 / 1e-6, 4.0 / 2.5]).clamp(-(2**0.25), 2**0.25)
    torch.testing.assert_close(opt.state[w]["exp_avg"], 0.5 * normed)
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0, 3.0]) - 0.1 * 0.5 * normed)
    decoupled = torch.ones(2, requires_grad=True)
    opt = ADOPT([decoupled], lr=0.1, weight_decay=0.5, weight_decouple=True, **IMPLS[impl])
    decoupled.grad = torch.ones(2)
    opt.step()
    assert torch.equal(decoupled.detach(), torch.full((2,), 0.95))  # as the reference


def test_a_param_counts_its_own_steps():
    """A deliberate difference: a param whose first grad comes at the group's third step takes
    its own first step then (the reference, counting the group's steps, would divide its grad by
    eps)."""
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = ADOPT([a, b], lr=0.1, fused=True)
    for step in range(3):
        a.grad = torch.full((3,), 2.0)
        b.grad = torch.full((3,), 2.0) if step == 2 else None
        opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and float(opt.state[b]["step"]) == 1
    assert torch.equal(opt.state[b]["exp_avg_sq"], torch.full((3,), 4.0))
    assert float(opt.state[a]["step"]) == 3 and not torch.equal(a.detach(), torch.ones(3))


def test_triton_kernels(monkeypatch):
    """The fused kernels on CUDA (here Triton's interpreter): the first step's kernel, the
    clipped steps, and the first pass's per-tensor scalars."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    shapes = [(20, 10), (10,), (), "transposed", (300,)]
    for config in ("coupled", "cautious-stable-maximize"):
        _compare(*_run(CONFIGS[config], "fused", torch.float32, shapes=shapes), TOL[torch.float32])


def test_in_step_clipping():
    """``max_grad_norm``: as ``clip_grad_norm_`` then the reference's step (grads unwritten)."""
    params = make_params(torch.float32, shapes=SHAPES)
    ref_params = clone_params(params)
    ours = ADOPT(params, lr=LR, cautious=True, max_grad_norm=1.0, fused=True)
    theirs = reference.ADOPT(ref_params, lr=LR, cautious=True, foreach=False)
    for step_grads in make_grads(params, 5):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        norm = torch.nn.utils.clip_grad_norm_(ref_params, 1.0, foreach=True)
        theirs.step()
        torch.testing.assert_close(ours.grad_norm, norm, **TOL[torch.float32])
    _compare(ours, params, theirs, ref_params, TOL[torch.float32])


@pytest.mark.parametrize("first", list(IMPLS))
@pytest.mark.parametrize("second", list(IMPLS))
def test_state_dict_interchange_across_implementations(first, second):
    """Save after 3 steps on one implementation, load into another, 3 more: as 6 on one (the
    loaded optimizer's ``clip_lambda`` is used: the saved groups have none)."""
    kwargs = dict(lr=LR, weight_decay=0.1, cautious=True, stable_adamw=True)
    params = make_params(torch.float32, shapes=SHAPES)
    twins = clone_params(params)
    straight = ADOPT(twins, **kwargs, clip_lambda=_half, **IMPLS[second])
    opt = ADOPT(params, **kwargs, **IMPLS[first])
    for i, step_grads in enumerate(make_grads(params, 6)):
        if i == 1:  # (the clipping bound then never mattered: step 1 does not clip)
            saved = copy.deepcopy(opt.state_dict())
            opt = ADOPT(params, lr=1.0, clip_lambda=_half, **IMPLS[second])
            opt.load_state_dict(saved)
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        straight.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    assert list(saved["state"][0]) == ["step", "exp_avg", "exp_avg_sq"]
    assert "clip_lambda" not in saved["param_groups"][0]
    assert opt.param_groups[0]["clip_lambda"] is _half and opt.param_groups[0]["cautious"] is True


def test_checkpoints_load_with_weights_only():
    """``torch.save`` / ``torch.load(weights_only=True)`` of the state dict (no function in it);
    a pickled or copied optimizer keeps its groups' ``clip_lambda`` and steps as the original."""
    params = make_params(torch.float32, shapes=[(6, 5), (7,)])
    opt = ADOPT(params, lr=LR, clip_lambda=_half)
    for step_grads in make_grads(params, 2):
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = ADOPT(clone_params(params), lr=LR)
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["clip_lambda"] is default_clip
    clones = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    opt.step()
    for clone in clones:
        assert clone.param_groups[0]["clip_lambda"] is _half
        for p, q in zip(clone.param_groups[0]["params"], params):
            p.grad = q.grad
        clone.step()
        for p, q in zip(clone.param_groups[0]["params"], params):
            assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
        (dict(lr=torch.tensor(0.1)), TypeError, "lr must be a number"),
        (dict(betas=(1.0, 0.9)), ValueError, "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.5)), ValueError, "Invalid beta parameter at index 1: -0.5"),
        (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
        (dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
        (dict(clip_lambda=0.25), TypeError, "clip_lambda must be a callable"),
        (dict(cautious=1), TypeError, "cautious must be a bool"),
        (dict(stable_adamw="yes"), TypeError, "stable_adamw must be a bool"),
        (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True`"),
        (dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm value"),
        (dict(adanorm=True), TypeError, "unexpected keyword argument 'adanorm'"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ADOPT([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_sparse_grads_are_refused_before_anything_changes():
    assert_refuses_sparse_grads(lambda params: ADOPT(params, foreach=False))


@pytest.mark.parametrize("fault", list(layout_faults.FAULTS))
def test_first_pass_under_layout_faults(fault):
    """See tests/layout_faults.py (the fault comes before the second step, the first that reads
    the sums): never a crash, always foreach's outcome."""
    make = "__import__('fuseopt.adopt').adopt.ADOPT(ps, cautious=True, stable_adamw=True, **impl)"
    layout_faults.check(fault, make, "exp_avg_sq")
