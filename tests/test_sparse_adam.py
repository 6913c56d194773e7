"""fuseopt's SparseAdam against torch.optim.SparseAdam (the oracle): numbers, state, errors.

Tolerance: none. torch's SparseAdam has only a for-loop, and fuseopt's evaluates the same
arithmetic on the same values in the same order (gather, ``old + (1 - beta) * (new - old)``,
``sqrt + eps``, ``-step_size * m / denom``, one add per position), so params and state are
compared bitwise.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import clone_params, error_of, expect_error_input
from torch import nn
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

from fuseopt.sparse_adam import SparseAdam

STEPS = 20
IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable")
INFO = next(o for o in optim_db if o.optim_cls.__name__ == "SparseAdam")

CONFIGS = [
    pytest.param({k: v for k, v in i.kwargs.items() if k not in IMPL_KEYS}, id=i.desc)
    for i in INFO.optim_inputs_func(device="cpu", dtype=torch.float32)
] + [pytest.param(dict(lr=0.05, betas=(0.5, 0.9), eps=1e-6, maximize=True), id="all_options")]
DTYPES = [torch.float32, torch.float64]

# (param shape, number of sparse dims of its gradient); "transposed" is a (5, 3) non-contiguous
# view, fully sparse. Sparse dims 0 means one value covering the whole tensor.
LAYOUTS = [((10, 3), 1), ((7,), 1), ((4, 3, 2), 2), ("transposed", 2), ((), 0), ((2, 3), 0)]


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, _ in LAYOUTS:
        if shape == "transposed":
            t = torch.randn(3, 5, generator=gen, dtype=dtype).t()
        else:
            t = torch.randn(shape, generator=gen, dtype=dtype)
        out.append(t.detach().requires_grad_())
    return out


def _sparse_grad(p, sparse_dims, gen, step):
    """A random uncoalesced sparse gradient (duplicate indices), sometimes empty."""
    if sparse_dims == 0:
        nnz = 0 if step % 7 == 3 else 1
        indices = torch.zeros(0, nnz, dtype=torch.long)
    else:
        nnz = 0 if step % 5 == 4 else int(torch.randint(1, 8, (), generator=gen))
        indices = torch.stack(
            [torch.randint(0, p.shape[d], (nnz,), generator=gen) for d in range(sparse_dims)]
        ).reshape(sparse_dims, nnz)
    values = torch.randn((nnz, *p.shape[sparse_dims:]), generator=gen, dtype=p.dtype)
    return torch.sparse_coo_tensor(indices, values, p.shape, check_invariants=True)


def _grads(params, steps, seed=1):
    """Per step, a gradient per param; some steps leave a param without gradient (None)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        row = []
        for i, (p, (_, sparse_dims)) in enumerate(zip(params, LAYOUTS)):
            row.append(None if (step + i) % 6 == 5 else _sparse_grad(p, sparse_dims, gen, step))
        out.append(row)
    return out


def _steps(opt, params, grads):
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
    return opt


def _assert_equal(ours, theirs):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert ours.stride() == theirs.stride()
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def _compare(opt, ref, params, ref_params):
    for p, q in zip(params, ref_params):
        _assert_equal(p.detach(), q.detach())
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for i, ref_state in theirs["state"].items():
        assert list(ours["state"][i]) == list(ref_state) == ["step", "exp_avg", "exp_avg_sq"]
        assert type(ours["state"][i]["step"]) is int
        assert ours["state"][i]["step"] == ref_state["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            _assert_equal(ours["state"][i][key], ref_state[key])
    assert ours["param_groups"] == theirs["param_groups"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_parity_with_torch(kwargs, dtype):
    params = _params(dtype)
    ref_params = clone_params(params)
    grads = _grads(params, STEPS)
    opt = _steps(SparseAdam(params, **kwargs), params, grads)
    ref = _steps(torch.optim.SparseAdam(ref_params, **kwargs), ref_params, grads)
    _compare(opt, ref, params, ref_params)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_embedding_training_matches_torch(dtype):
    """A real ``nn.Embedding(sparse=True)`` with a dense head, trained on a few batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Linear(8, 1)).to(dtype)
    ref_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    batches = [
        (torch.randint(0, 50, (16, 4), generator=gen), torch.randn(16, 4, 1, generator=gen))
        for _ in range(6)
    ]

    def train(m, cls):
        emb, head = m[0], m[1]
        sparse_opt = cls(emb.parameters(), lr=0.01)
        dense_opt = torch.optim.SGD(head.parameters(), lr=0.01)
        for idx, target in batches:
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss = ((m(idx) - target.to(dtype)) ** 2).mean()
            loss.backward()
            assert emb.weight.grad.is_sparse
            sparse_opt.step()
            dense_opt.step()
        return sparse_opt

    opt, ref = train(model, SparseAdam), train(ref_model, torch.optim.SparseAdam)
    _compare(opt, ref, list(model.parameters())[:1], list(ref_model.parameters())[:1])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        _assert_equal(p.detach(), q.detach())


def test_param_groups_and_closure():
    """Per-group options; the closure runs with grad enabled and its loss is returned."""
    params, ref_params = _params(torch.float32), None
    ref_params = clone_params(params)
    grads = _grads(params, 8)

    def build(cls, ps):
        return cls(
            [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.02, "betas": (0.8, 0.99)}], eps=1e-7
        )

    opt, ref = build(SparseAdam, params), build(torch.optim.SparseAdam, ref_params)
    for row in grads:
        for ps, o in ((params, opt), (ref_params, ref)):
            for p, g in zip(ps, row):
                p.grad = None if g is None else g.clone()

            def closure():
                assert torch.is_grad_enabled()
                return torch.tensor(1.5)

            assert o.step(closure).item() == 1.5
    _compare(opt, ref, params, ref_params)


ERRORS = [
    pytest.param(err, id=f"{i}-{err.optimizer_error_input.desc}")
    for i, err in enumerate(INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32))
]


@pytest.mark.parametrize("err", ERRORS)
def test_torch_error_inputs(err):
    inp = err.optimizer_error_input

    def make(cls):
        opt = cls(inp.params, **inp.kwargs)
        if err.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    expect_error_input(err, lambda: make(SparseAdam))
    if issubclass(err.error_type, Warning):
        return
    assert error_of(lambda: make(SparseAdam)) == error_of(lambda: make(torch.optim.SparseAdam))


def _param(dtype=torch.float32):
    return torch.zeros(3, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda cls: cls([_param()], lr=0.0), id="lr_zero"),
        pytest.param(lambda cls: cls([_param()], lr=-1.0), id="lr_negative"),
        pytest.param(lambda cls: cls([_param()], lr=torch.tensor([1.0, 2.0])), id="lr_2_elements"),
        pytest.param(lambda cls: cls([_param()], lr=torch.tensor(-1.0)), id="lr_tensor_negative"),
        pytest.param(lambda cls: cls([_param()], eps=0.0), id="eps_zero"),
        pytest.param(lambda cls: cls([_param()], betas=(0.9, 1.0)), id="beta2_one"),
        pytest.param(lambda cls: cls([_param()], betas=(-0.1, 0.9)), id="beta1_negative"),
        pytest.param(
            lambda cls: cls([{"params": [_param()]}, {"params": [_param(torch.complex64)]}]),
            id="complex_in_second_group",
        ),
        pytest.param(
            lambda cls: cls(
                [_param(), _param(torch.complex64), torch.zeros(3, layout=torch.sparse_coo)]
            ),
            id="sparse_checked_before_complex",
        ),
        pytest.param(lambda cls: cls([]), id="no_params"),
    ],
)
def test_constructor_errors_match_torch_exactly(make):
    """Same exception type and message as torch, word for word."""
    assert error_of(lambda: make(SparseAdam)) == error_of(lambda: make(torch.optim.SparseAdam))


def test_dense_gradient_error_leaves_state_untouched():
    """torch's error for a dense gradient; fuseopt checks every gradient before any change."""
    good, bad = _param(), _param()
    good.grad = torch.sparse_coo_tensor([[0]], [1.0], (3,), check_invariants=True)
    bad.grad = torch.ones(3)
    for cls in (SparseAdam, torch.optim.SparseAdam):
        with pytest.raises(RuntimeError, match="^SparseAdam does not support dense gradients, "):
            cls([good, bad]).step()
    opt = SparseAdam([{"params": [good]}, {"params": [bad]}])
    with pytest.raises(RuntimeError, match="please consider Adam instead"):
        opt.step()
    assert not opt.state and torch.equal(good, torch.zeros(3))


@pytest.mark.parametrize("direction", ["torch_to_fuseopt", "fuseopt_to_torch"])
def test_state_dict_interchange(direction):
    """Save after 10 steps in one library, load into the other, continue 10 steps: same result."""
    kwargs = dict(lr=0.02, betas=(0.8, 0.95), maximize=True)
    params = _params(torch.float32)
    ref_params = clone_params(params)
    grads = _grads(params, STEPS)
    ref = _steps(torch.optim.SparseAdam(ref_params, **kwargs), ref_params, grads)
    first, second = SparseAdam, torch.optim.SparseAdam
    if direction == "torch_to_fuseopt":
        first, second = second, first
    saved = _steps(first(params, **kwargs), params, grads[: STEPS // 2]).state_dict()
    resumed = second(params, **kwargs)
    resumed.load_state_dict(copy.deepcopy(saved))
    _steps(resumed, params, grads[STEPS // 2 :])
    _compare(resumed, ref, params, ref_params)


def test_deepcopy_continues_identically():
    params = _params(torch.float64)
    ref_params = clone_params(params)
    grads = _grads(params, STEPS)
    opt = _steps(SparseAdam(params, lr=0.01), params, grads[:10])
    ref = _steps(torch.optim.SparseAdam(ref_params, lr=0.01), ref_params, grads)
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(p is not q and torch.equal(p, q) for p, q in zip(params, twin_params))
    _steps(opt, params, grads[10:])
    _steps(twin, twin_params, grads[10:])
    _compare(opt, ref, params, ref_params)
    _compare(twin, ref, twin_params, ref_params)


def test_duplicate_params_warn_like_torch():
    p = _param()
    for cls in (SparseAdam, torch.optim.SparseAdam):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cls([p, p])
        assert any("duplicate parameters" in str(w.message) for w in caught)
