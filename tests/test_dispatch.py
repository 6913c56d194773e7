"""The one-pass path of a usual step (``_dispatch._steady_step``) and its hand-over to the general
path: each case it declines must still step exactly as torch.optim does."""

from __future__ import annotations

import pytest
import torch
from conftest import clone_params

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
