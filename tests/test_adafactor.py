"""fuseopt's Adafactor against torch.optim.Adafactor (the oracle): numbers, state, errors.

Tolerances: fuseopt's for-loop and foreach paths run the same ATen ops on the same values as
torch's for-loop (norms, lerp, clamp, rsqrt; the rank-1 estimate ``R * C`` is the exactly rounded
product that torch's k=1 matmul also gives; the update is added as ``p.add_(u, alpha=a)``), so
both are compared with torch's for-loop bitwise. torch's own foreach path scales the updates and
then adds them (two roundings where ``add_`` with ``alpha`` rounds once), so it drifts from its
for-loop by an ulp or so per step: fuseopt's foreach is compared with it at float32
``rtol=1e-5, atol=1e-6`` and float64 ``rtol=1e-12, atol=1e-14`` (20 steps of values of order 1).
The state-dict interchange also runs on CUDA where torch sees a GPU: the for-loop bitwise there
too; foreach at that tolerance, since CUDA's multi-tensor kernels (``_foreach_norm`` among them)
may round otherwise than the per-tensor ones that torch's for-loop calls.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import clone_params, error_of, expect_error_input
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

from fuseopt._adafactor import Adafactor
from fuseopt._dispatch import scalar_dtype

STEPS = 20
IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable")
INFO = next(o for o in optim_db if o.optim_cls.__name__ == "Adafactor")
IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "default": {}}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}

CONFIGS = [
    pytest.param({k: v for k, v in i.kwargs.items() if k not in IMPL_KEYS}, id=i.desc)
    for i in INFO.optim_inputs_func(device="cpu", dtype=torch.float32)
] + [
    pytest.param(dict(lr=torch.tensor(0.02), weight_decay=0.05), id="tensor_lr"),
    pytest.param(dict(eps=(1e-20, 1e-4), d=2.0, beta2_decay=-0.5, maximize=True), id="eps1_set"),
    pytest.param(dict(lr=0.5, eps=(0.0, 0.0)), id="large_lr_zero_eps"),
]
DTYPES = [torch.float32, torch.float64]
# (4, 3) and (2, 3, 4) are factored, (5,) and () keep a full variance; "transposed" is a (5, 3)
# non-contiguous view and (70, 33) is larger than a vector register or two.
SHAPES = [(), (5,), (4, 3), (2, 3, 4), "transposed", (1, 6), (70, 33)]


def _params(dtype, shapes=SHAPES, seed=0, device="cpu"):
    """Drawn on the CPU, then moved: the same values on every device."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if shape == "transposed":
            t = torch.randn(3, 5, generator=gen, dtype=dtype).t()
        else:
            t = torch.randn(shape, generator=gen, dtype=dtype)
        out.append(t.to(device).detach().requires_grad_())
    return out


def _grads(params, steps, seed=1):
    """Per step, a gradient laid out like each param, on its device; every fourth param skips a
    step (None)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        row = []
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if not p.is_contiguous():
                g = torch.randn(p.t().shape, generator=gen, dtype=p.dtype).t()
            row.append(None if (step + i) % 4 == 3 else g.to(p.device))
        out.append(row)
    return out


def _steps(opt, params, grads):
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
    return opt


def _same(ours, theirs, tol=None):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if tol is None:
        assert ours.stride() == theirs.stride()
        assert torch.equal(ours, theirs), (ours - theirs).abs().max()
    else:
        torch.testing.assert_close(ours, theirs, **tol)


def _compare(opt, ref, params, ref_params, tol=None):
    for p, q in zip(params, ref_params):
        _same(p.detach(), q.detach(), tol)
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for i, ref_state in theirs["state"].items():
        assert list(ours["state"][i]) == list(ref_state), "state keys and their order"
        for key, value in ref_state.items():
            if key == "step":
                assert ours["state"][i][key].dtype == value.dtype
                assert torch.equal(ours["state"][i][key], value)
            else:
                _same(ours["state"][i][key], value, tol)
    strip = lambda g: {k: v for k, v in g.items() if k != "foreach"}
    assert [strip(g) for g in ours["param_groups"]] == [strip(g) for g in theirs["param_groups"]]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_parity_with_torch_forloop(kwargs, dtype, impl):
    params = _params(dtype)
    ref_params = clone_params(params)
    grads = _grads(params, STEPS)
    opt = _steps(Adafactor(params, **kwargs, **IMPLS[impl]), params, grads)
    ref = _steps(torch.optim.Adafactor(ref_params, **kwargs, foreach=False), ref_params, grads)
    _compare(opt, ref, params, ref_params)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_foreach_close_to_torch_foreach(kwargs, dtype):
    """torch's foreach rounds its last add differently from its for-loop: close, not equal."""
    params = _params(dtype)
    ref_params = clone_params(params)
    grads = _grads(params, STEPS)
    opt = _steps(Adafactor(params, **kwargs, foreach=True), params, grads)
    ref = _steps(torch.optim.Adafactor(ref_params, **kwargs, foreach=True), ref_params, grads)
    _compare(opt, ref, params, ref_params, TOL[dtype])


def test_state_shapes_match_torch():
    params = _params(torch.float32, [(), (5,), (4, 3), (2, 3, 4)])
    for p in params:
        p.grad = torch.ones_like(p)
    opt = Adafactor(params)
    opt.step()
    shapes = {
        i: {k: tuple(v.shape) for k, v in s.items()} for i, s in opt.state_dict()["state"].items()
    }
    assert shapes == {
        0: {"step": (), "variance": ()},
        1: {"step": (), "variance": (5,)},
        2: {"step": (), "row_var": (4, 1), "col_var": (1, 3)},
        3: {"step": (), "row_var": (2, 3, 1), "col_var": (2, 1, 4)},
    }
    assert all(s["step"].dtype == scalar_dtype() for s in opt.state.values())


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
def test_groups_and_mixed_dtypes(impl):
    """Per-group options; a group mixing float32 and float64 takes eps1 from its first param (as
    torch's for-loop does); the foreach path batches by dtype and still gives the same numbers."""
    mixed = _params(torch.float32, [(4, 3), (5,)]) + _params(torch.float64, [(3, 2), (2,)], 1)
    other = _params(torch.float64, [(2, 3, 4), ()], 2)
    params = mixed + other
    ref_params = clone_params(params)
    grads = _grads(params, 12)

    def build(cls, ps, **flags):
        groups = [{"params": ps[:4]}, {"params": ps[4:], "lr": 0.05, "weight_decay": 0.1}]
        return cls(groups, d=1.2, **flags)

    opt = _steps(build(Adafactor, params, **IMPLS[impl]), params, grads)
    ref = _steps(build(torch.optim.Adafactor, ref_params, foreach=False), ref_params, grads)
    _compare(opt, ref, params, ref_params)


def test_closure_runs_with_grad_and_returns_loss():
    p = torch.randn(4, 3, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    results = []
    for cls, param in ((Adafactor, p), (torch.optim.Adafactor, q)):
        opt = cls([param])

        def closure(param=param, opt=opt):
            opt.zero_grad()
            loss = (param**2).sum()
            loss.backward()
            return loss

        results.append([opt.step(closure).item() for _ in range(3)])
    assert results[0] == results[1]
    _same(p.detach(), q.detach())


ERRORS = [
    pytest.param(err, id=f"{i}-{err.optimizer_error_input.desc}")
    for i, err in enumerate(INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32))
]


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
@pytest.mark.parametrize("err", ERRORS)
def test_torch_error_inputs(err, impl):
    inp = err.optimizer_error_input

    def make(cls):
        opt = cls(inp.params, **inp.kwargs, **IMPLS[impl])
        if err.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    expect_error_input(err, lambda: make(Adafactor))
    if issubclass(err.error_type, Warning):
        return
    assert error_of(lambda: make(Adafactor)) == error_of(lambda: make(torch.optim.Adafactor))


def _param(dtype=torch.float32):
    return torch.zeros(2, 3, dtype=dtype, requires_grad=True)


def _with_grad(p, grad):
    p.grad = grad
    return p


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda cls: cls([_param()], lr=-1.0), id="lr_negative"),
        pytest.param(lambda cls: cls([_param()], lr=torch.tensor([1.0, 2.0])), id="lr_2_elements"),
        pytest.param(lambda cls: cls([_param()], beta2_decay=0.1), id="beta2_decay_positive"),
        pytest.param(lambda cls: cls([_param()], eps=(-1.0, 1e-3)), id="eps1_negative"),
        pytest.param(lambda cls: cls([_param()], eps=(None, -1e-3)), id="eps2_negative"),
        pytest.param(lambda cls: cls([_param()], d=0.5), id="d_below_one"),
        pytest.param(lambda cls: cls([_param()], weight_decay=-0.1), id="weight_decay_negative"),
        pytest.param(lambda cls: cls([]), id="no_params"),
        pytest.param(
            lambda cls: cls(
                [_with_grad(_param(), torch.ones(2, 3).to_sparse())], foreach=True
            ).step(),
            id="sparse_grad_foreach",
        ),
        pytest.param(
            lambda cls: cls([_with_grad(_param(), torch.ones(2, 3).to_sparse())]).step(),
            id="sparse_grad",
        ),
        pytest.param(
            lambda cls: cls(
                [_with_grad(_param(torch.complex64), torch.ones(2, 3, dtype=torch.complex64))]
            ).step(),
            id="complex",
        ),
        pytest.param(
            lambda cls: cls(
                [_with_grad(torch.zeros(0, requires_grad=True), torch.zeros(0))]
            ).step(),
            id="empty_param_divides_by_zero",
        ),
    ],
)
def test_errors_match_torch_exactly(make):
    """Same exception type and message as torch, word for word."""
    assert error_of(lambda: make(Adafactor)) == error_of(lambda: make(torch.optim.Adafactor))


def test_error_leaves_params_and_state_untouched():
    """fuseopt checks every group before changing anything (torch steps earlier groups first)."""
    good = _with_grad(torch.ones(2, 3, requires_grad=True), torch.ones(2, 3))
    bad = _with_grad(_param(torch.complex64), torch.ones(2, 3, dtype=torch.complex64))
    opt = Adafactor([{"params": [good]}, {"params": [bad]}])
    with pytest.raises(RuntimeError, match="^Adafactor does not support complex parameters$"):
        opt.step()
    assert not opt.state and torch.equal(good, torch.ones(2, 3))


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
@pytest.mark.parametrize("direction", ["torch_to_fuseopt", "fuseopt_to_torch"])
def test_state_dict_interchange(direction, impl, device):
    """Save after 10 steps in one library, load into the other, continue 10 steps: same result."""
    kwargs = dict(lr=0.02, weight_decay=0.01, maximize=True)
    params = _params(torch.float32, device=device)
    ref_params = clone_params(params)
    grads = _grads(params, STEPS)
    ref = _steps(torch.optim.Adafactor(ref_params, **kwargs, foreach=False), ref_params, grads)
    first, second = Adafactor, torch.optim.Adafactor
    if direction == "torch_to_fuseopt":
        first, second = second, first
    flags = lambda cls: IMPLS[impl] if cls is Adafactor else dict(foreach=False)
    opt = _steps(first(params, **kwargs, **flags(first)), params, grads[: STEPS // 2])
    saved = copy.deepcopy(opt.state_dict())
    resumed = second(params, **kwargs, **flags(second))
    resumed.load_state_dict(saved)
    # Loading restores the saved groups' options, foreach included: pick the implementation again
    # (else torch would resume with its foreach path, which rounds differently, see the top).
    for group in resumed.param_groups:
        group["foreach"] = flags(second).get("foreach")
    _steps(resumed, params, grads[STEPS // 2 :])
    multi_tensor = device == "cuda" and impl == "foreach"  # (see the top)
    _compare(resumed, ref, params, ref_params, TOL[torch.float32] if multi_tensor else None)


def test_old_checkpoint_with_number_steps():
    """A state dict whose steps are numbers (older torch) loads with tensor steps, as in torch."""
    params = _params(torch.float32)
    ref_params = clone_params(params)
    grads = _grads(params, 10)
    saved = _steps(Adafactor(params), params, grads[:5]).state_dict()
    for state in saved["state"].values():
        state["step"] = state["step"].item()
    ours, theirs = Adafactor(params), torch.optim.Adafactor(ref_params)
    for p, q in zip(params, ref_params):
        q.data.copy_(p)
    ours.load_state_dict(copy.deepcopy(saved))
    theirs.load_state_dict(copy.deepcopy(saved))
    assert all(torch.is_tensor(s["step"]) for s in ours.state.values())
    _compare(
        _steps(ours, params, grads[5:]), _steps(theirs, ref_params, grads[5:]), params, ref_params
    )


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
def test_deepcopy_and_pickle_continue_identically(impl):
    params = _params(torch.float64)
    ref_params = clone_params(params)
    grads = _grads(params, STEPS)
    opt = _steps(Adafactor(params, weight_decay=0.1, **IMPLS[impl]), params, grads[:10])
    ref = _steps(torch.optim.Adafactor(ref_params, weight_decay=0.1), ref_params, grads)
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        twin_params = [p for g in twin.param_groups for p in g["params"]]
        assert all(p is not q and torch.equal(p, q) for p, q in zip(params, twin_params))
        _steps(twin, twin_params, grads[10:])
        _compare(twin, ref, twin_params, ref_params)
    _steps(opt, params, grads[10:])
    _compare(opt, ref, params, ref_params)
