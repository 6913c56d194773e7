"""Storage options (``state_dtype``, ``stochastic_rounding``, ``kahan_sum``, ``state_bits``) with
sparse grads, for the two algorithms that take them (Adagrad, SGD): every combination either
steps as the dense for-loop does with the grad densified (float32 math from the stored values, one
rounding per store; rows the grad does not reach stay as they are), or is refused before the
step changes anything, naming the option."""

from __future__ import annotations

import pytest
import torch
from conftest import IMPLS

import fuseopt

BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16
SHAPES = ((8, 5), (6, 4))  # an embedding table (rows sparse), a matrix (elements sparse)
STEPS = 4

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")


def _grad(shape, sparse_dim: int, step: int, dtype) -> torch.Tensor:
    """A sparse grad of ``step`` (uncoalesced, as an embedding's): a few distinct indices and one
    index given twice with the same value, so that the duplicates sum exactly in any dtype (the
    densified grad then holds what the float32 sum holds)."""
    gen = torch.Generator().manual_seed(100 + step)
    sizes = shape[:sparse_dim]
    picks = torch.randperm(sizes[0] * (sizes[1] if sparse_dim == 2 else 1), generator=gen)[:3]
    cols = [picks // sizes[1], picks % sizes[1]] if sparse_dim == 2 else [picks]
    indices = torch.stack(cols)
    indices = torch.cat([indices, indices[:, :1]], 1)  # the first index, again
    values = torch.randn(4, *shape[sparse_dim:], generator=gen)
    values[3] = values[0]
    return torch.sparse_coo_tensor(indices, values.to(dtype), shape)


def _grads(step: int, dtype) -> list[torch.Tensor]:
    return [_grad(shape, dim, step, dtype) for shape, dim in zip(SHAPES, (1, 2))]


def _params(dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def _build(cls, params, kwargs, group=None):
    torch.manual_seed(0)  # (the stochastic-rounding generator: the same bits in every run)
    return cls([{"params": params, **(group or {})}], **kwargs)


def _reached(grad: torch.Tensor, buffer=None) -> torch.Tensor:
    """The elements a sparse step may change: those of the grad's indices, and of the sparse
    momentum's (SGD carries its momentum to rows the grad skips, as a dense step does)."""
    mask = torch.zeros(grad.shape[: grad.sparse_dim()], dtype=torch.bool)
    for t in (grad, buffer):
        if t is not None:
            mask[tuple(t.coalesce().indices())] = True
    return mask.reshape(*mask.shape, *[1] * grad.dense_dim()).expand(grad.shape)


def _tensors(opt, p) -> dict:
    return {k: v.to_dense() if v.is_sparse else v for k, v in opt.state[p].items()}


def _run_sparse(cls, dtype, kwargs, group=None):
    """Steps with sparse grads; after each, the elements no grad (or momentum) reached are as
    they were, in the param and in every state."""
    params = _params(dtype)
    opt = _build(cls, params, kwargs, group)
    for step in range(STEPS):
        grads = _grads(step, dtype)
        before = [(p.detach().clone(), {k: v.clone() for k, v in _tensors(opt, p).items()})
                  for p in params]  # fmt: skip
        reached = [_reached(g, opt.state[p].get("momentum_buffer")) for p, g in zip(params, grads)]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, (p0, s0), mask in zip(params, before, reached):
            assert torch.equal(p.detach()[~mask], p0[~mask])
            for k, v in _tensors(opt, p).items():
                if k in s0 and v.dim():
                    assert torch.equal(v[~mask], s0[k][~mask]), k
    return params, opt


def _run_dense(cls, dtype, kwargs, group=None):
    """The same steps on the for-loop with the grads densified."""
    params = _params(dtype)
    opt = _build(cls, params, {**kwargs, "foreach": False}, group)
    for step in range(STEPS):
        for p, g in zip(params, _grads(step, dtype)):
            p.grad = g.to_dense()
        opt.step()
    return params, opt


# (algorithm, its options, param dtype, storage options, group keys, bitwise)
# bitwise: Adagrad's sparse step runs the dense step's float32 ops on the rows it touches. SGD
# (the for-loop, sparse grad as it is) within one ulp of the stored dtype: it adds the pieces of
# a repeated index to the param one at a time (as torch's sparse add does), where the dense grad
# holds their sum: float32 sums in another order (its stored states are sums of the pieces too).
ADAGRAD = (fuseopt.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1))
SGD = (fuseopt.SGD, dict(lr=0.1))
MOMENTUM = (fuseopt.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1))
NESTEROV = (fuseopt.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True))
SUPPORTED = [
    (*ADAGRAD, F32, dict(state_dtype=BF16), None, True),
    (*ADAGRAD, BF16, dict(state_dtype=F32), None, True),
    (*ADAGRAD, BF16, dict(state_dtype=BF16), None, True),
    (*ADAGRAD, F16, dict(state_dtype=F32), None, True),
    (*ADAGRAD, F32, dict(stochastic_rounding=True), None, True),  # no bfloat16 store: none
    (*ADAGRAD, BF16, dict(kahan_sum=True), None, True),
    (*ADAGRAD, BF16, dict(kahan_sum=True, state_dtype=F32), None, True),
    (*ADAGRAD, BF16, dict(kahan_sum=True, state_dtype=F32, stochastic_rounding=True), None, True),
    (ADAGRAD[0], {**ADAGRAD[1], "maximize": True}, BF16, dict(state_dtype=F32), None, True),
    (*SGD, F32, dict(stochastic_rounding=True), None, False),
    (*SGD, BF16, dict(stochastic_rounding=True), None, False),  # the for-loop's random bits
    (*SGD, BF16, dict(kahan_sum=True), None, False),
    (*SGD, BF16, dict(kahan_sum=True, stochastic_rounding=True), None, False),
    (*MOMENTUM, F32, dict(state_dtype=BF16), None, False),
    (*MOMENTUM, BF16, dict(state_dtype=F32), None, False),
    (*MOMENTUM, F32, dict(stochastic_rounding=True), None, False),
    (*MOMENTUM, BF16, dict(stochastic_rounding=True, state_dtype=F32), None, False),
    (*MOMENTUM, BF16, dict(kahan_sum=True), None, False),
    (*MOMENTUM, BF16, dict(kahan_sum=True, state_dtype=F32), None, False),
    (*MOMENTUM, F32, dict(state_bits=8), None, False),  # (below min_8bit_size: full precision)
    (*NESTEROV, F32, dict(state_dtype=BF16), None, False),
    (*NESTEROV, BF16, dict(kahan_sum=True), None, False),
]


def _id(case) -> str:
    cls, base, dtype, options, _, _ = case
    kind = "".join(k for k in ("momentum", "nesterov", "maximize") if base.get(k))
    opts = "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in options.items())
    return f"{cls.__name__}{kind}-{str(dtype)[6:]}-{opts}"


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "fused"])
@pytest.mark.parametrize("case", SUPPORTED, ids=_id)
def test_sparse_step_is_the_dense_step_on_the_rows_it_reaches(case, impl):
    cls, base, dtype, options, group, bitwise = case
    kwargs = {**base, **options}
    ours, opt = _run_sparse(cls, dtype, {**kwargs, **IMPLS[impl]}, group)
    dense, ref = _run_dense(cls, dtype, kwargs, group)
    for p, q in zip(ours, dense):
        pairs = [(p.detach(), q.detach())]
        assert set(opt.state[p]) == set(ref.state[q])
        for k, v in _tensors(opt, p).items():
            assert v.dtype == ref.state[q][k].dtype, k
            pairs.append((v, ref.state[q][k]))
        for a, b in pairs:
            if bitwise:
                assert torch.equal(a, b)
            else:  # one ulp of the stored dtype (see SUPPORTED)
                eps = torch.finfo(a.dtype).eps
                torch.testing.assert_close(a, b, rtol=eps, atol=eps)


def test_adagrad_kahan_compensates_the_rows_it_touches():
    """Updates below half a bfloat16 ulp: kahan_sum on the sparse path carries them in
    kahan_comp and the touched rows move as the dense step's do; without it they are lost."""
    moved = {}
    for kahan in (False, True):  # (steps of about 0.002; half an ulp of 1.5 is 2**-8)
        p = torch.full((4, 3), 1.5, dtype=BF16, requires_grad=True)
        opt = fuseopt.Adagrad([p], lr=0.02, initial_accumulator_value=100.0, kahan_sum=kahan)
        for _ in range(8):
            p.grad = torch.sparse_coo_tensor([[1, 2]], torch.ones(2, 3), (4, 3)).to(BF16)
            opt.step()
        moved[kahan] = p.detach().float() - 1.5
        assert not moved[kahan][[0, 3]].any()  # rows never touched
        if kahan:
            assert opt.state[p]["kahan_comp"][[0, 3]].eq(0).all()
    assert not moved[False].any() and (moved[True][[1, 2]] < 0).all()


# (algorithm, its options, param dtype, storage options, group keys, the error)
SR = "stochastic_rounding option is not compatible with sparse gradients"
REFUSED = [
    (*ADAGRAD, F32, dict(state_dtype=BF16, stochastic_rounding=True), None, SR + ".*'sum'"),
    (*ADAGRAD, BF16, dict(stochastic_rounding=True), None, SR + ".*param and state 'sum'"),
    (*ADAGRAD, BF16, dict(stochastic_rounding=True, state_dtype=F32), None, SR + ".*param:"),
    (*ADAGRAD, BF16, dict(stochastic_rounding=True, kahan_sum=True), None, SR + ".*'sum'"),
    (*MOMENTUM, F32, dict(state_dtype=BF16, stochastic_rounding=True), None, SR),
    (*MOMENTUM, BF16, dict(stochastic_rounding=True), None, SR + ".*'momentum_buffer'"),
    (*NESTEROV, BF16, dict(stochastic_rounding=True, kahan_sum=True), None, SR),
    (*MOMENTUM, F32, dict(state_bits=8), dict(min_8bit_size=0),
     "state_bits=8 option is not compatible with sparse gradients"),
    (*ADAGRAD, F32, dict(weight_decay=0.1, state_dtype=BF16), None,
     "weight_decay option is not compatible with sparse gradients"),
    (*SGD, BF16, dict(weight_decay=0.1, kahan_sum=True), None,
     r"add\(sparse, dense\) is not supported"),
]  # fmt: skip


def _snapshot(opt, params) -> tuple:
    """Everything a step could change: params, every state tensor (step counters included)
    and the stochastic-rounding generator."""
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state]
    rng = opt.__dict__.get("_storage_rng")
    return [p.detach().clone() for p in params], state, rng and rng.get_state()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if a.is_sparse:
            return b.is_sparse and torch.equal(a.to_dense(), b.to_dense())
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", REFUSED, ids=_id)
def test_refused_before_anything_changes(case, impl):
    """The error names the option (with ``fused=True`` too: these checks come first); a
    dense-grad param earlier in the group is not stepped, the states (step counters, momentum)
    and the generator are as they were, over two tries."""
    cls, base, dtype, options, group, error = case
    params = _params(dtype)
    opt = _build(cls, params, {**base, **options, **IMPLS[impl]}, group)
    _check_refused(opt, params, dtype, error)


@pytest.mark.parametrize("case", SUPPORTED, ids=_id)
def test_fused_refuses_sparse_grads_with_any_storage_option(case):
    cls, base, dtype, options, group, _ = case
    params = _params(dtype)
    opt = _build(cls, params, {**base, **options, "fused": True}, group)
    _check_refused(opt, params, dtype, "`fused=True` does not support sparse gradients")


def _check_refused(opt, params, dtype, error) -> None:
    if "momentum_buffer" not in opt.state.get(params[0], {}):  # a step counter or momentum
        params[0].grad = torch.ones_like(params[0])
        opt.step()
    before = _snapshot(opt, params)
    for _ in range(2):
        params[0].grad = torch.ones_like(params[0])  # dense
        params[1].grad = _grads(0, dtype)[1]
        with pytest.raises(RuntimeError, match=error):
            opt.step()
        assert _same(_snapshot(opt, params), before)


def test_state_bits_only_refuses_the_params_it_quantizes():
    """A param below min_8bit_size keeps a full-precision momentum, which a sparse step
    handles; one at or above it is quantized and refused."""
    small, big = torch.ones(4, 3, requires_grad=True), torch.ones(64, 64, requires_grad=True)
    opt = fuseopt.SGD([small, big], lr=0.1, momentum=0.9, state_bits=8)
    small.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 3), (4, 3))
    opt.step()
    assert opt.state[small]["momentum_buffer"].is_sparse
    big.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 64), (64, 64))
    with pytest.raises(RuntimeError, match="state_bits=8 option is not compatible with sparse"):
        opt.step()
    assert torch.equal(big, torch.ones(64, 64)) and not opt.state[big]


def test_sparse_momentum_is_stored_coalesced_and_rounded_once():
    """A bfloat16 momentum of a sparse grad holds one value per index (the float32 sum of the
    grad's repeated rows, rounded once), not one rounded piece per occurrence."""
    p = torch.zeros(4, requires_grad=True)
    opt = fuseopt.SGD([p], lr=0.1, momentum=0.9, state_dtype=BF16)
    x = 1 + 3 * 2**-9  # (rounded on its own, 1 + 2**-7: three such pieces sum to 3.0234375)
    p.grad = torch.sparse_coo_tensor([[2, 2, 2]], [x] * 3, (4,))
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert buf.is_coalesced() and buf._nnz() == 1 and buf.dtype == BF16
    assert buf._values().item() == 3.015625  # 3x = 3.017578125, rounded once
