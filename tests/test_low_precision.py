"""bfloat16 and float16 params on the fused CPU kernels, against torch.optim.

The kernels read 16-bit params, grads and states, compute in float32 and round each result back
once. The oracle is torch.optim's for-loop run in float32 from the same 16-bit values, with params
and states rounded to the 16-bit dtype after each step: the same arithmetic, rounded where the
kernel rounds. Elements may differ by one unit in the last place where the two float32 results
straddle a rounding boundary (torch's vectorised sqrt is not correctly rounded, see test_ops), so
the tolerance is two ulps of the 16-bit dtype, and at least 99% of the elements must be equal.

torch's own for-loop on 16-bit params rounds after every op; it is compared at a loose tolerance
only where it stays finite (float16 ``eps=1e-8`` is 0, so its Adam divides by zero), and torch's
``fused=True`` Adam/AdamW (float32 math, one rounding) must equal ours bitwise.
"""

from __future__ import annotations

import pytest
import torch
from algorithms import BY_NAME, cases
from conftest import clone_params, make_grads, make_params, run_steps

STEPS = 12
LOW = (torch.bfloat16, torch.float16)
SCALAR_STATE = {"step", "eta", "mu"}  # kept in float32/float64 whatever the param dtype


def _tensors(opt):
    """(key, tensor) of every param and state tensor, in order; keys name the scalar states."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(("param", p))
            out.extend(opt.state.get(p, {}).items())
    return out


def _within_one_ulp(ours: torch.Tensor, theirs: torch.Tensor, before: torch.Tensor) -> None:
    """``ours`` (16-bit) equals float32 ``theirs`` rounded, or is its 16-bit neighbour; where the
    step cancels (a result far smaller than the value ``before`` it), float32 rounding of the
    operands, a few ulps of ``before``, may exceed that."""
    dtype = ours.dtype
    ours, theirs = ours.float(), theirs.to(dtype).float()
    big = torch.maximum(ours.abs(), theirs.abs()).to(dtype)
    ulp = (torch.nextafter(big, torch.tensor(float("inf"), dtype=dtype)) - big).float()
    bound = ulp + 2.0**-21 * before.float().abs()
    bad = ~((ours - theirs).abs() <= bound) & ~(ours.isnan() & theirs.isnan())
    assert not bad.any(), f"{bad.sum()} beyond 1 ulp: {ours[bad][:3]} vs {theirs[bad][:3]}"
    if ours.numel() >= 1000:
        assert (ours == theirs).float().mean() >= 0.99


PARAMS = [
    pytest.param(algo, kwargs, dtype, id=f"{algo.name}-{desc}-{str(dtype)[6:]}")
    for algo, desc, kwargs in cases()
    for dtype in LOW
]


@pytest.mark.parametrize(("algo", "kwargs", "dtype"), PARAMS)
def test_fused_low_precision_rounds_once(algo, kwargs, dtype):
    """Each step against torch's float32 for-loop started from our 16-bit params and states.

    The first step only creates the states the oracle starts from: a state filled with an option
    (Rprop's ``step_size``, Adagrad's ``initial_accumulator_value``) is rounded to 16 bits in
    ours (as in torch's 16-bit for-loop), not in a float32 oracle.
    """
    params = make_params(dtype)
    grads = make_grads(params, STEPS)
    opt = algo.ours(params, **kwargs, fused=True)
    ref_params = [p.detach().float().requires_grad_() for p in params]
    ref = algo.theirs(ref_params, **kwargs, foreach=False)
    for n, step_grads in enumerate(grads):
        with torch.no_grad():  # the oracle starts each step from our values, widened exactly
            for (_, ours), (_, theirs) in zip(_tensors(opt), _tensors(ref)):
                theirs.copy_(ours)
        before = [t.detach().clone() for _, t in _tensors(opt)]
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.float()
        opt.step()
        ref.step()
        pairs = list(zip(_tensors(opt), _tensors(ref)))
        assert [k for (k, _), _ in pairs] == [k for _, (k, _) in pairs], "same state keys"
        if n == 0:
            continue
        for ((key, ours), (_, theirs)), prev in zip(pairs, before):
            if key in SCALAR_STATE:
                assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
            else:
                _within_one_ulp(ours.detach(), theirs.detach(), prev)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_fused_low_precision_equals_torch_fused(name, dtype):
    """torch's fused Adam/AdamW also compute in float32 and round once: the same bits (with float
    hyperparameters; torch's fused kernel reads a tensor lr or betas in another precision)."""
    algo = BY_NAME[name]
    for _, kwargs in algo.configs():
        if any(torch.is_tensor(v) for v in (kwargs.get("lr"), *kwargs.get("betas", ()))):
            continue
        params = make_params(dtype)
        ref_params = clone_params(params)
        grads = make_grads(params, STEPS)
        run_steps(algo.ours, params, grads, **kwargs, fused=True)
        run_steps(algo.theirs, ref_params, grads, **kwargs, fused=True)
        for p, q in zip(params, ref_params):
            assert torch.equal(p, q), kwargs


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_fused_low_precision_against_torch_16bit_for_loop(name, dtype):
    """torch's 16-bit for-loop rounds after every op, ours once per step: the two agree within
    8 eps on 99% of the elements (where torch's stays finite: its float16 Adam divides by an
    ``eps`` that rounds to 0, its float16 RMSprop and Adagrad overflow)."""
    algo = BY_NAME[name]
    params = make_params(dtype)
    torch16 = clone_params(params)
    grads = make_grads(params, STEPS)
    run_steps(algo.ours, params, grads, lr=0.01, fused=True)
    run_steps(algo.theirs, torch16, grads, lr=0.01, foreach=False)
    ours, theirs = (
        torch.cat([p.detach().double().flatten() for p in ps]) for ps in (params, torch16)
    )
    finite = theirs.isfinite()
    eps = torch.finfo(dtype).eps
    near = (ours - theirs).abs() <= 8 * eps * theirs.abs() + 0.01 * eps
    assert near[finite].double().mean() >= 0.99


def test_low_precision_default_is_fused():
    """With no flags, 16-bit CPU params take the fused kernel (float32 math): torch's for-loop
    numbers are not reproduced, the fused ones are."""
    algo = BY_NAME["Adam"]
    params = make_params(torch.bfloat16)
    ref_params = clone_params(params)
    grads = make_grads(params, STEPS)
    run_steps(algo.ours, params, grads)
    run_steps(algo.theirs, ref_params, grads, fused=True)
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params))
