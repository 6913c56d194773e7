"""The step inside backward (``fuseopt.step_in_backward``): the normal step's numbers, bit for bit,
with every grad freed as soon as its param stepped; schedulers, state dicts, hooks and removal; a
clear error for everything that cannot step one param at a time."""

from __future__ import annotations

import copy
import gc
import importlib
import warnings

import pytest
import torch
from conftest import IMPLS

import fuseopt
from fuseopt.in_backward import StepInBackward
from fuseopt.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

STEPS = 8


class Net(torch.nn.Module):
    """Shapes a step meets in practice: an embedding, matrices, a vector bias, a norm layer, a
    transposed (non-contiguous) weight, and an output layer tied to the embedding."""

    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8, sparse=sparse)
        self.l1 = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.t = torch.nn.Parameter(torch.randn(8, 16).t())  # dense, not contiguous
        self.head = torch.nn.Linear(8, 20, bias=False)
        if not sparse:  # (a dense grad would join the embedding's sparse one)
            self.head.weight = self.emb.weight  # one param, two uses: one accumulated grad

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.l1(self.emb(idx))))
        return self.head(h @ self.t)


def make(seed: int = 0, sparse: bool = False) -> Net:
    torch.manual_seed(seed)
    return Net(sparse)


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randint(0, 20, (4, 5), generator=gen), torch.randint(0, 20, (4, 5), generator=gen)


def loss_of(model: Net, i: int) -> torch.Tensor:
    idx, target = batch(i)
    return torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), target.flatten())


def groups(model: Net) -> list[dict]:
    """Two named groups with different options, as a training script builds them."""
    decay = [(n, p) for n, p in model.named_parameters() if p.dim() > 1]
    rest = [(n, p) for n, p in model.named_parameters() if p.dim() <= 1]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0, "lr": 0.02}]


def train(model, opt, steps, start=0, scheduler=None) -> None:
    """The usual loop: zero_grad, backward, step (a no-op inside backward), scheduler."""
    for i in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, i).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same(a: Net, b: Net, opt_a, opt_b) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k, state in sa["state"].items():
        for key, value in state.items():
            other = sb["state"][k][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


ALGOS = {
    "sgd_momentum": (fuseopt.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": (fuseopt.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    "adamw": (fuseopt.AdamW, dict(lr=0.01, weight_decay=0.1)),
}


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_trajectory_is_the_normal_steps_bit_for_bit(algo, impl):
    cls, kwargs = ALGOS[algo]
    normal, inside = make(), make()
    opt_a = cls(groups(normal), **kwargs, **IMPLS[impl])
    opt_b = cls(groups(inside), **kwargs, **IMPLS[impl])
    handle = fuseopt.step_in_backward(opt_b)
    assert isinstance(handle, StepInBackward) and handle.active
    train(normal, opt_a, STEPS)
    train(inside, opt_b, STEPS)
    assert_same(normal, inside, opt_a, opt_b)
    assert opt_b.steps_taken == STEPS and opt_b.stepped


STORAGE = {  # (param dtype, options; min_8bit_size as a group key: 16 puts each matrix in 8 bits)
    "bf16_states": (torch.float32, dict(state_dtype=torch.bfloat16)),
    "8bit": (torch.float32, dict(state_bits=8)),
    "kahan": (torch.bfloat16, dict(kahan_sum=True)),
    "float32_states": (torch.bfloat16, dict(state_dtype=torch.float32)),
}


def _storage_run(options: dict, dtype, impl: str, inside: bool, steps: int = STEPS):
    model = make().to(dtype)
    params = [{**g, "min_8bit_size": 16} for g in groups(model)]
    opt = fuseopt.AdamW(params, lr=0.01, weight_decay=0.1, **options, **IMPLS[impl])
    if inside:
        fuseopt.step_in_backward(opt)
    train(model, opt, steps)
    return model, opt


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
@pytest.mark.parametrize("storage", list(STORAGE))
def test_storage_options_step_as_the_normal_step(storage, impl):
    """bfloat16 and 8-bit states, Kahan-compensated bfloat16 params, float32 states of
    bfloat16 params: the normal step's numbers, bit for bit (8-bit codes and scales too)."""
    dtype, options = STORAGE[storage]
    normal, opt_a = _storage_run(options, dtype, impl, inside=False)
    inside, opt_b = _storage_run(options, dtype, impl, inside=True)
    assert_same(normal, inside, opt_a, opt_b)
    if storage == "8bit":
        assert opt_b.state[inside.l1.weight]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("impl", ["forloop", "fused"])
def test_stochastic_rounding_rounds_alike_not_bit_for_bit(impl):
    """Stochastic rounding draws its bits per launch, and inside backward each param is a launch
    of its own: each stored bfloat16 value is one of the normal step's two neighbours (after one
    step: within a bfloat16 ulp of it), and a run repeats bit for bit from the same seed."""
    options = dict(state_dtype=torch.bfloat16, stochastic_rounding=True)
    torch.manual_seed(0)
    normal, opt_a = _storage_run(options, torch.float32, impl, inside=False, steps=1)
    torch.manual_seed(0)
    inside, opt_b = _storage_run(options, torch.float32, impl, inside=True, steps=1)
    torch.manual_seed(0)
    again, opt_c = _storage_run(options, torch.float32, impl, inside=True, steps=1)
    assert_same(inside, again, opt_b, opt_c)
    for p, q in zip(normal.parameters(), inside.parameters()):
        assert torch.equal(p, q)  # (float32 params: rounded to nearest, from the same moments'
        # first values, which are the grads times constants)
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opt_a.state[p][key].float(), opt_b.state[q][key].float()
            ulp = torch.finfo(torch.bfloat16).eps * torch.maximum(a.abs(), b.abs())
            assert bool(((a - b).abs() <= ulp).all()), key
    differ = [
        not torch.equal(opt_a.state[p]["exp_avg"], opt_b.state[q]["exp_avg"])
        for p, q in zip(normal.parameters(), inside.parameters())
    ]
    assert any(differ)  # (other bits: if this fails, the streams became launch-independent)


def _every_optimizer():
    """(id, constructor over a Net, sparse embedding?) for every fuseopt optimizer that can step
    one param at a time, default implementation."""
    rows = [
        ("ASGD", fuseopt.ASGD, {}), ("Adadelta", fuseopt.Adadelta, {}),
        ("Adagrad", fuseopt.Adagrad, {}), ("Adamax", fuseopt.Adamax, {}),
        ("NAdam", fuseopt.NAdam, dict(decoupled_weight_decay=True, weight_decay=0.1)),
        ("RAdam", fuseopt.RAdam, {}), ("RMSprop", fuseopt.RMSprop, dict(centered=True)),
        ("Rprop", fuseopt.Rprop, {}), ("SGD", fuseopt.SGD, {}),
        ("Adam_cautious", fuseopt.Adam, dict(cautious=True)),
        ("LARS", fuseopt.LARS, {}), ("Lamb", fuseopt.Lamb, {}),
        ("Adafactor", fuseopt.Adafactor, {}),
    ]  # fmt: skip
    out = [
        pytest.param(lambda m, c=c, k=k: c(m.parameters(), **k), False, id=i) for i, c, k in rows
    ]
    muon = lambda m: fuseopt.Muon([m.l1.weight, m.head.weight])  # (2-D params only)
    out.append(pytest.param(muon, False, id="Muon"))
    out.append(pytest.param(lambda m: fuseopt.SparseAdam([m.emb.weight]), True, id="SparseAdam"))
    return out


@pytest.mark.parametrize("build, sparse", _every_optimizer())
def test_every_optimizer_steps_as_its_normal_step(build, sparse):
    normal, inside = make(sparse=sparse), make(sparse=sparse)
    opt_a, opt_b = build(normal), build(inside)
    fuseopt.step_in_backward(opt_b)
    covered = {id(p) for g in opt_b.param_groups for p in g["params"]}
    for i in range(5):
        for model, opt in ((normal, opt_a), (inside, opt_b)):
            opt.zero_grad()
            loss_of(model, i).backward()
            opt.step()
            for p in model.parameters():
                if id(p) not in covered:  # (what another optimizer would step)
                    p.grad = None
        assert all(p.grad is None for p in inside.parameters())
    assert_same(normal, inside, opt_a, opt_b)


def test_grads_are_freed_during_backward():
    model = make()
    opt = fuseopt.AdamW(model.parameters(), lr=0.01)
    fuseopt.step_in_backward(opt)
    seen = {}
    # the first layer's weight is among the last grads computed: by then the later layers'
    # grads were stepped with and freed
    model.l1.weight.register_post_accumulate_grad_hook(
        lambda p: seen.update(t=model.t.grad, norm=model.norm.weight.grad)
    )
    before = model.t.detach().clone()
    loss_of(model, 0).backward()
    assert seen == {"t": None, "norm": None}
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(model.t, before)


def test_step_and_zero_grad_are_harmless_no_ops():
    model = make()
    opt = fuseopt.Adam(model.parameters(), lr=0.01)
    fuseopt.step_in_backward(opt)
    loss_of(model, 0).backward()
    after = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    assert opt.step() is None
    opt.zero_grad()
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after))
    assert torch.equal(state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert opt.steps_taken == 1  # (one per backward, not per step() call)


@pytest.mark.parametrize("made", ["before", "after"])
@pytest.mark.parametrize("library", ["fuseopt", "torch"])
def test_scheduler_lr_reaches_the_steps(made, library):
    sched = {"fuseopt": fuseopt.lr_scheduler, "torch": torch.optim.lr_scheduler}[library]
    normal, inside = make(), make()
    opt_a = fuseopt.SGD(groups(normal), lr=0.1, momentum=0.9)
    opt_b = fuseopt.SGD(groups(inside), lr=0.1, momentum=0.9)
    sched_a = sched.StepLR(opt_a, step_size=2, gamma=0.5)
    if made == "after":
        fuseopt.step_in_backward(opt_b)
    sched_b = sched.StepLR(opt_b, step_size=2, gamma=0.5)
    if made == "before":
        fuseopt.step_in_backward(opt_b)
    train(normal, opt_a, STEPS, scheduler=sched_a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "step() overridden" or "called before" warning
        train(inside, opt_b, STEPS, scheduler=sched_b)
    assert sched_b.get_last_lr() == sched_a.get_last_lr() == [0.1 * 0.5**4, 0.02 * 0.5**4]
    assert_same(normal, inside, opt_a, opt_b)


def test_scheduler_without_calling_step():
    # the tutorial's loop: backward, then the scheduler; the optimizer stepped, so no warning
    model = make()
    opt = fuseopt.AdamW(model.parameters(), lr=0.01)
    sched = fuseopt.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
    fuseopt.step_in_backward(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(3):
            loss_of(model, i).backward()
            sched.step()
    assert opt.steps_taken == 3


def test_state_dict_round_trip_mid_training():
    normal, inside = make(), make()
    opt_a = fuseopt.AdamW(groups(normal), lr=0.01, fused=True)
    opt_b = fuseopt.AdamW(groups(inside), lr=0.01, fused=True)
    handle = fuseopt.step_in_backward(opt_b)
    train(normal, opt_a, 3)
    train(inside, opt_b, 3)
    assert_same(normal, inside, opt_a, opt_b)  # (the state dict is the normal step's)
    saved = copy.deepcopy(opt_b.state_dict())
    # resume: a new model and optimizer, stepping inside backward from the loaded state
    resumed = make(seed=1)
    resumed.load_state_dict(inside.state_dict())
    opt_c = fuseopt.AdamW(groups(resumed), lr=0.01, fused=True)
    opt_c.load_state_dict(copy.deepcopy(saved))  # (a loaded state is not copied: as torch)
    fuseopt.step_in_backward(opt_c)
    # and the same optimizer loads its own state back while stepping inside backward
    opt_b.load_state_dict(copy.deepcopy(saved))
    train(normal, opt_a, 4, start=3)
    train(inside, opt_b, 4, start=3)
    train(resumed, opt_c, 4, start=3)
    assert_same(normal, inside, opt_a, opt_b)
    assert_same(normal, resumed, opt_a, opt_c)
    handle.remove()


def test_step_hooks_run_once_per_backward():
    model = make()
    opt = fuseopt.SGD(model.parameters(), lr=0.1)
    fuseopt.step_in_backward(opt)
    calls = []
    n = len(list(model.parameters()))

    def pre(o, args, kwargs):
        assert o is opt and args == (opt,) and kwargs == {}
        calls.append(("pre", sum(p.grad is None for p in model.parameters())))

    def post(o, args, kwargs):
        assert o is opt and args == (opt,) and kwargs == {}
        assert opt.stepped  # (recorded before the post-hooks, as in step())
        calls.append(("post", sum(p.grad is None for p in model.parameters())))

    handles = [
        opt.register_step_pre_hook(pre),
        opt.register_step_post_hook(post),
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
    ]
    try:
        for i in range(2):
            opt.zero_grad()
            loss_of(model, i).backward()
            opt.step()  # (does not run them again)
    finally:
        for h in handles:
            h.remove()
    # the pre-hooks run when the first grad is ready (the rest to come), the post-hooks once
    # every param stepped and its grad is freed
    once = ["global pre", ("pre", n - 1), ("post", n), "global post"]
    assert calls == once + once


def test_pre_hook_returning_arguments_is_an_error():
    model = make()
    opt = fuseopt.SGD(model.parameters(), lr=0.1)
    fuseopt.step_in_backward(opt)
    opt.register_step_pre_hook(lambda o, a, k: ((o,), {"closure": None}))
    with pytest.raises(RuntimeError, match="pre-hook returned new arguments"):
        loss_of(model, 0).backward()


def test_removal_restores_the_normal_step():
    normal, inside = make(), make()
    opt_a = fuseopt.Adam(normal.parameters(), lr=0.01)
    opt_b = fuseopt.Adam(inside.parameters(), lr=0.01)
    with fuseopt.step_in_backward(opt_b) as handle:
        assert "step" in vars(opt_b)
        train(normal, opt_a, 3)
        train(inside, opt_b, 3)
    assert not handle.active and "step" not in vars(opt_b)
    handle.remove()  # (again: nothing)
    opt_b.zero_grad()
    loss_of(inside, 3).backward()
    assert all(p.grad is not None for p in inside.parameters())  # grads accumulate again
    opt_b.step()  # and step() steps
    opt_a.zero_grad()
    loss_of(normal, 3).backward()
    opt_a.step()
    assert_same(normal, inside, opt_a, opt_b)
    assert opt_b.steps_taken == 4


def test_removal_keeps_a_scheduler_wrapper():
    model = make()
    opt = fuseopt.SGD(model.parameters(), lr=0.1)
    fuseopt.lr_scheduler.StepLR(opt, step_size=1)
    wrapper = vars(opt)["step"]
    fuseopt.step_in_backward(opt).remove()
    assert vars(opt)["step"] is wrapper


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "option, match",
    [
        (dict(max_grad_norm=1.0), "max_grad_norm"),
        (dict(skip_if_nonfinite=True), "skip_if_nonfinite"),
        (dict(differentiable=True), "differentiable"),
    ],
)
def test_options_that_need_every_grad(option, match):
    model = make()
    with pytest.raises(RuntimeError, match=match):
        fuseopt.step_in_backward(fuseopt.AdamW(model.parameters(), **option))


def test_clipping_set_later_raises_from_backward_then_recovers():
    model = make()
    opt = fuseopt.AdamW(model.parameters(), lr=0.01)
    fuseopt.step_in_backward(opt)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.param_groups[0]["max_grad_norm"] = 1.0
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        loss_of(model, 0).backward()
    del opt.param_groups[0]["max_grad_norm"]
    opt.zero_grad()
    loss_of(model, 0).backward()
    assert calls == ["pre", "pre"] and opt.steps_taken == 1


def test_optimizers_that_cannot_step_one_param_at_a_time():
    model = make()
    with pytest.raises(RuntimeError, match="LBFGS cannot step inside backward"):
        fuseopt.step_in_backward(fuseopt.LBFGS(model.parameters()))

    class Custom(fuseopt.SGD):
        def step(self, closure=None):
            return super().step(closure)

    with pytest.raises(RuntimeError, match="defines its own step"):
        fuseopt.step_in_backward(Custom(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="fuseopt optimizer"):
        fuseopt.step_in_backward(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize(
    "module, name, match",
    [
        ("fuseopt.prodigy", "Prodigy", "sums over every param"),
        ("fuseopt.schedulefree", "AdamWScheduleFree", "values kept per group"),
    ],
)
def test_rules_that_need_the_whole_step(module, name, match):
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError:
        pytest.skip(f"{module} is not in this version")
    with pytest.raises(RuntimeError, match=match):
        fuseopt.step_in_backward(cls(make().parameters()))


def test_gradient_accumulation_is_detected():
    # a loop that calls step() after every backward: the second backward raises at once
    model = make()
    opt = fuseopt.SGD(model.parameters(), lr=0.1)
    fuseopt.step_in_backward(opt)
    loss_of(model, 0).backward()
    opt.step()
    loss_of(model, 1).backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        loss_of(model, 2).backward()
    # the first accumulation, before any step(): step() says so
    model = make()
    opt = fuseopt.SGD(model.parameters(), lr=0.1)
    fuseopt.step_in_backward(opt)
    for i in range(2):
        loss_of(model, i).backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        opt.step()
    loss_of(model, 3).backward()
    opt.step()  # one backward since: fine


def test_step_errors():
    model = make()
    opt = fuseopt.SGD(model.parameters(), lr=0.1)
    fuseopt.step_in_backward(opt)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: loss_of(model, 0))
    with pytest.raises(RuntimeError, match="steps inside backward already"):
        fuseopt.step_in_backward(opt)
    model.t.grad = torch.ones_like(model.t)  # set by hand: never stepped inside backward
    with pytest.raises(RuntimeError, match="not stepped inside backward"):
        opt.step()
    opt.grad_scale = torch.tensor(2.0)  # what GradScaler sets for a fused step
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="GradScaler"):
        opt.step()


def test_registration_errors():
    model = make()
    loss_of(model, 0).backward()
    with pytest.raises(RuntimeError, match="holds a grad"):
        fuseopt.step_in_backward(fuseopt.SGD(model.parameters(), lr=0.1))
    model.zero_grad()
    fuseopt.step_in_backward(fuseopt.SGD([model.t], lr=0.1))
    with pytest.raises(RuntimeError, match="another optimizer"):
        fuseopt.step_in_backward(fuseopt.SGD([model.t], lr=0.1))
    p = model.l1.bias
    with pytest.warns(UserWarning, match="duplicate"):
        opt = fuseopt.SGD([p, p], lr=0.1)
    with pytest.raises(RuntimeError, match="listed twice"):
        fuseopt.step_in_backward(opt)


def test_frozen_params_and_params_added_later():
    model = make()
    model.norm.weight.requires_grad_(False)
    opt = fuseopt.SGD([p for n, p in model.named_parameters() if n != "l1.bias"], lr=0.1)
    fuseopt.step_in_backward(opt)  # (a frozen param gets no hook: torch refuses one)
    opt.add_param_group({"params": [model.l1.bias]})
    loss_of(model, 0).backward()
    assert model.l1.bias.grad is not None  # no hook: not stepped
    with pytest.raises(RuntimeError, match="group 1 param 0"):
        opt.step()


def test_two_optimizers_on_disjoint_params():
    normal, inside = make(), make()

    def split(model):
        matrices = [p for p in model.parameters() if p.dim() > 1]
        return (
            fuseopt.SGD(matrices, lr=0.1, momentum=0.9),
            fuseopt.Adam([p for p in model.parameters() if p.dim() <= 1], lr=0.01),
        )

    a1, a2 = split(normal)
    b1, b2 = split(inside)
    fuseopt.step_in_backward(b1), fuseopt.step_in_backward(b2)
    for i in range(4):
        for model, opts in ((normal, (a1, a2)), (inside, (b1, b2))):
            loss_of(model, i).backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
    assert_same(normal, inside, a1, b1)
    assert_same(normal, inside, a2, b2)
    assert b1.steps_taken == b2.steps_taken == 4


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_grad_scaler_raises(impl):
    # the params stepped with scaled grads already: GradScaler's step must not pass silently
    model = make()
    opt = fuseopt.SGD(model.parameters(), lr=0.1, **IMPLS[impl])
    fuseopt.step_in_backward(opt)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, 0)).backward()
    error = RuntimeError if impl == "fused" else AssertionError  # (GradScaler's own, unfused)
    with pytest.raises(error, match="GradScaler|No inf checks"):
        scaler.step(opt)


def test_an_optimizer_dropped_without_remove():
    # its hooks must neither keep stepping (another optimizer of these params would find no
    # grads) nor go silent (nothing would train): the next backward raises, once
    model = make()
    handle = fuseopt.step_in_backward(fuseopt.SGD(model.parameters(), lr=0.1))
    gc.collect()
    assert handle.optimizer is None and handle.active
    with pytest.raises(RuntimeError, match="garbage-collected"):
        loss_of(model, 0).backward()
    assert not handle.active
    model.zero_grad()
    opt = fuseopt.SGD(model.parameters(), lr=0.1)
    fuseopt.step_in_backward(opt)  # (the params are free again)
    loss_of(model, 0).backward()
    assert opt.steps_taken == 1
