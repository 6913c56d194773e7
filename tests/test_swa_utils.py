"""fuseopt.swa_utils against torch.optim.swa_utils: equal averages, schedules, BN stats, errors."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.optim.swa_utils as T
from torch import nn

import fuseopt
import fuseopt.swa_utils as F

DTYPES = (torch.float32, torch.float64)


# ------------------------------------------------------------------------------------- harness
def make_model(dtype=torch.float32, seed=0):
    """A small model with parameters, float buffers and an integer buffer (num_batches_tracked)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).to(dtype)


def perturb(model, step, dtype):
    """Stand-in for a training step: new weights and a train-mode forward to move BN buffers."""
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
        model.train()
        model(torch.randn(8, 3, generator=g, dtype=dtype))


def run_pair(n_updates=6, dtype=torch.float32, fuse_kw=None, torch_kw=None):
    """Update a fuseopt and a torch AveragedModel from the same sequence of models."""
    model = make_model(dtype)
    fa = F.AveragedModel(model, **(fuse_kw or {}))
    ta = T.AveragedModel(model, **(torch_kw or {}))
    for step in range(n_updates):
        perturb(model, step, dtype)
        fa.update_parameters(model)
        ta.update_parameters(model)
    return fa, ta


def assert_state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def message(fn, *args, **kwargs):
    """The message of the exception ``fn`` raises (the test fails when it raises none)."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return type(info.value), str(info.value)


# ----------------------------------------------------------------------------- AveragedModel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_buffers", [False, True])
def test_swa_default_matches_torch(dtype, use_buffers):
    # The same foreach kernels run in the same order, so the averages are bitwise equal.
    fa, ta = run_pair(
        dtype=dtype, fuse_kw={"use_buffers": use_buffers}, torch_kw={"use_buffers": use_buffers}
    )
    assert_state_equal(fa, ta)
    assert int(fa.n_averaged) == 6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_buffers", [False, True])
def test_swa_avg_fn_matches_torch(dtype, use_buffers):
    fa, ta = run_pair(
        dtype=dtype,
        fuse_kw={"avg_fn": F.get_swa_avg_fn(), "use_buffers": use_buffers},
        torch_kw={"avg_fn": T.get_swa_avg_fn(), "use_buffers": use_buffers},
    )
    assert_state_equal(fa, ta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_buffers", [False, True])
def test_ema_multi_avg_fn_matches_torch(dtype, use_buffers):
    fa, ta = run_pair(
        dtype=dtype,
        fuse_kw={"multi_avg_fn": F.get_ema_multi_avg_fn(0.9), "use_buffers": use_buffers},
        torch_kw={"multi_avg_fn": T.get_ema_multi_avg_fn(0.9), "use_buffers": use_buffers},
    )
    assert_state_equal(fa, ta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_buffers", [False, True])
def test_ema_avg_fn_matches_torch(dtype, use_buffers):
    fa, ta = run_pair(
        dtype=dtype,
        fuse_kw={"avg_fn": F.get_ema_avg_fn(0.9), "use_buffers": use_buffers},
        torch_kw={"avg_fn": T.get_ema_avg_fn(0.9), "use_buffers": use_buffers},
    )
    assert_state_equal(fa, ta)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swa_is_the_mean(dtype):
    # Independent of torch: the SWA of n models is their mean (rounding only: 1e-6 relative).
    model = make_model(dtype)
    fa = F.AveragedModel(model)
    snapshots = []
    for step in range(5):
        perturb(model, step, dtype)
        fa.update_parameters(model)
        snapshots.append([p.detach().clone() for p in model.parameters()])
    for i, p in enumerate(fa.module.parameters()):
        mean = torch.stack([s[i] for s in snapshots]).mean(0)
        torch.testing.assert_close(p.detach(), mean, rtol=1e-6, atol=1e-6)


def test_buffers_copied_without_use_buffers():
    model = make_model()
    fa = F.AveragedModel(model)
    for step in range(3):
        perturb(model, step, torch.float32)
        fa.update_parameters(model)
    for b_avg, b_model in zip(fa.module.buffers(), model.buffers()):
        assert torch.equal(b_avg, b_model)


def test_forward_and_deepcopy():
    model = make_model()
    fa = F.AveragedModel(model)
    assert fa.module is not model
    x = torch.randn(5, 3)
    model.eval()
    fa.eval()
    assert torch.equal(fa(x), model(x))
    assert fa.n_averaged.dtype == torch.long


def test_device_argument():
    model = make_model()
    fa = F.AveragedModel(model, device="cpu")
    ta = T.AveragedModel(model, device="cpu")
    assert fa.n_averaged.device == ta.n_averaged.device
    assert next(fa.parameters()).device == torch.device("cpu")


def test_state_dict_loads_into_torch():
    fa, ta = run_pair()
    fresh = T.AveragedModel(make_model())
    fresh.load_state_dict(fa.state_dict())
    assert_state_equal(fresh, ta)


# ------------------------------------------------------------------------------------- SWALR
def sgd_pair(lrs=(0.1, 0.05, 0.2)):
    def groups():
        return [{"params": [nn.Parameter(torch.ones(2))], "lr": lr} for lr in lrs]

    return fuseopt.SGD(groups(), lr=0.1), torch.optim.SGD(groups(), lr=0.1)


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("anneal_epochs", [0, 1, 10, 30])
@pytest.mark.parametrize("swa_lr", [0.05, [0.01, 0.02, 0.5]])
def test_swalr_matches_torch(strategy, anneal_epochs, swa_lr):
    fo, to = sgd_pair()
    fs = F.SWALR(fo, swa_lr, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
    ts = T.SWALR(to, swa_lr, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
    assert fs.get_last_lr() == ts.get_last_lr()
    for _ in range(50):
        fo.step()
        to.step()
        fs.step()
        ts.step()
        assert fs.get_last_lr() == ts.get_last_lr()
        assert [g["lr"] for g in fo.param_groups] == [g["lr"] for g in to.param_groups]


def test_swalr_after_other_scheduler_matches_torch():
    # SWALR recovers the lr it starts from, so it composes with a scheduler run before it.
    fo, to = sgd_pair()
    fc = fuseopt.lr_scheduler.CosineAnnealingLR(fo, T_max=20)
    tc = torch.optim.lr_scheduler.CosineAnnealingLR(to, T_max=20)
    for _ in range(7):
        fo.step(), to.step(), fc.step(), tc.step()
    fs = F.SWALR(fo, 0.03, anneal_epochs=5)
    ts = T.SWALR(to, 0.03, anneal_epochs=5)
    for _ in range(20):
        fo.step(), to.step(), fs.step(), ts.step()
        assert fs.get_last_lr() == ts.get_last_lr()


def test_swalr_state_dict_roundtrip():
    fo, _ = sgd_pair()
    fs = F.SWALR(fo, 0.05, anneal_epochs=4, anneal_strategy="linear")
    for _ in range(2):
        fo.step(), fs.step()
    state = fs.state_dict()
    assert "anneal_func" not in state and "optimizer" not in state
    fo2, _ = sgd_pair()
    fs2 = F.SWALR(fo2, 0.05, anneal_epochs=4, anneal_strategy="cos")
    fs2.load_state_dict(state)
    assert fs2.anneal_func is F.SWALR._linear_anneal
    assert isinstance(fs2, fuseopt.lr_scheduler.LRScheduler)


# ---------------------------------------------------------------------------------- update_bn
def bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3, momentum=0.3),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.BatchNorm1d(5),
    )


def bn_batches(n=4, kind="tensor"):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        x = torch.randn(6, 2, 6, 6, generator=g) * 3 + 1
        y = torch.randint(0, 5, (6,), generator=g)
        out.append(x if kind == "tensor" else (x, y) if kind == "tuple" else [x, y])
    return out


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list"])
@pytest.mark.parametrize("training", [True, False])
def test_update_bn_matches_torch(kind, training):
    fm, tm = bn_model(), bn_model()
    fm.train(training), tm.train(training)
    loader = bn_batches(kind=kind)
    F.update_bn(loader, fm)
    T.update_bn(loader, tm)
    assert_state_equal(fm, tm)
    assert fm.training is training
    assert [m.momentum for m in fm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [
        0.3,
        0.1,
    ]


def test_update_bn_device_and_averaged_model():
    fm, tm = bn_model(), bn_model()
    fa, ta = F.AveragedModel(fm), T.AveragedModel(tm)
    F.update_bn(bn_batches(), fa, device="cpu")
    T.update_bn(bn_batches(), ta, device="cpu")
    assert_state_equal(fa, ta)


def test_update_bn_without_bn_is_a_no_op():
    model = nn.Linear(2, 2).eval()
    F.update_bn([torch.randn(3, 2)], model)
    assert not model.training


def test_update_bn_call_fn_dict_batches():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = bn_model()

        def forward(self, *, image):
            return self.net(image)

    fm = Keyword()
    tm = bn_model()
    tensors = bn_batches()
    F.update_bn(
        [{"image": x, "label": 0} for x in tensors],
        fm,
        call_fn=lambda m, b: m(image=b["image"]),
        device="cpu",
    )
    T.update_bn(tensors, tm)
    assert_state_equal(fm.net, tm)


def test_update_bn_max_batches():
    fm, tm = bn_model(), bn_model()
    batches = bn_batches(5)
    F.update_bn(iter(batches), fm, max_batches=2)
    T.update_bn(batches[:2], tm)
    assert_state_equal(fm, tm)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_update_bn_max_batches_error(bad):
    with pytest.raises(ValueError, match="max_batches"):
        F.update_bn(bn_batches(1), bn_model(), max_batches=bad)


@pytest.mark.parametrize("tqdm", ["installed", "missing"])
def test_update_bn_progress(capsys, monkeypatch, tqdm):
    if tqdm == "missing":
        monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    else:
        pytest.importorskip("tqdm")
    fm, tm = bn_model(), bn_model()
    F.update_bn(bn_batches(3), fm, progress=True)
    T.update_bn(bn_batches(3), tm)
    assert_state_equal(fm, tm)
    err = capsys.readouterr().err
    assert "update_bn" in err and "3/3" in err
    F.update_bn(iter(bn_batches(3)), fm, progress=True, max_batches=2)
    # tqdm counts "2it" (no length known); the plain fallback writes "batch 2"
    assert ("2it" if tqdm == "installed" else "batch 2") in capsys.readouterr().err


def test_update_bn_restores_state_on_error():
    model = bn_model().eval()

    def boom(m, b):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        F.update_bn(bn_batches(1), model, call_fn=boom)
    assert not model.training
    assert model[1].momentum == 0.3


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("decay", [-0.1, 1.5])
@pytest.mark.parametrize("name", ["get_ema_multi_avg_fn", "get_ema_avg_fn"])
def test_decay_error(name, decay):
    got = message(getattr(F, name), decay)
    assert got == message(getattr(T, name), decay)
    assert got[0] is ValueError and str(decay) in got[1] and "[0,1]" in got[1]


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_decay_bounds_accepted(decay):
    F.get_ema_multi_avg_fn(decay)
    F.get_ema_avg_fn(decay)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"anneal_epochs": -1},
        {"anneal_epochs": 2.0},
        {"anneal_strategy": "exp"},
        {"swa_lr": [0.1, 0.2]},
    ],
)
def test_swalr_errors(kwargs):
    kwargs = {"swa_lr": 0.05, **kwargs}
    fo, to = sgd_pair()
    got = message(F.SWALR, fo, **kwargs)
    assert got == message(T.SWALR, to, **kwargs)
    assert got[0] is ValueError


def test_swalr_rejects_non_optimizer():
    with pytest.raises(TypeError):
        F.SWALR(object(), 0.05)


def test_averaged_model_both_fns_error():
    model = make_model()
    kw = {"avg_fn": F.get_swa_avg_fn(), "multi_avg_fn": F.get_swa_multi_avg_fn()}
    got = message(F.AveragedModel, model, **kw)
    assert got == message(T.AveragedModel, model, **kw)


# ---------------------------------------------------------------------- beyond torch: warm-up
@pytest.mark.parametrize("n", [1, 2, 5, 10, 100, 10_000])
@pytest.mark.parametrize("power,gamma", [(2 / 3, 1.0), (0.75, 2.0), (1.0, 10.0)])
def test_warmup_decay_closed_form(n, power, gamma):
    expected = min(0.999, 1 - (1 + n / gamma) ** -power)
    assert F.ema_warmup_decay(n, 0.999, power, gamma) == expected


def test_warmup_decay_values():
    # (1 + 1)^-1 = 1/2 and (1 + 3)^-1 = 1/4 for power 1, gamma 1; capped at decay later.
    assert F.ema_warmup_decay(1, 0.9, 1.0, 1.0) == 0.5
    assert F.ema_warmup_decay(3, 0.9, 1.0, 1.0) == 0.75
    assert F.ema_warmup_decay(1000, 0.9, 1.0, 1.0) == 0.9
    assert F.ema_warmup_decay(0, 0.9, 1.0, 1.0) == 0.0


@pytest.mark.parametrize("multi", [True, False])
def test_warmup_ema_averages(multi):
    # float64 against the recurrence in Python floats: 1e-12 covers the lerp-vs-formula rounding.
    decay, power, gamma = 0.99, 1.0, 1.0
    fn = F.get_ema_multi_avg_fn if multi else F.get_ema_avg_fn
    kw = {
        "multi_avg_fn" if multi else "avg_fn": fn(
            decay, warmup=True, warmup_power=power, warmup_gamma=gamma
        )
    }
    p = nn.Parameter(torch.zeros((), dtype=torch.float64))
    holder = nn.ParameterList([p])
    avg = F.AveragedModel(holder, **kw)
    values = [1.0, 3.0, -2.0, 5.0, 0.5]
    ema = None
    for n, v in enumerate(values):
        with torch.no_grad():
            p.fill_(v)
        avg.update_parameters(holder)
        if ema is None:
            ema = v
        else:
            d = min(decay, 1 - (1 + n / gamma) ** -power)
            ema = d * ema + (1 - d) * v
        assert math.isclose(avg.module[0].item(), ema, rel_tol=1e-12, abs_tol=1e-12)


def test_warmup_off_is_torch():
    fa, ta = run_pair(
        fuse_kw={"multi_avg_fn": F.get_ema_multi_avg_fn(0.9, warmup=False)},
        torch_kw={"multi_avg_fn": T.get_ema_multi_avg_fn(0.9)},
    )
    assert_state_equal(fa, ta)


@pytest.mark.parametrize("kw", [{"warmup_power": 0.0}, {"warmup_gamma": -1.0}])
def test_warmup_errors(kw):
    with pytest.raises(ValueError, match="warmup_"):
        F.get_ema_multi_avg_fn(0.9, warmup=True, **kw)
    with pytest.raises(ValueError, match="warmup_"):
        F.get_ema_avg_fn(0.9, warmup=True, **kw)


# ------------------------------------------------------------------------ beyond torch: copy
def test_copy_false_wraps_module():
    model = make_model()
    ema_copy = make_model(seed=1)
    fa = F.AveragedModel(ema_copy, copy=False)
    assert fa.module is ema_copy
    ta = T.AveragedModel(ema_copy)  # deep copy of the same starting weights
    for step in range(4):
        perturb(model, step, torch.float32)
        fa.update_parameters(model)
        ta.update_parameters(model)
    assert fa.module is ema_copy
    assert_state_equal(fa, ta)
    assert_state_equal(F.AveragedModel(make_model()), F.AveragedModel(make_model(), copy=True))


# ----------------------------------------------------------- beyond torch: documentation examples
def doc_setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)) for _ in range(3)]
    return model, loader


def swa_example(optim, swa_utils):
    """torch.optim's "Putting it all together: SWA", scaled down (30 epochs, SWA from 16)."""
    model, loader = doc_setup()
    loss_fn = nn.MSELoss()
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    swa_model = swa_utils.AveragedModel(model)
    scheduler = optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=30)
    swa_start = 16
    swa_scheduler = swa_utils.SWALR(optimizer, swa_lr=0.05)
    for epoch in range(30):
        for input, target in loader:
            optimizer.zero_grad()
            loss_fn(model(input), target).backward()
            optimizer.step()
        if epoch > swa_start:
            swa_model.update_parameters(model)
            swa_scheduler.step()
        else:
            scheduler.step()
    swa_utils.update_bn(loader, swa_model)
    return swa_model, swa_model(torch.ones(2, 4))


def ema_example(optim, swa_utils):
    """torch.optim's "Putting it all together: EMA", scaled down (10 epochs)."""
    model, loader = doc_setup()
    loss_fn = nn.MSELoss()
    optimizer = optim.SGD(model.parameters(), lr=0.05)
    ema_model = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.999))
    for _ in range(10):
        for input, target in loader:
            optimizer.zero_grad()
            loss_fn(model(input), target).backward()
            optimizer.step()
            ema_model.update_parameters(model)
    swa_utils.update_bn(loader, ema_model)
    return ema_model, ema_model(torch.ones(2, 4))


@pytest.mark.parametrize("example", [swa_example, ema_example])
def test_documentation_examples_match_torch(example):
    fa, fpred = example(fuseopt, F)
    ta, tpred = example(torch.optim, T)
    assert_state_equal(fa, ta)
    assert torch.equal(fpred, tpred)
