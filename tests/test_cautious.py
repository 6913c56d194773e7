"""Cautious Adam and AdamW (``cautious=True``; Liang et al., 2024, "Cautious Optimizers") against
an oracle built from torch.optim's Adam math and ``pytorch-optimizer``'s ``apply_cautious`` (the
mask and its ``numel / (kept + 1)`` rescaling): neither torch nor pytorch-optimizer has a
cautious Adam, and timm's does not import here. Tolerances: fused parity's (float32 ``1e-5,
1e-6``, float64 ``1e-12, 1e-14``); the for-loop and foreach are within them too (the mask's
scale is a float64 quotient where the oracle's is a float32 one).
"""

from __future__ import annotations

import pytest
import torch
from conftest import clone_params, make_grads, make_params

import fuseopt

pytest.importorskip("pytorch_optimizer")
from pytorch_optimizer.base.optimizer import BaseOptimizer

IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}
SHAPES = [(4, 3), (7,), (), "transposed", (0,), (70_001,)]


def _oracle_step(params, states, lr, betas, eps, weight_decay, decoupled, maximize, step):
    """One cautious Adam(W) step per param, in torch.optim's for-loop order, the update masked
    by pytorch-optimizer's ``apply_cautious``."""
    b1, b2 = betas
    for p in params:
        grad = -p.grad if maximize else p.grad
        state = states.setdefault(p, dict(m=torch.zeros_like(p), v=torch.zeros_like(p)))
        if weight_decay and decoupled:
            p.mul_(1 - lr * weight_decay)
        elif weight_decay:
            grad = grad.add(p, alpha=weight_decay)
        state["m"].lerp_(grad, 1 - b1)
        state["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = lr / (1 - b1**step)
        denom = (state["v"].sqrt() / (1 - b2**step) ** 0.5).add_(eps)
        update = state["m"].clone()
        BaseOptimizer.apply_cautious(update, grad)
        p.addcdiv_(update, denom, value=-step_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (fuseopt.Adam, {}),
        (fuseopt.Adam, dict(weight_decay=0.1, maximize=True)),
        (fuseopt.AdamW, dict(weight_decay=0.1, betas=(0.8, 0.99))),
    ],
    ids=["Adam", "Adam-l2-maximize", "AdamW"],
)
def test_cautious_is_the_masked_adam_step(cls, kwargs, impl, dtype):
    params = make_params(dtype, shapes=SHAPES)
    ref_params = clone_params(params)
    opt = cls(params, lr=0.01, cautious=True, **kwargs, **IMPLS[impl])
    group = opt.param_groups[0]
    states: dict = {}
    for step, step_grads in enumerate(make_grads(params, 5), start=1):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        with torch.no_grad():
            _oracle_step(
                ref_params, states, 0.01, group["betas"], group["eps"], group["weight_decay"],
                group["decoupled_weight_decay"], group["maximize"], step,
            )  # fmt: skip
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[dtype])
        torch.testing.assert_close(opt.state[p]["exp_avg"], states[q]["m"], **TOL[dtype])


def test_masking_changes_the_step_and_off_is_torchs():
    """The flag matters (a step differs from Adam's where signs disagree) and, off, the groups
    and numbers are torch's."""
    params = make_params(torch.float32, shapes=[(50,)])
    plain, twins = clone_params(params), clone_params(params)
    cautious = fuseopt.Adam(params, lr=0.1, cautious=True)
    adam = fuseopt.Adam(plain, lr=0.1, foreach=False)
    theirs = torch.optim.Adam(twins, lr=0.1, foreach=False)
    for step_grads in make_grads(params, 3):
        for p, q, r, g in zip(params, plain, twins, step_grads):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
        for o in (cautious, adam, theirs):
            o.step()
    assert not torch.equal(params[0], plain[0])
    assert torch.equal(plain[0], twins[0]) and "cautious" not in adam.param_groups[0]
    assert cautious.state_dict()["param_groups"][0]["cautious"] is True


def test_triton_kernels(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    test_cautious_is_the_masked_adam_step(fuseopt.AdamW, dict(weight_decay=0.1), "fused",
                                          torch.float32)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(cautious=1), TypeError, "cautious must be a bool"),
        (dict(cautious=True, capturable=True), ValueError, "not supported with capturable"),
        (dict(cautious=True, differentiable=True), ValueError, "not supported with capturable"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        fuseopt.AdamW([torch.zeros(3, requires_grad=True)], **kwargs)
