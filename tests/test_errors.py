"""torch's own error inputs (``optim_db``): fuseopt raises the same exception type and message."""

from __future__ import annotations

import warnings

import pytest
import torch
from algorithms import ALGORITHMS
from conftest import expect_error_input
from torch.testing._internal.common_optimizers import OptimizerErrorEnum

import fuseopt

ERROR_CASES = [
    pytest.param(algo, err, id=f"{algo.name}-{i}-{err.error_type.__name__}")
    for algo in ALGORITHMS
    for i, err in enumerate(algo.info.optim_error_inputs_func(device="cpu", dtype=torch.float32))
]


def _build_and_step(cls, err):
    inp = err.optimizer_error_input
    opt = cls(inp.params, **inp.kwargs)
    if err.error_on == OptimizerErrorEnum.STEP_ERROR:
        opt.step()


@pytest.mark.parametrize(("algo", "err"), ERROR_CASES)
def test_torch_error_inputs(algo, err):
    expect_error_input(err, lambda: _build_and_step(algo.ours, err))


@pytest.mark.parametrize(
    ("cls", "kwargs", "exc", "match"),
    [
        (fuseopt.Adam, dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
        (fuseopt.Adam, dict(eps=-1e-8), ValueError, "Invalid epsilon value"),
        (fuseopt.Adam, dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1"),
        (fuseopt.Adam, dict(betas=(0.9, 0.99), weight_decay=-0.1), ValueError, "weight_decay"),
        (fuseopt.Adam, dict(fused=True, foreach=True), RuntimeError, "cannot be `True` together"),
        (fuseopt.Adam, dict(fused=True, differentiable=True), RuntimeError, "differentiable"),
        (fuseopt.AdamW, dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "1-element"),
        (fuseopt.SGD, dict(lr=-0.1), ValueError, "Invalid learning rate"),
        (fuseopt.SGD, dict(weight_decay=-1), ValueError, "Invalid weight_decay value"),
        (fuseopt.SGD, dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum"),
        (fuseopt.SGD, dict(fused=True, foreach=True), RuntimeError, "cannot be `True` together"),
    ],
)
def test_constructor_errors_match_torch(cls, kwargs, exc, match):
    """Errors name the argument, with torch's exception type and message."""
    theirs = getattr(torch.optim, cls.__name__)
    with pytest.raises(exc, match=match):
        theirs([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(exc, match=match):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("cls", [fuseopt.Adam, fuseopt.AdamW, fuseopt.SGD])
def test_fused_rejects_unsupported_dtype_before_changing_anything(cls):
    """fused=True on a dtype without kernel: a clear error, and no param or state touched."""
    good = torch.ones(3, requires_grad=True)
    bad = torch.ones(3, dtype=torch.complex32, requires_grad=True)
    good.grad, bad.grad = torch.ones(3), torch.ones(3, dtype=torch.complex32)
    opt = cls([good, bad], lr=0.1, fused=True)
    with pytest.raises(RuntimeError, match="`fused=True` requires .*complex32"):
        opt.step()
    assert torch.equal(good, torch.ones(3))
    assert torch.equal(bad.real.float(), torch.ones(3))
    assert all(not s for s in opt.state.values())


def test_sparse_grad_errors():
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.sparse_coo_tensor([[1]], [1.0], (4,))
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        fuseopt.Adam([p]).step()
    with pytest.raises(RuntimeError, match="fused=True.*sparse"):
        fuseopt.SGD([p], lr=0.1, fused=True).step()


def test_sparse_sgd_matches_torch():
    """SGD steps sparse grads (reference path), with and without momentum, as torch does."""
    for kwargs in (
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9),
        dict(lr=0.1, momentum=0.5, maximize=True),
    ):
        ours, theirs = torch.ones(5, requires_grad=True), torch.ones(5, requires_grad=True)
        o, t = fuseopt.SGD([ours], **kwargs), torch.optim.SGD([theirs], **kwargs)
        for i in range(3):
            grad = torch.sparse_coo_tensor([[i, 4]], [1.0, -2.0], (5,))
            ours.grad, theirs.grad = grad.clone(), grad.clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                o.step()
                t.step()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_sparse_sgd_weight_decay_fails_as_torch():
    """torch adds the dense param to the sparse grad, which ATen refuses: so do we, same error."""
    for cls in (fuseopt.SGD, torch.optim.SGD):
        p = torch.ones(5, requires_grad=True)
        p.grad = torch.sparse_coo_tensor([[1]], [1.0], (5,))
        with pytest.raises(RuntimeError, match=r"add\(sparse, dense\) is not supported"):
            cls([p], lr=0.1, weight_decay=0.1).step()


@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.1, lr_decay=0.05, maximize=True)])
def test_sparse_adagrad_matches_torch(kwargs):
    """Adagrad steps sparse grads with plain code (only the touched rows change), as torch."""
    torch.manual_seed(0)
    emb_ours = torch.nn.Embedding(10, 3, sparse=True)
    emb_theirs = torch.nn.Embedding(10, 3, sparse=True)
    emb_theirs.load_state_dict(emb_ours.state_dict())
    ours = fuseopt.Adagrad(emb_ours.parameters(), **kwargs)
    theirs = torch.optim.Adagrad(emb_theirs.parameters(), **kwargs)
    for step in range(5):
        idx = torch.tensor([[step % 10, 3, 3], [7, (2 * step) % 10, 1]])  # repeated indices too
        for emb, opt in ((emb_ours, ours), (emb_theirs, theirs)):
            opt.zero_grad()
            (emb(idx) ** 2).sum().backward()
            opt.step()
    assert torch.equal(emb_ours.weight, emb_theirs.weight)
    assert torch.equal(ours.state_dict()["state"][0]["sum"], theirs.state_dict()["state"][0]["sum"])


def test_sparse_adagrad_weight_decay_error():
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.sparse_coo_tensor([[1]], [1.0], (4,))
    opt = fuseopt.Adagrad([p], weight_decay=0.1)
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse"):
        opt.step()
    assert opt.state[p]["step"].item() == 0 and torch.equal(p, torch.zeros(4))  # nothing changed
