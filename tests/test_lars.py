"""LARS against its oracle, ``pytorch-optimizer``'s ``LARS`` (its for-loop, ``foreach=False``), on
every implementation and dtype; its state dicts across implementations; its errors; and the
reduction pass under hostile layouts (in child processes: a crash fails a case, not the run).

Tolerances: fuseopt sums the norms in float64 and rounds the trust ratio once to the param's
dtype, where pytorch-optimizer takes each norm in the param's dtype: the trust ratios differ by a
rounding of that dtype, and so do the steps (float32 ``rtol=1e-5, atol=1e-6``; float64 ``1e-10``,
the sums' order; bfloat16: a bfloat16 norm moves a ratio by up to 2**-8, so 2**-6).
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
    "wd-nesterov": dict(weight_decay=0.1, nesterov=True),
    "no-momentum": dict(momentum=0.0, weight_decay=0.01),
    "maximize-dampening": dict(maximize=True, dampening=0.1, trust_coefficient=0.02),
}


def _params(dtype, shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _run(kwargs, impl, dtype, steps=5, shapes=SHAPES, **extra):
    params = _params(dtype, shapes)
    ref_params = clone_params(params)
    ours = fuseopt.LARS(params, lr=0.1, **kwargs, **IMPLS[impl], **extra)
    theirs = reference.LARS(ref_params, lr=0.1, foreach=False, **kwargs)
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
    for p, q in zip(params, ref_params):
        if "momentum_buffer" in theirs.state[q]:
            torch.testing.assert_close(
                ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"], **tol
            )
        else:
            assert not ours.state.get(p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_lars_is_pytorch_optimizers(config, impl, dtype):
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
    _compare(*_run(CONFIGS["wd-nesterov"], "fused", torch.float32, shapes=shapes), TOL[torch.float32])


def test_the_trust_ratio_is_what_the_paper_says():
    """One matrix, one step without momentum: the step is lr * eta * |p| / (|g| + wd |p|) times
    (g + wd p); a vector takes plain SGD."""
    w, b = torch.full((2, 2), 2.0, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = fuseopt.LARS([w, b], lr=1.0, momentum=0.0, weight_decay=0.5, trust_coefficient=0.1)
    w.grad, b.grad = torch.full((2, 2), 3.0), torch.full((2,), 3.0)
    opt.step()
    trust = 0.1 * 4.0 / (6.0 + 0.5 * 4.0)  # |w| = 4, |g| = 6
    torch.testing.assert_close(w, torch.full((2, 2), 2.0 - trust * (3.0 + 0.5 * 2.0)))
    torch.testing.assert_close(b, torch.full((2,), 1.0 - 3.0))


def test_clipping_then_lars():
    """With ``max_grad_norm`` the norms see the clipped grads: clip_grad_norm_ then LARS."""
    ours, params, theirs, ref_params = None, _params(torch.float32), None, None
    ref_params = clone_params(params)
    ours = fuseopt.LARS(params, lr=0.1, weight_decay=0.01, max_grad_norm=0.5, fused=True)
    theirs = reference.LARS(ref_params, lr=0.1, weight_decay=0.01, foreach=False)
    for step_grads in make_grads(params, 3):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        torch.nn.utils.clip_grads_with_norm_(ref_params, 0.5, ours.grad_norm, foreach=True)
        theirs.step()
    _compare(ours, params, theirs, ref_params, TOL[torch.float32])


@pytest.mark.parametrize("first", list(IMPLS))
@pytest.mark.parametrize("second", list(IMPLS))
def test_state_dict_interchange_across_implementations(first, second):
    """Save after 3 steps on one implementation, load into another, 3 more: as 6 on one."""
    params = _params(torch.float32)
    twins = clone_params(params)
    grads = make_grads(params, 6)
    straight = fuseopt.LARS(twins, lr=0.1, weight_decay=0.1, **IMPLS[second])
    opt = fuseopt.LARS(params, lr=0.1, weight_decay=0.1, **IMPLS[first])
    for i, step_grads in enumerate(grads):
        if i == 3:
            saved = opt.state_dict()
            opt = fuseopt.LARS(params, lr=0.1, weight_decay=0.1, **IMPLS[second])
            opt.load_state_dict(saved)
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        straight.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    assert list(saved["state"][0]) == ["momentum_buffer"]
    assert saved["param_groups"][0]["trust_coefficient"] == 1e-3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
        (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
        (dict(trust_coefficient=-1.0), ValueError, "Invalid trust_coefficient value: -1.0"),
        (dict(momentum=1.0), ValueError, r"Invalid momentum value: 1.0 \(in \[0, 1\)\)"),
        (dict(dampening=-0.5), ValueError, "Invalid dampening value: -0.5"),
        (dict(nesterov=True, dampening=0.1), ValueError, "Nesterov momentum requires"),
        (dict(lr=torch.tensor(0.1)), TypeError, "lr must be a number"),
        (dict(max_grad_norm=-1.0), ValueError, "Invalid max_grad_norm value"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        fuseopt.LARS([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_sparse_grads_are_refused_before_anything_changes():
    assert_refuses_sparse_grads(lambda params: fuseopt.LARS(params, foreach=False))


@pytest.mark.parametrize("fault", list(layout_faults.FAULTS))
def test_reduction_pass_under_layout_faults(fault):
    """See tests/layout_faults.py: never a crash, always foreach's outcome."""
    layout_faults.check(fault, "fuseopt.LARS(ps, lr=0.1, weight_decay=0.1, **impl)", "momentum_buffer")
