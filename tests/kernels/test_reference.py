"""The for-loop backend where torch's for-loop runs and a fused kernel cannot: states the user
cast to another dtype (rounded in place, as torch's in-place ops store them), tensor learning
rates that autograd tracks (``differentiable=True``), CSR and mkldnn params."""

from __future__ import annotations

import copy

import pytest
import torch

import fuseopt

ALGOS = {
    "SGD": dict(lr=0.1, momentum=0.9),
    "SGD_nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "Adagrad": dict(lr=0.1),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Adadelta": dict(lr=0.5),
    "ASGD": dict(lr=0.1, t0=1),
    "Rprop": dict(lr=0.01),
    "Adamax": dict(lr=0.1),
    "Adam": dict(lr=0.1),
    "NAdam": dict(lr=0.1),
    "RAdam": dict(lr=0.1),
}


def _cls(name, lib):
    return getattr(lib, name.split("_")[0])


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).requires_grad_() for s in [(4, 3), (7,)]]


def _cast(opt, params, dtype):
    for p in params:
        for k, v in opt.state[p].items():
            if torch.is_tensor(v) and v.shape == p.shape:
                opt.state[p][k] = v.to(dtype)


@pytest.mark.parametrize("impl", [{}, dict(foreach=False), dict(fused=True), dict(foreach=True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(ALGOS))
def test_cast_states_round_as_torchs_for_loop(name, dtype, impl):
    """After the user casts every state tensor, each step is bitwise torch's for-loop from the
    same values (its in-place ops store each result in the state's dtype), or its error (Adam's
    lerp refuses mixed dtypes) with nothing changed: on every fuseopt path (the kernels and
    foreach hand such params to the for-loop, as torch's foreach steps them one by one)."""
    ours, theirs = _params(), _params()
    opt = _cls(name, fuseopt)(ours, **ALGOS[name], **impl)
    ref = _cls(name, torch.optim)(theirs, **ALGOS[name], foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 2:  # from the same values: torch's, after two fused steps, are a little off
            ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # (not our tensors)
            for group in ref.param_groups:  # (the flags came with our state dict)
                group.update(foreach=False, fused=None)
            with torch.no_grad():
                for p, q in zip(ours, theirs):
                    q.copy_(p)
            _cast(opt, ours, dtype)
            _cast(ref, theirs, dtype)
        if step < 2:
            opt.step()
            ref.step()
            continue
        before = [p.detach().clone() for p in ours]
        if impl.get("foreach") and dtype == torch.float16:
            # torch's foreach refuses float16 states beside float32 params: so does fuseopt's
            with pytest.raises(RuntimeError, match="same dtype"):
                opt.step()
            assert all(torch.equal(p, b) for p, b in zip(ours, before))
            return
        try:
            ref.step()
        except RuntimeError:
            with pytest.raises(RuntimeError):
                opt.step()
            assert all(torch.equal(p, b) for p, b in zip(ours, before))
            return
        opt.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q), (p - q).abs().max()
            for k, v in ref.state[q].items():
                w = opt.state[p][k]
                assert w.dtype == v.dtype and torch.equal(w, v), k


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RAdam"])
def test_differentiable_with_a_learning_rate_that_requires_grad(name):
    """torch's for-loop differentiates through a tensor lr (SGD, Adam, AdamW, RAdam): so does
    fuseopt (ATen's ``alpha``/``value`` take numbers: the lr is multiplied in instead)."""
    results = []
    for lib in (torch.optim, fuseopt):
        lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        p = torch.linspace(-1, 1, 6, dtype=torch.float64, requires_grad=True)
        w = p.clone()
        opt = getattr(lib, name)([w], lr=lr, differentiable=True)
        for i in range(3):
            w.grad = torch.linspace(0.5, -0.5, 6, dtype=torch.float64) * (i + 1)
            opt.step()
        (w * w).sum().backward()
        results.append((w.detach(), lr.grad, p.grad))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("layout", ["csr", "mkldnn"])
def test_csr_and_mkldnn_params_step_as_torch(layout, momentum):
    """torch's SGD for-loop steps CSR and mkldnn params; so does fuseopt (its kernels need a
    strided layout: these take the for-loop, whose first momentum buffer is a clone)."""
    convert = (lambda t: t.to_sparse_csr()) if layout == "csr" else (lambda t: t.to_mkldnn())
    outs = []
    for lib in (torch.optim, fuseopt):
        p = convert(torch.eye(3)).requires_grad_()
        opt = lib.SGD([p], lr=0.1, momentum=momentum)
        for i in range(3):
            p.grad = convert(torch.eye(3) * (i + 1))
            opt.step()
        outs.append(p.detach().to_dense())
    assert torch.equal(outs[0], outs[1])
