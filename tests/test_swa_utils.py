"""fuseopt.swa_utils against torch.optim.swa_utils: equal averages, schedules, BN stats, errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

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


# ------------------------------------------------------- mismatched models and lists, vs torch
# A model or list whose tensors differ from the averaged ones used to send the fused kernel out of
# bounds (garbage such as 1e29, or a segfault). Each case runs against torch.optim.swa_utils in a
# child process, so a crash fails the tests instead of killing pytest. The outcome (exception
# type, or the averages) must be torch's, and a failed update must leave the average and
# n_averaged as they were (torch itself can fail half-way).
ROOT = Path(__file__).resolve().parents[1]
F32, F64, F16, BF16, C64, I64 = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.int64,
)
BIG = 100_000  # several kernel chunks: an out-of-bounds walk reads far past the smaller tensor


def _t(spec, gen):
    """A tensor from ``(shape, dtype)`` or ``(shape, dtype, device)``, random but reproducible."""
    shape, dtype, device = (*spec, "cpu")[:3]
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, generator=gen, dtype=dtype)
    else:
        t = torch.randint(-5, 5, shape, generator=gen, dtype=dtype)
    return t.to(device)


def _module(params, buffers=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = nn.Module()
    for i, spec in enumerate(params):
        m.register_parameter(f"p{i}", nn.Parameter(_t(spec, gen), requires_grad=False))
    for i, spec in enumerate(buffers):
        m.register_buffer(f"b{i}", _t(spec, gen))
    return m


def _p(*shapes, dtype=F32):
    return [(s, dtype) for s in shapes]


# name -> (avg params, avg buffers, model params, model buffers, use_buffers, n_averaged before)
MODEL_CASES = {
    "bigger": (_p((BIG,)), [], _p((BIG + 7,)), [], False, 1),
    "bigger_first": (_p((BIG,)), [], _p((BIG + 7,)), [], False, 0),
    "smaller": (_p((BIG,)), [], _p((BIG - 7,)), [], False, 1),
    "smaller_first": (_p((BIG,)), [], _p((BIG - 7,)), [], False, 0),
    "second_smaller": (_p((5,), (BIG,)), [], _p((5,), (BIG - 7,)), [], False, 1),
    "transposed_shape": (_p((4, 3)), [], _p((3, 4)), [], False, 1),
    "broadcast_row": (_p((4, 3)), [], _p((3,)), [], False, 1),
    "broadcast_one": (_p((BIG,)), [], _p((1,)), [], False, 1),
    "broadcast_scalar": (_p((4, 3)), [], _p(()), [], False, 1),
    "broadcast_first": (_p((4, 3)), [], _p((3,)), [], False, 0),
    "wider_model": (_p((3,)), [], _p((4, 3)), [], False, 1),
    "fewer_params": (_p((5,), (6,)), [], _p((5,)), [], False, 1),
    "fewer_params_first": (_p((5,), (6,)), [], _p((5,)), [], False, 0),
    "more_params": (_p((5,)), [], _p((5,), (6,)), [], False, 1),
    "fewer_buffers": (_p((5,)), _p((3,)), _p((5,)), [], False, 1),
    "more_buffers": (_p((5,)), [], _p((5,)), _p((3,)), False, 1),
    "buffer_size": (_p((5,)), _p((3,)), _p((5,)), _p((4,)), False, 1),
    "fewer_buffers_averaged": (_p((5,)), _p((3,)), _p((5,)), [], True, 1),
    "more_buffers_averaged": (_p((5,)), [], _p((5,)), _p((3,)), True, 1),
    "buffer_size_averaged": (_p((5,)), _p((3,)), _p((5,)), _p((4,)), True, 1),
    "int_buffer_averaged": (_p((5,)), _p((), dtype=I64), _p((5,)), _p((), dtype=I64), True, 1),
    # a float64 group that averages fine beside a float32 group that torch rejects
    "second_group_bad": (
        [((5,), F64), ((BIG,), F32)],
        [],
        [((5,), F64), ((BIG,), F64)],
        [],
        False,
        1,
    ),
}
for _a in (F16, BF16, F32, F64, C64):
    for _c in (F16, BF16, F32, F64, C64):
        if _a != _c:
            MODEL_CASES[f"{_a}_from_{_c}".replace("torch.", "")] = (
                [((BIG,), _a)],
                [],
                [((BIG,), _c)],
                [],
                False,
                1,
            )

AVG_FNS = {
    "swa": lambda S: {},
    "ema_multi": lambda S: {"multi_avg_fn": S.get_ema_multi_avg_fn(0.9)},
    "swa_multi": lambda S: {"multi_avg_fn": S.get_swa_multi_avg_fn()},
    "swa_avg_fn": lambda S: {"avg_fn": S.get_swa_avg_fn()},
    "ema_avg_fn": lambda S: {"avg_fn": S.get_ema_avg_fn(0.9)},
}

# name -> (avg list, current list); each list runs with an int and a tensor num_averaged
LIST_CASES = {
    "current_shorter": (_p((BIG,), (BIG,)), _p((BIG,))),
    "current_longer": (_p((BIG,)), _p((BIG,), (BIG,))),
    "current_empty": (_p((BIG,)), []),
    "both_empty": ([], []),
    "bigger": (_p((BIG,)), _p((BIG + 7,))),
    "smaller": (_p((BIG,)), _p((BIG - 7,))),
    "second_smaller": (_p((5,), (BIG,)), _p((5,), (BIG - 7,))),
    "transposed_shape": (_p((4, 3)), _p((3, 4))),
    "broadcast_row": (_p((4, 3)), _p((3,))),
    "broadcast_one": (_p((BIG,)), _p((1,))),
    "broadcast_scalar": (_p((BIG,)), _p(())),
    "wider_current": (_p((3,)), _p((4, 3))),
    "second_float64": (_p((5,), (6,)), [((5,), F32), ((6,), F64)]),
    "float16_current": (_p((5,)), _p((5,), dtype=F16)),
    "int_current": (_p((5,)), _p((5,), dtype=I64)),
    "float16_average": (_p((5,), dtype=F16), _p((5,))),
    "mixed_averages": ([((BIG,), F32), ((BIG,), F64)], [((BIG,), F32), ((BIG,), F64)]),
    "mixed_with_broadcast": ([((BIG,), F32), ((4, 3), F64)], [((BIG,), F32), ((3,), F64)]),
    "second_int": ([((5,), F32), ((5,), I64)], [((5,), F32), ((5,), I64)]),
    "int_shorter": (_p((5,), (5,), dtype=I64), _p((5,), dtype=I64)),
    "int_bigger": (_p((5,), dtype=I64), _p((7,), dtype=I64)),
    "int_float_current": (_p((5,), dtype=I64), _p((5,))),
    "meta_current": (_p((BIG,)), [((BIG,), F32, "meta")]),
    "meta_average": ([((BIG,), F32, "meta")], _p((BIG,))),
    "noncontiguous_current": ([((3, 4), F32)], [((3, 4), F32)]),
}
MULTI_FNS = {
    "ema": lambda S: S.get_ema_multi_avg_fn(0.9),
    "swa": lambda S: S.get_swa_multi_avg_fn(),
}


def _snapshot(tensors):
    return [t.clone() if t.device.type != "meta" else t for t in tensors]


def _same(before, after):
    return all(
        a.device.type == "meta" or (a.dtype == b.dtype and torch.equal(a, b))
        for a, b in zip(before, after)
    )


def _attempt(fn, *args):
    """``fn(*args)``: ("ok", None) or (exception type name, message)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # complex -> real casts warn in torch and here alike
            fn(*args)
    except Exception as e:
        return type(e).__name__, str(e)
    return "ok", None


def _model_case(name, fn_kind):
    avg_p, avg_b, cur_p, cur_b, use_buffers, n_before = MODEL_CASES[name]
    out = {}
    results = {}
    for lib, S in (("torch", T), ("fuse", F)):
        averaged = S.AveragedModel(
            _module(avg_p, avg_b), use_buffers=use_buffers, **AVG_FNS[fn_kind](S)
        )
        for _ in range(n_before):
            averaged.update_parameters(_module(avg_p, avg_b, seed=1))
        before = _snapshot(averaged.state_dict().values())
        model = _module(cur_p, cur_b, seed=2)
        out[lib], out[lib + "_message"] = _attempt(averaged.update_parameters, model)
        out[lib + "_unchanged"] = _same(before, averaged.state_dict().values())
        results[lib] = averaged.state_dict()
    out["close"] = None
    if out["torch"] == out["fuse"] == "ok":
        try:
            for key, value in results["torch"].items():
                torch.testing.assert_close(results["fuse"][key], value, rtol=0, atol=0)
        except AssertionError as e:
            out["close"] = f"{key}: {e}"
    return out


def _list_case(name, fn_kind, n_kind):
    avg_specs, cur_specs = LIST_CASES[name]
    out = {}
    results = {}
    for lib, S in (("torch", T), ("fuse", F)):
        gen = torch.Generator().manual_seed(0)
        averaged = [_t(s, gen) for s in avg_specs]
        current = [_t(s, gen) for s in cur_specs]
        if name == "noncontiguous_current":
            current = [c.t().contiguous().t() for c in current]  # same shape, transposed strides
        before = _snapshot(averaged)
        n = torch.tensor(3) if n_kind == "tensor" else 3
        fn = MULTI_FNS[fn_kind](S)
        out[lib], out[lib + "_message"] = _attempt(fn, averaged, current, n)
        out[lib + "_unchanged"] = _same(before, averaged)
        results[lib] = averaged
    out["close"] = None
    if out["torch"] == out["fuse"] == "ok":
        try:
            for got, want in zip(results["fuse"], results["torch"]):
                if want.device.type != "meta":
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
        except AssertionError as e:
            out["close"] = str(e)
    return out


def _all_case_ids():
    ids = [("model", name, fn) for name in MODEL_CASES for fn in AVG_FNS]
    ids += [
        ("list", name, fn, n) for name in LIST_CASES for fn in MULTI_FNS for n in ("int", "tensor")
    ]
    return ids


def _run_cases_in_child(first: int) -> None:
    """Child process: cases ``first``... as JSON lines, flushed as each one starts and ends."""
    import json

    for case in _all_case_ids()[first:]:
        print(json.dumps({"case": "/".join(case), "start": True}), flush=True)
        out = _model_case(*case[1:]) if case[0] == "model" else _list_case(*case[1:])
        print(json.dumps({"case": "/".join(case), **out}), flush=True)


@pytest.fixture(scope="module")
def mismatch_outcomes():
    """case -> its outcomes, or the child's returncode and stderr where the child died in it.

    The cases run in child processes: a crash fails that case, and a new child goes on with the
    next one.
    """
    import json

    ids = ["/".join(case) for case in _all_case_ids()]
    done: dict[str, dict] = {}
    while len(done) < len(ids):
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
            f"import test_swa_utils; test_swa_utils._run_cases_in_child({len(done)})"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600
        )
        for line in proc.stdout.splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if record and "start" not in record:
                done[record["case"]] = record
        if len(done) < len(ids):  # died in the next case (or before it started)
            crash = f"child returncode {proc.returncode}:\n{proc.stderr[-3000:]}"
            done[ids[len(done)]] = {"crash": crash}
    return done


def _outcome(mismatch_outcomes, case):
    got = mismatch_outcomes["/".join(case)]
    assert "crash" not in got, got.get("crash")  # e.g. a segfault in an out-of-bounds kernel
    return got


def _check_outcome(got, our_names):
    assert got["fuse"] == got["torch"], got  # same exception type (or both succeed)
    if got["fuse"] == "ok":
        assert got["close"] is None, got["close"]  # the same averages as torch
    else:
        assert got["fuse_unchanged"], got  # nothing updated, n_averaged included
        if got["fuse"] != "IndexError":  # an empty list: torch's list[0], the same message
            assert any(n in got["fuse_message"] for n in our_names), got["fuse_message"]


@pytest.mark.parametrize("fn_kind", list(AVG_FNS))
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_update_parameters_mismatch_matches_torch(mismatch_outcomes, name, fn_kind):
    got = _outcome(mismatch_outcomes, ("model", name, fn_kind))
    _check_outcome(got, ["update_parameters"])


@pytest.mark.parametrize("n_kind", ["int", "tensor"])
@pytest.mark.parametrize("fn_kind", list(MULTI_FNS))
@pytest.mark.parametrize("name", list(LIST_CASES))
def test_multi_avg_fn_mismatch_matches_torch(mismatch_outcomes, name, fn_kind, n_kind):
    got = _outcome(mismatch_outcomes, ("list", name, fn_kind, n_kind))
    _check_outcome(got, ["current_param_list", "averaged_param_list", "ema_param_list"])


def test_mismatch_cases_cover_errors_and_successes(mismatch_outcomes):
    # The table is not vacuous: torch raises in some cases and succeeds in others, and in some
    # of its failures it has already updated part of the average (which ours must not).
    done = mismatch_outcomes
    kinds = {r["torch"] for r in done.values()}
    assert {"ok", "RuntimeError", "ValueError", "NotImplementedError"} <= kinds
    assert any(r["torch"] != "ok" and not r["torch_unchanged"] for r in done.values())
    assert done["model/bigger/ema_multi"]["fuse"] == "RuntimeError"
    assert done["list/broadcast_one/swa/int"]["torch"] == "ok"
