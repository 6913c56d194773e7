"""Loading an optimizer state by param names: ``load_state_dict(sd, by_name=True, strict=...)``.

The reference is an uninterrupted run: a run saved, reloaded by name into a model whose modules
were reordered (or regrouped) and continued must end with the same params, bit for bit. Numeric
comparisons with torch.optim use ``foreach=False`` on both sides (fuseopt then runs torch's
for-loop math) and are bitwise too.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fuseopt
from fuseopt._by_name import IncompatibleKeys

LR, WD = 0.01, 0.1


class Net(nn.Module):
    """Two same-shaped blocks ``a`` and ``b`` (a linear layer and a norm) between an input and
    an output layer; ``order`` is the order the modules are registered in (that of
    ``named_parameters()``), ``extra`` adds an adapter, ``width`` is the hidden width."""

    def __init__(self, order=("inp", "a", "b", "out"), extra=False, width=4, dtype=None):
        super().__init__()

        def block():
            return nn.Sequential(
                nn.Linear(width, width, dtype=dtype), nn.LayerNorm(width, dtype=dtype)
            )

        make = {
            "inp": lambda: nn.Linear(3, width, dtype=dtype),
            "a": block,
            "b": block,
            "out": lambda: nn.Linear(width, 2, dtype=dtype),
        }
        for name in order:
            setattr(self, name, make[name]())
        if extra:
            self.adapter = nn.Linear(width, width, dtype=dtype)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.a(h))
        h = torch.tanh(self.b(h))
        if hasattr(self, "adapter"):
            h = h + self.adapter(h)
        return self.out(h)


def train(model, opt, steps) -> None:
    """Steps ``steps`` (a range): the batch of step i is the same in every run."""
    dtype = next(model.parameters()).dtype
    for i in steps:
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(i), dtype=dtype)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def reference_run(opt_class=fuseopt.AdamW, groups=None, **kwargs):
    """A model trained 5 steps, its saved model and optimizer states, then 5 more steps."""
    torch.manual_seed(0)
    model = Net()
    opt = opt_class(groups(model) if groups else model.named_parameters(), **kwargs)
    train(model, opt, range(5))
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, range(5, 10))
    return model, opt, saved


def rebuilt(model_state, **net_kwargs) -> Net:
    model = Net(**net_kwargs)
    model.load_state_dict(model_state, strict=False)
    return model


def assert_same_params(ref: nn.Module, other: nn.Module) -> None:
    theirs = dict(other.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(p, theirs[name]), name


def assert_same_state_dict(a: dict, b: dict) -> None:
    """Two optimizer state dicts hold the same groups and the same tensors (bitwise)."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k, state in a["state"].items():
        assert state.keys() == b["state"][k].keys()
        for key, value in state.items():
            assert torch.equal(value, b["state"][k][key]), (k, key)


REORDERED = ("out", "b", "a", "inp")  # a and b have the same shapes: position swaps them silently


# ------------------------------------------------------------------------------ matching by name
def test_resume_after_reordering_modules_equals_the_uninterrupted_run():
    ref, _, (model_sd, opt_sd) = reference_run(lr=LR, weight_decay=WD)
    model = rebuilt(model_sd, order=REORDERED)
    opt = fuseopt.AdamW(model.named_parameters(), lr=0.5)  # the saved lr is loaded
    result = opt.load_state_dict(opt_sd, by_name=True)
    assert result == IncompatibleKeys([], []) and result.missing_keys == []
    assert opt.param_groups[0]["lr"] == LR and opt.param_groups[0]["weight_decay"] == WD
    train(model, opt, range(5, 10))
    assert_same_params(ref, model)


def test_the_positional_load_silently_swaps_same_shaped_params():
    # What loading by name prevents: the same reordering loads by position without an error,
    # and the run diverges from the uninterrupted one.
    ref, _, (model_sd, opt_sd) = reference_run(lr=LR, weight_decay=WD)
    model = rebuilt(model_sd, order=("inp", "b", "a", "out"))
    opt = fuseopt.AdamW(model.named_parameters(), lr=LR)
    assert opt.load_state_dict(opt_sd) is None
    train(model, opt, range(5, 10))
    assert not torch.equal(ref.a[0].weight, model.a[0].weight)


def test_loads_torch_optim_state_into_regrouped_params():
    # torch.optim.AdamW saved with named params; fuseopt splits the same params in two groups
    # (with the same options): the continued run is torch's uninterrupted one, bit for bit.
    ref, _, (model_sd, opt_sd) = reference_run(
        torch.optim.AdamW, lr=LR, weight_decay=WD, foreach=False
    )
    model = rebuilt(model_sd, order=REORDERED)
    named = list(model.named_parameters())
    matrices = [(n, p) for n, p in named if p.ndim == 2]
    vectors = [(n, p) for n, p in named if p.ndim < 2]
    opt = fuseopt.AdamW(
        [{"params": vectors}, {"params": matrices}], lr=LR, weight_decay=WD, foreach=False
    )
    assert opt.load_state_dict(opt_sd, by_name=True) == ([], [])
    assert opt.state[model.a[0].weight]["step"].item() == 5
    train(model, opt, range(5, 10))
    assert_same_params(ref, model)


FIRST = ["inp.weight", "inp.bias", "a.0.weight", "a.0.bias"]  # _two_groups' first group


def _two_groups(model):
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if n in FIRST]},
        {"params": [(n, p) for n, p in named if n not in FIRST], "lr": 2 * LR},
    ]


def test_group_options_follow_the_saved_groups_where_they_correspond_one_to_one():
    ref, _, (model_sd, opt_sd) = reference_run(groups=_two_groups, lr=LR)
    model = rebuilt(model_sd, order=REORDERED)
    named = dict(model.named_parameters())
    first = [n for n in named if n in FIRST]
    second = [n for n in named if n not in FIRST]
    opt = fuseopt.AdamW(  # our groups in the other order, with other lrs
        [{"params": [(n, named[n]) for n in second]}, {"params": [(n, named[n]) for n in first]}],
        lr=0.5,
    )
    opt.load_state_dict(opt_sd, by_name=True)
    assert [g["lr"] for g in opt.param_groups] == [2 * LR, LR]
    assert [g["param_names"] for g in opt.param_groups] == [second, first]  # ours
    train(model, opt, range(5, 10))
    assert_same_params(ref, model)


def test_split_or_merged_groups_keep_their_own_options():
    _, _, (model_sd, opt_sd) = reference_run(groups=_two_groups, lr=LR)
    model = rebuilt(model_sd)
    merged = fuseopt.AdamW(model.named_parameters(), lr=0.3, betas=(0.8, 0.9))
    merged.load_state_dict(opt_sd, by_name=True)
    assert merged.param_groups[0]["lr"] == 0.3 and merged.param_groups[0]["betas"] == (0.8, 0.9)
    named = list(model.named_parameters())
    split = fuseopt.AdamW([{"params": named[:2]}, {"params": named[2:], "lr": 0.4}], lr=0.3)
    split.load_state_dict(opt_sd, by_name=True)
    assert [g["lr"] for g in split.param_groups] == [0.3, 0.4]
    for opt in (merged, split):  # the state is loaded either way
        saved = opt_sd["state"][FIRST.index("a.0.weight")]
        assert torch.equal(opt.state[model.a[0].weight]["exp_avg"], saved["exp_avg"])


def test_state_is_cast_to_the_params_dtype_and_step_kept():
    torch.manual_seed(0)
    model64 = Net(dtype=torch.float64)
    opt64 = fuseopt.Adam(model64.named_parameters(), lr=LR)
    train(model64, opt64, range(3))
    model = Net(order=REORDERED)
    opt = fuseopt.Adam(model.named_parameters(), lr=LR)
    opt.load_state_dict(opt64.state_dict(), by_name=True)
    state = opt.state[model.out.weight]
    saved = opt64.state[model64.out.weight]
    assert state["exp_avg"].dtype == torch.float32
    assert torch.equal(state["exp_avg"], saved["exp_avg"].float())
    assert state["step"].dtype == saved["step"].dtype and state["step"].item() == 3
    assert state["exp_avg"] is not saved["exp_avg"]


def test_load_hooks_run_as_in_the_positional_load():
    # A pre-hook may rewrite the dict: here it strips DDP's "module." prefix from the names.
    _, _, (model_sd, opt_sd) = reference_run(lr=LR)
    for group in opt_sd["param_groups"]:
        group["param_names"] = [f"module.{n}" for n in group["param_names"]]
    model = rebuilt(model_sd, order=REORDERED)
    opt = fuseopt.AdamW(model.named_parameters(), lr=LR)
    calls = []

    def strip(optimizer, state_dict):
        calls.append("pre")
        groups = copy.deepcopy(state_dict["param_groups"])
        for group in groups:
            group["param_names"] = [n.removeprefix("module.") for n in group["param_names"]]
        return {**state_dict, "param_groups": groups}

    opt.register_load_state_dict_pre_hook(strip)
    opt.register_load_state_dict_post_hook(lambda optimizer: calls.append("post"))
    with pytest.raises(RuntimeError, match="module.inp.weight"):  # without the hook's rewrite
        fuseopt.AdamW(model.named_parameters()).load_state_dict(opt_sd, by_name=True)
    assert opt.load_state_dict(opt_sd, by_name=True) == ([], [])
    assert calls == ["pre", "post"]
    assert "module.inp.weight" in opt_sd["param_groups"][0]["param_names"]  # not changed


# ------------------------------------------------------------------------- strict and not strict
def _stepped_optimizer(model):
    """An optimizer with state of its own, to see that a failed load changes nothing."""
    opt = fuseopt.AdamW(model.named_parameters(), lr=0.2)
    train(model, opt, range(100, 101))
    return opt


@pytest.mark.parametrize(
    "net_kwargs, missing, unexpected",
    [
        (dict(extra=True), ["adapter.weight", "adapter.bias"], []),
        (dict(width=5), ["inp.weight", "inp.bias", "a.0.weight", "a.0.bias", "a.1.weight",
                         "a.1.bias", "b.0.weight", "b.1.bias", "out.weight"], []),
    ],
    ids=["added-layer", "resized"],
)  # fmt: skip
def test_strict_raises_naming_each_param_and_changes_nothing(net_kwargs, missing, unexpected):
    _, _, (_, opt_sd) = reference_run(lr=LR)
    model = Net(**net_kwargs)
    opt = _stepped_optimizer(model)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError) as info:
        opt.load_state_dict(opt_sd, by_name=True)
    message = str(info.value)
    assert "AdamW" in message and "nothing loaded" in message
    for name in missing:
        assert repr(name) in message
    if "width" in net_kwargs:  # the resized layers' states do not fit: each says why
        assert "Shape mismatch for 'a.0.weight'" in message
        assert "'exp_avg' of shape (4, 4)" in message and "shape (5, 5)" in message
        assert "Missing" not in message  # every name is there: only the shapes differ
    else:
        assert "Missing param(s)" in message and "Shape mismatch" not in message
    assert_same_state_dict(opt.state_dict(), before)


def test_strict_names_unexpected_params():
    _, _, (_, opt_sd) = reference_run(lr=LR)
    model = Net()
    del model.b  # the saved b.weight and b.bias have no param here
    opt = _stepped_optimizer_without_b(model)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=r"Unexpected param\(s\).*'b.0.weight', 'b.0.bias', 'b"):
        opt.load_state_dict(opt_sd, by_name=True)
    assert_same_state_dict(opt.state_dict(), before)
    result = opt.load_state_dict(opt_sd, by_name=True, strict=False)
    b_names = ["b.0.weight", "b.0.bias", "b.1.weight", "b.1.bias"]
    assert result == IncompatibleKeys(missing_keys=[], unexpected_keys=b_names)


def _stepped_optimizer_without_b(model):
    opt = fuseopt.AdamW(model.named_parameters(), lr=0.2)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(7))
    model.out(torch.tanh(model.a(torch.tanh(model.inp(x))))).sum().backward()
    opt.step()
    return opt


def test_not_strict_loads_what_matches_and_leaves_the_rest_fresh():
    ref, _, (model_sd, opt_sd) = reference_run(lr=LR, weight_decay=WD)
    model = rebuilt(model_sd, order=REORDERED, extra=True)
    opt = _stepped_optimizer(model)  # its own state for every param: replaced or dropped
    model.load_state_dict(model_sd, strict=False)
    result = opt.load_state_dict(opt_sd, by_name=True, strict=False)
    assert isinstance(result, IncompatibleKeys)
    assert result.missing_keys == ["adapter.weight", "adapter.bias"]
    assert result.unexpected_keys == []
    assert model.adapter.weight not in opt.state  # fresh
    saved_ids = dict(
        zip(opt_sd["param_groups"][0]["param_names"], opt_sd["param_groups"][0]["params"])
    )
    for name, p in model.named_parameters():
        if name in saved_ids:
            assert torch.equal(
                opt.state[p]["exp_avg_sq"], opt_sd["state"][saved_ids[name]]["exp_avg_sq"]
            )
    assert opt.param_groups[0]["lr"] == LR  # one group each side: the saved options
    # The adapter starts at zero output: the others then train as in the uninterrupted run.
    with torch.no_grad():
        model.adapter.weight.zero_()
        model.adapter.bias.zero_()
    model.adapter.requires_grad_(False)
    train(model, opt, range(5, 10))
    assert_same_params(ref, model)


def test_not_strict_leaves_a_param_whose_state_does_not_fit_fresh_and_lists_it_twice():
    _, _, (model_sd, opt_sd) = reference_run(lr=LR)
    model = Net(order=REORDERED)
    model.out = nn.Linear(4, 3)  # out.weight (2, 4) -> (3, 4); out.bias (2,) -> (3,)
    opt = fuseopt.AdamW(model.named_parameters(), lr=LR)
    result = opt.load_state_dict(opt_sd, by_name=True, strict=False)
    assert result.missing_keys == ["out.weight", "out.bias"]
    assert result.unexpected_keys == ["out.weight", "out.bias"]
    assert model.out.weight not in opt.state and model.inp.weight in opt.state
    train(model, opt, range(5, 6))  # the fresh params step from a fresh state
    assert opt.state[model.out.weight]["step"].item() == 1
    assert opt.state[model.inp.weight]["step"].item() == 6


def test_adafactor_factored_state_is_checked_by_broadcasting():
    # Adafactor's row and column factors are not param-shaped: they must broadcast to the param.
    torch.manual_seed(0)
    model = Net()
    saved_opt = fuseopt.Adafactor(model.named_parameters(), lr=LR)
    train(model, saved_opt, range(2))
    opt = fuseopt.Adafactor(Net(order=REORDERED).named_parameters(), lr=LR)
    assert opt.load_state_dict(saved_opt.state_dict(), by_name=True) == ([], [])
    wide = Net(width=5)
    opt = fuseopt.Adafactor(wide.named_parameters(), lr=LR)
    with pytest.raises(RuntimeError, match=r"'col_var' of shape \(1, 4\).*shape \(5, 5\)"):
        opt.load_state_dict(saved_opt.state_dict(), by_name=True)


# --------------------------------------------------------------------------------------- errors
def test_needs_names_on_both_sides_and_changes_nothing():
    model = Net()
    unnamed = torch.optim.AdamW(model.parameters(), lr=LR)
    train(model, unnamed, range(1))
    opt = _stepped_optimizer(model)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="param group 0 of the state dict has no 'param_names'"):
        opt.load_state_dict(unnamed.state_dict(), by_name=True)
    assert_same_state_dict(opt.state_dict(), before)
    ours = fuseopt.AdamW(model.parameters(), lr=LR)
    with pytest.raises(
        ValueError, match="its param group 0 has no 'param_names'.*named_parameters"
    ):
        ours.load_state_dict(opt.state_dict(), by_name=True)
    assert not ours.state


def test_duplicate_names_and_lbfgs_are_refused():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = fuseopt.SGD([{"params": [("w", p)]}, {"params": [("w", q)]}], lr=0.1)
    with pytest.raises(ValueError, match="the optimizer names two params 'w'"):
        opt.load_state_dict(opt.state_dict(), by_name=True)
    twice = {"state": {}, "param_groups": [{"params": [0, 1], "param_names": ["w", "w"]}]}
    with pytest.raises(ValueError, match="the state dict names two params 'w'"):
        fuseopt.SGD([("w", p)], lr=0.1).load_state_dict(twice, by_name=True)
    lbfgs = fuseopt.LBFGS([("w", p)])
    with pytest.raises(ValueError, match="LBFGS keeps one state for all its params"):
        lbfgs.load_state_dict(lbfgs.state_dict(), by_name=True)


def test_default_is_the_positional_load():
    _, _, (model_sd, opt_sd) = reference_run(lr=LR)
    model = rebuilt(model_sd, extra=True)
    opt = fuseopt.AdamW(model.named_parameters(), lr=LR)
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        opt.load_state_dict(opt_sd)  # torch's error, by position
    torch_opt = torch.optim.AdamW(model.named_parameters(), lr=LR)
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        torch_opt.load_state_dict(opt_sd)
    with pytest.raises(ValueError, match="strict=False applies to by_name=True"):
        opt.load_state_dict(opt_sd, strict=False)


# ------------------------------------------------------------------------ DCP's name-keyed dicts
@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("saved_by", ["fuseopt", "torch"])
def test_loads_dcp_optimizer_state_dicts(saved_by, flatten):
    # A real get_optimizer_state_dict call (no process group needed for a plain module): state
    # keyed by the params' fully qualified names; flattened, one key per value.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opt_class = fuseopt.AdamW if saved_by == "fuseopt" else torch.optim.AdamW
    torch.manual_seed(0)
    ref = Net()
    ref_opt = opt_class(_two_groups(ref), lr=LR, weight_decay=WD, foreach=False)
    train(ref, ref_opt, range(5))
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_sd = copy.deepcopy(get_optimizer_state_dict(ref, ref_opt, options=options))
    if flatten:
        assert "state.a.0.weight.exp_avg" in dcp_sd and "param_groups.out.bias.lr" in dcp_sd
    else:
        assert "a.0.weight" in dcp_sd["state"] and "out.bias" in dcp_sd["param_groups"][1]["params"]
    model = rebuilt(copy.deepcopy(ref.state_dict()), order=REORDERED)
    train(ref, ref_opt, range(5, 10))

    named = dict(model.named_parameters())
    first = [n for n in named if n in FIRST]
    opt = fuseopt.AdamW(
        [{"params": [(n, named[n]) for n in named if n not in first]},
         {"params": [(n, named[n]) for n in first]}],
        lr=0.5, weight_decay=WD, foreach=False,
    )  # fmt: skip
    assert opt.load_state_dict(dcp_sd, by_name=True) == ([], [])
    assert [g["lr"] for g in opt.param_groups] == [2 * LR, LR]  # the groups correspond
    train(model, opt, range(5, 10))
    assert_same_params(ref, model)


def test_dcp_state_dict_names_what_does_not_match():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    ref = Net()
    ref_opt = fuseopt.AdamW(ref.parameters(), lr=LR)  # unnamed: DCP names the params itself
    train(ref, ref_opt, range(2))
    dcp_sd = get_optimizer_state_dict(ref, ref_opt)
    model = Net(extra=True)
    opt = fuseopt.AdamW(model.named_parameters(), lr=LR)
    with pytest.raises(RuntimeError, match=r"Missing param\(s\).*'adapter.weight'"):
        opt.load_state_dict(dcp_sd, by_name=True)
    result = opt.load_state_dict(dcp_sd, by_name=True, strict=False)
    assert result == (["adapter.weight", "adapter.bias"], [])
    b_state = ref_opt.state[ref.b[0].weight]
    assert torch.equal(opt.state[model.b[0].weight]["exp_avg"], b_state["exp_avg"])


def test_malformed_state_dicts_are_refused():
    opt = fuseopt.SGD([("w", torch.zeros(2, requires_grad=True))], lr=0.1)
    with pytest.raises(ValueError, match="no 'state' and 'param_groups'"):
        opt.load_state_dict({"weights": 1}, by_name=True)
    mixed = {"state": {}, "param_groups": [{"params": [0, "w"], "lr": 0.1}]}
    with pytest.raises(ValueError, match="neither all by int id"):
        opt.load_state_dict(mixed, by_name=True)
    stray = {"state": {"v": {}}, "param_groups": [{"params": ["w"], "lr": 0.1}]}
    with pytest.raises(ValueError, match="state for 'v', which no group lists"):
        opt.load_state_dict(stray, by_name=True)
