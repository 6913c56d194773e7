"""Trajectories, state and state dicts of every algorithm x option set x implementation x dtype,
compared with torch.optim's for-loop implementation (the oracle) over 20 steps: on the CPU and,
where torch sees a GPU, on CUDA (the oracle on the same device).

Tolerances: the reference (for-loop) implementation evaluates the same ATen ops in the same order
as torch's for-loop, so it must be bitwise equal on every device; so must foreach on the CPU, where
torch's foreach ops run ATen's per-tensor kernels. On CUDA they are multi-tensor kernels of their
own, which may round otherwise (a divide by a scalar is a true division there, a multiply by the
reciprocal in the per-tensor kernel; FMA contraction may differ): foreach is compared there with
torch's foreach implementation, bitwise, where that evaluates its for-loop's ops in the same order
(``SAME_OPS_FOREACH``; Rprop's ops all round exactly), else with the for-loop at the fused
tolerance (Adagrad scales the grad before dividing, NAdam divides after the sqrt, ASGD and RAdam
regroup their updates). The fused kernels (numba on the CPU, Triton compiled on CUDA) round like
ATen (FMA where ATen uses it) but compute sqrt and division correctly rounded (Triton's float32
``/`` and ``sqrt`` are approximate: the kernels call ``div_rn`` and ``sqrt_rn``), where torch's
vectorised float32 sqrt and its CUDA divide by a scalar are not: float32 ``rtol=1e-5, atol=1e-6``
(torch's own fused-vs-for-loop distance is of the same order), float64 ``rtol=1e-12, atol=1e-14``,
on both devices. Complex params are viewed as real before any backend runs, while torch does part
of some algorithms (weight decay, SGD's whole update) in complex arithmetic, which rounds without
FMA: complex is compared with the float32 tolerance everywhere.
"""
from __future__ import annotations

import re

import pytest
import torch
from algorithms import ALGORITHMS, BY_NAME, cases
from conftest import IMPLS, clone_params, make_grads, make_params, run_steps
from hypothesis import given, settings
from hypothesis import strategies as st

import fuseopt
from fuseopt.kernels import triton_gpu
from fuseopt.rule import ScalarState

STEPS = 20
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.complex64: dict(rtol=1e-5, atol=1e-6),
}
# torch's foreach implementations that evaluate their for-loop's ops in the same order (see the top)
SAME_OPS_FOREACH = {"SGD", "Adam", "AdamW", "Adadelta", "Adamax", "RMSprop", "Rprop"}


def _oracle(algo, impl: str, device: str) -> tuple[dict, bool]:
    """torch's implementation flags that fuseopt's ``impl`` is compared with on ``device``, and
    whether the comparison is bitwise."""
    if impl == "default":  # the fused kernel, or foreach on CUDA without Triton
        impl = "fused" if device == "cpu" or triton_gpu.available() else "foreach"
    if impl == "forloop" or (impl == "foreach" and device == "cpu"):
        return dict(foreach=False), True
    if impl == "foreach" and algo.name in SAME_OPS_FOREACH:
        return dict(foreach=True), True
    return dict(foreach=False), False


def _assert_same(ours, theirs, exact: bool, tol: dict, torch_alt=None) -> None:
    """Equal (``exact``), or close within ``tol``; where ``torch_alt`` (torch's foreach result)
    is given, an element may also differ by twice what torch's own two implementations differ."""
    if exact:
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert torch.equal(ours, theirs), (ours - theirs).abs().max()
    elif torch_alt is None:
        torch.testing.assert_close(ours, theirs, **tol)
    else:
        bound = tol["atol"] + tol["rtol"] * theirs.abs() + 2 * (torch_alt - theirs).abs()
        excess = (ours - theirs).abs() - bound
        assert ours.shape == theirs.shape and not (excess > 0).any(), excess.max()


def _compare(opt, ref, params, ref_params, exact: bool, dtype, alt=None) -> None:
    """Params, state and groups of ``opt`` against torch's ``ref``; ``alt``: (optimizer, params) of
    torch's foreach run, whose distance to ``ref`` widens the tolerance (complex only)."""
    alt_params = alt[1] if alt else [None] * len(params)
    for p, q, r in zip(params, ref_params, alt_params):
        _assert_same(p.detach(), q.detach(), exact, TOL[dtype], None if r is None else r.detach())
    alt_state = alt[0].state_dict()["state"] if alt else None
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for i, ref_state in theirs["state"].items():
        assert list(ours["state"][i]) == list(ref_state), "state keys and their order"
        for key, value in ref_state.items():
            if key == "step":  # the step counter is exact in every implementation
                assert ours["state"][i][key].dtype == value.dtype
                assert torch.equal(ours["state"][i][key], value)
            else:
                other = alt_state[i][key] if alt_state else None
                _assert_same(ours["state"][i][key], value, exact, TOL[dtype], other)
    # groups equal except the implementation flags the test chose
    strip = lambda g: {k: v for k, v in g.items() if k not in ("foreach", "fused")}
    assert [strip(g) for g in ours["param_groups"]] == [strip(g) for g in theirs["param_groups"]]


def _dtypes(algo):
    return [torch.float32, torch.float64] + ([torch.complex64] if algo.supports_complex else [])


PARAMS = [
    pytest.param(algo, kwargs, dtype, id=f"{algo.name}-{desc}-{str(dtype)[6:]}")
    for algo, desc, kwargs in cases()
    for dtype in _dtypes(algo)
]


def test_problem_is_the_same_on_every_device(device):
    """Params and grads are drawn on the CPU, then moved: every device gets the same values and
    layouts (the transposed param and its grads stay transposed)."""
    for dtype in (torch.float32, torch.complex64):
        params, cpu_params = make_params(dtype, device=device), make_params(dtype)
        for p, q in zip(params, cpu_params):
            assert p.device.type == device and p.is_leaf and p.requires_grad
            assert p.stride() == q.stride() and torch.equal(p.detach().cpu(), q.detach())
        for grads, cpu_grads in zip(make_grads(params, 2), make_grads(cpu_params, 2)):
            for g, h, p in zip(grads, cpu_grads, params):
                assert g.device == p.device and g.stride() == p.stride()
                assert torch.equal(g.cpu(), h)


@pytest.mark.parametrize(("algo", "kwargs", "dtype"), PARAMS)
def test_parity_with_torch(algo, kwargs, dtype, impl, device):
    params = make_params(dtype, device=device)
    ref_params = clone_params(params)
    grads = make_grads(params, STEPS)
    tensor_option = any(isinstance(v, torch.Tensor) for v in _flat(kwargs))
    if impl == "foreach" and tensor_option:
        # Some of torch's algorithms refuse tensor hyperparameters with foreach: then so must we.
        try:
            algo.theirs(clone_params(params), **kwargs, **IMPLS[impl])
        except ValueError as e:
            with pytest.raises(ValueError, match=re.escape(str(e))):
                algo.ours(params, **kwargs, **IMPLS[impl])
            return
    oracle, exact = _oracle(algo, impl, device)
    opt = run_steps(algo.ours, params, grads, **kwargs, **IMPLS[impl])
    ref = run_steps(algo.theirs, ref_params, grads, **kwargs, **oracle)
    alt = None
    if dtype.is_complex and not tensor_option:
        # torch's for-loop does some complex steps (weight decay) in complex arithmetic, its
        # foreach (like fuseopt) on the real view: ill-conditioned elements (centered RMSprop)
        # then differ in torch itself, and fuseopt may differ as much.
        alt_params = clone_params(make_params(dtype, device=device))
        alt = (run_steps(algo.theirs, alt_params, grads, **kwargs, foreach=True), alt_params)
    _compare(opt, ref, params, ref_params, exact and not dtype.is_complex, dtype, alt)


def _flat(kwargs):
    for v in kwargs.values():
        yield from v if isinstance(v, tuple) else (v,)


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
@pytest.mark.parametrize("direction", ["torch_to_fuseopt", "fuseopt_to_torch"])
def test_state_dict_interchange(algo, direction, impl, device):
    """Save after 10 steps in one library, load into the other, continue 10 steps: same result."""
    desc, kwargs = algo.configs()[-1]
    if impl == "foreach" and any(isinstance(v, torch.Tensor) for v in _flat(kwargs)):
        kwargs = {}
    first, second = (algo.theirs, algo.ours)
    if direction == "fuseopt_to_torch":
        first, second = second, first
    params = make_params(torch.float32, device=device)
    grads = make_grads(params, 2 * STEPS // 2)
    ref_params = clone_params(params)
    oracle, exact = _oracle(algo, impl, device)
    ref = run_steps(algo.theirs, ref_params, grads, **kwargs, **oracle)

    flags = lambda cls: IMPLS[impl] if cls is algo.ours else oracle
    opt = run_steps(first, params, grads[: STEPS // 2], **kwargs, **flags(first))
    saved = opt.state_dict()
    resumed = second(params, **kwargs, **flags(second))
    resumed.load_state_dict(saved)
    if second is algo.theirs:  # the saved groups carry our flags: torch resumes on the oracle's
        for group in resumed.param_groups:
            group.update(fused=None, **oracle)
    for step_grads in grads[STEPS // 2 :]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        resumed.step()
    _compare(resumed, ref, params, ref_params, exact, torch.float32)


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
def test_differentiable_step_matches_torch_gradients(algo):
    """With differentiable=True, autograd through two steps gives torch's gradients."""
    desc, kwargs = algo.configs()[1]
    kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}

    def grads_through(cls, scales):
        gen = torch.Generator().manual_seed(3)
        p0 = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
        g0 = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
        p = p0.clone()
        opt = cls([p], differentiable=True, **kwargs)
        for scale in scales:
            p.grad = g0 * scale
            opt.step()
        return torch.autograd.grad((p * p).sum(), (p0, g0))

    scales = (1.0, 0.5)
    try:
        expected = grads_through(algo.theirs, scales)
    except RuntimeError:  # torch's own state updates break autograd over two steps here
        scales = (1.0,)
        expected = grads_through(algo.theirs, scales)
    # fuseopt computes what torch computes: Adam's step size folded into the denominator with
    # float32 0-dim tensors, NAdam's mu_product a tensor in the update, the others' scalars from
    # the step as a number
    tol = dict(rtol=1e-12, atol=1e-14)
    for ours, theirs in zip(grads_through(algo.ours, scales), expected):
        torch.testing.assert_close(ours, theirs, **tol)


DIFFERENTIABLE = [
    pytest.param(algo, kwargs, id=f"{algo.name}-{desc}")
    for algo, desc, kwargs in cases()
    if not any(isinstance(v, torch.Tensor) for v in _flat(kwargs))
]


@pytest.mark.parametrize(("algo", "kwargs"), DIFFERENTIABLE)
def test_differentiable_float64_trajectories_are_torchs(algo, kwargs):
    """``differentiable=True``: 10 float64 steps give torch's params and state within 1e-12
    relative (torch's Adam computes its scalars on float32 step tensors there, NAdam with its
    mu_product tensor; its other algorithms from the step as a number), and so do their
    gradients."""

    def run(cls):
        gen = torch.Generator().manual_seed(4)
        p0 = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
        g0 = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
        p = p0.clone()
        opt = cls([p], differentiable=True, **kwargs)
        for k in range(10):
            p.grad = g0 / (k + 1.0)
            opt.step()
        state = {k: v.detach() for k, v in opt.state[p].items() if torch.is_tensor(v)}
        try:
            grad = torch.autograd.grad(p.square().sum(), g0)[0]
        except RuntimeError:  # torch's in-place state updates break its own graph over steps
            grad = None  # (Adamax, Rprop, amsgrad, centered or momentum RMSprop)
        return p.detach(), state, grad

    ours, theirs = run(algo.ours), run(algo.theirs)
    tol = dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours[0], theirs[0], **tol)
    assert ours[1].keys() == theirs[1].keys()
    for key, value in theirs[1].items():
        torch.testing.assert_close(ours[1][key], value, **tol)
    assert ours[2] is not None  # fuseopt's graph holds
    if theirs[2] is not None:
        torch.testing.assert_close(ours[2], theirs[2], **tol)


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
def test_differentiable_step_passes_gradcheck(algo):
    """One ``differentiable=True`` step, from a state reached by a first step, as a function of
    the param, the grad and every floating state that torch computes with as a tensor (as
    torch's TestDifferentiableOptimizer checks): autograd's gradients are the numerical ones."""
    desc, kwargs = algo.configs()[-1]
    kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    gen = torch.Generator().manual_seed(7)
    p = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    warm = p.detach().clone().requires_grad_()
    warm.grad = torch.randn(3, generator=gen, dtype=torch.float64)
    first = algo.ours([warm], **kwargs)
    first.step()
    saved = first.state[warm]
    # (torch reads ASGD's eta and mu as numbers: no gradient flows to them, in torch's test too)
    numbers = {
        s.name for s in algo.ours.rule.state if isinstance(s, ScalarState) and not s.in_graph
    }
    names = [n for n, v in saved.items() if n != "step" and n not in numbers]
    states = [saved[n].detach().to(torch.float64).requires_grad_() for n in names]

    def one_step(p, g, *values):
        q = p.clone()
        q.grad = g
        opt = algo.ours([q], differentiable=True, **kwargs)
        opt.state[q] = dict(saved, **{n: v.clone() for n, v in zip(names, values)})
        if "step" in saved:
            opt.state[q]["step"] = saved["step"].clone()
        opt.step()
        return (q, *(opt.state[q][n] for n in names))

    assert names or algo.name == "SGD"
    assert torch.autograd.gradcheck(one_step, (p, g, *states))


def test_differentiable_nadam_gradient_flows_through_mu_product():
    """torch computes NAdam's update with the ``mu_product`` tensor under differentiable=True:
    the step's gradient with respect to it is torch's (it was 0), and gradcheck holds."""

    def step_from(lib, mu0):
        gen = torch.Generator().manual_seed(6)
        p = torch.randn(4, generator=gen, dtype=torch.float64)
        opt = lib.NAdam([p], lr=0.1, differentiable=True)
        p.grad = torch.randn(4, generator=gen, dtype=torch.float64)
        opt.step()  # the state exists
        opt.state[p]["mu_product"] = mu0 * 1.0  # (a tensor in mu0's graph)
        q = p.clone()
        opt.param_groups[0]["params"] = [q]
        opt.state[q] = opt.state.pop(p)
        q.grad = torch.randn(4, generator=gen, dtype=torch.float64)
        opt.step()
        return q.square().sum()

    mu0 = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(step_from(fuseopt, mu0), mu0)[0]
    theirs = torch.autograd.grad(step_from(torch.optim, mu0), mu0)[0]
    assert theirs != 0
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda m: step_from(fuseopt, m), (mu0,))


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_differentiable_sgd_first_momentum_buffer_is_detached(nesterov, steps):
    """torch's first momentum buffer is a detached copy of the grad: the step's gradient with
    respect to the first grad flows through the plain grad term only (none without nesterov)."""

    def grads_through(lib):
        gen = torch.Generator().manual_seed(5)
        p0 = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
        g0 = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
        p = p0.clone()
        opt = lib.SGD([p], lr=0.1, momentum=0.9, nesterov=nesterov, differentiable=True)
        for k in range(steps):
            p.grad = g0 * (k + 1.0)
            opt.step()
        return torch.autograd.grad((p * p).sum(), (p0, g0), allow_unused=True)

    for ours, theirs in zip(grads_through(fuseopt), grads_through(torch.optim)):
        assert (ours is None) == (theirs is None)
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
    lr=st.floats(1e-5, 1.0),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.3]),
    amsgrad=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_fused_adam_property(shape, lr, beta1, beta2, eps, weight_decay, amsgrad, dtype):
    """Any shape and hyperparameters in range: the fused kernel stays within the stated tolerance."""
    kwargs = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
    params = make_params(dtype, shapes=[shape])
    ref_params = clone_params(params)
    grads = make_grads(params, 5)
    opt = run_steps(BY_NAME["Adam"].ours, params, grads, **kwargs, fused=True)
    ref = run_steps(BY_NAME["Adam"].theirs, ref_params, grads, **kwargs, foreach=False)
    _compare(opt, ref, params, ref_params, False, dtype)
