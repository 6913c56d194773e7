"""fuseopt's Muon against torch.optim.Muon (the oracle): trajectories, state, state dicts, errors.

Tolerance: none. fuseopt's Muon runs the same ATen ops as torch's in the same order (lerp for the
momentum, bfloat16 addmm for Newton–Schulz, mul_/add_ for the apply), so params and every state
tensor must be bitwise equal, in every dtype.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import clone_params, error_of, expect_error_input, make_grads, make_params
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

from fuseopt._muon import Muon

STEPS = 20
# square, tall, wide, a transposed (non-contiguous) tall one, and a larger wide one
SHAPES = [(4, 4), (7, 3), (3, 6), "transposed", (24, 40)]
INFO = next(o for o in optim_db if o.optim_cls.__name__ == "Muon")

# torch's own option sets for Muon, then every option torch's set leaves at its default
EXTRA_CONFIGS = [
    dict(nesterov=False),
    dict(nesterov=False, momentum=0.5, weight_decay=0.0),
    dict(momentum=0.0),
    dict(adjust_lr_fn="original", lr=0.02),
    dict(adjust_lr_fn="match_rms_adamw", lr=0.02, weight_decay=0.3),
    dict(adjust_lr_fn="match_rms_adamw", nesterov=False, lr=torch.tensor([0.05])),
    dict(eps=10.0),  # larger than the update's norm: the clamp decides the scale
    dict(ns_steps=0),
    dict(ns_steps=1, ns_coefficients=(2.0, -1.5, 0.5)),
    dict(weight_decay=0.0, lr=0.1),
]


def _configs():
    pairs = [(i.desc, i.kwargs) for i in INFO.optim_inputs_func(device="cpu", dtype=torch.float32)]
    pairs += [(",".join(f"{k}={v}" for k, v in kw.items()), kw) for kw in EXTRA_CONFIGS]
    return [(desc.replace(" ", "_"), kw) for desc, kw in pairs]


CONFIGS = _configs()


def _feed(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _run(cls, params, grads, **kwargs):
    opt = cls(params, **kwargs)
    for step_grads in grads:
        _feed(params, step_grads)
        opt.step()
    return opt


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert ours.stride() == theirs.stride(), "memory layout"
    assert torch.equal(ours, theirs), (ours.double() - theirs.double()).abs().max()


def _compare(opt, ref, params, ref_params) -> None:
    for p, q in zip(params, ref_params):
        _same(p.detach(), q.detach())
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert list(ours["state"]) == list(theirs["state"]), "state ids and their order"
    for i, ref_state in theirs["state"].items():
        assert list(ours["state"][i]) == list(ref_state), "state keys and their order"
        for key, value in ref_state.items():
            _same(ours["state"][i][key], value)
    assert ours["param_groups"] == theirs["param_groups"]
    assert [list(g) for g in ours["param_groups"]] == [list(g) for g in theirs["param_groups"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kwargs", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_parity_with_torch(kwargs, dtype):
    params = make_params(dtype, shapes=SHAPES)
    ref_params = clone_params(params)
    grads = make_grads(params, STEPS)
    opt = _run(Muon, params, grads, **kwargs)
    ref = _run(torch.optim.Muon, ref_params, grads, **kwargs)
    _compare(opt, ref, params, ref_params)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_parity(dtype, nesterov):
    """bfloat16 too: torch then normalises the momentum buffer in place (no copy to bfloat16)."""
    params = make_params(dtype, shapes=SHAPES)
    ref_params = clone_params(params)
    grads = make_grads(params, 5)
    opt = _run(Muon, params, grads, nesterov=nesterov, lr=0.02)
    ref = _run(torch.optim.Muon, ref_params, grads, nesterov=nesterov, lr=0.02)
    _compare(opt, ref, params, ref_params)


def test_groups_missing_grads_and_added_group():
    """Per-group options, params without grad (no state), a group added after construction."""

    def build(cls, params):
        opt = cls(
            [
                {"params": params[:2], "adjust_lr_fn": "match_rms_adamw", "nesterov": False},
                {"params": params[2:3], "lr": 0.05, "momentum": 0.7},
            ],
            weight_decay=0.2,
        )
        opt.add_param_group({"params": params[3:], "ns_steps": 3, "eps": 1e-3})
        return opt

    params = make_params(torch.float32, shapes=SHAPES)
    ref_params = clone_params(params)
    grads = make_grads(params, 8)
    for step_grads in grads[::3]:
        step_grads[1] = None  # this param gets a grad only at some steps
    opt, ref = build(Muon, params), build(torch.optim.Muon, ref_params)
    for step_grads in grads:
        _feed(params, step_grads)
        _feed(ref_params, step_grads)
        opt.step()
        ref.step()
    _compare(opt, ref, params, ref_params)
    assert repr(opt) == repr(ref)


def test_empty_matrices():
    """(0, n) steps as in torch; (n, 0) divides by zero in the lr ratio, in both."""
    p, q = torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 3, requires_grad=True)
    _run(Muon, [p], [[torch.zeros(0, 3)]])
    _run(torch.optim.Muon, [q], [[torch.zeros(0, 3)]])
    _same(p.detach(), q.detach())
    for cls in (Muon, torch.optim.Muon):
        with pytest.raises(ZeroDivisionError):
            _run(cls, [torch.zeros(3, 0, requires_grad=True)], [[torch.zeros(3, 0)]])


def test_closure_and_hooks():
    """The closure runs with grad enabled and its loss is returned; step hooks run once each."""

    def run(cls):
        gen = torch.Generator().manual_seed(5)
        w = torch.randn(6, 4, generator=gen, requires_grad=True)
        x = torch.randn(8, 6, generator=gen)
        opt = cls([w], lr=0.05)
        calls = []
        opt.register_step_pre_hook(lambda *a: calls.append("pre"))
        opt.register_step_post_hook(lambda *a: calls.append("post"))

        def closure():
            opt.zero_grad()
            loss = (x @ w).square().mean()
            loss.backward()
            return loss

        losses = []
        with torch.no_grad():  # the closure must still build a graph
            for _ in range(4):
                losses.append(opt.step(closure))
        return w, losses, calls

    w, losses, calls = run(Muon)
    ref_w, ref_losses, ref_calls = run(torch.optim.Muon)
    _same(w.detach(), ref_w.detach())
    assert [loss.item() for loss in losses] == [loss.item() for loss in ref_losses]
    assert calls == ref_calls == ["pre", "post"] * 4


# --------------------------------------------------------------------------------------- errors
ERROR_CASES = [
    pytest.param(err, id=f"{i}-{err.error_type.__name__}")
    for i, err in enumerate(INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32))
]


def _build_and_step(cls, err):
    inp = err.optimizer_error_input
    opt = cls(inp.params, **inp.kwargs)
    if err.error_on == OptimizerErrorEnum.STEP_ERROR:
        opt.step()


@pytest.mark.parametrize("err", ERROR_CASES)
def test_torch_error_inputs(err):
    for cls in (torch.optim.Muon, Muon):  # torch first: the case must hold for the oracle
        expect_error_input(err, lambda cls=cls: _build_and_step(cls, err))


def _param(*shape, dtype=torch.float32):
    p = torch.ones(*shape, dtype=dtype, requires_grad=True)
    p.grad = torch.ones_like(p)
    return p


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        (dict(lr=-1.0), (2, 2)),
        (dict(lr=torch.tensor(-0.5)), (2, 2)),
        (dict(lr=torch.tensor([1e-3, 1e-3])), (2, 2)),
        (dict(momentum=-0.1), (2, 2)),
        (dict(weight_decay=-1e-4), (2, 2)),
        (dict(adjust_lr_fn="rms"), (2, 2)),
        (dict(), (5,)),
        (dict(), ()),
        (dict(), (2, 3, 4)),
    ],
    ids=["lr", "tensor-lr", "tensor-lr-numel", "momentum", "wd", "adjust", "1d", "0d", "3d"],
)
def test_constructor_errors_match_torch(kwargs, shape):
    """Same exception type and full message as torch (a 1-D param included)."""
    ours = error_of(lambda: Muon([_param(*shape)], **kwargs))
    assert ours == error_of(lambda: torch.optim.Muon([_param(*shape)], **kwargs))
    if shape == (5,):
        assert ours == (
            ValueError,
            "Muon only supports 2D parameters whereas we found a parameter with size: "
            "torch.Size([5])",
        )


def _sparse_param():
    p = torch.ones(3, 4, requires_grad=True)
    p.grad = torch.sparse_coo_tensor([[0, 2], [1, 3]], [1.0, -2.0], (3, 4), check_invariants=True)
    return p


STEP_ERRORS = {
    "sparse": (lambda: [_sparse_param()], {}),
    "complex": (lambda: [_param(2, 3, dtype=torch.complex64)], {}),
    "ns_steps": (lambda: [_param(2, 3)], dict(ns_steps=100)),
    "ns_coefficients": (lambda: [_param(2, 3)], dict(ns_coefficients=(3.0, -4.0))),
    "ns_coefficients_not_sized": (lambda: [_param(2, 3)], dict(ns_coefficients=3.0)),
    "1d_added_later": (lambda: [_param(2, 3)], "add_1d"),
    "1d_sparse_order": (lambda: [_param(2, 3), _sparse_param()], dict(ns_steps=100)),
}


@pytest.mark.parametrize("case", list(STEP_ERRORS))
def test_step_errors_match_torch(case):
    """Errors torch raises in ``step``: same type and message; fuseopt changes nothing first."""
    make, kwargs = STEP_ERRORS[case]

    def build(cls, params):
        if kwargs == "add_1d":  # the shape check is the constructor's only: it comes at step
            opt = cls(params)
            opt.add_param_group({"params": [_param(4)]})
            return opt
        return cls(params, **kwargs)

    assert error_of(lambda: build(Muon, make()).step()) == error_of(
        lambda: build(torch.optim.Muon, make()).step()
    )
    opt = build(Muon, make())
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state


# ------------------------------------------------------------------------------ state and copies
INTERCHANGE_KWARGS = dict(
    lr=torch.tensor(0.02), nesterov=False, weight_decay=0.2, adjust_lr_fn="match_rms_adamw"
)


@pytest.mark.parametrize("direction", ["torch_to_fuseopt", "fuseopt_to_torch"])
def test_state_dict_interchange(direction, device):
    """Save after 10 steps in one library, load into the other, continue 10: same as torch alone
    (on CUDA too: the same ATen calls, bitwise there as well)."""
    first, second = torch.optim.Muon, Muon
    if direction == "fuseopt_to_torch":
        first, second = second, first
    params = make_params(torch.float32, shapes=SHAPES, device=device)
    ref_params = clone_params(params)
    grads = make_grads(params, STEPS)
    ref = _run(torch.optim.Muon, ref_params, grads, **INTERCHANGE_KWARGS)

    saved = _run(first, params, grads[: STEPS // 2], **INTERCHANGE_KWARGS).state_dict()
    resumed = second(params)  # options come from the state dict
    resumed.load_state_dict(copy.deepcopy(saved))
    for step_grads in grads[STEPS // 2 :]:
        _feed(params, step_grads)
        resumed.step()
    _compare(resumed, ref, params, ref_params)
    assert type(resumed) is second


def test_state_dict_layout_matches_torch():
    params = make_params(torch.float64, shapes=SHAPES)
    ref_params = clone_params(params)
    grads = make_grads(params, 2)
    ours = _run(Muon, params, grads).state_dict()
    theirs = _run(torch.optim.Muon, ref_params, grads).state_dict()
    assert list(ours) == list(theirs) == ["state", "param_groups"]
    assert {i: list(s) for i, s in ours["state"].items()} == {
        i: ["momentum_buffer"] for i in range(len(SHAPES))
    }
    assert ours["param_groups"] == theirs["param_groups"]


def test_deepcopy_continues_identically():
    params = make_params(torch.float32, shapes=SHAPES)
    grads = make_grads(params, 10)
    opt = _run(Muon, params, grads[:5], lr=0.03, adjust_lr_fn="match_rms_adamw")
    clone = copy.deepcopy(opt)
    clone_params_ = [p for g in clone.param_groups for p in g["params"]]
    assert all(c is not p for c, p in zip(clone_params_, params))
    for step_grads in grads[5:]:
        _feed(params, step_grads)
        _feed(clone_params_, step_grads)
        opt.step()
        clone.step()
    for p, c in zip(params, clone_params_):
        _same(c.detach(), p.detach())
        _same(clone.state[c]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_signature_and_docstring():
    import inspect

    ours, theirs = inspect.signature(Muon.__init__), inspect.signature(torch.optim.Muon.__init__)
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()
    ]
    assert Muon.__doc__ and not re.search(r"\{(params|foreach|fused)\}", Muon.__doc__)
