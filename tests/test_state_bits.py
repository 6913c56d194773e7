"""state_bits=8: blockwise 8-bit states (fuseopt._quant) in every implementation, against the
for-loop (the oracle: _quant's spec quantizer on torch's ops) and against bitsandbytes' 8-bit
optimizers; K10 (what a kernel assumes of codes and scales) and its errors; the memory saved."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_bfloat16_close

import fuseopt
from fuseopt import _quant
from fuseopt.kernels import numba_cpu, reference

SMALL = 256  # min_8bit_size for the tests: params of 256 elements and more quantize
# (algorithm, options): every state fuseopt offers in 8 bits
ALGOS = {
    "Adam": (fuseopt.Adam, dict(lr=1e-2)),
    "AdamW": (fuseopt.AdamW, dict(lr=1e-2, amsgrad=True)),
    "SGD": (fuseopt.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "SGD-nesterov": (fuseopt.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "Lion": (fuseopt.Lion, dict(lr=1e-3, weight_decay=0.1)),
    "AdEMAMix": (fuseopt.AdEMAMix, dict(lr=1e-2)),
}
# a multi-chunk tensor (numba's CHUNK is 65,536), sizes not a multiple of 256, one below the
# minimum size (full precision), a param that is not contiguous (full precision)
SHAPES = [(70_001,), (300, 7), (1000,), (100,), "transposed"]


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        if shape == "transposed":
            t = torch.randn(40, 30, generator=gen).t()  # (30, 40), not contiguous
        else:
            t = torch.randn(shape, generator=gen)
        out.append(torch.nn.Parameter(t.to(dtype)))
    return out


def _run(name, impl, dtype, steps=20, **extra):
    cls, kw = ALGOS[name]
    params = _params(dtype)
    opt = cls([{"params": params, "min_8bit_size": SMALL}], state_bits=8, **impl, **kw, **extra)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return params, opt


def _eight_bit(opt, p) -> dict:
    return {k: v for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dtype == torch.uint8}


def assert_states_close(ours, theirs, share=0.999) -> None:
    """8-bit states: codes equal for ``share`` of the elements and all within one code, scales
    within rtol 1e-6; other states and params as their dtype's tolerance."""
    (ps, opt), (rps, ropt) = ours, theirs
    for p, rp in zip(ps, rps):
        state, rstate = opt.state[p], ropt.state[rp]
        assert state.keys() == rstate.keys()
        for k, v in state.items():
            r = rstate[k]
            if v.dtype == torch.uint8:
                d = (v.int() - r.int()).abs()
                assert (d == 0).double().mean() >= share and int(d.max()) <= 1, k
            elif k.endswith("_absmax"):
                torch.testing.assert_close(v, r, rtol=1e-6, atol=0)
            elif v.dtype == torch.bfloat16:
                torch.testing.assert_close(v.float(), r.float(), rtol=2**-7, atol=1e-6)
            else:
                torch.testing.assert_close(v, r, rtol=1e-5, atol=1e-6)
        if p.dtype == torch.bfloat16:  # (float32 math, one rounding: a bfloat16 ulp apart)
            torch.testing.assert_close(p.float(), rp.float(), rtol=2**-7, atol=1e-6)
        else:
            torch.testing.assert_close(p, rp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(ALGOS))
def test_fused_and_foreach_equal_the_forloop(name, dtype):
    oracle = _run(name, dict(foreach=False), dtype)
    params, opt = oracle
    for shape, p in zip(SHAPES, params):  # which states are 8-bit
        keys = _eight_bit(opt, p)
        if shape in ((100,), "transposed"):
            assert not keys
        else:
            assert keys
            for k, codes in keys.items():
                absmax = opt.state[p][_quant.absmax_key(k)]
                assert codes.shape == p.shape and codes.is_contiguous()
                assert absmax.dtype == torch.float32 and absmax.shape == (_quant.blocks(p.numel()),)
    assert_states_close(_run(name, dict(fused=True), dtype), oracle)
    assert_states_close(_run(name, dict(foreach=True), dtype), oracle)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_forloop_is_the_spec(name):
    """One for-loop step from a given 8-bit state: the rule on the dequantized state in float32,
    then _quant.quantize of the new state (the param from the unquantized new state)."""
    cls, kw = ALGOS[name]
    p = torch.nn.Parameter(torch.randn(1000))
    opt = cls([{"params": [p], "min_8bit_size": SMALL}], state_bits=8, foreach=False, **kw)
    p.grad = torch.randn(1000)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    p0 = p.detach().clone()
    p.grad = g = torch.randn(1000)
    opt.step()
    if name == "Adam":
        m = _quant.dequantize(before["exp_avg"], before["exp_avg_absmax"], True)
        v = _quant.dequantize(before["exp_avg_sq"], before["exp_avg_sq_absmax"], False)
        m, v = m.lerp(g, 0.1), (v * 0.999).addcmul(g, g, value=0.001)
        want = p0.addcdiv(m, v.sqrt() / (1 - 0.999**2) ** 0.5 + 1e-8, value=-1e-2 / (1 - 0.9**2))
        new = {"exp_avg": (m, True), "exp_avg_sq": (v, False)}
    else:
        b = _quant.dequantize(before["momentum_buffer"], before["momentum_buffer_absmax"], True)
        g = g.add(p0, alpha=0.01)
        b = (b * 0.9).add(g, alpha=0.9)
        want, new = p0.add(b, alpha=-1e-2), {"momentum_buffer": (b, True)}
    torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
    for k, (value, signed) in new.items():
        codes, absmax = _quant.quantize(value, signed)
        assert (codes.int() - opt.state[p][k].int()).abs().max() <= 1
        assert (codes == opt.state[p][k]).double().mean() >= 0.999
        torch.testing.assert_close(opt.state[p][_quant.absmax_key(k)], absmax, rtol=1e-6, atol=0)


def test_state_layout_and_memory():
    p = torch.nn.Parameter(torch.randn(1024, 1000))
    small = torch.nn.Parameter(torch.randn(4095))  # below the default min_8bit_size (4096)
    opt = fuseopt.AdamW([p, small], state_bits=8)
    assert opt.param_groups[0]["state_bits"] == 8 and "min_8bit_size" not in opt.param_groups[0]
    assert "state_bits" not in fuseopt.AdamW([p]).param_groups[0]  # (a key only where asked)
    p.grad, small.grad = torch.randn_like(p), torch.randn_like(small)
    opt.step()
    state = opt.state[p]
    assert set(state) == {"step", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"}
    assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
    nbytes = sum(
        t.numel() * t.element_size() for k, t in state.items() if k != "step"
    )  # two states: codes and scales
    assert nbytes / (2 * p.numel()) == pytest.approx(1 + 4 / 256, rel=1e-3)  # ~1.016 B/element
    assert {k: v.dtype for k, v in opt.state[small].items() if k != "step"} == {
        "exp_avg": torch.float32, "exp_avg_sq": torch.float32,
    }  # fmt: skip
    # a new state is the code of zero and zero scales
    q = torch.nn.Parameter(torch.zeros(512))
    opt2 = fuseopt.Adam([{"params": [q], "min_8bit_size": 0}], state_bits=8)
    q.grad = torch.zeros(512)
    opt2.step()
    assert bool((opt2.state[q]["exp_avg"] == _quant.zero_code(True)).all())
    assert bool((opt2.state[q]["exp_avg_sq"] == _quant.zero_code(False)).all())
    assert not opt2.state[q]["exp_avg_absmax"].any()


def test_state_dtype_applies_to_full_precision_states():
    big, small = torch.nn.Parameter(torch.randn(512)), torch.nn.Parameter(torch.randn(10))
    opt = fuseopt.Adam(
        [{"params": [big, small], "min_8bit_size": SMALL}], state_bits=8, state_dtype=torch.bfloat16
    )
    big.grad, small.grad = torch.randn(512), torch.randn(10)
    opt.step()
    assert opt.state[big]["exp_avg"].dtype == torch.uint8
    assert opt.state[small]["exp_avg"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: fuseopt.Adam([p], state_bits=4), r"Invalid state_bits: 4 \(8, or None"),
        (lambda p: fuseopt.Adam([p], state_bits=True), "Invalid state_bits"),
        (lambda p: fuseopt.SGD([p], state_bits=8), "offered by Adam, AdamW, SGD with momentum"),
        (lambda p: fuseopt.Adagrad([p], state_bits=8), "offered by"),
        (lambda p: fuseopt.RMSprop([p], state_bits=8), "offered by"),
        (lambda p: fuseopt.Adam([p], state_bits=8, differentiable=True), "differentiable"),
        (lambda p: fuseopt.Adam([p], state_bits=8, capturable=True), "capturable"),
        (lambda p: fuseopt.AdamW([p], state_bits=8, cautious=True), "cautious"),
        (
            lambda p: fuseopt.Adam([{"params": [p], "min_8bit_size": -1}], state_bits=8),
            "Invalid min_8bit_size",
        ),
        (
            lambda p: fuseopt.Adam([{"params": [p], "min_8bit_size": 1.5}], state_bits=8),
            "Invalid min_8bit_size",
        ),
        (
            lambda p: fuseopt.SGD([torch.zeros(3)], momentum=0.9).add_param_group(
                {"params": [p], "momentum": 0.0, "state_bits": 8}
            ),
            "offered by",
        ),
        (
            lambda p: fuseopt.Adam([torch.zeros(3)]).add_param_group(
                {"params": [p], "state_bits": 16}
            ),
            "Invalid state_bits: 16",
        ),
        (
            lambda p: fuseopt.Adam([p.detach().double()], state_bits=8),
            "float64",
        ),
    ],
)
def test_construction_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make(torch.nn.Parameter(torch.zeros(3)))


def _stepped(impl, seed=0, steps=3):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(64, 64, generator=gen))
    opt = fuseopt.Adam([{"params": [p], "min_8bit_size": SMALL}], state_bits=8, **impl)
    for _ in range(steps):
        p.grad = torch.randn(64, 64, generator=gen)
        opt.step()  # (from the second step on, the plan cache's)
    p.grad = torch.randn(64, 64, generator=gen)
    return p, opt


def _snapshot(p, opt):
    return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}


BROKEN = {  # state -> None: a state no path can step (K10's errors)
    "absmax resized": lambda s: s["exp_avg_absmax"].resize_(3),
    "absmax float64": lambda s: s.update(exp_avg_absmax=s["exp_avg_absmax"].double()),
    "absmax 2-D": lambda s: s.update(exp_avg_absmax=s["exp_avg_absmax"].view(1, -1)),
    "absmax missing": lambda s: s.pop("exp_avg_sq_absmax"),
    "absmax storage shrunk": lambda s: s["exp_avg_absmax"].untyped_storage().resize_(4),
    "codes float": lambda s: s.update(exp_avg=s["exp_avg"].float()),
    "codes int8": lambda s: s.update(exp_avg=s["exp_avg"].view(torch.int8)),
    "codes reshaped": lambda s: s.update(exp_avg_sq=s["exp_avg_sq"].view(32, 128)),
}


@pytest.mark.parametrize("impl", [dict(fused=True), dict(foreach=True), dict(foreach=False)])
@pytest.mark.parametrize("fault", list(BROKEN))
def test_k10_errors_change_nothing(fault, impl):
    p, opt = _stepped(impl)
    BROKEN[fault](opt.state[p])
    p0, s0 = _snapshot(p, opt)
    with pytest.raises((RuntimeError, KeyError)):
        opt.step()
    assert torch.equal(p.detach(), p0)
    assert opt.state[p].keys() == s0.keys()
    for k, v in s0.items():
        t = opt.state[p][k]
        if t.untyped_storage().nbytes() >= t.numel() * t.element_size():
            assert torch.equal(t, v), k


MISFITS = {  # the same values, laid out so that no kernel may take them: the for-loop's
    "param not contiguous": lambda p, s: setattr(p, "data", p.data.t().contiguous().t()),
    "codes not contiguous": lambda p, s: s.update(exp_avg=s["exp_avg"].t().contiguous().t()),
    "absmax strided": lambda p, s: s.update(
        exp_avg_absmax=torch.stack([s["exp_avg_absmax"]] * 2, 1)[:, 0]
    ),
}


@pytest.mark.parametrize("misfit", list(MISFITS))
def test_misfits_take_the_forloop(misfit, monkeypatch):
    p, opt = _stepped(dict(fused=True))
    ref = copy.deepcopy(opt)  # the same history, then the for-loop
    ref.param_groups[0].update(fused=None, foreach=False)
    q = ref.param_groups[0]["params"][0]
    q.grad = p.grad.clone()
    MISFITS[misfit](p, opt.state[p])
    MISFITS[misfit](q, ref.state[q])
    kernel_calls, forloop_calls = [], []
    monkeypatch.setattr(numba_cpu, "run", lambda launch: kernel_calls.append(launch))
    real = reference.run
    monkeypatch.setattr(reference, "run", lambda launch: forloop_calls.append(real(launch)))
    opt.step()
    ref.step()
    assert not kernel_calls and len(forloop_calls) == 2
    assert torch.equal(p.detach(), q.detach())
    for k, v in ref.state[q].items():
        assert torch.equal(opt.state[p][k], v), k


def test_plan_cache_rechecks_scales():
    """A group whose plan is cached (same tensors, step after step) is re-checked: scales
    replaced by a tensor of another size or dtype are still errors."""
    p, opt = _stepped(dict(fused=True), steps=4)
    assert opt.__dict__.get("_plan_caches")  # (the cache holds the group)
    absmax = opt.state[p]["exp_avg_absmax"]
    opt.state[p]["exp_avg_absmax"] = torch.zeros(absmax.numel() + 1)
    with pytest.raises(RuntimeError, match="absmax"):
        opt.step()
    opt.state[p]["exp_avg_absmax"] = absmax
    opt.step()


def test_first_value_is_quantized():
    """SGD's momentum buffer, made by the first step (the grad), is stored in 8 bits."""
    outs = []
    for impl in (dict(fused=True), dict(foreach=True), dict(foreach=False)):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(700))
        opt = fuseopt.SGD([{"params": [p], "min_8bit_size": SMALL}], lr=0.1, momentum=0.9,
                          state_bits=8, **impl)  # fmt: skip
        p.grad = g = torch.randn(700)
        opt.step()
        codes, absmax = _quant.quantize(g, True)
        assert torch.equal(opt.state[p]["momentum_buffer"], codes)
        assert torch.equal(opt.state[p]["momentum_buffer_absmax"], absmax)
        outs.append(p.detach().clone())
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])


# ---------------------------------------------------------------------------- bitsandbytes
def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes")


# name: (bitsandbytes' class name, options for both, fuseopt class, fuseopt-only options,
# [(fuseopt state, bnb state key, bnb absmax key, index into a stacked bnb state)])
BNB = {
    "Adam": ("Adam8bit", dict(lr=1e-2), fuseopt.Adam, {},
             [("exp_avg", "state1", "absmax1", None), ("exp_avg_sq", "state2", "absmax2", None)]),
    "AdamW": ("AdamW8bit", dict(lr=1e-2, weight_decay=0.1), fuseopt.AdamW, {},
              [("exp_avg", "state1", "absmax1", None), ("exp_avg_sq", "state2", "absmax2", None)]),
    "Lion": ("Lion8bit", dict(lr=1e-3, weight_decay=0.1), fuseopt.Lion, {},
             [("exp_avg", "state1", "absmax1", None)]),
    "SGD": ("SGD8bit", dict(lr=1e-2, momentum=0.9), fuseopt.SGD, {},
            [("momentum_buffer", "state1", "absmax1", None)]),
    # (no alpha or beta3 scheduler; bitsandbytes' decays by default, fuseopt's does not)
    "AdEMAMix": ("AdEMAMix8bit", dict(lr=1e-2, weight_decay=0.0), fuseopt.AdEMAMix, {},
                 [("exp_avg", "state1", "absmax1", 0), ("exp_avg_slow", "state1", "absmax1", 1),
                  ("exp_avg_sq", "state2", "absmax2", None)]),
}  # fmt: skip


def _bnb_pair(name, shape=(300, 70)):
    bnb = _bnb()
    bcls, kw, fcls, extra, keys = BNB[name]
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(25)]
    pb, pf = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ob = getattr(bnb.optim, bcls)([pb], min_8bit_size=SMALL, **kw)
    of = fcls([{"params": [pf], "min_8bit_size": SMALL}], state_bits=8, fused=True, **kw, **extra)
    return p0, grads, (pb, ob), (pf, of), keys


def _theirs(state, bkey, akey, index):
    codes, absmax = state[bkey], state[akey]
    return (codes, absmax) if index is None else (codes[index], absmax[index])


@pytest.mark.parametrize("name", list(BNB))
def test_each_step_is_bitsandbytes(name):
    """From the same params and 8-bit state, one step of fuseopt and of bitsandbytes: the codes
    equal but for bitsandbytes' own rounding (its CPU quantizer picks the farther neighbour for
    ~0.15% of elements, and more of the tiny first second moments), the params within float32
    rounding. Resynchronised after each step, so that 25 steps test 25 states."""
    _, grads, (pb, ob), (pf, of), keys = _bnb_pair(name)
    for i, g in enumerate(grads):
        pb.grad, pf.grad = g.clone(), g.clone()
        ob.step()
        of.step()
        torch.testing.assert_close(pf.detach(), pb.detach(), rtol=0, atol=1e-6)
        for ours, bkey, akey, index in keys:
            codes, absmax = _theirs(ob.state[pb], bkey, akey, index)
            mine = of.state[pf][ours]
            equal = (mine == codes).double().mean()
            assert equal >= (0.97 if i < 3 else 0.995), (ours, i, float(equal))
            assert (mine.int() - codes.int()).abs().max() <= (8 if i == 0 else 4)
            torch.testing.assert_close(
                of.state[pf][_quant.absmax_key(ours)], absmax, rtol=1e-6, atol=0
            )
            signed = ours != "exp_avg_sq"
            # dequantized: as close as the codes (a differing code is a neighbour's value)
            a = _quant.dequantize(mine, absmax, signed)
            b = _quant.dequantize(codes, absmax, signed)
            assert (a - b).norm() <= 0.02 * b.norm()
        with torch.no_grad():  # resynchronise with bitsandbytes
            pf.copy_(pb)
            for ours, bkey, akey, index in keys:
                codes, absmax = _theirs(ob.state[pb], bkey, akey, index)
                of.state[pf][ours].copy_(codes)
                of.state[pf][_quant.absmax_key(ours)].copy_(absmax)


@pytest.mark.parametrize("name", list(BNB))
def test_trajectory_converges_as_bitsandbytes(name):
    """25 free steps (mean absolute distances of the params): fuseopt's 8-bit run is as far from
    the float32 optimizer's as bitsandbytes' is (within 10%), and much nearer to bitsandbytes'
    than either is to float32 (under a tenth; measured: 1/30 to 1/50), so the two 8-bit methods
    are one method, their own roundings apart."""
    p0, grads, (pb, ob), (pf, of), _ = _bnb_pair(name)
    bcls, kw, fcls, extra, _ = BNB[name]
    p32 = torch.nn.Parameter(p0.clone())
    o32 = fcls([p32], **kw, **extra)
    for g in grads:
        for p in (pb, pf, p32):
            p.grad = g.clone()
        ob.step()
        of.step()
        o32.step()
    ours, theirs = (pf - p32).abs().mean(), (pb - p32).abs().mean()
    between = (pf - pb).abs().mean()
    assert ours <= 1.1 * theirs, (float(ours), float(theirs))
    assert between <= 0.1 * theirs, (float(between), float(theirs))


# ------------------------------------------------------------------------------ layout faults
_LAYOUT_MAKES = {
    "state_bits": "fuseopt.AdamW([{'params': ps, 'min_8bit_size': 0}], lr=0.1, "
    "max_grad_norm=1.0, state_bits=8, **impl)",
    "state_dtype": "fuseopt.AdamW(ps, lr=0.1, max_grad_norm=1.0, state_dtype=torch.bfloat16, "
    "**impl)",
}


@pytest.mark.parametrize("fmt", list(_LAYOUT_MAKES))
@pytest.mark.parametrize("fault", ["grad_with_gaps", "grad_transposed", "grad_broadcast",
                                   "param_storage_shrunk", "state_resized", "grad_other_dtype"])  # fmt: skip
def test_storage_formats_under_layout_faults(fault, fmt):
    """tests/layout_faults.py through the clipping pass of a storage-format group: never a
    crash, always foreach's outcome (its numbers, or its error with nothing changed)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import layout_faults

    assert fault in layout_faults.FAULTS
    layout_faults.check(fault, _LAYOUT_MAKES[fmt], "exp_avg")


def _trained(impl, extra, grads):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n).bfloat16()) for n in (1000, 70_000, 50)]
    opt = fuseopt.AdamW(
        [{"params": ps, "min_8bit_size": SMALL}], lr=1e-2, state_bits=8, **impl, **extra
    )
    for step in grads:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
    return ps, opt


@pytest.mark.parametrize(
    "extra",
    [dict(kahan_sum=True), dict(stochastic_rounding=True), dict(kahan_sum=True,
                                                                state_dtype=torch.float32)],
    ids=["kahan", "sr", "kahan+f32"],
)  # fmt: skip
def test_with_param_storage_options(extra):
    """bfloat16 params with Kahan summation or stochastic rounding and 8-bit states (the
    kernel's compensation operand sits before the scales): the 8-bit states of every
    implementation are the for-loop's (codes >= 99.9% equal, all within one; scales rtol 1e-6:
    AdamW's moments do not read the params), the params within bfloat16 rounding (stochastic
    rounding draws other random bits in the kernel than in the for-loop)."""
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(n, generator=gen).bfloat16() for n in (1000, 70_000, 50)]
             for _ in range(5)]  # fmt: skip
    ps, oracle = _trained(dict(foreach=False), extra, grads)
    for impl in (dict(fused=True), dict(foreach=True)):
        qs, opt = _trained(impl, extra, grads)
        assert_bfloat16_close(qs, ps, share=0.99, worst=2**-3)
        for p, q in zip(ps[:2], qs[:2]):
            for k, v in oracle.state[p].items():
                if v.dtype == torch.uint8:
                    d = (opt.state[q][k].int() - v.int()).abs()
                    assert (d == 0).double().mean() >= 0.999 and int(d.max()) <= 1, k
                elif k.endswith("_absmax"):
                    torch.testing.assert_close(opt.state[q][k], v, rtol=1e-6, atol=0)


def test_nonfinite_blocks():
    """A NaN and an inf in the grads: their blocks' scales become NaN, their codes are the
    spec's (_quant.quantize: a NaN scaled value takes code 0) on every path."""
    out = []
    for impl in (dict(fused=True), dict(foreach=True), dict(foreach=False)):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1000, generator=gen))
        opt = fuseopt.Adam([{"params": [p], "min_8bit_size": SMALL}], state_bits=8, **impl)
        for step in range(3):
            g = torch.randn(1000, generator=gen)
            if step == 1:
                g[5], g[600] = float("nan"), float("inf")
            p.grad = g
            opt.step()
        out.append(opt.state[p])
    for state in out:
        assert state["exp_avg_absmax"].isnan().tolist() == [True, False, True, False]
        for k, v in out[-1].items():
            assert torch.equal(state[k].nan_to_num(7.0), v.nan_to_num(7.0)), k


@pytest.mark.parametrize("name", list(ALGOS))
def test_triton_kernel_equals_the_forloop(name, monkeypatch):
    """The Triton kernel (its interpreter on CPU) reads and writes 8-bit states itself, a
    quantization block per vector step: its states are the for-loop's (codes >= 99.9% equal and
    within one, scales rtol 1e-6), params rtol 1e-5, with a NaN and an inf in one step's grads
    (their blocks' scales NaN on both)."""
    pytest.importorskip("triton")
    from fuseopt.kernels import triton_gpu

    cls, kw = ALGOS[name]
    seen = []
    real = triton_gpu.run
    monkeypatch.setattr(triton_gpu, "run", lambda launch: (seen.append(launch.quant), real(launch)))
    out = []
    for impl, backend in ((dict(fused=True), "triton"), (dict(foreach=False), "")):
        monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", backend)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((1000,), (30, 20), (9,))]
        opt = cls([{"params": ps, "min_8bit_size": SMALL}], state_bits=8, **impl, **kw)
        for step in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            if step == 2:
                ps[0].grad[5], ps[1].grad[3, 4] = float("nan"), float("inf")
            opt.step()
        out.append((ps, opt))
    # one launch a step holds the two 8-bit params (the small one's states are full precision)
    assert sum(1 for quant in seen if quant) == 4
    (ps, opt), (rps, ropt) = out
    for p, rp in zip(ps, rps):
        torch.testing.assert_close(p, rp, rtol=1e-5, atol=1e-6, equal_nan=True)
        for k, v in opt.state[p].items():
            r = ropt.state[rp][k]
            if v.dtype == torch.uint8:
                d = (v.int() - r.int()).abs()
                assert (d == 0).double().mean() >= 0.999 and int(d.max()) <= 1, k
            elif torch.is_tensor(v) and v.is_floating_point():
                torch.testing.assert_close(v, r, rtol=1e-6, atol=1e-12, equal_nan=True)
