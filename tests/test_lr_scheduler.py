"""fuseopt.lr_scheduler against torch.optim.lr_scheduler: bitwise-equal schedules and same API."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.optim.lr_scheduler as T

import fuseopt
import fuseopt.lr_scheduler as F

STEPS = 300
GROUP_LRS = (0.1, 0.05)


# ------------------------------------------------------------------------------------- harness
def make_opt(family: str, kind: str = "sgd", lrs=GROUP_LRS, **kw):
    """An optimizer of ``family`` ("fuseopt" or "torch") over one 2-element param per group."""
    mod = fuseopt if family == "fuseopt" else torch.optim
    groups = []
    for lr in lrs:
        p = torch.nn.Parameter(torch.ones(2))
        p.grad = torch.full((2,), 0.5)
        groups.append({"params": [p], "lr": lr})
    if kind == "sgd":
        return mod.SGD(groups, lr=0.1, momentum=kw.pop("momentum", 0.9), **kw)
    if kind == "adam":
        return mod.Adam(groups, lr=0.1, **kw)
    raise ValueError(kind)


def hyper(opt):
    """Everything a scheduler may write, per group."""
    return [(g["lr"], g.get("momentum"), g.get("betas")) for g in opt.param_groups]


def as_float(x):
    return x.item() if isinstance(x, torch.Tensor) else x


def assert_same(ours, theirs, where=""):
    for a, b in zip(hyper(ours), hyper(theirs), strict=True):
        lr_a, lr_b = as_float(a[0]), as_float(b[0])
        assert lr_a == lr_b, f"{where}: lr {lr_a!r} != {lr_b!r}"
        assert a[1] == b[1], f"{where}: momentum {a[1]!r} != {b[1]!r}"
        assert a[2] == b[2], f"{where}: betas {a[2]!r} != {b[2]!r}"


def run_parity(factory, kind="sgd", steps=STEPS, ours_on="fuseopt", theirs_mod=T, ours_mod=F):
    """Step ``factory``'s scheduler (ours) and torch's side by side; compare after every step."""
    opt_a, opt_b = make_opt(ours_on, kind), make_opt("torch", kind)
    sch_a, sch_b = factory(opt_a, ours_mod), factory(opt_b, theirs_mod)
    assert_same(opt_a, opt_b, "init")
    assert [as_float(x) for x in sch_a.get_last_lr()] == [as_float(x) for x in sch_b.get_last_lr()]
    for i in range(steps):
        opt_a.step()
        opt_b.step()
        sch_a.step()
        sch_b.step()
        assert_same(opt_a, opt_b, f"step {i}")
        assert sch_a.get_last_lr() == sch_b.get_last_lr(), f"step {i}"
    return sch_a, sch_b


def crazy_scale(x):
    return 0.5 * (1 + math.sin(x * math.pi / 2))


CONFIGS = {
    "LambdaLR": [
        lambda o, S: S.LambdaLR(o, lambda e: 0.95**e),
        lambda o, S: S.LambdaLR(o, [lambda e: e // 30, lambda e: 0.99**e]),
        lambda o, S: S.LambdaLR(o, lambda e: 1 / (e + 1)),
    ],
    "MultiplicativeLR": [
        lambda o, S: S.MultiplicativeLR(o, lambda e: 0.99),
        lambda o, S: S.MultiplicativeLR(o, (lambda e: 0.98, lambda e: 1.001)),
        lambda o, S: S.MultiplicativeLR(o, lambda e: 0.999 if e % 2 else 0.98),
    ],
    "StepLR": [
        lambda o, S: S.StepLR(o, 30, gamma=0.5),
        lambda o, S: S.StepLR(o, 7),
        lambda o, S: S.StepLR(o, step_size=1, gamma=0.99),
    ],
    "MultiStepLR": [
        lambda o, S: S.MultiStepLR(o, [10, 50, 50, 200]),
        lambda o, S: S.MultiStepLR(o, [5], gamma=0.3),
        lambda o, S: S.MultiStepLR(o, milestones=[299, 100, 150], gamma=0.7),
    ],
    "ConstantLR": [
        lambda o, S: S.ConstantLR(o),
        lambda o, S: S.ConstantLR(o, factor=0.5, total_iters=100),
        lambda o, S: S.ConstantLR(o, factor=0.9, total_iters=0),
    ],
    "LinearLR": [
        lambda o, S: S.LinearLR(o),
        lambda o, S: S.LinearLR(o, start_factor=0.1, total_iters=100),
        lambda o, S: S.LinearLR(o, start_factor=1.0, end_factor=0.05, total_iters=250),
    ],
    "ExponentialLR": [
        lambda o, S: S.ExponentialLR(o, 0.99),
        lambda o, S: S.ExponentialLR(o, gamma=0.9),
        lambda o, S: S.ExponentialLR(o, 1.001),
    ],
    "PolynomialLR": [
        lambda o, S: S.PolynomialLR(o),
        lambda o, S: S.PolynomialLR(o, total_iters=100, power=2.0),
        lambda o, S: S.PolynomialLR(o, total_iters=400, power=0.5),
    ],
    "CosineAnnealingLR": [
        lambda o, S: S.CosineAnnealingLR(o, 50),
        lambda o, S: S.CosineAnnealingLR(o, T_max=10, eta_min=0.001),
        lambda o, S: S.CosineAnnealingLR(o, 300),
    ],
    "ChainedScheduler": [
        lambda o, S: S.ChainedScheduler([S.ExponentialLR(o, 0.99), S.StepLR(o, 10)]),
        lambda o, S: S.ChainedScheduler([S.ConstantLR(o, 0.5, 40), S.ExponentialLR(o, 0.995)]),
        lambda o, S: S.ChainedScheduler(
            [S.LinearLR(o, 0.2, total_iters=20), S.CosineAnnealingLR(o, 60)], optimizer=o
        ),
    ],
    "SequentialLR": [
        lambda o, S: S.SequentialLR(
            o, [S.LinearLR(o, 0.1, total_iters=20), S.ExponentialLR(o, 0.99)], milestones=[20]
        ),
        lambda o, S: S.SequentialLR(
            o,
            [S.ConstantLR(o, 0.5, 10), S.StepLR(o, 20, 0.5), S.CosineAnnealingLR(o, 40)],
            milestones=[50, 150],
        ),
        lambda o, S: S.SequentialLR(
            o, [S.ExponentialLR(o, 0.98), S.MultiStepLR(o, [10, 60])], milestones=[100]
        ),
    ],
    "CyclicLR": [
        lambda o, S: S.CyclicLR(o, 0.01, 0.1, step_size_up=20),
        lambda o, S: S.CyclicLR(
            o, [0.01, 0.02], [0.1, 0.3], 10, step_size_down=30, mode="triangular2"
        ),
        lambda o, S: S.CyclicLR(o, 0.001, 0.1, 15, mode="exp_range", gamma=0.99),
        lambda o, S: S.CyclicLR(o, 0.001, 0.1, 7, scale_fn=crazy_scale, scale_mode="cycle"),
        lambda o, S: S.CyclicLR(
            o, 0.001, 0.1, 9, scale_fn=lambda x: 0.999**x, scale_mode="iterations"
        ),
        lambda o, S: S.CyclicLR(
            o, 0.001, 0.1, 12, base_momentum=[0.7, 0.75], max_momentum=0.95, mode="triangular2"
        ),
    ],
    "OneCycleLR": [
        lambda o, S: S.OneCycleLR(o, 0.5, total_steps=STEPS),
        lambda o, S: S.OneCycleLR(
            o, [0.5, 0.2], epochs=10, steps_per_epoch=30, anneal_strategy="linear"
        ),
        lambda o, S: S.OneCycleLR(o, 1.0, total_steps=STEPS + 20, three_phase=True, pct_start=0.2),
        lambda o, S: S.OneCycleLR(
            o, 0.3, total_steps=STEPS, three_phase=True, anneal_strategy="linear", div_factor=10
        ),
    ],
    "CosineAnnealingWarmRestarts": [
        lambda o, S: S.CosineAnnealingWarmRestarts(o, 10),
        lambda o, S: S.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2),
        lambda o, S: S.CosineAnnealingWarmRestarts(o, 7, T_mult=3, eta_min=0.01),
    ],
}
CASES = [(name, i) for name, fs in CONFIGS.items() for i in range(len(fs))]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize(("name", "idx"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_parity(name, idx, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stepping in the right order warns about nothing
        run_parity(CONFIGS[name][idx], kind)


@pytest.mark.parametrize(
    "name", ["StepLR", "CosineAnnealingLR", "CyclicLR", "OneCycleLR", "SequentialLR"]
)
def test_cross_family(name):
    factory = CONFIGS[name][-1]
    # fuseopt's schedulers drive a torch optimizer ...
    run_parity(factory, "sgd", ours_on="torch")
    # ... and torch's schedulers drive a fuseopt optimizer.
    run_parity(factory, "adam", ours_on="fuseopt", ours_mod=T)


def test_all_schedulers_exported():
    assert set(T.__all__) <= set(F.__all__)  # torch's names, plus our extras
    assert set(F.__all__) - set(T.__all__) == {"WarmupCosineLR", "WSDLR", "preview", "plot"}
    assert fuseopt.lr_scheduler is F
    for name in F.__all__:
        assert getattr(F, name).__doc__, name


def test_schedulers_are_torchs_by_type_only(monkeypatch):
    """Every fuseopt scheduler is a :class:`torch.optim.lr_scheduler.LRScheduler` (and
    ReduceLROnPlateau torch's ``ReduceLROnPlateau``), as tools check, while none of torch's
    scheduler code runs: with every function of those torch classes made to fail, each scheduler
    still builds, steps, saves and loads."""
    from fuseopt.swa_utils import SWALR

    def forbidden(*args, **kwargs):
        raise AssertionError("torch's scheduler code ran")

    for cls in (T.LRScheduler, T.ReduceLROnPlateau):
        for name, value in list(vars(cls).items()):
            if isinstance(value, property):
                monkeypatch.setattr(cls, name, property(forbidden))
            elif callable(value) or isinstance(value, (staticmethod, classmethod)):
                monkeypatch.setattr(cls, name, forbidden)
    factories = [fs[0] for fs in CONFIGS.values()] + [
        lambda o, S: S.ReduceLROnPlateau(o, patience=0),
        lambda o, S: SWALR(o, swa_lr=0.05, anneal_epochs=3),
        lambda o, S: S.WarmupCosineLR(o, 20, warmup_steps=5),
        lambda o, S: S.WSDLR(o, 20, warmup_steps=4, decay_steps=6),
    ]
    for factory in factories:
        opt = make_opt("fuseopt")
        sched = factory(opt, F)
        assert isinstance(sched, T.LRScheduler), type(sched)
        plateau = isinstance(sched, F.ReduceLROnPlateau)
        assert plateau == isinstance(sched, T.ReduceLROnPlateau)
        for _ in range(3):
            opt.step()
            sched.step(1.0) if plateau else sched.step()
        lrs = sched.get_last_lr()
        sched.load_state_dict(sched.state_dict())
        assert sched.get_last_lr() == lrs


# ------------------------------------------------------------------------------- tensor lr
def test_tensor_lr_is_filled_in_place():
    opts = [
        fuseopt.Adam([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor(0.01)),
        torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor(0.01)),
    ]
    lr_tensor = opts[0].param_groups[0]["lr"]
    schs = [F.ExponentialLR(opts[0], 0.97), T.ExponentialLR(opts[1], 0.97)]
    for _ in range(50):
        for o, s in zip(opts, schs):
            o.step()
            s.step()
        assert opts[0].param_groups[0]["lr"] is lr_tensor
        assert torch.equal(opts[0].param_groups[0]["lr"], opts[1].param_groups[0]["lr"])
        last = schs[0].get_last_lr()[0]
        assert isinstance(last, torch.Tensor) and last is not lr_tensor
        assert torch.equal(last, schs[1].get_last_lr()[0])
    # initial_lr is a copy, not the live tensor
    assert opts[0].param_groups[0]["initial_lr"] is not lr_tensor


# --------------------------------------------------------------------------------- warnings
@pytest.mark.parametrize("family", ["fuseopt", "torch"])
def test_warns_when_scheduler_steps_before_optimizer(family):
    opt = make_opt(family)
    sched = F.StepLR(opt, 3)
    with pytest.warns(UserWarning, match=r"lr_scheduler.step\(\)` before `optimizer.step\(\)"):
        sched.step()
    opt = make_opt(family)
    sched = F.StepLR(opt, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        sched.step()
        sched.step()


def test_warns_when_step_overridden_after_init():
    opt = make_opt("fuseopt")
    sched = F.ExponentialLR(opt, 0.9)
    opt.step = lambda closure=None: None
    with pytest.warns(UserWarning, match="overridden"):
        sched.step()


def test_torch_and_fuseopt_schedulers_share_one_step_wrapper():
    opt = make_opt("fuseopt")
    F.StepLR(opt, 3)
    wrapped = opt.step
    T.StepLR(opt, 3)
    assert opt.step is wrapped  # torch recognises fuseopt's wrapper (and vice versa)
    opt = make_opt("torch")
    T.StepLR(opt, 3)
    wrapped = opt.step
    s = F.StepLR(opt, 3)
    assert opt.step is wrapped
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.step()


def test_get_lr_outside_step_warns():
    sched = F.StepLR(make_opt("fuseopt"), 3)
    with pytest.warns(UserWarning, match="get_last_lr"):
        sched.get_lr()


@pytest.mark.parametrize(
    "factory",
    [
        lambda o, S: S.StepLR(o, 7, 0.5),
        lambda o, S: S.MultiStepLR(o, [3, 9, 9, 20]),
        lambda o, S: S.ConstantLR(o, 0.4, 10),
        lambda o, S: S.LinearLR(o, 0.2, 0.9, 15),
        lambda o, S: S.ExponentialLR(o, 0.95),
        lambda o, S: S.PolynomialLR(o, 20, 1.5),
        lambda o, S: S.CosineAnnealingLR(o, 12, 0.01),
        lambda o, S: S.LambdaLR(o, lambda e: 0.9**e),
    ],
)
def test_deprecated_epoch_uses_closed_form(factory):
    opt_a, opt_b = make_opt("fuseopt"), make_opt("torch")
    sch_a, sch_b = factory(opt_a, F), factory(opt_b, T)
    for epoch in [0, 1, 5, 3, 9, 10, 30, 14, 2]:
        opt_a.step()
        opt_b.step()
        with pytest.warns(UserWarning, match="epoch parameter"):
            sch_a.step(epoch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sch_b.step(epoch)
        assert_same(opt_a, opt_b, f"epoch {epoch}")
        assert sch_a.last_epoch == epoch


# ----------------------------------------------------------------------- resume / state_dict
@pytest.mark.parametrize(
    "factory",
    [
        lambda o, S, e=-1: S.StepLR(o, 10, 0.5, last_epoch=e),
        lambda o, S, e=-1: S.CosineAnnealingLR(o, 40, 0.001, last_epoch=e),
        lambda o, S, e=-1: S.ExponentialLR(o, 0.98, last_epoch=e),
        lambda o, S, e=-1: S.LinearLR(o, 0.25, total_iters=80, last_epoch=e),
        lambda o, S, e=-1: S.CyclicLR(o, 0.01, 0.1, 13, last_epoch=e),
        lambda o, S, e=-1: S.OneCycleLR(o, 0.4, total_steps=200, last_epoch=e),
        lambda o, S, e=-1: S.CosineAnnealingWarmRestarts(o, 6, 2, last_epoch=e),
    ],
)
def test_last_epoch_resume(factory):
    results = []
    for family, S in (("fuseopt", F), ("torch", T)):
        opt = make_opt(family)
        sched = factory(opt, S)
        for _ in range(37):
            opt.step()
            sched.step()
        # A fresh optimizer holding the saved groups (initial_lr included) and a resumed scheduler.
        opt2 = make_opt(family)
        opt2.load_state_dict(opt.state_dict())
        sched2 = factory(opt2, S, sched.last_epoch)
        trace = [hyper(opt2)]
        for _ in range(60):
            opt2.step()
            sched2.step()
            trace.append(hyper(opt2))
        results.append(trace)
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "build",
    [
        lambda o: F.StepLR(o, 3, last_epoch=5),
        lambda o: F.CosineAnnealingLR(o, 10, last_epoch=0),
        lambda o: F.LambdaLR(o, lambda e: 1.0, last_epoch=2),
    ],
)
def test_resume_without_initial_lr_raises_key_error(build):
    with pytest.raises(KeyError, match="initial_lr.*param_groups\\[0\\]"):
        build(make_opt("fuseopt"))
    with pytest.raises(KeyError, match="initial_lr"):
        T.StepLR(make_opt("torch"), 3, last_epoch=5)


class Decay:
    """A stateful callable: its ``__dict__`` is part of the scheduler's state."""

    def __init__(self, rate):
        self.rate = rate

    def __call__(self, epoch):
        return self.rate**epoch


STATE_CASES = {
    "StepLR": lambda o, S: S.StepLR(o, 9, 0.5),
    "MultiStepLR": lambda o, S: S.MultiStepLR(o, [50, 120, 120]),
    "LambdaLR": lambda o, S: S.LambdaLR(o, [Decay(0.99), lambda e: 0.98**e]),
    "MultiplicativeLR": lambda o, S: S.MultiplicativeLR(o, Decay(0.999)),
    "CosineAnnealingLR": lambda o, S: S.CosineAnnealingLR(o, 30),
    "PolynomialLR": lambda o, S: S.PolynomialLR(o, 150, 2.0),
    "CyclicLR": lambda o, S: S.CyclicLR(o, 0.01, 0.1, 11, mode="exp_range", gamma=0.995),
    "CyclicLR-custom": lambda o, S: S.CyclicLR(o, 0.01, 0.1, 11, scale_fn=Decay(0.9)),
    "OneCycleLR": lambda o, S: S.OneCycleLR(o, 0.5, total_steps=STEPS, three_phase=True),
    "CAWR": lambda o, S: S.CosineAnnealingWarmRestarts(o, 4, 2, 0.001),
    "Sequential": lambda o, S: S.SequentialLR(
        o, [S.LinearLR(o, 0.1, total_iters=30), S.ExponentialLR(o, 0.99)], [30]
    ),
    "Chained": lambda o, S: S.ChainedScheduler([S.StepLR(o, 20), S.ExponentialLR(o, 0.999)]),
}


def normalize(state):
    """A state dict made comparable across implementations (functions become their names)."""
    if isinstance(state, dict):
        return {k: normalize(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(normalize(v) for v in state)
    if callable(state):
        return getattr(state, "__name__", type(state).__name__)
    return state


@pytest.mark.parametrize("name", list(STATE_CASES))
def test_state_dict_round_trip(name):
    factory = STATE_CASES[name]
    opt_a, opt_b = make_opt("fuseopt"), make_opt("torch")
    sch_a, sch_b = factory(opt_a, F), factory(opt_b, T)
    for _ in range(120):
        for o, s in ((opt_a, sch_a), (opt_b, sch_b)):
            o.step()
            s.step()
    state = sch_a.state_dict()
    assert "optimizer" not in state
    assert set(state) == set(sch_b.state_dict())  # torch's layout
    if name == "LambdaLR":
        assert state["lr_lambdas"] == [{"rate": 0.99}, None]
    # Restore into a fresh optimizer/scheduler pair built the usual way, then run both on.
    opt_c = make_opt("fuseopt")
    sch_c = factory(opt_c, F)
    opt_c.load_state_dict(opt_a.state_dict())
    sch_c.load_state_dict(state)
    assert set(sch_c.state_dict()) == set(state)
    assert normalize(sch_c.state_dict()) == normalize(state)
    for i in range(STEPS - 120):
        for o, s in ((opt_a, sch_a), (opt_b, sch_b), (opt_c, sch_c)):
            o.step()
            s.step()
        assert hyper(opt_c) == hyper(opt_a), i
        assert_same(opt_a, opt_b, f"step {i}")


def test_callable_state_restored_into_object():
    fn = Decay(0.5)
    sched = F.LambdaLR(make_opt("fuseopt", lrs=(0.1,)), fn)
    state = sched.state_dict()
    fn.rate = 0.1
    sched.load_state_dict(state)
    assert fn.rate == 0.5
    assert state["lr_lambdas"] == [{"rate": 0.5}]  # the given dict is left intact


# ---------------------------------------------------------------------------- chaining two
def test_two_schedulers_on_one_optimizer():
    def run(family, S):
        opt = make_opt(family)
        a, b = S.ExponentialLR(opt, 0.99), S.MultiStepLR(opt, [30, 80], 0.5)
        out = []
        for _ in range(STEPS):
            opt.step()
            a.step()
            b.step()
            out.append((hyper(opt), a.get_last_lr(), b.get_last_lr()))
        return out

    assert run("fuseopt", F) == run("torch", T)


def test_sequential_milestones_switch_schedulers():
    opt = make_opt("fuseopt", lrs=(1.0,))
    sched = F.SequentialLR(opt, [F.ConstantLR(opt, 0.1, 100), F.ExponentialLR(opt, 0.5)], [3])
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(5):
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == [0.1, 0.1, 0.1, 1.0, 0.5, 0.25]


# ------------------------------------------------------------------------ ReduceLROnPlateau
def metric(i):
    # Improving in bursts, with plateaus and noise.
    return 1.0 / (1 + i // 25) + 0.002 * math.sin(i)


PLATEAU = [
    dict(),
    dict(mode="min", threshold=0.05, threshold_mode="abs", patience=3),
    dict(mode="max", factor=0.5, patience=2, cooldown=4),
    dict(mode="max", threshold=0.01, threshold_mode="abs", patience=0, min_lr=[0.01, 0.002]),
    dict(patience=1, factor=0.9, eps=1e-3, min_lr=0.001),
    dict(patience=2, cooldown=2, factor=0.2, min_lr=(0.0, 0.04)),
]


@pytest.mark.parametrize("kw", PLATEAU, ids=[str(i) for i in range(len(PLATEAU))])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_reduce_on_plateau(kw, kind):
    opt_a, opt_b = make_opt("fuseopt", kind), make_opt("torch", kind)
    sch_a, sch_b = F.ReduceLROnPlateau(opt_a, **kw), T.ReduceLROnPlateau(opt_b, **kw)
    sign = -1.0 if kw.get("mode") == "max" else 1.0
    changes = 0
    for i in range(STEPS):
        before = hyper(opt_a)
        opt_a.step()
        opt_b.step()
        sch_a.step(torch.tensor(sign * metric(i), dtype=torch.float64))  # a 0-d tensor works too
        sch_b.step(sign * metric(i))
        assert_same(opt_a, opt_b, f"step {i}")
        assert sch_a.get_last_lr() == sch_b.get_last_lr()
        changes += hyper(opt_a) != before
        if i == 150:
            state = sch_a.state_dict()
            assert normalize(state) == normalize(sch_b.state_dict())
            fresh = F.ReduceLROnPlateau(opt_a)
            fresh.load_state_dict(state)
            sch_a = fresh
    assert changes > 0
    assert normalize(sch_a.state_dict()) == normalize(sch_b.state_dict())


def test_reduce_on_plateau_min_lr_and_eps():
    opt = make_opt("fuseopt", lrs=(1.0, 1.0))
    sched = F.ReduceLROnPlateau(opt, patience=0, factor=0.5, min_lr=[0.3, 0.0], eps=0.01)
    for _ in range(12):
        sched.step(1.0)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == 0.3  # clamped at its own min_lr
    assert 0.01 < lrs[1] <= 0.02  # stops once a cut would be smaller than eps
    with pytest.warns(UserWarning, match="epoch parameter"):
        sched.step(1.0, epoch=20)
    assert sched.last_epoch == 20


# ---------------------------------------------------------------- CyclicLR, OneCycle, CAWR
def test_cyclic_lr_momentum_and_betas():
    sgd = make_opt("fuseopt", "sgd")
    F.CyclicLR(sgd, 0.01, 0.1, 5, base_momentum=0.8, max_momentum=0.9)
    assert [g["momentum"] for g in sgd.param_groups] == [0.9, 0.9]
    adam = make_opt("fuseopt", "adam")
    F.CyclicLR(adam, 0.01, 0.1, 5, base_momentum=0.8, max_momentum=0.95)
    assert [g["betas"] for g in adam.param_groups] == [(0.95, 0.999)] * 2
    adam = make_opt("fuseopt", "adam")
    F.CyclicLR(adam, 0.01, 0.1, 5, cycle_momentum=False)
    assert [g["betas"] for g in adam.param_groups] == [(0.9, 0.999)] * 2
    run_parity(
        lambda o, S: S.CyclicLR(o, 0.01, 0.1, 5, cycle_momentum=False, mode="triangular2"), "adam"
    )


def test_cyclic_lr_needs_momentum():
    opts = [
        fuseopt.Adagrad([torch.nn.Parameter(torch.ones(2))]),
        torch.optim.Adagrad([torch.nn.Parameter(torch.ones(2))]),
    ]
    for opt, S in zip(opts, (F, T)):
        with pytest.raises(ValueError, match="momentum"):
            S.CyclicLR(opt, 0.01, 0.1)
        S.CyclicLR(opt, 0.01, 0.1, cycle_momentum=False)


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_one_cycle_loads_an_older_torchs_state_dict(strategy):
    """A OneCycleLR of an older torch kept its annealing function itself (``anneal_func``, no
    ``_anneal_func_type``): such a scheduler, given that state dict, anneals with the function,
    as torch's does (the lrs of a scheduler made with that ``anneal_strategy``)."""

    def lrs(S, legacy):
        opt = make_opt("fuseopt" if S is F else "torch")
        made_with = "cos" if legacy else strategy
        sched = S.OneCycleLR(opt, max_lr=2.0, total_steps=12, anneal_strategy=made_with)
        if legacy:
            del sched._anneal_func_type
            state = sched.state_dict()
            assert "_anneal_func_type" not in state and "anneal_func" not in state
            state["anneal_func"] = getattr(T.OneCycleLR, f"_annealing_{strategy}")
            sched.load_state_dict(state)
        seen = []
        for _ in range(11):
            opt.step()
            sched.step()
            seen.append(opt.param_groups[0]["lr"])
        return seen

    assert lrs(F, legacy=True) == lrs(T, legacy=True) == lrs(F, legacy=False)


def test_one_cycle_beyond_total_steps_raises():
    opt = make_opt("fuseopt")
    sched = F.OneCycleLR(opt, 0.1, total_steps=5)
    for _ in range(5):
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="total steps is 5"):
        sched.step()


@pytest.mark.parametrize(("t0", "tmult"), [(10, 1), (3, 2), (5, 3)])
def test_warm_restarts_fractional_epochs(t0, tmult):
    opt_a, opt_b = make_opt("fuseopt"), make_opt("torch")
    sch_a = F.CosineAnnealingWarmRestarts(opt_a, t0, tmult, eta_min=0.001)
    sch_b = T.CosineAnnealingWarmRestarts(opt_b, t0, tmult, eta_min=0.001)
    iters = 7
    for epoch in range(40):
        for i in range(iters):
            opt_a.step()
            opt_b.step()
            sch_a.step(epoch + i / iters)
            sch_b.step(epoch + i / iters)
            assert_same(opt_a, opt_b, f"epoch {epoch} + {i}/{iters}")
            assert (sch_a.T_cur, sch_a.T_i, sch_a.last_epoch) == (
                sch_b.T_cur,
                sch_b.T_i,
                sch_b.last_epoch,
            )
    sch_a.step(3)  # going back in time restarts the first period
    sch_b.step(3)
    assert_same(opt_a, opt_b)
    with pytest.raises(ValueError, match="epoch"):
        sch_a.step(-1)


# ------------------------------------------------------------------------------ bad input
def _sgd(family):
    return make_opt(family)


def _seq_empty(o, S):
    return S.SequentialLR(o, [], [])


BAD = [
    ("factor", lambda o, S: S.ConstantLR(o, factor=1.5)),
    ("factor", lambda o, S: S.ConstantLR(o, factor=-0.1)),
    ("Starting multiplicative factor", lambda o, S: S.LinearLR(o, start_factor=0)),
    ("Ending multiplicative factor", lambda o, S: S.LinearLR(o, end_factor=1.5)),
    ("lr_lambdas", lambda o, S: S.LambdaLR(o, [lambda e: 1.0])),
    ("lr_lambdas", lambda o, S: S.MultiplicativeLR(o, [lambda e: 1.0] * 3)),
    ("lr_lambda", lambda o, S: S.MultiplicativeLR(o, 0.5)),
    ("Optimizer", lambda o, S: S.StepLR(object(), 3)),
    ("Optimizer", lambda o, S: S.ReduceLROnPlateau(object())),
    ("Optimizer", lambda o, S: S.CyclicLR(object(), 0.1, 1.0)),
    ("Optimizer", lambda o, S: S.OneCycleLR(object(), 0.1, 10)),
    ("T_0", lambda o, S: S.CosineAnnealingWarmRestarts(o, 0)),
    ("T_0", lambda o, S: S.CosineAnnealingWarmRestarts(o, 2.5)),
    ("T_mult", lambda o, S: S.CosineAnnealingWarmRestarts(o, 5, T_mult=0)),
    ("T_mult", lambda o, S: S.CosineAnnealingWarmRestarts(o, 5, T_mult=1.5)),
    ("eta_min", lambda o, S: S.CosineAnnealingWarmRestarts(o, 5, eta_min="0")),
    ("total_steps", lambda o, S: S.OneCycleLR(o, 0.1, total_steps=0)),
    ("total_steps", lambda o, S: S.OneCycleLR(o, 0.1, total_steps=10.0)),
    ("epochs", lambda o, S: S.OneCycleLR(o, 0.1, epochs=0, steps_per_epoch=3)),
    ("steps_per_epoch", lambda o, S: S.OneCycleLR(o, 0.1, epochs=2, steps_per_epoch=-3)),
    ("total_steps", lambda o, S: S.OneCycleLR(o, 0.1, epochs=2)),
    ("pct_start", lambda o, S: S.OneCycleLR(o, 0.1, 10, pct_start=1.5)),
    ("pct_start", lambda o, S: S.OneCycleLR(o, 0.1, 10, pct_start=1)),
    ("anneal_strategy", lambda o, S: S.OneCycleLR(o, 0.1, 10, anneal_strategy="exp")),
    ("max_lr", lambda o, S: S.OneCycleLR(o, [0.1, 0.2, 0.3], 10)),
    ("max_momentum", lambda o, S: S.OneCycleLR(o, 0.1, 10, max_momentum=[0.9])),
    ("base_lr", lambda o, S: S.CyclicLR(o, [0.1], 1.0)),
    ("max_lr", lambda o, S: S.CyclicLR(o, 0.1, [1.0, 2.0, 3.0])),
    ("base_momentum", lambda o, S: S.CyclicLR(o, 0.1, 1.0, base_momentum=(0.8,))),
    ("mode", lambda o, S: S.CyclicLR(o, 0.1, 1.0, mode="square")),
    ("Factor", lambda o, S: S.ReduceLROnPlateau(o, factor=1.0)),
    ("mode", lambda o, S: S.ReduceLROnPlateau(o, mode="up")),
    ("threshold mode", lambda o, S: S.ReduceLROnPlateau(o, threshold_mode="pct")),
    ("min_lrs", lambda o, S: S.ReduceLROnPlateau(o, min_lr=[0.1])),
    ("at least one scheduler", _seq_empty),
    ("at least one scheduler", lambda o, S: S.ChainedScheduler([])),
    ("milestones", lambda o, S: S.SequentialLR(o, [S.StepLR(o, 2), S.StepLR(o, 3)], [1, 2])),
    ("ReduceLROnPlateau", lambda o, S: S.SequentialLR(o, [S.ReduceLROnPlateau(o)], [])),
    ("ReduceLROnPlateau", lambda o, S: S.ChainedScheduler([S.ReduceLROnPlateau(o)])),
    ("optimizer", lambda o, S: S.ChainedScheduler([S.StepLR(o, 2), S.StepLR(_sgd("fuseopt"), 2)])),
    ("optimizer", lambda o, S: S.SequentialLR(o, [object()], [])),
]


@pytest.mark.parametrize(("needle", "build"), BAD, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD)])
def test_bad_input_matches_torch(needle, build):
    with pytest.raises(Exception) as theirs:
        build(make_opt("torch"), T)
    with pytest.raises(type(theirs.value)) as ours:
        build(make_opt("fuseopt"), F)
    assert type(ours.value) is type(theirs.value)
    assert needle in str(ours.value)
    assert str(ours.value) == str(theirs.value) or isinstance(ours.value, KeyError)
