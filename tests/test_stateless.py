"""``fuseopt.swap_in_optimizer_params_and_state`` against torch.optim's: the same steps of the
swapped-in params and state, the live optimizer restored, the same errors."""

from __future__ import annotations

import copy

import pytest
import torch

import fuseopt

FUSED_TOL = dict(rtol=1e-5, atol=1e-6)  # fused kernels vs torch's for-loop (see test_parity)


def _trained(lib, impl: dict):
    """An Adam of ``lib`` after two steps on a small model: (optimizer, model)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = lib.Adam(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.05}],
        lr=0.1, **impl,
    )  # fmt: skip
    for seed in range(2):
        torch.manual_seed(seed)
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    return opt, model


@pytest.mark.parametrize("impl", [{}, dict(foreach=False)], ids=["default", "forloop"])
def test_steps_the_swapped_in_params_and_state_as_torch(impl):
    results = {}
    for lib in (fuseopt, torch.optim):
        opt, model = _trained(lib, impl if lib is fuseopt else dict(foreach=False))
        live_params = [p.detach().clone() for p in model.parameters()]
        live_state = copy.deepcopy(opt.state_dict())
        live_lists = [g["params"] for g in opt.param_groups]
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        for p in params.values():
            p.grad = torch.full_like(p, 0.5)
        osd = copy.deepcopy(opt.state_dict())
        osd["param_groups"][1]["lr"] = 1.0
        with lib.swap_in_optimizer_params_and_state(opt, params, osd):
            assert opt.param_groups[1]["lr"] == 1.0
            assert opt.param_groups[0]["params"] == list(params.values())[:2]
            opt.step()
        # the live optimizer is as it was: params, state, groups (the very params lists)
        for p, before in zip(model.parameters(), live_params):
            assert torch.equal(p.detach(), before)
        assert [g["params"] for g in opt.param_groups] == live_lists
        assert all(g["params"] is lst for g, lst in zip(opt.param_groups, live_lists))
        after = opt.state_dict()
        assert after["param_groups"] == live_state["param_groups"]
        for k, s in live_state["state"].items():
            for key, value in s.items():
                assert torch.equal(after["state"][k][key], value)
        results[lib.__name__] = (list(params.values()), osd["state"])
    (ours, our_state), (theirs, their_state) = results["fuseopt"], results["torch.optim"]
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **FUSED_TOL)
        assert not torch.equal(p, p.grad * 0)  # stepped
    for k, s in their_state.items():
        for key, value in s.items():  # in-place updates reach the caller's state dict
            torch.testing.assert_close(our_state[k][key], value, **FUSED_TOL)
            assert key != "step" or value.item() == 3.0


def _bad(case, opt, params, osd):
    if case == "no_state":
        opt.state.clear()
    elif case == "groups":
        osd["param_groups"] = osd["param_groups"][:1]
    elif case == "keys":
        osd["param_groups"][0]["extra"] = 1
    elif case == "ids":
        osd["param_groups"][0]["params"] = ["a", "b"]
    elif case == "extra_state":
        osd["state"][99] = {}
    elif case == "tensor_keys":
        osd["state"] = {params[0]: {}}
    elif case == "few_params":
        params = params[:1]
    return params


@pytest.mark.parametrize(
    "case", ["no_state", "groups", "keys", "ids", "extra_state", "tensor_keys", "few_params"]
)
def test_bad_input_raises_as_torch_and_changes_nothing(case):
    errors = []
    for lib in (fuseopt, torch.optim):
        opt, model = _trained(lib, {})
        osd = copy.deepcopy(opt.state_dict())
        params = _bad(case, opt, list(model.parameters()), osd)
        named = {f"p{i}": p for i, p in enumerate(params)}
        groups = [dict(g) for g in opt.param_groups]
        swap = lib.swap_in_optimizer_params_and_state(opt, named, osd)
        with pytest.raises(RuntimeError) as info, swap:
            pass
        assert opt.param_groups == groups
        errors.append(str(info.value))
    assert errors[0] == errors[1]
