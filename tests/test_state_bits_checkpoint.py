"""Checkpoints of 8-bit states (``state_bits=8``): fuseopt._quant_io, through ``state_dict`` and
``load_state_dict`` (by position and by name) and DCP's ``get_optimizer_state_dict``.

The default form is torch's layout, each 8-bit state dequantized (the oracle: ``_quant.dequantize``
of the codes and scales held, compared exactly) and loaded by ``torch.optim`` (its continued run
is compared bitwise with torch's run continued from the same numbers, and with fuseopt's
full-precision for-loop). The compact form holds the codes and scales: a load gives back the
state bit for bit, and a continued run equals the run never interrupted, bit for bit. Most tests
build their 8-bit states by hand from a few float32 steps (the stored format, independent of the
8-bit step); the round trips of a trained run use the 8-bit step itself.
"""

from __future__ import annotations

import copy
import io
import re
import warnings
from dataclasses import dataclass, field

import pytest
import torch

import fuseopt
from fuseopt import _quant, _storage

SHAPES = {"w": (70, 70), "v": (80, 64), "b": (70,)}  # 4900 (a partial last block), 5120, small
BIG = ("w", "v")
STEPS = 3


@dataclass
class Row:
    name: str
    cls: type
    kwargs: dict
    torch_cls: type | None  # torch.optim's class where torch has the algorithm
    states: dict[str, bool] = field(default_factory=dict)  # the 8-bit states: signed


ROWS = [
    Row("Adam", fuseopt.Adam, dict(lr=1e-2), torch.optim.Adam,
        {"exp_avg": True, "exp_avg_sq": False}),
    Row("AdamW", fuseopt.AdamW, dict(lr=1e-2, amsgrad=True), torch.optim.AdamW,
        {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}),
    Row("SGD", fuseopt.SGD, dict(lr=0.1, momentum=0.9), torch.optim.SGD,
        {"momentum_buffer": True}),
    Row("Lion", fuseopt.Lion, dict(lr=1e-3), None, {"exp_avg": True}),
    Row("AdEMAMix", fuseopt.AdEMAMix, dict(lr=1e-2), None,
        {"exp_avg": True, "exp_avg_sq": False, "exp_avg_slow": True}),
]  # fmt: skip
BY_ROW = {r.name: r for r in ROWS}
TORCH_ROWS = [r for r in ROWS if r.torch_cls is not None]


def named_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for n, s in SHAPES.items()
    }


def set_grads(params: dict, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params.values():
        p.grad = (torch.randn(p.shape, generator=gen) * 0.5).to(p.dtype)


def train(opt, params: dict, steps) -> None:
    for i in steps:
        set_grads(params, i)
        opt.step()


def by_hand(row: Row, dtype=torch.float32, seed=0, **extra):
    """A named optimizer of ``row`` with 8-bit states made by hand: a few float32 steps, then
    the group given ``state_bits=8`` and each state ``_quant.quantized`` names quantized."""
    params = named_params(dtype, seed)
    opt = row.cls(list(params.items()), **row.kwargs, foreach=False, **extra)
    train(opt, params, range(STEPS))
    group = opt.param_groups[0]
    group["state_bits"] = 8
    for p in params.values():
        which = _quant.quantized(opt.rule, group, p)
        for name, signed in which.items():
            codes, absmax = _quant.quantize(opt.state[p][name], signed)
            opt.state[p][name], opt.state[p][_quant.absmax_key(name)] = codes, absmax
    return opt, params


def eight_bit(row: Row, **extra):
    """An optimizer of ``row`` with ``state_bits=8`` over fresh params (named), not stepped."""
    params = named_params()
    return row.cls(list(params.items()), **row.kwargs, state_bits=8, **extra), params


def as_8bit(opt, min_8bit_size=None):
    """``opt``'s groups given ``state_bits=8`` (and ``min_8bit_size``) by hand, as the
    constructor's arguments give them: the load's side needs no 8-bit step."""
    for group in opt.param_groups:
        group["state_bits"] = 8
        if min_8bit_size is not None:
            group["min_8bit_size"] = min_8bit_size
    return opt


def fresh_8bit(row: Row, min_8bit_size=None):
    """A fresh optimizer of ``row`` made 8-bit by hand (:func:`as_8bit`), and its params."""
    params = named_params()
    return as_8bit(row.cls(list(params.items()), **row.kwargs), min_8bit_size), params


def dequantized(opt, p) -> dict:
    """The oracle of the default form: each 8-bit state of ``p`` dequantized, the rest as held."""
    state, out = opt.state[p], {}
    signed = {s.name: s.signed for s in opt.rule.state if s.signed is not None}
    for k, v in state.items():
        if k.endswith("_absmax"):
            continue
        if _quant.absmax_key(k) in state:
            out[k] = _quant.dequantize(v, state[_quant.absmax_key(k)], signed[k])
        else:
            out[k] = v
    return out


def snapshot(opt):
    """The state (by param) and the groups' options of ``opt``, copied."""
    state = {p: copy.deepcopy(s) for p, s in opt.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, copy.deepcopy(groups)


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def assert_unchanged(opt, before) -> None:
    state, groups = before
    assert list(opt.state) == list(state)
    for p, s in state.items():
        assert_same_state(opt.state[p], s)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


# ------------------------------------------------------------------------ the default form
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_default_form_is_torch_layout_dequantized(row):
    opt, params = by_hand(row)
    held = {n: dict(opt.state[p]) for n, p in params.items()}
    sd = opt.state_dict()
    for i, (n, p) in enumerate(params.items()):
        saved = sd["state"][i]
        assert not any(k.endswith("_absmax") for k in saved)
        if n in BIG:
            assert set(row.states) <= set(saved)
            assert_same_state(saved, dequantized(opt, p))  # exactly the held codes' values
            for k in row.states:
                assert saved[k].dtype == torch.float32 and saved[k].shape == p.shape
        else:  # under min_8bit_size: full precision, as held
            assert_same_state(saved, held[n])
    assert sd["param_groups"][0]["state_bits"] == 8
    for n, p in params.items():  # the optimizer's own state is untouched
        assert_same_state(opt.state[p], held[n])
    assert opt.state[params["w"]][next(iter(row.states))].dtype == torch.uint8


@pytest.mark.parametrize(
    "param_dtype, state_dtype, saved_dtype",
    [
        (torch.bfloat16, None, torch.bfloat16),  # the param's, as torch would hold
        (torch.bfloat16, torch.float32, torch.float32),  # the group's state_dtype
        (torch.float32, torch.bfloat16, torch.bfloat16),
    ],
)
def test_default_form_dtype_is_that_of_full_precision_states(param_dtype, state_dtype, saved_dtype):
    extra = {} if state_dtype is None else dict(state_dtype=state_dtype)
    opt, params = by_hand(BY_ROW["Adam"], dtype=param_dtype, **extra)
    saved = opt.state_dict()["state"][0]
    want = dequantized(opt, params["w"])
    for k in ("exp_avg", "exp_avg_sq"):
        assert saved[k].dtype == saved_dtype
        assert torch.equal(saved[k], want[k].to(saved_dtype))


@pytest.mark.parametrize("row", TORCH_ROWS, ids=lambda r: r.name)
def test_torch_loads_the_default_form_and_continues(row):
    opt, params = by_hand(row)
    sd = copy.deepcopy(opt.state_dict())
    # the reference: torch continued from the dequantized numbers, built from the codes here
    ref_sd = copy.deepcopy(sd)
    for i, p in enumerate(params.values()):
        ref_sd["state"][i] = copy.deepcopy(dequantized(opt, p))

    def continued(cls, state_dict):
        ps = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
        o = cls(list(ps.values()), **row.kwargs, foreach=False)
        o.load_state_dict(copy.deepcopy(state_dict))
        train(o, ps, range(STEPS, STEPS + 4))
        return ps, o

    theirs, theirs_opt = continued(row.torch_cls, sd)
    ref, _ = continued(row.torch_cls, ref_sd)
    plain_sd = copy.deepcopy(sd)
    del plain_sd["param_groups"][0]["state_bits"]
    ours, ours_opt = continued(row.cls, plain_sd)  # fuseopt in full precision: torch's numbers
    for n in params:
        assert torch.equal(theirs[n], ref[n]), n
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-6, atol=1e-6)
        for k, v in theirs_opt.state[theirs[n]].items():
            torch.testing.assert_close(ours_opt.state[ours[n]][k], v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_full_precision_optimizer_loads_the_default_form(row):
    # Lion and AdEMAMix, which torch lacks: fuseopt without state_bits takes the numbers
    opt, params = by_hand(row)
    sd = opt.state_dict()
    del sd["param_groups"][0]["state_bits"]
    plain = row.cls(list(named_params().items()), **row.kwargs)
    plain.load_state_dict(copy.deepcopy(sd))
    for p, q in zip(params.values(), plain.param_groups[0]["params"]):
        assert_same_state(plain.state[q], dequantized(opt, p))


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_default_form_requantizes_within_one_step(row):
    opt, params = by_hand(row)
    fresh, fresh_params = fresh_8bit(row)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    moved = 0
    for p, q in zip(params.values(), fresh_params.values()):
        a, b = opt.state[p], fresh.state[q]
        assert set(b) == set(a)
        for k in row.states:
            if k not in a or _quant.absmax_key(k) not in a:
                continue
            assert b[k].dtype == torch.uint8 and b[_quant.absmax_key(k)].dtype == torch.float32
            diff = (b[k].int() - a[k].int()).abs()
            assert int(diff.max()) <= 1, k
            moved += int((diff > 0).sum())
            # a block keeps its scale where its largest magnitude was positive; one whose
            # largest was negative shrinks it by the signed map's -0.99296875
            ratio = b[_quant.absmax_key(k)] / a[_quant.absmax_key(k)]
            assert bool(((ratio > 0.99296) & (ratio <= 1)).all()), k
    assert moved > 0 or all(not s for s in row.states.values())


def test_the_largest_negative_value_is_why_the_default_form_is_not_exact():
    x = torch.full((256,), 0.25)
    x[7] = -1.0
    codes, absmax = _quant.quantize(x, True)
    back = _quant.dequantize(codes, absmax, True)
    assert float(back[7]) == pytest.approx(-0.99296875, rel=1e-6)
    codes2, absmax2 = _quant.quantize(back, True)
    assert float(absmax2[0]) == pytest.approx(0.99296875, rel=1e-6)  # the block's new scale
    assert int((codes2.int() - codes.int()).abs().max()) <= 1


# ------------------------------------------------------------------------- the compact form
def held(saved: dict) -> dict:
    """A compact param state as the optimizer holds it: codes under their state's key."""
    return {k.removesuffix("_codes"): v for k, v in saved.items()}


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_compact_form_round_trips_exactly(row):
    """The codes under ``<name>_codes`` (no ``<name>``: torch.optim would cast the codes to
    floats and step on them), the scales under ``<name>_absmax``; a load gives back exactly
    the state, and so does one of the first compact layout (the codes under ``<name>``)."""
    opt, params = by_hand(row)
    sd = opt.state_dict(compact=True)
    for i, (n, p) in enumerate(params.items()):
        assert_same_state(held(sd["state"][i]), opt.state[p])
        assert any(k.endswith("_absmax") for k in sd["state"][i]) == (n in BIG)
        assert any(k.endswith("_codes") for k in sd["state"][i]) == (n in BIG)
        assert not any(v.dtype == torch.uint8 for k, v in sd["state"][i].items()
                       if not k.endswith("_codes"))  # fmt: skip
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    fresh, fresh_params = fresh_8bit(row)
    fresh.load_state_dict(torch.load(buffer))
    for p, q in zip(params.values(), fresh_params.values()):
        assert_same_state(fresh.state[q], opt.state[p])
    assert fresh.param_groups[0]["state_bits"] == 8
    first_layout = {**sd, "state": {i: held(v) for i, v in sd["state"].items()}}
    again, again_params = fresh_8bit(row)
    again.load_state_dict(copy.deepcopy(first_layout))
    for p, q in zip(params.values(), again_params.values()):
        assert_same_state(again.state[q], opt.state[p])


def test_torch_refuses_to_step_from_a_compact_checkpoint():
    """torch.optim loads any state dict; from a compact one its step finds no ``exp_avg`` and
    raises, instead of taking the cast codes for moments."""
    opt, params = by_hand(BY_ROW["AdamW"])
    theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params.values()])
    theirs.load_state_dict(copy.deepcopy(opt.state_dict(compact=True)))
    for p in theirs.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(KeyError, match="exp_avg"):
        theirs.step()


@pytest.mark.parametrize("impl", [dict(foreach=False), dict(fused=True)], ids=["forloop", "fused"])
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_compact_form_continues_as_the_run_never_interrupted(row, impl):
    opt, params = eight_bit(row, **impl)
    train(opt, params, range(STEPS))
    sd = copy.deepcopy(opt.state_dict(compact=True))
    train(opt, params, range(STEPS, 2 * STEPS))  # uninterrupted

    again = {n: torch.nn.Parameter(p.detach().clone()) for n, p in named_params().items()}
    fresh = row.cls(list(again.items()), **row.kwargs, state_bits=8, **impl)
    train(fresh, again, range(STEPS))  # the same params as at the save
    resumed_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in again.items()}
    resumed = row.cls(list(resumed_params.items()), **row.kwargs, state_bits=8, **impl)
    resumed.load_state_dict(sd)
    train(resumed, resumed_params, range(STEPS, 2 * STEPS))
    for n, p in params.items():
        assert torch.equal(resumed_params[n], p), n
        assert_same_state(resumed.state[resumed_params[n]], opt.state[p])


@pytest.mark.parametrize("row", TORCH_ROWS, ids=lambda r: r.name)
def test_torch_continues_from_a_trained_8bit_optimizer(row):
    opt, params = eight_bit(row, foreach=False)
    train(opt, params, range(STEPS))
    assert opt.state[params["w"]][next(iter(row.states))].dtype == torch.uint8
    sd = copy.deepcopy(opt.state_dict())
    ps = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    theirs = row.torch_cls(list(ps.values()), **row.kwargs, foreach=False)
    theirs.load_state_dict(copy.deepcopy(sd))
    for p, q in zip(params.values(), ps.values()):
        for k, v in dequantized(opt, p).items():
            assert torch.equal(theirs.state[q][k], v), k
    train(theirs, ps, range(STEPS, STEPS + 2))
    # fuseopt in full precision continues from the same numbers as torch
    del sd["param_groups"][0]["state_bits"]
    ours_ps = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    ours = row.cls(list(ours_ps.values()), **row.kwargs, foreach=False)
    ours.load_state_dict(sd)
    train(ours, ours_ps, range(STEPS, STEPS + 2))
    for n in params:
        torch.testing.assert_close(ours_ps[n], ps[n], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- loading converts
@pytest.mark.parametrize("row", TORCH_ROWS, ids=lambda r: r.name)
def test_torch_checkpoint_is_quantized_and_the_format_kept(row):
    if "state_bits" not in _storage.OPTIONS:
        pytest.skip("_storage.OPTIONS does not carry state_bits yet")
    params = named_params()
    theirs = row.torch_cls(list(params.values()), **row.kwargs)
    train(theirs, params, range(STEPS))
    sd = theirs.state_dict()
    assert "state_bits" not in sd["param_groups"][0]
    ours, our_params = fresh_8bit(row)
    ours.load_state_dict(copy.deepcopy(sd))
    assert ours.param_groups[0]["state_bits"] == 8  # ours, kept: a torch checkpoint has none
    for (n, p), q in zip(params.items(), our_params.values()):
        state = ours.state[q]
        for k, signed in row.states.items():
            if n in BIG:
                codes, absmax = _quant.quantize(theirs.state[p][k], signed)
                assert torch.equal(state[k], codes) and torch.equal(
                    state[_quant.absmax_key(k)], absmax
                )
            else:
                assert torch.equal(state[k], theirs.state[p][k])
                assert _quant.absmax_key(k) not in state


def test_min_8bit_size_of_ours_is_carried_too():
    if "min_8bit_size" not in _storage.OPTIONS:
        pytest.skip("_storage.OPTIONS does not carry min_8bit_size yet")
    params = named_params()
    theirs = torch.optim.Adam(list(params.values()), lr=1e-2)
    train(theirs, params, range(STEPS))
    ours, our_params = fresh_8bit(BY_ROW["Adam"], min_8bit_size=64)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert ours.param_groups[0]["min_8bit_size"] == 64
    assert ours.state[our_params["b"]]["exp_avg"].dtype == torch.uint8  # 70 >= 64


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_compact_form_into_full_precision_is_dequantized(row):
    opt, params = by_hand(row)
    sd = opt.state_dict(compact=True)
    del sd["param_groups"][0]["state_bits"]  # a group that keeps full precision
    plain_params = named_params()
    plain = row.cls(list(plain_params.items()), **row.kwargs)
    plain.load_state_dict(copy.deepcopy(sd))
    for p, q in zip(params.values(), plain_params.values()):
        assert_same_state(plain.state[q], dequantized(opt, p))
    # bfloat16 params: dequantized, then torch's cast to the param's dtype (or kept float32)
    bf = {n: p.detach().bfloat16().requires_grad_() for n, p in params.items()}
    for keep, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        plain = row.cls(list(bf.items()), **row.kwargs)
        plain.load_state_dict(copy.deepcopy(sd), keep_state_dtype=keep)
        want = dequantized(opt, params["w"])
        for k in row.states:
            if k in want:
                assert plain.state[bf["w"]][k].dtype == dtype
                assert torch.equal(plain.state[bf["w"]][k], want[k].to(dtype))


def test_compact_form_of_a_param_under_min_8bit_size_is_dequantized():
    opt, params = by_hand(BY_ROW["Adam"])
    sd = opt.state_dict(compact=True)
    sd["param_groups"][0]["min_8bit_size"] = 5000  # w (4900) now under it, v (5120) not
    fresh, fresh_params = fresh_8bit(BY_ROW["Adam"])
    fresh.load_state_dict(copy.deepcopy(sd))
    w, v = fresh.state[fresh_params["w"]], fresh.state[fresh_params["v"]]
    assert_same_state(w, dequantized(opt, params["w"]))
    assert_same_state(v, opt.state[params["v"]])


def test_keep_state_dtype_keeps_full_precision_states_and_8bit_ones_stay_8bit():
    # bfloat16 states of an optimizer with state_dtype (no 8-bit) into an 8-bit one
    params = named_params()
    bf = fuseopt.Adam(list(params.items()), lr=1e-2, state_dtype=torch.bfloat16)
    train(bf, params, range(STEPS))
    sd = bf.state_dict()
    del sd["param_groups"][0]["state_dtype"]
    sd["param_groups"][0]["state_bits"] = 8
    fresh, fresh_params = fresh_8bit(BY_ROW["Adam"])
    fresh.load_state_dict(copy.deepcopy(sd), keep_state_dtype=True)
    w, b = fresh.state[fresh_params["w"]], fresh.state[fresh_params["b"]]
    assert w["exp_avg"].dtype == torch.uint8  # the group's 8-bit format
    codes, _ = _quant.quantize(bf.state[params["w"]]["exp_avg"].float(), True)
    assert torch.equal(w["exp_avg"], codes)
    assert b["exp_avg"].dtype == torch.bfloat16  # kept, as without state_bits


# ---------------------------------------------------------------------------------- errors
def _bad(name: str):
    """A compact state dict of Adam with one fault, and the error it must give."""

    def edit(state):
        codes, absmax = state["exp_avg_codes"], state["exp_avg_absmax"]
        if name == "codes shape":
            state["exp_avg_codes"] = codes.reshape(-1)
        elif name == "codes dtype":
            state["exp_avg_codes"] = codes.to(torch.int16)
        elif name == "absmax dtype":
            state["exp_avg_absmax"] = absmax.half()
        elif name == "absmax blocks":
            state["exp_avg_absmax"] = absmax[:-1]
        elif name == "absmax 2-d":
            state["exp_avg_absmax"] = absmax[:, None]
        elif name == "absmax without codes":
            del state["exp_avg_codes"]
        elif name == "codes without absmax":
            del state["exp_avg_absmax"]
        elif name == "codes twice":
            state["exp_avg"] = codes.clone()
        elif name == "full state shape":
            del state["exp_avg_absmax"], state["exp_avg_codes"]
            state["exp_avg"] = torch.zeros(7)

    match = {
        "codes shape": r"'exp_avg_codes' \(torch.uint8 of shape \(4900,\); 8-bit codes are uint8 "
        r"in the param's shape\)",
        "codes dtype": r"'exp_avg_codes' \(torch.int16 of shape \(70, 70\); 8-bit codes are uint8",
        "absmax dtype": r"'exp_avg_absmax' \(torch.float16 of shape \(20,\); 8-bit scales are "
        r"float32 of shape \(20,\), one per block of 256 of the param's 4900 elements\)",
        "absmax blocks": r"'exp_avg_absmax' \(torch.float32 of shape \(19,\); 8-bit scales",
        "absmax 2-d": r"'exp_avg_absmax' \(torch.float32 of shape \(20, 1\); 8-bit scales",
        "absmax without codes": r"'exp_avg_absmax' \(8-bit scales without their codes "
        r"'exp_avg_codes'\)",
        "codes without absmax": r"'exp_avg_codes' \(uint8: 8-bit codes without their scales "
        r"'exp_avg_absmax'\)",
        "codes twice": r"'exp_avg_codes' and 'exp_avg' \(8-bit codes beside another value of "
        r"the same state\)",
        "full state shape": r"'exp_avg' \(torch.float32 of shape \(7,\)\) cannot be quantized",
    }[name]
    return edit, match


FAULTS = [
    "codes shape", "codes dtype", "absmax dtype", "absmax blocks", "absmax 2-d",
    "absmax without codes", "codes without absmax", "codes twice", "full state shape",
]  # fmt: skip


@pytest.mark.parametrize("fault", FAULTS)
def test_bad_codes_or_scales_raise_and_change_nothing(fault):
    opt, _ = by_hand(BY_ROW["Adam"])
    sd = copy.deepcopy(opt.state_dict(compact=True))
    edit, match = _bad(fault)
    edit(sd["state"][0])
    target, _ = by_hand(BY_ROW["Adam"], seed=1)
    target.param_groups[0]["lr"] = 0.5
    before = snapshot(target)
    prefix = r"loaded state dict: the state of param 0: the saved "
    with pytest.raises(ValueError, match=prefix + match):
        target.load_state_dict(sd)
    assert_unchanged(target, before)

    # by name: a strict load names it and changes nothing; a lax one leaves that param fresh
    # (a float state of the wrong shape is the shape mismatch the load by name reports already)
    with pytest.raises(RuntimeError, match=r"Shape mismatch for 'w'") as info:
        target.load_state_dict(sd, by_name=True)
    if fault != "full state shape":  # (that one is the shape mismatch of any state)
        assert re.search(r"Shape mismatch for 'w': the saved " + match, str(info.value))
    assert_unchanged(target, before)
    missing, unexpected = target.load_state_dict(sd, by_name=True, strict=False)
    assert missing == ["w"] and unexpected == ["w"]
    assert target.param_groups[0]["params"][0] not in target.state


# ----------------------------------------------------------------------------- by name, DCP
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_by_name_loads_both_forms(row):
    opt, params = by_hand(row)
    # our params in another order, in two groups: the saved group is split (options ours)
    order = ["b", "v", "w"]
    fresh_params = named_params()

    def groups():
        return [
            {"params": [(n, fresh_params[n]) for n in order[:1]]},
            {"params": [(n, fresh_params[n]) for n in order[1:]]},
        ]

    compact = as_8bit(row.cls(groups(), **row.kwargs))
    assert compact.load_state_dict(copy.deepcopy(opt.state_dict(compact=True)), by_name=True) == (
        [],
        [],
    )
    for n in order:
        assert_same_state(compact.state[fresh_params[n]], opt.state[params[n]])

    default = as_8bit(row.cls(groups(), **row.kwargs))
    default.load_state_dict(copy.deepcopy(opt.state_dict()), by_name=True)
    for n in BIG:
        for k in row.states:
            if _quant.absmax_key(k) in opt.state[params[n]]:
                got, held = default.state[fresh_params[n]][k], opt.state[params[n]][k]
                assert got.dtype == torch.uint8
                assert int((got.int() - held.int()).abs().max()) <= 1

    # into groups without state_bits (split: our own options kept): dequantized
    plain = row.cls(groups(), **row.kwargs)
    plain.load_state_dict(copy.deepcopy(opt.state_dict(compact=True)), by_name=True)
    for n in order:
        assert_same_state(plain.state[fresh_params[n]], dequantized(opt, params[n]))


@pytest.mark.parametrize("storage", ["state_bits", "state_dtype"])
def test_by_name_keeps_our_storage_format_for_a_torch_checkpoint(storage):
    # as the positional load: a saved group without the option takes ours (the groups
    # correspond one to one, so the saved options are taken)
    params = named_params()
    theirs = torch.optim.Adam(list(params.items()), lr=1e-2)
    train(theirs, params, range(STEPS))
    fresh_params = named_params()
    ours = fuseopt.Adam(list(fresh_params.items()), lr=0.5)
    if storage == "state_bits":
        as_8bit(ours)
    else:
        ours.param_groups[0]["state_dtype"] = torch.bfloat16
    assert ours.load_state_dict(copy.deepcopy(theirs.state_dict()), by_name=True) == ([], [])
    group = ours.param_groups[0]
    assert group["lr"] == 1e-2  # the saved options, with our storage format
    w, p = ours.state[fresh_params["w"]], theirs.state[params["w"]]
    if storage == "state_bits":
        assert group["state_bits"] == 8
        codes, absmax = _quant.quantize(p["exp_avg_sq"], False)
        assert torch.equal(w["exp_avg_sq"], codes) and torch.equal(w["exp_avg_sq_absmax"], absmax)
    else:
        assert group["state_dtype"] is torch.bfloat16
        assert torch.equal(w["exp_avg_sq"], p["exp_avg_sq"].bfloat16())


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_dcp_get_optimizer_state_dict_of_an_8bit_optimizer(flatten):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    row = BY_ROW["AdamW"]
    model = torch.nn.Sequential(torch.nn.Linear(70, 70), torch.nn.Linear(70, 64, bias=False))
    opt = row.cls(model.named_parameters(), **row.kwargs, foreach=False)
    for _ in range(STEPS):
        model(torch.randn(4, 70)).square().mean().backward()
        opt.step()
    group = opt.param_groups[0]
    group["state_bits"] = 8
    for p in model.parameters():  # quantized by hand, as by_hand does
        for name, signed in _quant.quantized(opt.rule, group, p).items():
            codes, absmax = _quant.quantize(opt.state[p][name], signed)
            opt.state[p][name], opt.state[p][_quant.absmax_key(name)] = codes, absmax
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_sd = copy.deepcopy(
            get_optimizer_state_dict(
                model, opt, options=StateDictOptions(flatten_optimizer_state_dict=flatten)
            )
        )
    weight = model[0].weight
    if flatten:
        assert torch.equal(dcp_sd["state.0.weight.exp_avg"], dequantized(opt, weight)["exp_avg"])
        assert not any(k.endswith("_absmax") for k in dcp_sd)
    else:
        assert_same_state(dcp_sd["state"]["0.weight"], dequantized(opt, weight))
    fresh_model = copy.deepcopy(model)
    fresh = as_8bit(row.cls(fresh_model.named_parameters(), **row.kwargs))
    assert fresh.load_state_dict(dcp_sd, by_name=True) == ([], [])
    got, held = fresh.state[fresh_model[0].weight], opt.state[weight]
    assert got["exp_avg"].dtype == torch.uint8
    assert int((got["exp_avg"].int() - held["exp_avg"].int()).abs().max()) <= 1
    assert torch.equal(
        fresh.state[fresh_model[0].bias]["exp_avg"], opt.state[model[0].bias]["exp_avg"]
    )

    if not flatten:  # DCP's own load (by position, after mapping the names): quantized too
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        other_model = copy.deepcopy(model)
        other = as_8bit(row.cls(other_model.named_parameters(), **row.kwargs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_optimizer_state_dict(other_model, other, copy.deepcopy(dcp_sd))
        got = other.state[other_model[0].weight]
        assert got["exp_avg"].dtype == torch.uint8
        assert int((got["exp_avg"].int() - held["exp_avg"].int()).abs().max()) <= 1
