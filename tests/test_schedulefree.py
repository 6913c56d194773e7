"""Schedule-Free SGD, AdamW and RAdam against their oracle, the ``schedulefree`` package's
optimizers (its for-loop, ``foreach=False``), on every implementation and dtype, with train/eval
switches in the middle of the runs; their state dicts saved in either mode, across
implementations and with the reference; their errors and their modes.

Tolerances: the for-loop and foreach implementations evaluate the reference's ATen ops in its
order (foreach ops on the CPU run ATen's per-tensor kernels; the running values are Python
doubles computed as it computes them), so they are compared bitwise. The fused kernels (numba,
and Triton through its interpreter) round like ATen but compute sqrt and division correctly
rounded, where torch's vectorised float32 sqrt is not: test_parity's fused tolerances (float32
``rtol=1e-5, atol=1e-6``, float64 ``rtol=1e-12, atol=1e-14``). Measured: 1-2 ulp after 24 steps
(the step interpolates towards ``z``, so an ulp does not grow). bfloat16: the reference rounds
every op to bfloat16, the kernels compute in float32 and round once: see ``test_bfloat16``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_bfloat16_close, clone_params, make_grads, make_params

from fuseopt.schedulefree import AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree

schedulefree = pytest.importorskip("schedulefree")

ROOT = Path(__file__).parent.parent
IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
}
RUNNING = ("k", "train_mode", "weight_sum", "lr_max", "scheduled_lr")
# name -> (ours, theirs, lr, option sets)
ALGOS = {
    "SGD": (
        SGDScheduleFree, schedulefree.SGDScheduleFree, 0.1,
        {
            "default": {},
            "warmup-decay": dict(warmup_steps=5, weight_decay=0.1),
            "weighting": dict(momentum=0.5, r=1.0, weight_lr_power=0.0),
            "maximize": dict(maximize=True, weight_decay=0.01, warmup_steps=2),
        },
    ),
    "AdamW": (
        AdamWScheduleFree, schedulefree.AdamWScheduleFree, 0.01,
        {
            "default": {},
            "warmup-decay": dict(warmup_steps=5, weight_decay=0.1),
            "weighting": dict(r=0.5, weight_lr_power=1.0, betas=(0.8, 0.99), eps=1e-6),
            "maximize": dict(maximize=True, weight_decay=0.01, warmup_steps=3),
        },
    ),
    "RAdam": (
        RAdamScheduleFree, schedulefree.RAdamScheduleFree, 0.01,
        {
            "default": {},  # (silent_sgd_phase: no step before step 5)
            "sgd-phase-decay": dict(silent_sgd_phase=False, weight_decay=0.1),
            "weighting": dict(betas=(0.9, 0.95), r=0.5, weight_lr_power=1.0),
            "maximize": dict(maximize=True, silent_sgd_phase=False),
        },
    ),
}  # fmt: skip
CASES = [(a, c) for a, (_, _, _, configs) in ALGOS.items() for c in configs]
STEPS = 24
LATE = 1  # this param gets no grad before step 3: its z starts there, mid-schedule
NO_GRAD_STEP = 10  # no param has a grad: both count the step (the reference does)
SWITCH_AFTER = (7, 15)  # eval(), compared, then train()


def _same(a, b, impl, dtype):
    if impl in ("forloop", "foreach"):
        assert torch.equal(a, b), (a - b).abs().max()
    elif dtype == torch.bfloat16:  # (see test_bfloat16)
        assert_bfloat16_close(a, b)
    else:
        torch.testing.assert_close(a, b, **TOL[dtype])


def _compare(ours, params, theirs, ref_params, impl, dtype):
    for p, q in zip(params, ref_params):
        _same(p.detach(), q.detach(), impl, dtype)
        assert set(ours.state.get(p, {})) == set(theirs.state.get(q, {}))
        for key, value in theirs.state.get(q, {}).items():
            _same(ours.state[p][key], value, impl, dtype)
    for g, h in zip(ours.param_groups, theirs.param_groups):
        assert {k: g[k] for k in RUNNING} == {k: h[k] for k in RUNNING}  # (the same doubles)


def _run(algo, config, impl, dtype, shapes=None, steps=STEPS):
    ours_cls, theirs_cls, lr, configs = ALGOS[algo]
    kwargs = dict(configs[config])
    maximize = kwargs.pop("maximize", False)
    params = make_params(dtype) if shapes is None else make_params(dtype, shapes=shapes)
    ref_params = clone_params(params)
    ours = ours_cls(params, lr=lr, maximize=maximize, **kwargs, **IMPLS[impl])
    theirs = theirs_cls(ref_params, lr=lr, foreach=False, **kwargs)
    ours.train()
    theirs.train()
    for i, step_grads in enumerate(make_grads(params, steps)):
        for j, (p, q, g) in enumerate(zip(params, ref_params, step_grads)):
            if i == NO_GRAD_STEP or (j == LATE and i < 3):
                p.grad = q.grad = None
            else:  # (the reference has no maximize: the grad it would ascend)
                p.grad, q.grad = g.clone(), (-g if maximize else g).clone()
        ours.step()
        theirs.step()
        for p, g in zip(params, step_grads):  # never written (the reference normalizes them)
            assert p.grad is None or torch.equal(p.grad, g)
        if i in SWITCH_AFTER:
            ours.eval()
            theirs.eval()
            _compare(ours, params, theirs, ref_params, impl, dtype)
            ours.train()
            theirs.train()
    return ours, params, theirs, ref_params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(("algo", "config"), CASES)
def test_is_the_reference(algo, config, impl, dtype):
    ours, params, theirs, ref_params = _run(algo, config, impl, dtype)
    _compare(ours, params, theirs, ref_params, impl, dtype)
    assert ours.param_groups[0]["k"] == STEPS
    ours.eval()
    theirs.eval()
    _compare(ours, params, theirs, ref_params, impl, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("algo", "config"), CASES)
def test_triton_kernels(algo, config, dtype, monkeypatch):
    """The fused kernels on CUDA, here through Triton's interpreter (smaller tensors: it is
    slow), train/eval switches included."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    shapes = [(4, 3), (7,), (2, 3, 2), (), (0,), "transposed", (300,)]
    ours, params, theirs, ref_params = _run(algo, config, "fused", dtype, shapes=shapes)
    _compare(ours, params, theirs, ref_params, "fused", dtype)


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused", "triton"])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_bfloat16(algo, impl, monkeypatch):
    """bfloat16: the for-loop and foreach are the reference's ops, bitwise. The kernels compute
    in float32 and round each stored value once, where the reference rounds after every op
    (24 steps, each moving y and z): 99% of the elements within 2**-6 (relative and absolute,
    2 bfloat16 ulps), none beyond 2**-3; params and state, at the switches and at the end."""
    if impl == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("FUSEOPT_FUSED_BACKEND", "triton")
    shapes = [(20, 10), (7,), "transposed", (300,)]
    config = "warmup-decay" if algo != "RAdam" else "sgd-phase-decay"
    run_impl = "fused" if impl == "triton" else impl
    ours, params, theirs, ref_params = _run(algo, config, run_impl, torch.bfloat16, shapes)
    _compare(ours, params, theirs, ref_params, run_impl, torch.bfloat16)


@pytest.mark.parametrize("algo", ["SGD", "AdamW"])
def test_eval_gives_the_papers_average(algo, capsys):
    """eval() sets the params to the average x of the paper's form, which the reference
    package's ``*Reference`` optimizers keep explicitly (x, y, z; weight decay applied to z):
    the same algorithm in another order of ops (float64, 24 steps: within 1e-10); train()
    gives y back."""
    ours_cls, _, lr, _ = ALGOS[algo]
    explicit = getattr(schedulefree, f"{algo}ScheduleFreeReference")
    kwargs = dict(lr=lr, warmup_steps=4, weight_decay=0.05)
    params = make_params(torch.float64, shapes=[(4, 3), (7,), "transposed"])
    ref_params = clone_params(params)
    ours, theirs = ours_cls(params, **kwargs), explicit(ref_params, **kwargs)
    ours.train()
    theirs.train()
    for step_grads in make_grads(params, STEPS):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    tol = dict(rtol=1e-10, atol=1e-12)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, theirs.state[q]["y"], **tol)
    ours.eval()
    theirs.eval()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **tol)
        torch.testing.assert_close(p, theirs.state[q]["x"], **tol)
    ours.train()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, theirs.state[q]["y"], **tol)
    capsys.readouterr()  # (the explicit reference prints its switches)


def _train(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def _snapshot(opt, params):
    state = {
        i: {k: v.clone() for k, v in opt.state[p].items()}
        for i, p in enumerate(params)
        if opt.state.get(p)
    }
    groups = [{k: g[k] for k in RUNNING} for g in opt.param_groups]
    return [p.detach().clone() for p in params], state, groups


def _unchanged(opt, params, snapshot):
    values, state, groups = snapshot
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert set(state) == {i for i, p in enumerate(params) if opt.state.get(p)}
    for i, saved in state.items():
        assert all(torch.equal(opt.state[params[i]][k], v) for k, v in saved.items())
    assert [{k: g[k] for k in RUNNING} for g in opt.param_groups] == groups


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("first", list(IMPLS))
@pytest.mark.parametrize("second", list(IMPLS))
def test_state_dict_in_either_mode(mode, first, second):
    """Save after 6 steps (in train mode, or after eval(): a checkpoint of x), load the params and
    the state dict into a fresh optimizer of another implementation (which the training loop
    had put in train mode), train() and 6 more steps: as the run that never stopped (and that
    evaluated at the same point)."""
    params = make_params(torch.float32)
    twins = clone_params(params)
    grads = make_grads(params, 12)
    kwargs = dict(lr=0.01, warmup_steps=4, weight_decay=0.1)
    straight = AdamWScheduleFree(twins, **kwargs, **IMPLS[first])
    opt = AdamWScheduleFree(params, **kwargs, **IMPLS[first])
    for o in (opt, straight):
        o.train()
    _train(opt, params, grads[:6])
    _train(straight, twins, grads[:6])
    if mode == "eval":  # (the run that never stopped evaluates there too: eval(), train())
        opt.eval()
        straight.eval()
        straight.train()
    saved, checkpoint = opt.state_dict(), [p.detach().clone() for p in params]
    assert saved["param_groups"][0]["train_mode"] is (mode == "train")
    assert saved["param_groups"][0]["k"] == 6
    assert set(saved["state"][0]) == {"z", "exp_avg_sq"}
    params = [c.clone().requires_grad_() for c in checkpoint]
    fresh = AdamWScheduleFree(params, **kwargs, **IMPLS[second])
    fresh.train()
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["train_mode"] is (mode == "train")  # the saved mode
    assert fresh.param_groups[0].get("fused") == IMPLS[first].get("fused")  # (the saved options)
    for group in fresh.param_groups:  # (then run on the second implementation)
        group.update({"foreach": None, "fused": None, **IMPLS[second]})
    fresh.train()
    _train(fresh, params, grads[6:])
    _train(straight, twins, grads[6:])
    impl = "fused" if "fused" in (first, second) else first
    for p, q in zip(params, twins):
        _same(p.detach(), q.detach(), impl, torch.float32)
    fresh.eval()
    straight.eval()
    for p, q in zip(params, twins):
        _same(p.detach(), q.detach(), impl, torch.float32)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_state_dict_interchange_with_the_reference(algo, mode):
    """The reference's state dict (saved in either mode) loads into ours, and ours into the
    reference; each continues as the run that never stopped (the reference's options: its
    for-loop, bitwise)."""
    ours_cls, theirs_cls, lr, _ = ALGOS[algo]
    kwargs = dict(lr=lr, weight_decay=0.05)
    params = make_params(torch.float64)
    grads = make_grads(params, 12)
    runs = {}
    for source, target in ((theirs_cls, ours_cls), (ours_cls, theirs_cls)):
        a = clone_params(params)
        opt = source(a, **kwargs, foreach=False)
        opt.train()
        _train(opt, a, grads[:6])
        if mode == "eval":
            opt.eval()
        saved = opt.state_dict()
        b = clone_params(a)
        loaded = target(b, **kwargs, foreach=False)
        loaded.load_state_dict(saved)
        assert loaded.param_groups[0]["train_mode"] is (mode == "train")
        loaded.train()
        _train(loaded, b, grads[6:])
        loaded.eval()
        runs[source] = b
    straight = clone_params(params)
    opt = theirs_cls(straight, **kwargs, foreach=False)
    opt.train()
    _train(opt, straight, grads[:6])
    if mode == "eval":
        opt.eval()
        opt.train()
    _train(opt, straight, grads[6:])
    opt.eval()
    for b in runs.values():
        assert all(torch.equal(p, q) for p, q in zip(b, straight))


def test_modes_switch_once_and_skip_params_without_state():
    """eval() in eval mode and train() in train mode change nothing; a param that never
    stepped (no z: y = x = z) is never moved."""
    params = make_params(torch.float64, shapes=[(4, 3), (7,)])
    opt = AdamWScheduleFree(params, lr=0.01)
    opt.train()
    params[0].grad = torch.ones(4, 3, dtype=torch.float64)
    for _ in range(3):
        opt.step()
    y = [p.detach().clone() for p in params]
    opt.train()
    assert all(torch.equal(p, v) for p, v in zip(params, y))
    opt.eval()
    x = [p.detach().clone() for p in params]
    assert not torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    z = opt.state[params[0]]["z"]
    torch.testing.assert_close(x[0], (y[0] - 0.1 * z) / 0.9, rtol=1e-12, atol=1e-14)
    opt.eval()
    assert all(torch.equal(p, v) for p, v in zip(params, x))
    assert "z" not in opt.state.get(params[1], {})


@pytest.mark.parametrize("algo", list(ALGOS))
def test_step_in_eval_mode_raises_and_changes_nothing(algo):
    """A new optimizer is in eval mode, as the reference's: step() raises before anything
    changes (the reference raises a bare Exception; ours is a RuntimeError, which is one),
    as after eval(), and where any group is in eval mode (the reference checks the first)."""
    ours_cls, theirs_cls, lr, _ = ALGOS[algo]
    params = make_params(torch.float32, shapes=[(4, 3), (7,)])
    ref = theirs_cls(clone_params(params), lr=lr)
    for q in ref.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    with pytest.raises(Exception, match="not in train mode"):
        ref.step()
    opt = ours_cls([{"params": params[:1]}, {"params": params[1:]}], lr=lr)
    for p in params:
        p.grad = torch.ones_like(p)
    calls = []
    snapshot = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"step\(\) in eval mode \(param group 0\).*train\(\)"):
        opt.step(lambda: calls.append(1))
    _unchanged(opt, params, snapshot)
    assert not calls  # (before the closure, as the reference)
    opt.train()
    opt.step()
    opt.eval()
    snapshot = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    _unchanged(opt, params, snapshot)
    opt.train()
    opt.param_groups[1]["train_mode"] = False
    with pytest.raises(RuntimeError, match=r"param group 1"):
        opt.step()


def test_a_group_added_later_joins_in_the_optimizers_mode():
    """Added after train(), a group is in train mode (its own running values from zero) and
    steps as a new optimizer of its params would; eval() switches it with the others."""
    params = make_params(torch.float32, shapes=[(4, 3), (7,)])
    late = clone_params(params[1:])
    opt = AdamWScheduleFree(params[:1], lr=0.01)
    opt.train()
    grads = make_grads(params, 8)
    _train(opt, params[:1], [g[:1] for g in grads[:3]])
    opt.add_param_group({"params": params[1:], "lr": 0.02})
    assert opt.param_groups[1]["train_mode"] is True and opt.param_groups[1]["k"] == 0
    alone = AdamWScheduleFree(late, lr=0.02)
    alone.train()
    _train(opt, params, grads[3:])
    _train(alone, late, [g[1:] for g in grads[3:]])
    opt.eval()
    alone.eval()
    assert torch.equal(params[1], late[0])
    assert opt.param_groups[1]["k"] == 5 and opt.param_groups[0]["k"] == 8


def test_radam_silent_phase():
    """silent_sgd_phase: while rho_t <= 4 (steps 1-4 with beta2 = 0.999) the params and z stay
    and only the second moment accumulates (lr 0: no weight in the average); without it, the
    first step is SGD's (c_1 = 1: y_1 = z_1 = y_0 - lr g)."""
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    start = p.detach().clone()
    opt = RAdamScheduleFree([p], lr=0.1)
    opt.train()
    for _ in range(4):
        p.grad = torch.ones(5, dtype=torch.float64)
        opt.step()
    assert torch.equal(p, start) and torch.equal(opt.state[p]["z"], start)
    assert (opt.state[p]["exp_avg_sq"] > 0).all()
    group = opt.param_groups[0]
    assert (group["lr_max"], group["weight_sum"], group["scheduled_lr"]) == (0.0, 0.0, 0.0)
    opt.step()
    assert not torch.equal(p, start) and group["scheduled_lr"] > 0
    q = start.clone().requires_grad_()
    opt = RAdamScheduleFree([q], lr=0.1, silent_sgd_phase=False, foreach=False)
    opt.train()
    q.grad = torch.ones(5, dtype=torch.float64)
    opt.step()
    assert torch.equal(q, start - 0.1) and torch.equal(opt.state[q]["z"], start - 0.1)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_skipped_and_failed_steps_do_not_count(impl):
    """skip_if_nonfinite: a step with an inf grad changes nothing, the running values
    included; a step that fails (a sparse grad) neither; the next step is the reference's."""
    params = make_params(torch.float32, shapes=[(4, 3), (7,)])
    ref_params = clone_params(params)
    opt = SGDScheduleFree(params, lr=0.1, warmup_steps=3, skip_if_nonfinite=True, **IMPLS[impl])
    ref = schedulefree.SGDScheduleFree(ref_params, lr=0.1, warmup_steps=3, foreach=False)
    opt.train()
    ref.train()
    grads = make_grads(params, 4)
    _train(opt, params, grads[:2])
    _train(ref, ref_params, grads[:2])
    snapshot = _snapshot(opt, params)
    params[0].grad = torch.full((4, 3), float("inf"))
    params[1].grad = torch.ones(7)
    opt.step()
    assert not opt.stepped
    _unchanged(opt, params, snapshot)
    params[1].grad = torch.ones(7).to_sparse()
    params[0].grad = torch.ones(4, 3)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    _unchanged(opt, params, snapshot)
    _train(opt, params, grads[2:])
    _train(ref, ref_params, grads[2:])
    _compare(opt, params, ref, ref_params, impl, torch.float32)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_in_step_clipping(impl):
    """max_grad_norm: the reference after torch's clip_grad_norm_ (grads are not written)."""
    params = make_params(torch.float32)
    ref_params = clone_params(params)
    opt = AdamWScheduleFree(params, lr=0.01, max_grad_norm=1.0, **IMPLS[impl])
    ref = schedulefree.AdamWScheduleFree(ref_params, lr=0.01, foreach=False)
    opt.train()
    ref.train()
    for step_grads in make_grads(params, 8):
        for p, q, g in zip(params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        opt.step()
        ref.step()
    _compare(opt, params, ref, ref_params, "fused" if impl == "fused" else "forloop", torch.float32)


def test_grad_scaler_unscales_and_skips_itself():
    """The running values live on the host: the optimizer does not claim GradScaler's scaling,
    so GradScaler unscales (by a power of two: exact) and skips an inf step without calling
    step(); the numbers are the reference's on the unscaled grads."""
    params = make_params(torch.float32, shapes=[(4, 3), (7,)])
    ref_params = clone_params(params)
    opt = AdamWScheduleFree(params, lr=0.01, fused=True)
    ref = schedulefree.AdamWScheduleFree(ref_params, lr=0.01, foreach=False)
    assert not opt._step_supports_amp_scaling
    opt.train()
    ref.train()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i, step_grads in enumerate(make_grads(params, 6)):
        loss = sum((p * g).sum() for p, g in zip(params, step_grads))
        if i == 2:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i != 2:
            for q, g in zip(ref_params, step_grads):
                q.grad = g.clone()
            ref.step()
    assert opt.param_groups[0]["k"] == 5
    _compare(opt, params, ref, ref_params, "fused", torch.float32)


_COMPILED = """
import torch
from fuseopt.schedulefree import AdamWScheduleFree

graphs = []
def counting(gm, inputs):
    graphs.append(gm)
    return gm.forward

results = []
for compiled in (True, False):
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    opt = AdamWScheduleFree(params, lr=0.01, warmup_steps=3)
    step = torch.compile(lambda: opt.step(), backend=counting, fullgraph=True) if compiled else opt.step
    opt.train()
    for i in range(6):
        for p in params:
            p.grad = torch.full_like(p, 0.1 * (i + 1))
        step()
        if i == 3:
            opt.eval()
            opt.train()
    opt.eval()
    results.append([p.detach().clone() for p in params])
    assert opt.param_groups[0]["k"] == 6, opt.param_groups[0]["k"]
assert len(graphs) == 1, len(graphs)  # no recompilation as the running values change
assert all(torch.equal(a, b) for a, b in zip(*results))
step = torch.compile(lambda: opt.step(), backend=counting)
try:
    step()
except RuntimeError as e:
    assert "eval mode" in str(e), e
else:
    raise AssertionError("no error in eval mode")
print("OK")
"""


def test_torch_compile():
    """A compiled function calling step() (fullgraph=True, in a fresh process): one graph while
    the running values change, the eager numbers bitwise; in eval mode, the error."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_COMPILED)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "match"),
    [
        (AdamWScheduleFree, dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
        (AdamWScheduleFree, dict(lr=torch.tensor(0.1)), TypeError, "lr must be a number"),
        (AdamWScheduleFree, dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
        (AdamWScheduleFree, dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value"),
        (AdamWScheduleFree, dict(betas=(1.0, 0.9)), ValueError, "beta parameter at index 0: 1.0"),
        (AdamWScheduleFree, dict(betas=(0.0, 0.9)), ValueError, r"index 0: 0.0 \(in \(0, 1\)\)"),
        (AdamWScheduleFree, dict(betas=(0.9, 1.0)), ValueError, "beta parameter at index 1: 1.0"),
        (AdamWScheduleFree, dict(warmup_steps=-1), ValueError, "Invalid warmup_steps value: -1"),
        (AdamWScheduleFree, dict(warmup_steps=2.5), ValueError, "Invalid warmup_steps value"),
        (AdamWScheduleFree, dict(r=-1.0), ValueError, "Invalid r value: -1.0"),
        (AdamWScheduleFree, dict(weight_lr_power=-2.0), ValueError, "Invalid weight_lr_power"),
        (AdamWScheduleFree, dict(max_grad_norm=-1.0), ValueError, "Invalid max_grad_norm value"),
        (SGDScheduleFree, dict(momentum=0.0), ValueError, r"Invalid momentum value: 0.0"),
        (SGDScheduleFree, dict(momentum=1.0), ValueError, r"Invalid momentum value: 1.0"),
        (SGDScheduleFree, dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
        (SGDScheduleFree, dict(warmup_steps=True), ValueError, "Invalid warmup_steps value"),
        (RAdamScheduleFree, dict(betas=(0.9, -0.1)), ValueError, "index 1: -0.1"),
        (RAdamScheduleFree, dict(eps=-1e-8), ValueError, "Invalid epsilon value"),
        (RAdamScheduleFree, dict(r=-0.5), ValueError, "Invalid r value"),
    ],
)
def test_errors(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls([torch.zeros(2, 2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_defaults_and_groups_are_the_references(algo):
    """The reference's defaults, and the running values it keeps in each group, as it starts
    them (fuseopt's implementation options besides)."""
    ours_cls, theirs_cls, _, _ = ALGOS[algo]
    ours = ours_cls([torch.zeros(2, requires_grad=True)]).param_groups[0]
    theirs = theirs_cls([torch.zeros(2, requires_grad=True)]).param_groups[0]
    ours_only = {"maximize"}  # (foreach: both, fuseopt's default None)
    assert set(ours) - ours_only == set(theirs)
    assert {k: v for k, v in ours.items() if k not in (*ours_only, "foreach", "params")} == {
        k: v for k, v in theirs.items() if k not in ("foreach", "params")
    }


def test_step_in_backward_is_refused():
    """The running values advance once per step, for every group: fuseopt.step_in_backward,
    which steps one param at a time, refuses these optimizers (clearly, before any hook)."""
    import fuseopt

    params = make_params(torch.float32, shapes=[(4, 3)])
    opt = AdamWScheduleFree(params)
    with pytest.raises(RuntimeError, match="values kept per group"):
        fuseopt.step_in_backward(opt)
    opt.train()
    params[0].grad = torch.ones(4, 3)
    opt.step()  # (nothing was installed)
    assert opt.param_groups[0]["k"] == 1


@pytest.mark.parametrize(
    "param_dtype, state_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_storage_formats_switch_modes(param_dtype, state_dtype, impl):
    """``state_dtype`` keeps ``z`` in another dtype than the param: ``eval()`` and ``train()``
    lerp in float32 and round the param once (they raised before: ATen's lerp refuses mixed
    dtypes), and the step goes on from the switched-back params."""
    torch.manual_seed(0)
    params = [torch.randn(6, 5, dtype=param_dtype, requires_grad=True) for _ in range(2)]
    opt = AdamWScheduleFree(params, lr=0.01, state_dtype=state_dtype, **IMPLS[impl])
    opt.train()
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(p.dtype)
        opt.step()
    beta1 = opt.param_groups[0]["betas"][0]
    ys = [p.detach().clone() for p in params]
    zs = [opt.state[p]["z"] for p in params]
    assert all(z.dtype == state_dtype for z in zs)
    opt.eval()
    xs = [torch.lerp(y.float(), z.float(), 1 - 1 / beta1).to(param_dtype) for y, z in zip(ys, zs)]
    assert all(torch.equal(p, x) for p, x in zip(params, xs))
    opt.train()
    back = [torch.lerp(x.float(), z.float(), 1 - beta1).to(param_dtype) for x, z in zip(xs, zs)]
    assert all(torch.equal(p, y) for p, y in zip(params, back))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
