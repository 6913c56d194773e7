"""AdEMAMix against its oracle, ``pytorch-optimizer``'s ``AdEMAMix`` (its for-loop,
``foreach=False``; with ``cautious=True`` its own cautious option), on every implementation and
dtype over 20 steps; its warm-up schedules; its state dicts across implementations; its errors;
and the cautious first pass under hostile layouts (in child processes).

Tolerances: without ``cautious`` the for-loop and foreach run the reference's ops in its order,
bitwise equal to it. The fused kernels differ from a torch for-loop as torch's own fused kernels
do (test_parity's TOL: float32 ``rtol=1e-5, atol=1e-6``, float64 ``1e-12, 1e-14``). With
``cautious`` every implementation is within that TOL, not bitwise: the mask's scale
``numel / (kept + 1)`` is a float64 quotient here, rounded once, where the reference takes
``numel * (1 / (kept + 1))`` in the param's dtype (torch's reverse division), an ulp apart.
bfloat16: see tests/test_adan.py.
"""

from __future__ import annotations

import layout_faults
import pytest
import torch
from conftest import (
    assert_bfloat16_close,
    assert_refuses_sparse_grads,
    assert_state_dict_round_trip,
    clone_params,
    make_grads,
    make_params,
)

from fuseopt.ademamix import AdEMAMix, alpha_at, beta3_at
from fuseopt.kernels import triton_gpu

reference = pytest.importorskip("pytorch_optimizer")

IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
}
EXACT = dict(rtol=0.0, atol=0.0)
STEPS = 20
SHAPES = [(20, 10), (10,), (), (5, 4, 3), (0, 3), "transposed", (70_001,)]
KEYS = ["step", "exp_avg", "exp_avg_sq", "exp_avg_slow"]
CONFIGS = {
    "default": {},
    "warm-up-coupled": dict(t_alpha_beta3=10, weight_decay=0.1),
    "decoupled-fixed-maximize": dict(
        weight_decay=0.05,
        weight_decouple=True,
        fixed_decay=True,
        maximize=True,
        alpha=2.0,
        betas=(0.8, 0.99, 0.999),
    ),
    "cautious": dict(cautious=True),
    "cautious-warm-up-maximize": dict(
        cautious=True,
        t_alpha_beta3=7.5,
        weight_decay=0.1,
        maximize=True,
        eps=1e-6,
    ),
    "cautious-decoupled": dict(cautious=True, weight_decay=0.1, weight_decouple=True),
}


def _params(dtype, shapes=SHAPES):
    return make_params(dtype, shapes=shapes)


def _run(kwargs, impl, dtype, steps=STEPS, shapes=SHAPES, clip=None):
    """``steps`` steps of ours and of the reference on the same grads (``clip``: ours clips in
    the step, the reference's grads are clipped by torch's clip_grads_with_norm_ first)."""
    params = _params(dtype, shapes)
    ref_params = clone_params(params)
    extra = {} if clip is None else dict(max_grad_norm=clip)
    ours = AdEMAMix(params, lr=0.01, **kwargs, **IMPLS[impl], **extra)
    theirs = reference.AdEMAMix(ref_params, lr=0.01, foreach=False, **kwargs)
    for step_grads in make_grads(params, steps):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        if clip is not None:
            assert ours.grad_norm > clip  # (it clips)
            torch.nn.utils.clip_grads_with_norm_(ref_params, clip, ours.grad_norm, foreach=True)
        theirs.step()
        for p, g in zip(params, step_grads):  # never written (the reference writes them)
            assert torch.equal(p.grad, g)
    return ours, params, theirs, ref_params


def _compare(ours, params, theirs, ref_params, tol):
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)
        assert list(ours.state[p]) == KEYS
        for key in KEYS[1:]:
            torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], **tol)
        assert ours.state[p]["step"].item() == theirs.param_groups[0]["step"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_ademamix_is_pytorch_optimizers(config, impl, dtype):
    kwargs = CONFIGS[config]
    exact = impl != "fused" and not kwargs.get("cautious")
    _compare(*_run(kwargs, impl, dtype), EXACT if exact else TOL[dtype])


@pytest.mark.parametrize("t", [None, 1, 7.5, 10, 333])
def test_the_schedules_are_the_references(t):
    """alpha and beta3 at every step are the reference's (bitwise: the same double math), with
    the step as the float the plan reads from the state; they reach alpha and beta3 at step T
    and stay there."""
    for step in range(1, 400):
        for b1, b3 in ((0.9, 0.9999), (0.8, 0.999), (0.5, 1.0)):
            assert beta3_at(float(step), b1, b3, t) == reference.AdEMAMix.schedule_beta3(
                t, step, b1, b3
            )
        assert alpha_at(float(step), 5.0, t) == reference.AdEMAMix.schedule_alpha(t, step, 5.0)
    if t is not None:
        assert alpha_at(float(t), 5.0, t) == 5.0 and alpha_at(1.0, 5.0, t) == min(5.0 / t, 5.0)
        assert beta3_at(1.0, 0.9, 0.9999, t) < 0.9999 or t == 1
        assert beta3_at(1e6, 0.9, 0.9999, t) == 0.9999


def test_the_warm_up_changes_the_steps():
    """The schedules reach the update: with a warm-up the first steps are not those without."""
    plain, params, _, _ = _run({}, "fused", torch.float32, steps=2)
    warm, params2, _, _ = _run(dict(t_alpha_beta3=100), "fused", torch.float32, steps=2)
    assert not torch.equal(params[0], params2[0])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bfloat16(impl):
    """bfloat16: the reference rounds every op to bfloat16 (and divides, then adds, where its
    float32 path runs addcdiv), fuseopt's fused kernels compute in float32 and round once.
    Against the same math in float64 (the reference from the same bfloat16 params and grads)
    fuseopt is no less accurate than the reference (mean error within 5% of its, or below); and
    99% of all elements are within 2**-6 of the reference, none beyond 2**-3."""
    kwargs = dict(weight_decay=0.01, cautious=True, t_alpha_beta3=10)
    ours, params, theirs, ref_params = _run(kwargs, impl, torch.bfloat16)
    exact = [p.detach().double().requires_grad_() for p in _params(torch.bfloat16)]
    wide = reference.AdEMAMix(exact, lr=0.01, foreach=False, **kwargs)
    for step_grads in make_grads(params, STEPS):
        for p, g in zip(exact, step_grads):
            p.grad = g.double()
        wide.step()
    flat = lambda ps: torch.cat([p.detach().double().flatten() for p in ps])
    mine, theirs_, truth = flat(params), flat(ref_params), flat(exact)
    assert (mine - truth).abs().mean() <= 1.05 * (theirs_ - truth).abs().mean()
    assert_bfloat16_close(mine, theirs_)


@pytest.mark.parametrize("config", ["warm-up-coupled", "cautious-warm-up-maximize"])
def test_triton_kernels(config, monkeypatch):
    """The fused kernels on CUDA (here Triton's interpreter): one update launch per step, the
    cautious counts from Triton's reduction kernel reaching it as a per-tensor scalar table."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    calls, sums = [], []
    run, reduce = triton_gpu.run, triton_gpu.reduce
    monkeypatch.setattr(triton_gpu, "run", lambda *a, **k: (calls.append(a), run(*a, **k))[1])
    monkeypatch.setattr(triton_gpu, "reduce", lambda *a, **k: (sums.append(a), reduce(*a, **k))[1])
    shapes = [(20, 10), (10,), (), "transposed", (300,)]
    _compare(*_run(CONFIGS[config], "fused", torch.float32, shapes=shapes), TOL[torch.float32])
    assert len(calls) == STEPS
    assert len(sums) == (STEPS if CONFIGS[config].get("cautious") else 0)


def test_cautious_masks_the_fast_average_only():
    """Two steps by hand: at the first, every element is kept (scale 4 / (4 + 1)); at the
    second, the fast average of the second element (0.2) disagrees in sign with its grad
    (-0.1): it is masked (3 kept of 4, scale 4 / (3 + 1) = 1) while its slow average (0.08)
    still moves it, with weight alpha."""
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = AdEMAMix([p], lr=1.0, eps=0.0, cautious=True, alpha=2.0, betas=(0.5, 0.75, 0.9))
    g1, g2 = torch.ones(4, dtype=torch.float64), torch.tensor([1.0, -0.1, 1.0, 1.0]).double()
    p.grad = g1
    opt.step()
    # all 4 kept: the fast part scaled by 4 / 5, -(0.8 g + 2 * 0.1 g) / |g|
    torch.testing.assert_close(p.detach(), torch.full((4,), -1.0).double())
    p.grad = g2
    opt.step()
    m = 0.5 * 0.5 * g1 + 0.5 * g2  # [0.75, 0.2, 0.75, 0.75]
    v = 0.75 * 0.25 * g1 * g1 + 0.25 * g2 * g2
    slow = 0.9 * 0.1 * g1 + 0.1 * g2  # [0.1, 0.08, 0.1, 0.1]
    fast = m * torch.tensor([1.0, 0.0, 1.0, 1.0]).double()
    step = (fast / 0.75 + 2.0 * slow) / (v.sqrt() / 0.4375**0.5)
    torch.testing.assert_close(p.detach(), -1.0 - step)
    unmasked = (m / 0.75 + 2.0 * slow) / (v.sqrt() / 0.4375**0.5)
    assert (unmasked - step)[1] > 0.1 and torch.equal(unmasked[[0, 2, 3]], step[[0, 2, 3]])
    torch.testing.assert_close(opt.state[p]["exp_avg"], m)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_cautious_counts_see_the_clipped_grads(impl):
    """``max_grad_norm`` with ``cautious``: torch's clip_grad_norm_ then the reference's cautious
    step (the counts and the averages of the clipped grads)."""
    kwargs = CONFIGS["cautious-warm-up-maximize"]
    _compare(*_run(kwargs, impl, torch.float32, steps=5, clip=5.0), TOL[torch.float32])


def test_cautious_off_keeps_the_references_groups():
    """Off, no ``cautious`` key (the reference's groups have none); on, it is saved."""
    ours, *_ = _run({}, "forloop", torch.float32, steps=1)
    assert "cautious" not in ours.param_groups[0]
    ours, *_ = _run(dict(cautious=True), "forloop", torch.float32, steps=1)
    assert ours.state_dict()["param_groups"][0]["cautious"] is True


@pytest.mark.parametrize("first", list(IMPLS))
@pytest.mark.parametrize("second", list(IMPLS))
def test_state_dict_interchange_across_implementations(first, second):
    """Save after 3 steps on one implementation, load into another, 3 more: as 6 on one (the
    warm-ups resume from the saved step)."""
    params = _params(torch.float32)
    twins = clone_params(params)
    grads = make_grads(params, 6)
    kwargs = dict(lr=0.01, cautious=True, t_alpha_beta3=5, weight_decay=0.1)
    straight = AdEMAMix(twins, **kwargs, **IMPLS[second])
    opt = AdEMAMix(params, **kwargs, **IMPLS[first])
    for i, step_grads in enumerate(grads):
        if i == 3:
            saved = opt.state_dict()
            opt = AdEMAMix(params, **kwargs, **IMPLS[second])
            opt.load_state_dict(saved)
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        straight.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    assert list(saved["state"][0]) == KEYS
    assert saved["param_groups"][0]["t_alpha_beta3"] == 5


def test_state_dict_round_trip():
    """state_dict -> load_state_dict on a fresh optimizer gives the same state dict back (the
    groups backfilled, as torch's ``__setstate__``, with the signature's off flags only)."""
    ours, params, _, _ = _run(dict(t_alpha_beta3=10), "fused", torch.float32, 2)
    saved = ours.state_dict()
    fresh = AdEMAMix(params, lr=0.5)
    fresh.load_state_dict(saved)
    again = fresh.state_dict()
    assert_state_dict_round_trip(saved, again)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
        (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
        (dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
        (dict(alpha=-1.0), ValueError, "Invalid alpha value: -1.0"),
        (dict(betas=(0.9, 0.9)), ValueError, "betas must hold three values"),
        (dict(betas=(1.0, 0.9, 0.9)), ValueError, r"Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, 1.0, 0.9)), ValueError, r"index 1: 1.0 \(in \[0, 1\)\)"),
        (dict(betas=(0.9, 0.9, 1.5)), ValueError, r"index 2: 1.5 \(in \[0, 1\]\)"),
        (dict(t_alpha_beta3=0), ValueError, "Invalid t_alpha_beta3 value: 0"),
        (dict(t_alpha_beta3=-5.0), ValueError, "Invalid t_alpha_beta3 value: -5.0"),
        (dict(t_alpha_beta3="10"), TypeError, "t_alpha_beta3 must be a number or None"),
        (dict(t_alpha_beta3=10, betas=(0.0, 0.9, 0.99)), ValueError, "beta1 and beta3 above 0"),
        (dict(cautious=1), TypeError, "cautious must be a bool"),
        (dict(stable_adamw=True), NotImplementedError, "stable_adamw=True is not implemented"),
        (dict(lr=torch.tensor(0.1)), TypeError, "lr must be a number"),
        (dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm value"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdEMAMix([torch.zeros(2, 2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_sparse_grads_are_refused_before_anything_changes(impl):
    assert_refuses_sparse_grads(lambda params: AdEMAMix(params, cautious=True, **IMPLS[impl]))


MAKE = "__import__('fuseopt.ademamix').ademamix.AdEMAMix(ps, lr=0.01, cautious=True, **impl)"


@pytest.mark.parametrize("fault", list(layout_faults.FAULTS))
def test_cautious_pass_under_layout_faults(fault):
    """See tests/layout_faults.py: never a crash, always foreach's outcome."""
    layout_faults.check(fault, MAKE, "exp_avg_slow")
