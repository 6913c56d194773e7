"""Storage formats (fuseopt._storage): ``state_dtype``, ``stochastic_rounding``, ``kahan_sum``.

The oracle of ``state_dtype`` is torch.optim's for-loop run in float32 with its state tensors
rounded to the state dtype after every step (and, for bfloat16 params, on float32 copies of params
and grads, the params rounded to bfloat16 after every step): that is exactly "load each operand in
its own dtype, compute in float32, round once per store". fuseopt's for-loop and foreach evaluate
the same ATen ops on float32 copies and round on the write-back, so they are compared bitwise
(foreach on the CPU runs ATen's per-tensor kernels, as in test_parity). The fused kernels are
compared with the oracle at a tolerance argued in :func:`test_state_dtype_matches_torch`.
"""

from __future__ import annotations

import pytest
import torch
from algorithms import BY_NAME

import fuseopt
from fuseopt.kernels import numba_cpu
from fuseopt.kernels.trace import trace

BF16 = torch.bfloat16
IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
STEPS = 12
SHAPES = [(33, 17), (300,), (5,)]
# the algorithms torch has, with options that give them every kind of state they keep
TORCH_CASES = {
    "SGD": dict(lr=0.1, momentum=0.9, nesterov=True),
    "Adam": dict(lr=0.01, weight_decay=0.1),
    "AdamW": dict(lr=0.01, amsgrad=True),
    "Adadelta": dict(lr=0.5),
    "Adagrad": dict(lr=0.1, initial_accumulator_value=0.1),
    "Adamax": dict(lr=0.01),
    "NAdam": dict(lr=0.01),
    "RAdam": dict(lr=0.01),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "ASGD": dict(lr=0.01, t0=1),
}


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def _grads(step: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=gen) * 0.5).to(dtype) for s in SHAPES]


def _tensor_states(opt, p) -> dict:
    """The states of ``p`` shaped like it (not ``step``, not scalar states)."""
    return {k: v for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}


def torch_rounded(name, kwargs, state_dtype, param_dtype=torch.float32, steps=STEPS):
    """The oracle: torch's for-loop in float32, states rounded to ``state_dtype`` and params to
    ``param_dtype`` after every step (kept as float32 tensors holding those values)."""
    params = [p.detach().float().requires_grad_() for p in _params(param_dtype)]
    opt = getattr(torch.optim, name)(params, **kwargs, foreach=False)
    with torch.no_grad():  # (Adagrad's made at construction: stored in the state dtype too)
        for p in params:
            for v in _tensor_states(opt, p).values():
                v.copy_(v.to(state_dtype))
    for step in range(steps):
        for p, g in zip(params, _grads(step, param_dtype)):
            p.grad = g.float()
        opt.step()
        with torch.no_grad():
            for p in params:
                p.copy_(p.to(param_dtype))
                for v in _tensor_states(opt, p).values():
                    v.copy_(v.to(state_dtype))
    return params, opt


def ours(name, kwargs, impl, param_dtype=torch.float32, steps=STEPS, **storage):
    params = _params(param_dtype)
    opt = getattr(fuseopt, name)(params, **kwargs, **IMPLS[impl], **storage)
    for step in range(steps):
        for p, g in zip(params, _grads(step, param_dtype)):
            p.grad = g
        opt.step()
    return params, opt


# A 1-ulp float32 difference (fused vs for-loop: test_parity's rtol=1e-5) moves a value across a
# bfloat16 rounding boundary with a probability of about 2**-16 per element and step, so a state
# may differ by one bfloat16 ulp (rtol 2**-8) somewhere over the run; the updates that read it
# afterwards differ by that fraction of themselves, and an update is at most about lr per element
# (Lamb's: lr times a trust ratio of order 1 here): the params within lr * STEPS * 2**-8.
PARAM_ATOL = STEPS * 2**-8


def _assert_states(o_opt, t_opt, o_params, t_params, dtype, exact: bool, lr: float):
    state_tol = dict(rtol=0, atol=0) if exact else dict(rtol=2**-7, atol=1e-6)
    param_tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=lr * PARAM_ATOL)
    for p, q in zip(o_params, t_params):
        torch.testing.assert_close(p.detach().float(), q.detach(), **param_tol)
        mine, theirs = _tensor_states(o_opt, p), _tensor_states(t_opt, q)
        assert mine.keys() == theirs.keys()
        for k, v in mine.items():
            assert v.dtype == dtype, k
            torch.testing.assert_close(v.float(), theirs[k], **state_tol, msg=k)
        if "step" in t_opt.state[q]:  # never in the state dtype
            assert o_opt.state[p]["step"].dtype == t_opt.state[q]["step"].dtype


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_state_dtype_matches_torch(name, impl):
    """bfloat16 states of float32 params: torch with its states rounded after every step; the
    for-loop and foreach bitwise, fused within the tolerance argued at ``_assert_states``."""
    kwargs = TORCH_CASES[name]
    t_params, t_opt = torch_rounded(name, kwargs, BF16)
    o_params, o_opt = ours(name, kwargs, impl, state_dtype=BF16)
    exact = impl != "fused"
    _assert_states(o_opt, t_opt, o_params, t_params, BF16, exact, kwargs["lr"])


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_float32_states_of_bfloat16_params(name, impl):
    """The mixed setup: bfloat16 params and grads, float32 states, float32 math, the param
    rounded once per step."""
    kwargs = TORCH_CASES[name]
    t_params, t_opt = torch_rounded(name, kwargs, torch.float32, param_dtype=BF16)
    o_params, o_opt = ours(name, kwargs, impl, param_dtype=BF16, state_dtype=torch.float32)
    assert all(p.dtype == BF16 for p in o_params)
    # (params: one bfloat16 ulp where a float32 difference crosses a rounding boundary)
    exact = impl != "fused"
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=2**-7, atol=1e-6)
    for p, q in zip(o_params, t_params):
        torch.testing.assert_close(p.detach().float(), q.detach(), **tol)
        for k, v in _tensor_states(o_opt, p).items():
            assert v.dtype == torch.float32
            torch.testing.assert_close(v, _tensor_states(t_opt, q)[k], **tol, msg=k)


@pytest.mark.parametrize("name", ["Lion", "AdEMAMix", "Adan", "ADOPT", "Lamb", "Prodigy"])
def test_fused_equals_forloop_for_other_algorithms(name):
    """Algorithms torch lacks: the fused kernels against fuseopt's for-loop (the oracle), each
    state in bfloat16."""
    o_params, o_opt = ours(name, dict(lr=0.01), "fused", state_dtype=BF16)
    r_params, r_opt = ours(name, dict(lr=0.01), "forloop", state_dtype=BF16)
    for p, q in zip(o_params, r_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=0.01 * PARAM_ATOL)
        mine, theirs = _tensor_states(o_opt, p), _tensor_states(r_opt, q)
        assert mine and mine.keys() == theirs.keys()
        for k, v in mine.items():
            assert v.dtype == BF16, k
            torch.testing.assert_close(v.float(), theirs[k].float(), rtol=2**-7, atol=1e-6)


def test_groups_stay_torchs_unless_asked():
    p = torch.zeros(3, requires_grad=True)
    assert "state_dtype" not in fuseopt.Adam([p]).param_groups[0]
    group = fuseopt.Adam([p], state_dtype=BF16, stochastic_rounding=True).param_groups[0]
    assert group["state_dtype"] is BF16 and group["stochastic_rounding"] is True
    assert "kahan_sum" not in group
    groups = [{"params": [p]}, {"params": [torch.zeros(2)], "state_dtype": BF16}]
    opt = fuseopt.AdamW(groups)
    assert "state_dtype" not in opt.param_groups[0] and opt.param_groups[1]["state_dtype"] is BF16


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda p: fuseopt.Adam([p], state_dtype=torch.int32), ValueError, "Invalid state_dtype"),
        (lambda p: fuseopt.Adam([p], state_dtype=torch.float16), ValueError, "Invalid state_dtype"),
        (lambda p: fuseopt.Adam([p], state_dtype="bf16"), ValueError, "Invalid state_dtype"),
        (
            lambda p: fuseopt.Adam([torch.zeros(2, dtype=torch.float64)], state_dtype=BF16),
            ValueError, "float32, bfloat16",
        ),
        (
            lambda p: fuseopt.Adam([torch.zeros(2, dtype=torch.complex64)], state_dtype=BF16),
            ValueError, "complex64",
        ),
        (  # (a float16 store rounds to nearest: the option would do nothing to it)
            lambda p: fuseopt.Adam([torch.zeros(2, dtype=torch.float16)], kahan_sum=True),
            ValueError, r"kahan_sum=True applies to bfloat16 params and stores, got a float16",
        ),
        (
            lambda p: fuseopt.Adam(
                [torch.zeros(2, dtype=torch.float16)], state_dtype=BF16, stochastic_rounding=True
            ),
            ValueError, r"stochastic_rounding=True applies to bfloat16 params and stores",
        ),
        (  # (the message names the option given)
            lambda p: fuseopt.Adam([torch.zeros(2, dtype=torch.float64)], state_bits=8),
            ValueError, r"^state_bits: these storage options .* got a param of torch.float64",
        ),
        (lambda p: fuseopt.SGD([p], state_dtype=BF16), ValueError, "no elementwise state"),
        (lambda p: fuseopt.Adam([p], stochastic_rounding=1), TypeError, "must be a bool"),
        (lambda p: fuseopt.Adam([p], kahan_sum="yes"), TypeError, "must be a bool"),
        (
            lambda p: fuseopt.Adam([p], state_dtype=BF16, differentiable=True),
            ValueError, "differentiable",
        ),
        (
            lambda p: fuseopt.Adam([p], stochastic_rounding=True, capturable=True),
            ValueError, "capturable",
        ),
        (
            lambda p: fuseopt.Adam([p]).add_param_group(
                {"params": [torch.zeros(2, dtype=torch.float64)], "state_dtype": BF16}
            ),
            ValueError, "float64",
        ),
    ],
)  # fmt: skip
def test_errors_at_construction(make, err, match):
    with pytest.raises(err, match=match):
        make(torch.zeros(3, requires_grad=True))


def test_new_states_and_first_values_take_the_state_dtype():
    """Zeros, Fill, Clone and FirstValue states; never ``step``."""
    for cls, kwargs, keys in [
        (fuseopt.SGD, dict(lr=0.1, momentum=0.9), ["momentum_buffer"]),
        (fuseopt.Adagrad, dict(lr=0.1), ["sum"]),
        (fuseopt.Prodigy, dict(lr=1.0), ["p0", "exp_avg", "exp_avg_sq", "s"]),
        (fuseopt.Adan, dict(lr=0.01), ["exp_avg", "exp_avg_sq", "exp_avg_diff"]),
    ]:
        for impl in IMPLS:
            p = torch.randn(4, 3, requires_grad=True)
            opt = cls([p], **kwargs, **IMPLS[impl], state_dtype=BF16)
            for _ in range(2):
                p.grad = torch.randn(4, 3)
                opt.step()
            state = opt.state[p]
            for k in keys:
                assert state[k].dtype == BF16, (cls.__name__, impl, k)
            if "step" in state:
                assert state["step"].dtype == torch.float32
            assert p.dtype == torch.float32


def test_kernel_loads_each_operand_in_its_dtype():
    """One generator: a float32 param and grad, bfloat16 moments; a bfloat16 param with float32
    moments (the numba and Triton sources)."""
    from fuseopt.kernels import triton_gpu

    opt = fuseopt.Adam([torch.zeros(2)])
    rule, group = opt.rule, opt.param_groups[0]
    from fuseopt._plan import launch_flags

    flags = launch_flags(rule, group, False, 1.0, {})
    ops = ("param", "grad", "exp_avg", "exp_avg_sq")
    graph = trace(rule, flags, ops)
    src = numba_cpu.source(graph, ops, (torch.float32, torch.float32, BF16, BF16))
    assert "a0[j] = v" in src and "ptr_float32(ptrs[0, t] + lo * 4)" in src
    assert "ptr_uint16(ptrs[2, t] + lo * 2)" in src and "load_bf16(a2[j])" in src
    assert src.count("= store_bf16(") == 2 and "load_bf16(a0" not in src
    src = numba_cpu.source(graph, ops, (BF16, BF16, torch.float32, torch.float32))
    assert "load_bf16(a0[j])" in src and "a2[j] = v" in src and src.count("= store_bf16(") == 1
    tsrc = triton_gpu.source(graph, ops, (torch.float32, torch.float32, BF16, BF16), table=False)
    assert "bf16_load(a2, offs, m)" in tsrc and "bf16_store(a3, offs" in tsrc
    assert "tl.load(a0 + offs, mask=m).to(tl.float32)" in tsrc


def test_plan_cache_keeps_the_dtypes():
    """Steps after the first take the plan cache: its kept launch has each operand's dtype (a
    wrong one would read bfloat16 bits as float32: far from the for-loop)."""
    from fuseopt._plan_cache import PlanCache

    o_params, o_opt = ours("Adam", dict(lr=0.01), "fused", state_dtype=BF16)
    caches = o_opt.__dict__.get("_plan_caches")
    assert caches and isinstance(next(iter(caches.values())), PlanCache)
    r_params, r_opt = ours("Adam", dict(lr=0.01), "forloop", state_dtype=BF16)
    for p, q in zip(o_params, r_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=0.01 * PARAM_ATOL)


def test_algorithms_table_is_covered():
    assert set(TORCH_CASES) <= set(BY_NAME)


# ------------------------------------------------------------------------- stochastic rounding
SR_IMPLS = ["forloop", "foreach", "numba", "triton"]


def _impl_flags(impl, monkeypatch) -> dict:
    """The flags of ``impl``; "triton": the fused kernels in Triton's interpreter."""
    if impl == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    return dict(fused=True) if impl in ("numba", "triton") else IMPLS[impl]


N = 1 << 15
ULP = 2**-7  # of bfloat16 in [1, 2)


@pytest.mark.parametrize("q", [0.25, 0.7])
@pytest.mark.parametrize("impl", SR_IMPLS)
def test_stochastic_rounding_is_unbiased(impl, q, monkeypatch):
    """SGD's first momentum buffer is the grad: ``N`` bfloat16 stores of one float32 value x a
    fraction ``q`` of an ulp above a bfloat16. Each stores x's neighbours, the upper one with
    probability q: their mean is x within 5 standard deviations (ULP * sqrt(q(1-q)/N), about
    1e-5 ulp of slack: rounding to nearest is q * ULP away, a failure). The bits of each element
    are independent: the upper neighbour's share is q within 5 sigma too."""
    flags = _impl_flags(impl, monkeypatch)
    x = 1.0 + q * ULP
    p = torch.zeros(N, requires_grad=True)
    opt = fuseopt.SGD(
        [p], lr=0.0, momentum=0.9, state_dtype=BF16, stochastic_rounding=True, **flags
    )
    p.grad = torch.full((N,), x)
    opt.step()
    buf = opt.state[p]["momentum_buffer"].float()
    assert set(buf.unique().tolist()) == {1.0, 1.0 + ULP}
    sigma = (q * (1 - q) / N) ** 0.5
    assert abs(buf.mean().item() - x) < 5 * ULP * sigma
    assert abs((buf > 1.0).double().mean().item() - q) < 5 * sigma


@pytest.mark.parametrize("impl", SR_IMPLS)
def test_stochastic_rounding_of_bfloat16_params(impl, monkeypatch):
    """A bfloat16 param moved by a quarter of its ulp: to nearest it never moves (the update
    is lost); stochastically it moves by a quarter ulp on average."""
    flags = _impl_flags(impl, monkeypatch)
    p = torch.ones(N, dtype=BF16, requires_grad=True)
    opt = fuseopt.SGD([p], lr=1.0, stochastic_rounding=True, **flags)
    p.grad = torch.full((N,), -ULP / 4, dtype=BF16)
    opt.step()
    sigma = (0.25 * 0.75 / N) ** 0.5
    assert abs(p.detach().float().mean().item() - (1 + ULP / 4)) < 5 * ULP * sigma
    q = torch.ones(N, dtype=BF16, requires_grad=True)
    plain = fuseopt.SGD([q], lr=1.0, **flags)
    q.grad = p.grad.clone()
    plain.step()
    assert (q.detach() == 1).all()


def _sr_run(impl, monkeypatch, seed: int, steps: int = 3):
    flags = _impl_flags(impl, monkeypatch)
    torch.manual_seed(seed)
    params = _params()
    opt = fuseopt.Adam(params, lr=0.01, state_dtype=BF16, stochastic_rounding=True, **flags)
    for step in range(steps):
        for p, g in zip(params, _grads(step)):
            p.grad = g
        opt.step()
    return [opt.state[p]["exp_avg"].clone() for p in params]


@pytest.mark.parametrize("impl", SR_IMPLS)
def test_stochastic_rounding_is_reproducible(impl, monkeypatch):
    """Given torch.manual_seed before the optimizer is built, a run is repeated bit for bit;
    another seed rounds otherwise."""
    a, b = _sr_run(impl, monkeypatch, 0), _sr_run(impl, monkeypatch, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = _sr_run(impl, monkeypatch, 1)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_stochastic_rounding_draws_a_seed_per_launch_and_nothing_else():
    """Each step draws new bits (the same grads round otherwise at the next step), from the
    optimizer's generator: torch's default one is read once, at construction."""
    torch.manual_seed(0)
    p = torch.zeros(N, requires_grad=True)
    opt = fuseopt.SGD([p], lr=0.0, momentum=0.0, dampening=0.0, stochastic_rounding=True)
    after_construction = torch.random.get_rng_state()
    p2 = torch.ones(N, dtype=BF16, requires_grad=True)
    opt = fuseopt.SGD([p2], lr=1.0, stochastic_rounding=True)
    seen = []
    for _ in range(2):
        p2.data.fill_(1.0)
        p2.grad = torch.full((N,), -ULP / 4, dtype=BF16)
        opt.step()
        seen.append(p2.detach().clone())
    assert not torch.equal(seen[0], seen[1])
    torch.manual_seed(0)
    fuseopt.SGD([p], lr=0.0, stochastic_rounding=True)
    assert torch.equal(torch.random.get_rng_state(), after_construction)
    torch.manual_seed(0)
    fuseopt.SGD([p], lr=0.0)  # (without the option: torch's stream untouched)
    assert torch.equal(torch.random.get_rng_state(), torch.manual_seed(0).get_state())


@pytest.mark.parametrize("param_dtype", [torch.float32, BF16])
def test_numba_and_triton_draw_the_same_bits(param_dtype, monkeypatch):
    """One counter-based hash in both kernels: from the same torch seed, numba and Triton
    (interpreted) take every bfloat16 store of Adam (its moments, and bfloat16 params) to the
    same bits over three steps."""
    pytest.importorskip("triton")

    def run():
        torch.manual_seed(7)
        params = _params(param_dtype)
        opt = fuseopt.Adam(params, lr=0.01, fused=True, state_dtype=BF16, stochastic_rounding=True)
        for step in range(3):
            for p, g in zip(params, _grads(step, param_dtype)):
                p.grad = g
            opt.step()
        return [(p.detach().clone(), _tensor_states(opt, p)) for p in params]

    ours = run()
    _impl_flags("triton", monkeypatch)
    for (p, states), (q, expected) in zip(ours, run(), strict=True):
        assert torch.equal(p, q)
        assert states.keys() == expected.keys()
        assert all(torch.equal(states[k], expected[k]) for k in states)


# ------------------------------------------------------------------------------- Kahan summation
def torch_kahan(name, kwargs, steps=STEPS):
    """The oracle of ``kahan_sum`` on bfloat16 params (states in bfloat16, the params' dtype):
    torch's for-loop on float32 copies of the params, its states rounded to bfloat16 after every
    step, and each param's new value stored by Kahan summation, written out here."""
    params = [p.detach().float().requires_grad_() for p in _params(BF16)]
    comps = [torch.zeros_like(p) for p in params]
    opt = getattr(torch.optim, name)(params, **kwargs, foreach=False)
    for step in range(steps):
        old = [p.detach().clone() for p in params]
        for p, g in zip(params, _grads(step, BF16)):
            p.grad = g.float()
        opt.step()
        with torch.no_grad():
            for p, o, c in zip(params, old, comps):
                y = (p - o) + c  # the update, and what earlier roundings lost
                stored = (o + y).bfloat16().float()
                c.copy_((y - (stored - o)).bfloat16().float())
                p.copy_(stored)
                for v in _tensor_states(opt, p).values():
                    v.copy_(v.bfloat16())
    return params, comps, opt


@pytest.mark.parametrize("impl", SR_IMPLS)
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_kahan_sum_matches_its_oracle(name, impl, monkeypatch):
    """Bitwise on the for-loop and foreach; the fused kernels within a bfloat16 ulp (a float32
    ulp of difference in the update can cross a rounding boundary of the param or of its
    compensation: one ulp of the compensation moves the next sum by far less than the param's)."""
    kwargs = TORCH_CASES[name]
    t_params, t_comps, t_opt = torch_kahan(name, kwargs)
    flags = _impl_flags(impl, monkeypatch)
    params = _params(BF16)
    opt = getattr(fuseopt, name)(params, **kwargs, **flags, kahan_sum=True)
    for step in range(STEPS):
        for p, g in zip(params, _grads(step, BF16)):
            p.grad = g
        opt.step()
    exact = impl in ("forloop", "foreach")
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=2**-7, atol=1e-6)
    for p, q, c in zip(params, t_params, t_comps):
        comp = opt.state[p]["kahan_comp"]
        assert p.dtype == BF16 and comp.dtype == BF16
        torch.testing.assert_close(p.detach().float(), q.detach(), **tol)
        ctol = tol if exact else dict(rtol=0, atol=kwargs["lr"] * 2**-7)
        torch.testing.assert_close(comp.float(), c, **ctol)
    assert any(opt.state[p]["kahan_comp"].abs().sum() > 0 for p in params)


def test_kahan_sum_keeps_small_updates():
    """Updates of a quarter of a bfloat16 ulp: lost to rounding without compensation, summed
    with it (after 8 steps the param has moved by 2 ulps, exactly)."""
    for flags in IMPLS.values():
        p = torch.ones(64, dtype=BF16, requires_grad=True)
        q = torch.ones(64, dtype=BF16, requires_grad=True)
        kahan = fuseopt.SGD([p], lr=1.0, kahan_sum=True, **flags)
        plain = fuseopt.SGD([q], lr=1.0, **flags)
        for _ in range(8):
            p.grad = torch.full((64,), -ULP / 4, dtype=BF16)
            q.grad = p.grad.clone()
            kahan.step()
            plain.step()
        assert (q.detach() == 1).all()
        assert (p.detach().float() == 1 + 2 * ULP).all()


def test_kahan_comp_made_for_a_loaded_state():
    """A checkpoint without ``kahan_comp`` (torch's) starts one at zero at the next step; a
    float32 param keeps none."""
    p = torch.randn(4, 3, dtype=BF16, requires_grad=True)
    f = torch.randn(5, requires_grad=True)
    src = torch.optim.AdamW([p.detach().clone().requires_grad_(), f.detach().clone()])
    for q in src.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    src.step()
    opt = fuseopt.AdamW([p, f], kahan_sum=True)
    sd = src.state_dict()
    sd["param_groups"][0]["kahan_sum"] = True
    opt.load_state_dict(sd)
    assert "kahan_comp" not in opt.state[p]
    p.grad, f.grad = torch.ones_like(p), torch.ones_like(f)
    opt.step()
    assert opt.state[p]["kahan_comp"].dtype == BF16 and "kahan_comp" not in opt.state[f]


# ---------------------------------------------------------------------------------- checkpoints
def test_torch_loads_bfloat16_states_and_continues(tmp_path):
    """``state_dict()`` keeps torch's layout, the states bfloat16 tensors (weights_only loads
    it); torch.optim.AdamW loads it (its cast makes them float32, exactly) and its next step is
    fuseopt's for-loop's, bitwise (the same float32 math), whose states are torch's rounded."""
    o_params, o_opt = ours("AdamW", TORCH_CASES["AdamW"], "forloop", state_dtype=BF16)
    path = tmp_path / "opt.pt"
    torch.save(o_opt.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert sd["param_groups"][0]["state_dtype"] is BF16
    assert all(v.dtype == BF16 for s in sd["state"].values() for k, v in s.items() if k != "step")
    t_params = [p.detach().clone().requires_grad_() for p in o_params]
    t_opt = torch.optim.AdamW(t_params, **TORCH_CASES["AdamW"], foreach=False)
    t_opt.load_state_dict(sd)
    for p, q, g in zip(o_params, t_params, _grads(STEPS)):
        p.grad, q.grad = g, g.clone()
    o_opt.step()
    t_opt.step()
    for p, q in zip(o_params, t_params):
        assert torch.equal(p.detach(), q.detach())
        for k, v in _tensor_states(o_opt, p).items():
            assert torch.equal(v, t_opt.state[q][k].to(BF16)), k


def test_torch_float32_checkpoint_converts_to_bfloat16_states():
    """A float32 torch checkpoint loaded into a bfloat16-state optimizer: its states are
    rounded to bfloat16, and the group keeps ``state_dtype`` (torch's groups have none)."""
    t_params, t_opt = torch_rounded("Adam", TORCH_CASES["Adam"], torch.float32, steps=3)
    params = [p.detach().clone().requires_grad_() for p in t_params]
    opt = fuseopt.Adam(params, **TORCH_CASES["Adam"], state_dtype=BF16)
    opt.load_state_dict(t_opt.state_dict())
    assert opt.param_groups[0]["state_dtype"] is BF16
    for p, q in zip(params, t_params):
        for k, v in _tensor_states(opt, p).items():
            assert v.dtype == BF16 and torch.equal(v, t_opt.state[q][k].to(BF16)), k
        assert opt.state[p]["step"].dtype == torch.float32


def test_keep_state_dtype_on_load():
    """Float32 moments of bfloat16 params, saved by a group that does not say so (torch's own
    mixed setup): torch's load casts them to bfloat16 (issue #43706), ``keep_state_dtype=True``
    keeps them float32; a group with ``state_dtype`` keeps its format either way."""
    p = torch.randn(4, 3, dtype=BF16, requires_grad=True)
    src = fuseopt.AdamW([p], state_dtype=torch.float32)
    p.grad = torch.ones_like(p)
    src.step()
    sd = src.state_dict()
    assert src.state[p]["exp_avg"].dtype == torch.float32
    kept = fuseopt.AdamW([p])
    kept.load_state_dict(sd)  # (the saved group's state_dtype)
    assert kept.state[p]["exp_avg"].dtype == torch.float32
    del sd["param_groups"][0]["state_dtype"]
    cast = fuseopt.AdamW([p])
    cast.load_state_dict(sd)
    assert cast.state[p]["exp_avg"].dtype == BF16  # torch's
    keep = fuseopt.AdamW([p])
    keep.load_state_dict(sd, keep_state_dtype=True)
    assert keep.state[p]["exp_avg"].dtype == torch.float32
    assert keep.state[p]["step"].dtype == torch.float32
    assert torch.equal(keep.state[p]["exp_avg"], src.state[p]["exp_avg"])


def test_state_dict_round_trip_is_exact():
    o_params, o_opt = ours("Adam", TORCH_CASES["Adam"], "fused", steps=3, state_dtype=BF16)
    params = [p.detach().clone().requires_grad_() for p in o_params]
    opt = fuseopt.Adam(params, **TORCH_CASES["Adam"], fused=True, state_dtype=BF16)
    opt.load_state_dict(o_opt.state_dict())
    for p, q in zip(params, o_params):
        for k, v in opt.state[p].items():
            assert v.dtype == o_opt.state[q][k].dtype and torch.equal(v, o_opt.state[q][k])


def test_options_changed_between_steps_take_effect():
    """The plan kept between steps (fuseopt._plan_cache) is dropped when a group's storage
    options change: stochastic rounding and Kahan summation stop at once."""
    for options in (dict(stochastic_rounding=True), dict(kahan_sum=True)):
        p = torch.ones(N, dtype=BF16, requires_grad=True)
        opt = fuseopt.SGD([p], lr=1.0, fused=True, **options)
        for _ in range(4):  # (the plan is kept from the second step on)
            p.grad = torch.full((N,), -ULP / 4, dtype=BF16)
            opt.step()
        assert (p.detach() != 1).any()
        for key in options:
            opt.param_groups[0][key] = False
        p.data.fill_(1.0)
        for _ in range(4):
            p.grad = torch.full((N,), -ULP / 4, dtype=BF16)
            opt.step()
        assert (p.detach() == 1).all(), options


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_first_pass_reads_states_in_their_dtype(impl, monkeypatch):
    """Cautious AdamW's first pass (per-tensor mask counts) reads the bfloat16 moments through
    the launch's dtypes, as the update does: the fused and foreach steps are the for-loop's
    (the counts are sums of a mask: exact)."""
    kwargs = dict(lr=0.01, cautious=True)
    o_params, o_opt = ours("AdamW", kwargs, impl, state_dtype=BF16)
    r_params, r_opt = ours("AdamW", kwargs, "forloop", state_dtype=BF16)
    for p, q in zip(o_params, r_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=0.01 * PARAM_ATOL)
        for k, v in _tensor_states(o_opt, p).items():
            torch.testing.assert_close(
                v.float(), _tensor_states(r_opt, q)[k].float(), rtol=2**-7, atol=1e-6
            )
