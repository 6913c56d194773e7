"""LAMB against its oracle, ``pytorch-optimizer``'s ``Lamb`` (its for-loop, ``foreach=False``), on
every implementation and dtype; its state dicts across implementations; its errors; and its
reduction pass (the direction's norm: moments read, nothing written) under hostile layouts, in
child processes. Tolerances as for LARS (tests/test_lars.py): the norms are float64 sums here,
in the param's dtype there.
"""

from __future__ import annotations

import layout_faults
import pytest
import torch
from conftest import assert_bfloat16_close, assert_refuses_sparse_grads, clone_params, make_grads

import fuseopt

reference = pytest.importorskip("pytorch_optimizer")

IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}
SHAPES = [(20, 10), (10,), (), (5, 4, 3), (0, 3), (3, 7), (70_001,)]
CONFIGS = {
    "default": {},
    "decoupled": dict(weight_decay=0.1),
    "coupled": dict(weight_decay=0.1, weight_decouple=False),
    "fixed-maximize": dict(weight_decay=0.05, fixed_decay=True, grad_averaging=False, maximize=True),
    "adam": dict(adam=True, weight_decay=0.01, betas=(0.8, 0.99)),
}


def _params(dtype, shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _run(kwargs, impl, dtype, steps=5, shapes=SHAPES, **extra):
    params = _params(dtype, shapes)
    ref_params = clone_params(params)
    ours = fuseopt.Lamb(params, lr=0.01, **kwargs, **IMPLS[impl], **extra)
    theirs = reference.Lamb(ref_params, lr=0.01, foreach=False, **kwargs)
    grads = make_grads(params, steps)
    for step_grads in grads:
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for p, g in zip(params, step_grads):  # never written (pytorch-optimizer scales them)
            assert torch.equal(p.grad, g)
    return ours, params, theirs, ref_params


def _compare(ours, params, theirs, ref_params, tol):
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)
        if theirs.state.get(q):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_lamb_is_pytorch_optimizers(config, impl, dtype):
    _compare(*_run(CONFIGS[config], impl, dtype), TOL[dtype])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bfloat16(impl):
    """bfloat16: pytorch-optimizer rounds each norm and op to bfloat16, fuseopt's kernels compute
    in float32 and round once: 99% of the elements within 2**-6, none beyond 2**-3."""
    ours, params, theirs, ref_params = _run(dict(weight_decay=0.01), impl, torch.bfloat16)
    for p, q in zip(params, ref_params):
        assert_bfloat16_close(p, q)


def test_triton_kernels(monkeypatch):
    """The fused kernels on CUDA (here Triton's interpreter): the trust ratios reach the kernel
    as a per-tensor scalar table."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    shapes = [(20, 10), (10,), (3, 7), (300,)]
    _compare(*_run(CONFIGS["coupled"], "fused", torch.float32, shapes=shapes), TOL[torch.float32])


def test_the_trust_ratio_is_what_the_paper_says():
    """One step from zero moments: the direction is g / (|g| + eps) elementwise, the step
    lr / (1 - b1) * min(|p|, 10) / (|u| + eps) * (1 - b1) u (the first moment's correction)."""
    w = torch.full((2, 2), 2.0, requires_grad=True)
    opt = fuseopt.Lamb([w], lr=0.1, eps=0.0)
    w.grad = torch.full((2, 2), 3.0)
    opt.step()
    u = torch.full((2, 2), 0.1 / (0.001**0.5 * 3.0) * 3.0)  # m = 0.1 g, sqrt(v) = sqrt(0.001) g
    trust = 4.0 / u.norm()  # |w| = 4
    expected = 2.0 - 0.1 / 0.1 * trust * u
    torch.testing.assert_close(w, expected)


@pytest.mark.parametrize("first", list(IMPLS))
@pytest.mark.parametrize("second", list(IMPLS))
def test_state_dict_interchange_across_implementations(first, second):
    """Save after 3 steps on one implementation, load into another, 3 more: as 6 on one."""
    params = _params(torch.float32)
    twins = clone_params(params)
    grads = make_grads(params, 6)
    straight = fuseopt.Lamb(twins, lr=0.01, weight_decay=0.1, **IMPLS[second])
    opt = fuseopt.Lamb(params, lr=0.01, weight_decay=0.1, **IMPLS[first])
    for i, step_grads in enumerate(grads):
        if i == 3:
            saved = opt.state_dict()
            opt = fuseopt.Lamb(params, lr=0.01, weight_decay=0.1, **IMPLS[second])
            opt.load_state_dict(saved)
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        straight.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    assert list(saved["state"][0]) == ["step", "exp_avg", "exp_avg_sq"]
    assert saved["param_groups"][0]["weight_decouple"] is True


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
        (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
        (dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
        (dict(betas=(1.0, 0.9)), ValueError, "Invalid beta parameter at index 0: 1.0"),
        (dict(rectify=True), NotImplementedError, "rectify=True is not implemented"),
        (dict(pre_norm=True), NotImplementedError, "pre_norm=True is not implemented"),
        (dict(lr=torch.tensor(0.1)), TypeError, "lr must be a number"),
        (dict(max_grad_norm=-1.0), ValueError, "Invalid max_grad_norm value"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        fuseopt.Lamb([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_sparse_grads_are_refused_before_anything_changes():
    assert_refuses_sparse_grads(lambda params: fuseopt.Lamb(params, foreach=False))


@pytest.mark.parametrize("fault", list(layout_faults.FAULTS))
def test_reduction_pass_under_layout_faults(fault):
    """See tests/layout_faults.py: never a crash, always foreach's outcome."""
    layout_faults.check(fault, "fuseopt.Lamb(ps, lr=0.01, weight_decay=0.1, **impl)", "exp_avg")


def test_a_group_excluded_from_adaptation():
    """Biases and norm weights in a group with ``adam=True`` take Adam's step (no trust ratio)
    while the matrices adapt, as pytorch-optimizer's groups do."""
    params = _params(torch.float32, shapes=[(20, 10), (10,), (70_001,)])
    ref_params = clone_params(params)
    groups = lambda ps: [{"params": [ps[0], ps[2]]}, {"params": [ps[1]], "adam": True}]
    ours = fuseopt.Lamb(groups(params), lr=0.01, weight_decay=0.1, fused=True)
    theirs = reference.Lamb(groups(ref_params), lr=0.01, weight_decay=0.1, foreach=False)
    for step_grads in make_grads(params, 4):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    _compare(ours, params, theirs, ref_params, TOL[torch.float32])
