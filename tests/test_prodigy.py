"""Prodigy against its oracle, ``prodigyopt``'s ``Prodigy``, on every implementation and dtype,
one param group or several; its state dicts across implementations and from prodigyopt; its
errors (nothing changes); its first pass (``<g, p0 - p>`` and ``|s|``, summed over every group
into one d) under hostile layouts, in child processes.

The grads are a fixed sequence (never computed from the params, so a rounding difference is not
fed back into them): a direction that fades, ``bias * exp(-t / 8)``, plus noise, so that d grows
by orders of magnitude and then settles, as in training (each test checks that it grew).

Tolerances (``TOL``): prodigyopt sums ``<g, p0 - p>`` and ``|s|`` in the param's dtype (a BLAS
dot, ``sum``), fuseopt in float64 (fused) or in the param's dtype in another order (for-loop,
foreach), so d differs by the sums' rounding (measured: up to 5e-7 relative in float32, 2e-15 in
float64), and every step's size with it. A param then differs by 1-2 ulp of itself (the
elementwise ops, as torch's fused kernels against its for-loop) plus d's relative error times how
far it moved from p0, and a state by d's error times its largest terms (see ``_compare``): each is
compared with ``rtol`` of its value plus ``rtol`` of that scale plus ``atol``. Measured: within
6e-7 of that scale in float32 (1e-15 in float64), hence ``rtol=1e-5``, ``atol=1e-6`` (LARS's and
Lamb's; a margin of 10 or more) and ``rtol=1e-13``, ``atol=1e-15`` (a margin of 45 or more). The
group values take ``rtol`` too.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import layout_faults
import pytest
import torch
from conftest import assert_bfloat16_close, clone_params, make_grads, make_params

from fuseopt.prodigy import Prodigy

reference = pytest.importorskip("prodigyopt")

IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-13, atol=1e-15),
}
STEPS = 25
# a matrix, a vector, a scalar, a 3-d tensor, an empty one, a transposed matrix, one larger than
# a kernel chunk, and one of zeros (prodigyopt keeps its p0 as a 0-dim zero)
SHAPES = [(20, 10), (10,), (), (5, 4, 3), (0, 3), "transposed", (70_001,), "zeros"]
CONFIGS = {
    "default": {},
    "decoupled": dict(weight_decay=0.1),
    "coupled": dict(weight_decay=0.1, decouple=False),
    "bias_correction": dict(use_bias_correction=True, betas=(0.9, 0.99), weight_decay=0.01),
    "safeguard": dict(safeguard_warmup=True, growth_rate=1.5, d_coef=2.0),
    "no_momentum": dict(betas=(0.0, 0.99), beta3=0.95, lr=0.5, d0=1e-5, eps=1e-6, growth_rate=1.3),
}
GROUPS = {
    # per-group decay, eps, d0 and safeguard (prodigyopt reads these per group)
    "two_groups": lambda ps: [
        {"params": ps[0::2], "weight_decay": 0.1},
        {"params": ps[1::2], "eps": 1e-6, "d0": 2e-6, "safeguard_warmup": True},
    ],
    # a group at lr 0: its moments and s stay, its params still decay with the others' d
    "frozen_group": lambda ps: [
        {"params": ps[0::2]},
        {"params": ps[1::2], "lr": 0.0, "weight_decay": 0.1},
    ],
}


def _params(dtype, shapes=SHAPES):
    plain = [s for s in shapes if s != "zeros"]
    params = iter(make_params(dtype, shapes=plain))
    return [
        torch.zeros(3, 4, dtype=dtype, requires_grad=True) if s == "zeros" else next(params)
        for s in shapes
    ]


def _grads(params, steps=STEPS):
    """A direction that fades plus noise, laid out like each param."""
    (bias,) = make_grads(params, 1, seed=2)
    noise = make_grads(params, steps, seed=1)
    return [
        [b * math.exp(-t / 8) + 0.5 * n for b, n in zip(bias, step)] for t, step in enumerate(noise)
    ]


def _theirs(params, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # ("Using decoupled weight decay")
        return reference.Prodigy(params, **kwargs)


def _step(ours, params, theirs, ref_params, grads):
    for p, q, g in zip(params, ref_params, grads):
        p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    theirs.step()
    for p, g in zip(params, grads):  # never written (prodigyopt adds the coupled decay)
        assert torch.equal(p.grad, g)


def _run(kwargs, impl, dtype, steps=STEPS, shapes=SHAPES, groups=None, **extra):
    params = _params(dtype, shapes)
    ref_params = clone_params(params)
    arrange = groups or (lambda ps: ps)
    ours = Prodigy(arrange(params), **kwargs, **IMPLS[impl], **extra)
    theirs = _theirs(arrange(ref_params), **kwargs)
    for step_grads in _grads(params, steps):
        _step(ours, params, theirs, ref_params, step_grads)
    return ours, params, theirs, ref_params


def _like(t, p):
    """prodigyopt's ``s`` or ``p0`` (flat, or a 0-dim zero) in the param's shape."""
    return t.reshape(p.shape) if t.numel() == p.numel() else t.expand(p.shape)


def _compare(ours, params, theirs, ref_params, tol):
    keys = [k for k in ("s", "p0", "exp_avg", "exp_avg_sq") if k in theirs.state[ref_params[0]]]
    # A state's elements are sums of terms that share the step's coefficients (d (1 - b1), d**2,
    # (d / d0) d lr), times grads of one scale in every tensor here: where terms cancel, they
    # differ by d's rounding times the largest terms, not the sum. So each state's ``atol``
    # grows by ``rtol`` times its largest magnitude over every param.
    scale = {
        k: max(theirs.state[q][k].abs().max().item() for q in ref_params if q.numel()) for k in keys
    }
    for p, q in zip(params, ref_params):
        mine, ref = ours.state[p], theirs.state[q]
        # a param also differs by d's rounding times how far it moved from p0 (see the top)
        moved = (q - _like(ref["p0"], q)).abs().max().item() if q.numel() else 0.0
        atol = tol["atol"] + tol["rtol"] * moved
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol["rtol"], atol=atol)
        assert set(mine) == set(ref)
        assert float(mine["step"]) == ref["step"]
        for key in keys:
            atol = tol["atol"] + tol["rtol"] * scale[key]
            torch.testing.assert_close(mine[key], _like(ref[key], p), rtol=tol["rtol"], atol=atol)
    for mine, ref in zip(ours.param_groups, theirs.param_groups):
        assert mine["k"] == ref["k"]
        for key in ("d", "d_max", "d_denom"):
            assert math.isclose(mine[key], ref[key], rel_tol=tol["rtol"]), key
        # d_hat and its numerator are running sums whose terms cancel as the estimate settles:
        # they round relative to the largest d_hat reached, d_max (and its numerator)
        assert abs(mine["d_hat"] - ref["d_hat"]) <= tol["rtol"] * ref["d_max"]
        peak = ref["d_max"] * ref["d_denom"] / ref["d_coef"]
        assert abs(mine["d_numerator"] - ref["d_numerator"]) <= tol["rtol"] * peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_prodigy_is_prodigyopts(config, impl, dtype):
    ours, params, theirs, ref_params = _run(CONFIGS[config], impl, dtype)
    _compare(ours, params, theirs, ref_params, TOL[dtype])
    d0 = CONFIGS[config].get("d0", 1e-6)
    assert theirs.param_groups[0]["d"] > 10 * d0  # (the estimate moved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("arrangement", list(GROUPS))
def test_param_groups_share_one_d(arrangement, impl, dtype):
    """Several groups: one d from the sums over all of them, per-group options where prodigyopt
    reads them per group; the lr changed between steps, as a scheduler does (the groups at lr 0
    stay there)."""
    params = _params(dtype)
    ref_params = clone_params(params)
    arrange = GROUPS[arrangement]
    ours = Prodigy(arrange(params), **IMPLS[impl])
    theirs = _theirs(arrange(ref_params))
    for t, step_grads in enumerate(_grads(params)):
        if t == 12:
            for opt in (ours, theirs):
                for group in opt.param_groups:
                    group["lr"] = group["lr"] and 0.5
        _step(ours, params, theirs, ref_params, step_grads)
    _compare(ours, params, theirs, ref_params, TOL[dtype])
    assert theirs.param_groups[0]["d"] > 1e-5
    assert len({g["d"] for g in ours.param_groups}) == 1


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bfloat16(impl):
    """bfloat16: prodigyopt rounds each op, its dot and sum to bfloat16, fuseopt's kernels compute
    in float32 and round once (its sums in float32 or float64): 99% of the elements within 2**-6,
    none beyond 2**-3 (d0 = 1e-4: from 1e-6 no step is large enough to change a bfloat16)."""
    shapes = [(20, 10), (10,), (), (5, 4, 3), (70_001,)]
    kwargs = dict(d0=1e-4, weight_decay=0.01)
    ours, params, theirs, ref_params = _run(kwargs, impl, torch.bfloat16, shapes=shapes)
    assert theirs.param_groups[0]["d"] > 100 * kwargs["d0"]
    assert math.isclose(ours.param_groups[0]["d"], theirs.param_groups[0]["d"], rel_tol=2**-6)
    assert_bfloat16_close(params, ref_params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", ["decoupled", "coupled", "no_momentum"])
def test_triton_kernels(monkeypatch, config, dtype):
    """The fused kernels on CUDA (here Triton's interpreter): both sums from Triton's reduction
    kernel, the update from its update kernel, over two groups."""
    pytest.importorskip("triton")
    from fuseopt.kernels import triton_gpu

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    calls = []
    for name in ("run", "reduce"):
        kernel = getattr(triton_gpu, name)
        monkeypatch.setattr(
            triton_gpu, name, lambda *a, k=kernel, n=name: (calls.append(n), k(*a))[1]
        )
    shapes = [(20, 10), (10,), (), "transposed", (300,), "zeros"]
    groups = lambda ps: [{"params": ps[:3]}, {"params": ps[3:], "eps": 1e-6}]
    got = _run(CONFIGS[config], "fused", dtype, shapes=shapes, groups=groups)
    _compare(*got, TOL[dtype])
    assert calls.count("reduce") == calls.count("run") == 2 * STEPS  # (a launch per group)


def test_the_first_step_is_what_the_paper_says():
    """From d0: the moments take d0 g, s takes d0 g (d / d0 = 1, dlr = d0), <g, p0 - p> = 0, so
    d stays d0 and the step is Adam's first: d0 m / (sqrt(v) + d0 eps) with m = d0 (1 - b1) g,
    sqrt(v) = d0 sqrt(1 - b2) |g|."""
    w = torch.full((2, 2), 2.0, dtype=torch.float64, requires_grad=True)
    opt = Prodigy([w])
    g = torch.tensor([[3.0, -1.0], [0.5, -2.0]], dtype=torch.float64)
    w.grad = g.clone()
    opt.step()
    group = opt.param_groups[0]
    assert (group["d"], group["d_hat"], group["d_numerator"], group["k"]) == (1e-6, 0.0, 0.0, 1)
    assert group["d_denom"] == pytest.approx(1e-6 * 6.5, rel=1e-12)
    step = 1e-6 * 0.1 * g / (math.sqrt(0.001) * g.abs() + 1e-8)
    torch.testing.assert_close(w.detach(), 2.0 - step, rtol=1e-14, atol=0)


@pytest.mark.parametrize("first", list(IMPLS))
@pytest.mark.parametrize("second", list(IMPLS))
def test_state_dict_interchange_across_implementations(first, second):
    """Save after 12 steps on one implementation, load into another, 13 more: as 25 on one."""
    kwargs = dict(weight_decay=0.1)
    params = _params(torch.float32)
    twins = clone_params(params)
    straight = Prodigy(twins, **kwargs, **IMPLS[second])
    opt = Prodigy(params, **kwargs, **IMPLS[first])
    for t, step_grads in enumerate(_grads(params)):
        if t == 12:
            saved = copy.deepcopy(opt.state_dict())
            opt = Prodigy(params, **kwargs, **IMPLS[second])
            opt.load_state_dict(saved)
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        straight.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    assert math.isclose(opt.param_groups[0]["d"], straight.param_groups[0]["d"], rel_tol=1e-5)
    assert opt.param_groups[0]["k"] == straight.param_groups[0]["k"] == STEPS
    assert list(saved["state"][0]) == ["step", "s", "p0", "exp_avg", "exp_avg_sq"]
    assert saved["param_groups"][0]["k"] == 12


def test_state_dict_round_trip_is_exact():
    """A state dict loaded into a new optimizer of the same implementation continues bit for
    bit; its groups hold prodigyopt's keys (plus fuseopt's options)."""
    params = _params(torch.float32)
    twins = clone_params(params)
    grads = _grads(params)
    opt, straight = Prodigy(params, weight_decay=0.1), Prodigy(twins, weight_decay=0.1)
    for t, step_grads in enumerate(grads):
        if t == 10:
            opt_ = Prodigy(params, weight_decay=0.1)
            opt_.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt = opt_
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        straight.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
    theirs = _theirs(clone_params(params))
    theirs.param_groups[0]["params"][0].grad = torch.ones(20, 10)
    theirs.step()
    ours, ref = opt.state_dict()["param_groups"][0], theirs.state_dict()["param_groups"][0]
    fuseopts = {"maximize", "foreach", "fused"}  # (and the clipping options a load fills in)
    fuseopts |= {"max_grad_norm", "error_if_nonfinite", "skip_if_nonfinite"}
    assert set(ref) <= set(ours) and set(ours) - set(ref) <= fuseopts


@pytest.mark.parametrize("impl", list(IMPLS))
def test_loads_prodigyopts_state_dict(impl):
    """prodigyopt's state dict (flat s and p0, a 0-dim p0 for the zero and the empty param, an
    int step, groups without fuseopt's options) loads here, and both continue alike."""
    params = _params(torch.float32)
    grads = _grads(params)
    theirs = _theirs(params, weight_decay=0.1)
    for step_grads in grads[:12]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        theirs.step()
    saved = theirs.state_dict()
    assert saved["state"][7]["p0"].dim() == 0 and saved["state"][0]["s"].dim() == 1
    mine = clone_params(params)
    ours = Prodigy(mine, weight_decay=0.1, **IMPLS[impl])
    ours.load_state_dict(copy.deepcopy(saved))
    assert ours.state[mine[0]]["s"].shape == (20, 10)
    for step_grads in grads[12:]:
        _step(ours, mine, theirs, params, step_grads)
    _compare(ours, mine, theirs, params, TOL[torch.float32])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_no_step_before_a_grad_is_nonzero(impl):
    """Zero grads (the sum of |s| is 0): prodigyopt returns before stepping; here nothing
    changes (no state is made either: it is made, with the same values, at the next step),
    ``stepped`` is False, and both then go on alike."""
    params = _params(torch.float32)
    ref_params = clone_params(params)
    ours = Prodigy(params, weight_decay=0.1, **IMPLS[impl])
    theirs = _theirs(ref_params, weight_decay=0.1)
    zeros = [torch.zeros_like(p) for p in params]
    for step_grads in [zeros, zeros, *_grads(params, 10)]:
        _step(ours, params, theirs, ref_params, step_grads)
        if step_grads is zeros:
            assert not ours.stepped and not ours.state and ours.param_groups[0]["k"] == 0
            assert theirs.param_groups[0]["k"] == 0
            assert all(torch.equal(p, q) for p, q in zip(params, ref_params))
    assert ours.stepped and ours.steps_taken == 10
    _compare(ours, params, theirs, ref_params, TOL[torch.float32])


def test_group_values_only_change_when_the_step_runs():
    """A step that skip_if_nonfinite skips writes no group value (nor anything else)."""
    params = _params(torch.float32)
    opt = Prodigy(params, skip_if_nonfinite=True)
    grads = _grads(params, 4)
    for step_grads in grads[:3]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    before = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    values = [p.detach().clone() for p in params]
    params[0].grad[0, 0] = math.nan
    opt.step()
    assert not opt.stepped
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == before
    assert all(torch.equal(p, v) for p, v in zip(params, values))


def test_a_group_added_later_shares_the_estimate():
    """prodigyopt steps a group added later with the first group's d (and bias correction's k):
    the same numbers here, where the group takes them when added (so its own ``k`` counts from
    the first group's, where prodigyopt's counts from 0: the one stored difference)."""
    params = _params(torch.float32)
    ref_params = clone_params(params)
    kwargs = dict(use_bias_correction=True, weight_decay=0.01)
    ours = Prodigy(params[:4], **kwargs)
    theirs = _theirs(ref_params[:4], **kwargs)
    for t, step_grads in enumerate(_grads(params)):
        if t == 10:
            ours.add_param_group({"params": params[4:], "weight_decay": 0.0})
            theirs.add_param_group({"params": ref_params[4:], "weight_decay": 0.0})
        grads = step_grads if t >= 10 else step_grads[:4]
        _step(ours, params[: len(grads)], theirs, ref_params[: len(grads)], grads)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])
    assert ours.param_groups[1]["d"] == ours.param_groups[0]["d"]
    assert ours.param_groups[1]["k"] == STEPS and theirs.param_groups[1]["k"] == STEPS - 10


@pytest.mark.parametrize("impl", list(IMPLS))
def test_maximize_and_clipping(impl):
    """maximize: prodigyopt on the negated grads; max_grad_norm: prodigyopt after
    ``clip_grad_norm_`` (fuseopt's own options, inside the step)."""
    params = _params(torch.float32)
    ref_params = clone_params(params)
    ours = Prodigy(params, maximize=True, max_grad_norm=1.0, **IMPLS[impl])
    theirs = _theirs(ref_params)
    for step_grads in _grads(params):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), -g
        ours.step()
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0, foreach=True)
        theirs.step()
    _compare(ours, params, theirs, ref_params, TOL[torch.float32])
    assert theirs.param_groups[0]["d"] > 1e-5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
        (dict(lr=0.0), ValueError, "Invalid learning rate: 0.0"),
        (dict(d0=0.0), ValueError, "Invalid d0 value: 0.0"),
        (dict(eps=0.0), ValueError, "Invalid epsilon value: 0.0"),
        (dict(betas=(1.0, 0.9)), ValueError, "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1: -0.1"),
        (dict(beta3=1.0), ValueError, r"Invalid beta3 value: 1.0 \(in \[0, 1\), or None\)"),
        (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
        (dict(d_coef=0.0), ValueError, "Invalid d_coef value: 0.0"),
        (dict(growth_rate=-1.0), ValueError, "Invalid growth_rate value: -1.0"),
        (dict(slice_p=0), ValueError, "Invalid slice_p value: 0"),
        (dict(slice_p=11), NotImplementedError, "slice_p > 1 is not implemented"),
        (dict(fsdp_in_use=True), NotImplementedError, "fsdp_in_use=True is not implemented"),
        (dict(lr=torch.tensor(1.0)), TypeError, "lr must be a number"),
        (dict(max_grad_norm=-1.0), ValueError, "Invalid max_grad_norm value"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Prodigy([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_params_it_cannot_step_are_refused_when_added():
    opt = Prodigy([torch.zeros(2, requires_grad=True)])
    with pytest.raises(NotImplementedError, match="complex params"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex64)]})
    with pytest.raises(NotImplementedError, match="slice_p > 1"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "slice_p": 2})
    assert len(opt.param_groups) == 1


def _expect_nothing_changes(opt, params, error, match):
    values = [p.detach().clone() for p in params]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    state = {p: copy.deepcopy(s) for p, s in opt.state.items()}
    with pytest.raises(error, match=match):
        opt.step()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert opt.state.keys() == state.keys()
    for p, s in state.items():
        assert all(torch.equal(opt.state[p][k], v) for k, v in s.items() if torch.is_tensor(v))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_step_errors_change_nothing(impl):
    """Groups that cannot share one d (another lr than the others' or 0, other betas than the
    first group's), a sparse grad: the error comes before anything changes, a step in."""
    params = _params(torch.float32, shapes=[(4, 3), (5,), (2, 2)])
    opt = Prodigy([{"params": params[:2]}, {"params": params[2:]}], **IMPLS[impl])
    for step_grads in _grads(params, 2):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    opt.param_groups[1]["lr"] = 0.5
    _expect_nothing_changes(opt, params, RuntimeError, "different lr values")
    opt.param_groups[1]["lr"] = 1.0
    opt.param_groups[1]["betas"] = (0.8, 0.999)
    _expect_nothing_changes(opt, params, ValueError, "param group 1 has betas=")
    opt.param_groups[1]["betas"] = (0.9, 0.999)
    opt.param_groups[0]["slice_p"] = 2
    _expect_nothing_changes(opt, params, NotImplementedError, "slice_p > 1")
    opt.param_groups[0]["slice_p"] = 1
    params[2].grad = params[2].grad.to_sparse()
    _expect_nothing_changes(opt, params, RuntimeError, "sparse gradients")


def test_load_state_dict_refuses_sliced_state():
    params = _params(torch.float32, shapes=[(4, 3)])
    theirs = _theirs(clone_params(params), slice_p=2)
    theirs.param_groups[0]["params"][0].grad = torch.ones(4, 3)
    theirs.step()
    opt = Prodigy(params)
    with pytest.raises(NotImplementedError, match="slice_p > 1"):
        opt.load_state_dict(theirs.state_dict())
    assert not opt.state and opt.param_groups[0]["slice_p"] == 1


@pytest.mark.parametrize(
    ("fault", "state"), [(f, "s") for f in layout_faults.FAULTS] + [("state_resized", "p0")]
)
def test_first_pass_under_layout_faults(fault, state):
    """See tests/layout_faults.py: never a crash, always foreach's outcome."""
    make = "__import__('fuseopt.prodigy').prodigy.Prodigy(ps, weight_decay=0.1, **impl)"
    layout_faults.check(fault, make, state)
