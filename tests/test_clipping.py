"""Grad-norm clipping inside the step (``max_grad_norm=``) against its oracle:
``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=True)`` then the step, on
every algorithm, implementation and dtype.

The for-loop and foreach implementations compute the norms with torch's own ops and multiply
each grad by the same coefficient: params, state and the total norm are bitwise torch's (its
clipping, then its for-loop step). The fused kernels sum the squares (or powers) in float64 where
torch's float32 norm accumulates in float32, so their total norm is compared with torch's within
that accumulation's error (``rtol=1e-6`` for the 2- and max norms, ``1e-5`` for other p); and
their step must be bitwise the fused step without clipping on the grads torch's
``clip_grads_with_norm_`` clips by that norm (the fused step itself is compared with torch's in
the parity tests). bfloat16: the kernels keep ``grad * coef`` in float32 where the clipped grad
is stored in bfloat16, so within 2 bfloat16 ulps there.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from algorithms import ALGORITHMS, BY_NAME
from conftest import clone_params, make_grads, make_params

import fuseopt

STEPS = 4
TOL = dict(rtol=1e-5, atol=1e-6)  # (float32: torch's complex weight decay, see test_complex)
TOL_BF16 = dict(rtol=2**-7, atol=2**-7)
IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
SHAPES = [(4, 3), (7,), (2, 3, 2), (), "transposed", (70_001,)]  # (no empty one: see below)


def _configs():
    for algo in ALGORITHMS:
        for desc, kwargs in dict(algo.configs()[i] for i in (0, -1)).items():
            flat = [x for v in kwargs.values() for x in (v if isinstance(v, tuple) else (v,))]
            if not any(isinstance(v, torch.Tensor) for v in flat):  # (foreach refuses them)
                yield algo, desc, kwargs


CASES = [
    pytest.param(algo, kwargs, impl, id=f"{algo.name}-{desc}-{impl}")
    for algo, desc, kwargs in _configs()
    for impl in IMPLS
]


def _run(algo, kwargs, impl, dtype, max_norm, norm_type, steps=STEPS, shapes=SHAPES):
    """Ours with clipping, and its reference on the same grads (torch's clipping, then torch's
    for-loop step; for fused, fuseopt's fused step without clipping, the grads clipped by
    torch by the norm ours found): (ours, its params, the reference, its params, torch's total
    norms)."""
    params = make_params(dtype, shapes=shapes)
    ref_params = clone_params(params)
    grads = make_grads(params, steps)
    ours = algo.ours(params, **kwargs, **IMPLS[impl], max_grad_norm=max_norm, norm_type=norm_type)
    if impl == "fused":
        ref = algo.ours(ref_params, **kwargs, fused=True)
    else:
        ref = algo.theirs(ref_params, **kwargs, foreach=False)
    norms = []
    for step_grads in grads:
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        norms.append(torch.nn.utils.get_total_norm(step_grads, norm_type, foreach=True))
        used = ours.grad_norm if impl == "fused" else norms[-1]
        torch.nn.utils.clip_grads_with_norm_(ref_params, max_norm, used, foreach=True)
        ref.step()
        for p, g in zip(params, step_grads):  # the step reads the grads, never writes them
            assert torch.equal(p.grad, g)
    return ours, params, ref, ref_params, norms


def _compare(ours, params, ref, ref_params, tol=None):
    """Params and state bitwise equal (``tol``: within it)."""
    same = torch.equal if tol is None else lambda a, b: _close(a, b, tol)
    for p, q in zip(params, ref_params):
        assert same(p.detach(), q.detach()), (p - q).abs().max()
    mine, theirs = ours.state_dict()["state"], ref.state_dict()["state"]
    for i, state in theirs.items():
        for key, value in state.items():
            assert same(torch.as_tensor(mine[i][key]), torch.as_tensor(value)), key


def _close(a, b, tol) -> bool:
    torch.testing.assert_close(a, b, **tol)
    return True


def _norm_close(ours, theirs, norm_type):
    rtol = 1e-6 if norm_type in (2.0, math.inf) else 1e-5
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize(("algo", "kwargs", "impl"), CASES)
def test_clipping_is_clip_grad_norm_then_step(algo, kwargs, impl, norm_type, dtype):
    """Clipping active every step (the grads' norm is ~50x max_grad_norm): params, state and the
    total norm (``opt.grad_norm``, in the grads' dtype) as clip_grad_norm_ and the step give them."""
    ours, params, ref, ref_params, norms = _run(algo, kwargs, impl, dtype, 0.5, norm_type)
    _compare(ours, params, ref, ref_params)
    assert ours.grad_norm.dtype == norms[-1].dtype == dtype
    if impl == "fused":
        _norm_close(ours.grad_norm, norms[-1], norm_type)
    else:
        assert torch.equal(ours.grad_norm, norms[-1])


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf])
def test_other_norms_and_a_norm_below_the_limit(norm_type, impl):
    """Other p-norms, and a max_grad_norm above the grads' norm (the coefficient is 1: the grads
    as they are)."""
    for max_norm in (0.5, 1e6):
        ours, params, ref, ref_params, norms = _run(BY_NAME["Adam"], {}, impl, torch.float32,
                                                    max_norm, norm_type)  # fmt: skip
        _compare(ours, params, ref, ref_params)
        _norm_close(ours.grad_norm, norms[-1], norm_type)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_bfloat16(name, impl):
    """bfloat16 params and grads: the for-loop and foreach bitwise (each clipped grad rounded to
    bfloat16, as clip_grad_norm_ stores it), fused within 2 bfloat16 ulps."""
    kwargs = dict(momentum=0.9) if name == "SGD" else {}
    ours, params, ref, ref_params, norms = _run(BY_NAME[name], kwargs, impl, torch.bfloat16, 0.5,
                                                2.0)  # fmt: skip
    _compare(ours, params, ref, ref_params, TOL_BF16 if impl == "fused" else None)
    assert ours.grad_norm.dtype == torch.bfloat16
    torch.testing.assert_close(ours.grad_norm, norms[-1], rtol=2**-7, atol=0)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_complex(norm_type, impl):
    """Complex params (the fused kernels walk real views: a complex grad's 1-norm is not its
    real view's, so that norm comes from torch's ops). torch's for-loop does Adam's complex
    weight decay in complex arithmetic: the for-loop is compared within the float32 parity
    tolerance, as in the parity tests."""
    ours, params, ref, ref_params, norms = _run(BY_NAME["Adam"], {}, impl, torch.complex64, 0.5,
                                                norm_type)  # fmt: skip
    _compare(ours, params, ref, ref_params, None if impl == "fused" else TOL)
    _norm_close(ours.grad_norm, norms[-1], norm_type)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_one_norm_over_every_clipping_group(impl):
    """Two groups that clip share one norm (clip_grad_norm_ over both groups' params); a third
    group that does not clip is neither clipped nor counted."""
    params = make_params(torch.float32, shapes=[(5, 4), (9,), (30,), (6,)])
    ref_params = clone_params(params)
    groups = lambda ps, **clip: [
        {"params": ps[:2]}, {"params": ps[2:3], "lr": 0.01},
        {"params": ps[3:], **({"max_grad_norm": None} if clip else {})},
    ]  # fmt: skip
    ours = fuseopt.AdamW(groups(params, clip=True), lr=0.1, max_grad_norm=0.3, **IMPLS[impl])
    if impl == "fused":
        ref = fuseopt.AdamW(groups(ref_params), lr=0.1, fused=True)
    else:
        ref = torch.optim.AdamW(groups(ref_params), lr=0.1, foreach=False)
    for step_grads in make_grads(params, STEPS):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        norm = torch.nn.utils.get_total_norm(step_grads[:3], foreach=True)
        used = ours.grad_norm if impl == "fused" else norm
        torch.nn.utils.clip_grads_with_norm_(ref_params[:3], 0.3, used, foreach=True)
        ref.step()
    _compare(ours, params, ref, ref_params)
    _norm_close(ours.grad_norm, norm, 2.0)


def test_triton_kernels_clip(monkeypatch):
    """The Triton kernels (through Triton's interpreter on CPU) take the coefficient too."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    for name in ("Adam", "SGD"):
        kwargs = dict(momentum=0.9) if name == "SGD" else {}
        ours, params, ref, ref_params, norms = _run(BY_NAME[name], kwargs, "fused", torch.float32,
                                                    0.5, 2.0, shapes=[(4, 3), (7,), (300,)])
        _compare(ours, params, ref, ref_params)
        _norm_close(ours.grad_norm, norms[-1], 2.0)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(max_grad_norm=-1.0), ValueError, "Invalid max_grad_norm value: -1.0"),
        (dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm value: 0.0"),
        (dict(max_grad_norm=math.inf), ValueError, "Invalid max_grad_norm value: inf"),
        (dict(max_grad_norm=math.nan), ValueError, "Invalid max_grad_norm value: nan"),
        (dict(max_grad_norm="1"), TypeError, "max_grad_norm must be a number or None"),
        (dict(max_grad_norm=1.0, norm_type=0.0), ValueError, "Invalid norm_type value: 0.0"),
        (dict(max_grad_norm=1.0, norm_type=-2.0), ValueError, "Invalid norm_type value: -2.0"),
        (dict(max_grad_norm=1.0, norm_type="fro"), TypeError, "norm_type must be a number"),
        (dict(max_grad_norm=1.0, error_if_nonfinite=1), TypeError, "error_if_nonfinite"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=re.escape(match)):
        fuseopt.Adam([torch.zeros(2, requires_grad=True)], **kwargs)


def _stepped_once(**kwargs):
    params = make_params(torch.float32, shapes=[(4, 3), (5,)])
    opt = fuseopt.Adam(params, lr=0.1, **kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt, params


def _snapshot(opt, params):
    return [p.detach().clone() for p in params] + [
        v.clone() for p in params for v in opt.state[p].values()
    ]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_nonfinite_norm_raises_before_anything_changes(impl):
    """``error_if_nonfinite=True``: torch's error, and params, state and step counts as they
    were; without it, a NaN grad gives torch's numbers (NaN everywhere it reaches)."""
    opt, params = _stepped_once(max_grad_norm=1.0, error_if_nonfinite=True, **IMPLS[impl])
    before = _snapshot(opt, params)
    params[1].grad = torch.tensor([1.0, float("nan"), 0.0, 0.0, 0.0])
    with pytest.raises(RuntimeError, match="The total norm of order 2.0 for gradients"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(opt, params)))
    for group in opt.param_groups:
        group["error_if_nonfinite"] = False
    opt.step()
    assert torch.isnan(opt.grad_norm) and all(torch.isnan(p).all() for p in params)


def test_groups_that_disagree_and_capturable_raise_at_the_step_before_anything_changes(
    monkeypatch,
):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (capturable steps need a device, or Triton)
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    opt, params = _stepped_once(max_grad_norm=1.0, fused=True)
    opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "max_grad_norm": 2.0})
    opt.param_groups[1]["params"][0].grad = torch.ones(3)
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match="must be the same in every param group that clips"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(opt, params)))
    opt.param_groups[1]["max_grad_norm"] = -3.0  # a bad value set in a group
    with pytest.raises(ValueError, match="Invalid max_grad_norm value: -3.0"):
        opt.step()
    opt.param_groups[1]["max_grad_norm"] = 1.0
    opt.param_groups[1]["fused"] = True
    for group in opt.param_groups:
        group["capturable"] = True
    with pytest.raises(ValueError, match="not supported with capturable=True"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(opt, params)))


def test_inf_norm_of_an_empty_grad_is_torchs_error():
    """torch cannot take the max norm of an empty tensor: neither can the fused pass."""
    for impl in IMPLS.values():
        p, q = torch.zeros(0, requires_grad=True), torch.ones(3, requires_grad=True)
        opt = fuseopt.Adam([p, q], max_grad_norm=1.0, norm_type=math.inf, **impl)
        p.grad, q.grad = torch.zeros(0), torch.ones(3)
        with pytest.raises(RuntimeError, match="cannot compute the infinity norm on an empty"):
            opt.step()
        assert not opt.state  # nothing was made


@pytest.mark.parametrize("name", ["Adagrad", "SGD"])
def test_sparse_grads_are_refused(name):
    """Adagrad's sparse grads take a sparse launch, SGD's a for-loop one: both refuse the
    norm with the same error, before the dense param beside them steps."""
    p, q = torch.zeros(5, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = getattr(fuseopt, name)([q, p], lr=0.1, max_grad_norm=1.0)
    q.grad = torch.ones(3)
    p.grad = torch.sparse_coo_tensor([[1, 3]], [1.0, 2.0], (5,))
    before = copy.deepcopy(opt.state_dict()["state"])  # (Adagrad's is made at construction)
    with pytest.raises(RuntimeError, match="max_grad_norm does not support sparse gradients"):
        opt.step()
    assert torch.equal(p, torch.zeros(5)) and torch.equal(q, torch.ones(3))
    after = opt.state_dict()["state"]
    assert after.keys() == before.keys()
    assert all(torch.equal(after[i][k], v) for i in before for k, v in before[i].items())


# --------------------------------------------------------------------------- the other parts
def test_options_only_in_groups_that_ask_and_state_dicts_carry_them():
    """Without clipping the groups are torch's; with it they carry the options, which a state
    dict round trip keeps and torch.optim loads (it keeps options it does not know)."""
    p = torch.zeros(3, requires_grad=True)
    assert "max_grad_norm" not in fuseopt.Adam([p]).param_groups[0]
    assert fuseopt.Adam([p]).grad_norm is None
    opt, params = _stepped_once(max_grad_norm=1.0, norm_type=math.inf)
    group = opt.state_dict()["param_groups"][0]
    assert (group["max_grad_norm"], group["norm_type"], group["error_if_nonfinite"]) == (
        1.0, math.inf, False,
    )  # fmt: skip
    again = fuseopt.Adam(params, lr=0.1)
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]["max_grad_norm"] == 1.0
    theirs = torch.optim.Adam(params, lr=0.1)
    theirs.load_state_dict(opt.state_dict())
    theirs.step()  # (torch steps without clipping: the options are inert there)


def test_grad_scaler_unscales_before_a_clipping_step():
    """A clipping optimizer never asks GradScaler to leave the unscaling to it: a norm of scaled
    grads would be wrong."""
    p = torch.zeros(3, requires_grad=True)
    assert not fuseopt.Adam([p], max_grad_norm=1.0)._step_supports_amp_scaling


def test_compiled_step_clips():
    """The step under ``torch.compile(fullgraph=True)`` (the op runs the eager step) clips."""
    algo = BY_NAME["Adam"]
    params = make_params(torch.float32, shapes=[(4, 3), (9,)])
    ref_params = clone_params(params)
    ours = algo.ours(params, max_grad_norm=0.5, fused=True)
    theirs = algo.ours(ref_params, fused=True)
    step = torch.compile(lambda: ours.step(), fullgraph=True, backend="aot_eager")
    for step_grads in make_grads(params, 3):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        step()
        torch.nn.utils.clip_grads_with_norm_(ref_params, 0.5, ours.grad_norm, foreach=True)
        theirs.step()
    _compare(ours, params, theirs, ref_params, TOL)
