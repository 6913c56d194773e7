"""fuseopt.lr_scheduler beyond torch: schedule-backed schedulers, any hyper-parameter, preview and
plot, ReduceLROnPlateau inside composites."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.optim.lr_scheduler as T

import fuseopt
import fuseopt.lr_scheduler as F
from fuseopt import schedules


def _sgd(lrs=(0.1, 0.05)):
    groups = [{"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr} for lr in lrs]
    return fuseopt.SGD(groups, lr=0.1, momentum=0.9)


def _adamw():
    p = torch.nn.Parameter(torch.ones(2))
    return fuseopt.AdamW([p], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)


def _run(opt, sched, steps, key="lr"):
    """Values of every group per step: the one in effect, then step."""
    out = []
    for _ in range(steps):
        out.append([F._get_hyper(g, F._check_key(key)) for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


# ------------------------------------------------------------------ WarmupCosineLR and WSDLR
SCHEDULED = {
    "warmup_cosine": (
        lambda o: F.WarmupCosineLR(o, 20, warmup_steps=5, warmup_start_factor=0.1, eta_min=1e-3),
        lambda base: schedules.warmup_cosine(base, 20, 5, start=0.1 * base, end=1e-3),
    ),
    "wsd": (
        lambda o: F.WSDLR(o, 20, warmup_steps=4, decay_steps=6, decay="cosine", eta_min=1e-3),
        lambda base: schedules.wsd(base, 20, 4, 6, end=1e-3, decay="cosine"),
    ),
    "wsd_default": (
        lambda o: F.WSDLR(o, 20),
        lambda base: schedules.wsd(base, 20),
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_schedule_scheduler_matches_schedule(name):
    build, reference = SCHEDULED[name]
    opt = _sgd()
    got = _run(opt, build(opt), 25)
    for base, col in zip((0.1, 0.05), zip(*got)):
        assert list(col) == [reference(base)(t) for t in range(25)]


@pytest.mark.parametrize("name", sorted(SCHEDULED))
@pytest.mark.parametrize("k", [0, 1, 5, 12, 24])
def test_schedule_scheduler_resumes_exactly(name, k):
    # Save after k steps; a new optimizer and scheduler load the checkpoint and go on.
    build, _ = SCHEDULED[name]
    n = 30
    opt = _sgd()
    full = _run(opt, build(opt), n)

    opt_a = _sgd()
    sched_a = build(opt_a)
    head = _run(opt_a, sched_a, k)
    opt_state, sched_state = opt_a.state_dict(), sched_a.state_dict()

    opt_b = _sgd((0.7, 0.3))  # other lrs: the checkpoint must win
    sched_b = build(opt_b)
    opt_b.load_state_dict(opt_state)
    sched_b.load_state_dict(sched_state)
    tail = _run(opt_b, sched_b, n - k)
    assert head + tail == full


def test_schedule_scheduler_state_dict_pickles(tmp_path):
    opt = _sgd()
    sched = F.WSDLR(opt, 10, warmup_steps=2)
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=False)
    assert state["last_epoch"] == 0


def test_schedule_scheduler_epoch_closed_form():
    opt = _sgd()
    sched = F.WarmupCosineLR(opt, 10, warmup_steps=2)
    sched.step(6)
    assert sched.get_last_lr() == [schedules.warmup_cosine(b, 10, 2)(6) for b in (0.1, 0.05)]


@pytest.mark.parametrize(
    ("needle", "build"),
    [
        ("total_steps", lambda o: F.WarmupCosineLR(o, 0)),
        ("total_steps", lambda o: F.WSDLR(o, 2.5)),
        ("warmup_steps", lambda o: F.WarmupCosineLR(o, 10, warmup_steps=11)),
        ("warmup_steps", lambda o: F.WSDLR(o, 10, warmup_steps=-1)),
        ("warmup_start_factor", lambda o: F.WarmupCosineLR(o, 10, warmup_start_factor=1.5)),
        ("warmup_start_factor", lambda o: F.WSDLR(o, 10, warmup_start_factor="0")),
        ("eta_min", lambda o: F.WarmupCosineLR(o, 10, eta_min=-1.0)),
        ("eta_min", lambda o: F.WSDLR(o, 10, eta_min=None)),
        ("decay_steps", lambda o: F.WSDLR(o, 10, warmup_steps=5, decay_steps=6)),
        ("decay_steps", lambda o: F.WSDLR(o, 10, decay_steps=1.5)),
        ("decay", lambda o: F.WSDLR(o, 10, decay="exp")),
        ("Optimizer", lambda o: F.WSDLR(object(), 10)),
        ("key", lambda o: F.WarmupCosineLR(o, 10, key=3)),
    ],
)
def test_schedule_scheduler_bad_input(needle, build):
    with pytest.raises((TypeError, ValueError)) as err:
        build(_sgd())
    assert needle in str(err.value)


# ------------------------------------------------------------------------- any hyper-parameter
def test_step_lr_on_weight_decay():
    opt = _adamw()
    sched = F.StepLR(opt, step_size=3, gamma=0.5, key="weight_decay")
    got = _run(opt, sched, 12, key="weight_decay")
    assert [v[0] for v in got] == pytest.approx([0.1 * 0.5 ** (t // 3) for t in range(12)])
    group = opt.param_groups[0]
    assert group["initial_weight_decay"] == 0.1
    assert "initial_lr" not in group
    assert group["lr"] == 1e-3 and group["betas"] == (0.9, 0.999)
    assert sched.get_last_lr() == [group["weight_decay"]]


def test_cosine_on_beta1():
    opt = _adamw()
    sched = F.CosineAnnealingLR(opt, T_max=10, eta_min=0.5, key=("betas", 0))
    got = _run(opt, sched, 25, key=("betas", 0))
    want = [0.5 + (0.9 - 0.5) * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(25)]
    assert [v[0] for v in got] == pytest.approx(want, abs=1e-12)
    group = opt.param_groups[0]
    assert isinstance(group["betas"], tuple) and group["betas"][1] == 0.999
    assert group["initial_betas_0"] == 0.9
    assert group["lr"] == 1e-3 and "initial_lr" not in group


def test_warmup_cosine_on_weight_decay_and_lr_together():
    opt = _adamw()
    wd = F.WarmupCosineLR(opt, 10, warmup_steps=2, eta_min=0.01, key="weight_decay")
    lr = F.StepLR(opt, step_size=4)
    seen = []
    for _ in range(12):
        g = opt.param_groups[0]
        seen.append((g["lr"], g["weight_decay"]))
        opt.step()
        wd.step()
        lr.step()
    ref = schedules.warmup_cosine(0.1, 10, 2, end=0.01)
    assert [s[1] for s in seen] == [ref(t) for t in range(12)]
    assert [s[0] for s in seen] == pytest.approx([1e-3 * 0.1 ** (t // 4) for t in range(12)])


def test_key_state_dict_and_resume_needs_initial():
    opt = _adamw()
    sched = F.StepLR(opt, 2, key=("betas", 0))
    assert sched.state_dict()["_key"] == ("betas", 0)
    assert "_key" not in F.StepLR(_sgd(), 2).state_dict()  # torch's layout for the lr
    with pytest.raises(KeyError, match="initial_weight_decay"):
        F.StepLR(_adamw(), 2, last_epoch=3, key="weight_decay")


def test_key_on_tensor_beta():
    p = torch.nn.Parameter(torch.ones(2))
    opt = fuseopt.Adam([p], lr=1e-3, betas=(torch.tensor(0.9), torch.tensor(0.999)))
    beta1 = opt.param_groups[0]["betas"][0]
    sched = F.ExponentialLR(opt, 0.5, key=("betas", 0))
    opt.step()
    sched.step()
    assert opt.param_groups[0]["betas"][0] is beta1  # filled in place
    assert float(beta1) == pytest.approx(0.45)


# --------------------------------------------------------------------------- preview and plot
def _torch_lrs(build, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    sched = build(opt, T)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(
    "build",
    [
        lambda o, S: S.StepLR(o, step_size=3, gamma=0.3),
        lambda o, S: S.OneCycleLR(o, max_lr=2.0, total_steps=40),
        lambda o, S: S.OneCycleLR(o, max_lr=2.0, total_steps=40, three_phase=True),
    ],
    ids=["StepLR", "OneCycleLR", "OneCycleLR-3"],
)
def test_preview_matches_torch(build):
    assert F.preview(lambda o: build(o, F), 40) == _torch_lrs(build, 40)


def test_preview_other_key_and_optimizer():
    got = F.preview(
        lambda o: F.OneCycleLR(o, max_lr=1.0, total_steps=20),
        20,
        key=("betas", 0),
        optimizer_factory=lambda ps: fuseopt.AdamW(ps, lr=1.0),
    )
    assert got[0] == 0.95 and min(got) == pytest.approx(0.85)
    assert F.preview(lambda o: F.StepLR(o, 2), 0) == []
    with pytest.raises(ValueError, match="steps"):
        F.preview(lambda o: F.StepLR(o, 2), -1)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "lr.png"
    assert F.plot(lambda o: F.WarmupCosineLR(o, 50, warmup_steps=5), 60, path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"fuseopt\[plot\]"):
        F.plot(lambda o: F.StepLR(o, 2), 5, tmp_path / "x.png")


def test_matplotlib_not_imported_by_the_module():
    import subprocess
    import sys

    code = "import sys, fuseopt.lr_scheduler; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------ ReduceLROnPlateau in composites
def test_sequential_warmup_then_plateau():
    opt = _sgd((0.1,))
    warm = F.LinearLR(opt, start_factor=0.1, total_iters=5)
    plateau = F.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    sched = F.SequentialLR(opt, [warm, plateau], milestones=[5], forward_metrics=True)
    lrs = []
    metrics = [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 0.9, 0.8] + [0.8] * 8
    for m in metrics:
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(m)
    assert lrs[:5] == pytest.approx([0.1 * (0.1 + 0.9 * t / 5) for t in range(5)])
    # From the milestone on: the initial lr while the metric improves (to 0.8 at step 7), halved
    # after 3 epochs without improvement (patience 2), and again 3 epochs later.
    assert lrs[5:] == pytest.approx([0.1] * 6 + [0.05] * 3 + [0.025] * 2)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
    with pytest.raises(TypeError, match="metrics"):
        sched.step()


def test_sequential_plateau_first():
    opt = _sgd((0.1,))
    plateau = F.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    sched = F.SequentialLR(opt, [plateau, F.StepLR(opt, 2)], milestones=[3], forward_metrics=True)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(1.0)
    # plateau: best at epoch 1, bad from 2 (patience 0); StepLR restarts from 0.1 at 3.
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.1, 0.1, 0.01])


def test_chained_exponential_and_plateau():
    opt = _sgd((0.1,))
    chain = F.ChainedScheduler(
        [F.ExponentialLR(opt, 0.9), F.ReduceLROnPlateau(opt, factor=0.5, patience=0)],
        forward_metrics=True,
    )
    ref, got, want = 0.1, [], []
    for k in range(1, 10):
        opt.step()
        chain.step(1.0)  # constant metric: bad every epoch after the first
        ref = ref * 0.9
        if k >= 2:
            ref = ref * 0.5
        got.append(opt.param_groups[0]["lr"])
        want.append(ref)
    assert got == want
    assert chain.get_last_lr() == [got[-1]]
    assert want[-1] == pytest.approx(0.1 * 0.9**9 * 0.5**8)


def test_composites_keep_torch_default():
    opt = _sgd()
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        F.ChainedScheduler([F.ExponentialLR(opt, 0.9), F.ReduceLROnPlateau(opt)])
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        F.SequentialLR(opt, [F.StepLR(opt, 2), F.ReduceLROnPlateau(opt)], [3])
    chain = F.ChainedScheduler([F.StepLR(opt, 2), F.ExponentialLR(opt, 0.9)])
    assert "_forward_metrics" not in chain.state_dict()


def test_composite_with_plateau_state_round_trip():
    def build(opt):
        return F.ChainedScheduler(
            [F.ExponentialLR(opt, 0.9), F.ReduceLROnPlateau(opt, factor=0.5, patience=1)],
            forward_metrics=True,
        )

    opt_a = _sgd()
    a = build(opt_a)
    for m in (3.0, 2.0, 2.0, 2.0):
        opt_a.step()
        a.step(m)
    opt_b = _sgd()
    b = build(opt_b)
    opt_b.load_state_dict(opt_a.state_dict())
    b.load_state_dict(a.state_dict())
    for m in (2.0, 1.0, 1.0, 1.0):
        opt_a.step()
        a.step(m)
        opt_b.step()
        b.step(m)
        assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_b.param_groups]
