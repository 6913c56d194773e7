"""``torch.amp.GradScaler("cpu")`` handing unscaling and inf-skipping to fuseopt's fused CPU step
(``_step_supports_amp_scaling``), as it does to torch's fused CPU optimizers.

The oracle: torch.optim with the same GradScaler, its fused step where torch has one (it reads
``grad_scale``/``found_inf`` itself), else its for-loop after GradScaler's own unscaling (a
multiplication by the inverse scale: a power of two, so the same numbers as dividing by it).
"""

from __future__ import annotations

import pytest
import torch
from algorithms import ALGORITHMS

import fuseopt

TORCH_FUSED = {"SGD", "Adam", "AdamW", "Adagrad"}
INF_AT = 2  # the iteration whose loss is inf: GradScaler's found_inf skips its step


def _train(cls, flags, inf_at=INF_AT, iters=6, dtype=torch.float32, state_dtype=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model.to(dtype)
    kwargs = dict(momentum=0.9) if cls.__name__ == "SGD" else {}
    opt = cls(model.parameters(), **kwargs, **flags)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for i in range(iters):
        opt.zero_grad()
        loss = model(x).square().mean() * (float("inf") if i == inf_at else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if state_dtype is not None and i == 0:  # a state cast: its param takes the for-loop
            first = next(iter(opt.state.values()))
            for key, value in first.items():
                if key != "step" and torch.is_tensor(value) and value.dim():
                    first[key] = value.to(state_dtype)
    return model, opt


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
def test_grad_scaler_hands_unscaling_to_the_fused_step(algo):
    ours_model, ours = _train(algo.ours, dict(fused=True))
    assert ours._step_supports_amp_scaling
    flags = dict(fused=True) if algo.name in TORCH_FUSED else dict(foreach=False)
    theirs_model, theirs = _train(algo.theirs, flags)
    for p, q in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for s, t in zip(ours.state.values(), theirs.state.values()):
        for key, value in t.items():
            torch.testing.assert_close(s[key], value, rtol=1e-5, atol=1e-6)
    assert ours.steps_taken == 5  # the inf iteration did not step, nor count
    if algo.name != "SGD":
        assert all(s["step"].item() == 5 for s in ours.state.values())


def test_a_param_the_kernel_cannot_take_is_unscaled_by_the_for_loop_math():
    """A state the user cast to float64: its param steps in torch's for-loop math, which
    divides by the scale and skips on found_inf as the kernel does."""
    ours_model, ours = _train(fuseopt.SGD, dict(fused=True), state_dtype=torch.float64)
    theirs_model, _ = _train(torch.optim.SGD, dict(foreach=False), state_dtype=torch.float64)
    assert next(iter(ours.state.values()))["momentum_buffer"].dtype == torch.float64
    for p, q in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_found_inf_skips_before_anything_changes():
    """Set by hand as GradScaler sets them: a found inf leaves params, state, step counts (and
    NAdam's host scalar state) as they were, and ``stepped`` False."""
    p = torch.ones(5, requires_grad=True)
    opt = fuseopt.NAdam([p], fused=True)
    p.grad = torch.ones(5)
    opt.step()
    before = [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    p.grad = torch.ones(5)
    opt.step()
    after = [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and not opt.stepped
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert opt.stepped and opt.steps_taken == 2


def test_torchs_error_where_the_options_ask_for_no_fused_kernel():
    p = torch.ones(5, requires_grad=True)
    for flags in (dict(foreach=True), dict(foreach=False)):
        opt = fuseopt.Adam([p], **flags)
        assert not opt._step_supports_amp_scaling
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        p.grad = torch.ones(5)
        with pytest.raises(AssertionError, match="Expected grad_scale and found_inf to be None"):
            opt.step()


def test_clipping_optimizers_leave_unscaling_to_grad_scaler():
    """A norm over scaled grads would be wrong: a clipping optimizer does not claim the scaling,
    and a scale set on it anyway is an error before anything changes."""
    p = torch.ones(5, requires_grad=True)
    opt = fuseopt.Adam([p], fused=True, max_grad_norm=1.0)
    assert not opt._step_supports_amp_scaling
    opt.grad_scale = torch.tensor(4.0)
    p.grad = torch.ones(5)
    with pytest.raises(RuntimeError, match="max_grad_norm needs unscaled grads"):
        opt.step()
    assert torch.equal(p, torch.ones(5)) and not opt.state
    ours_model, _ = _train(fuseopt.AdamW, dict(fused=True, max_grad_norm=0.1))
    torch.manual_seed(0)  # (the oracle: GradScaler unscales, then clip_grad_norm_, then the step)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for i in range(6):
        opt.zero_grad()
        loss = model(x).square().mean() * (float("inf") if i == INF_AT else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1, foreach=True)
        scaler.step(opt)
        scaler.update()
    for p, q in zip(ours_model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make", [lambda ps: fuseopt.LARS(ps, lr=0.1, weight_decay=0.01, fused=True),
             lambda ps: fuseopt.Adam(ps, lr=0.01, cautious=True, fused=True)],
    ids=["LARS", "cautious-Adam"],
)  # fmt: skip
def test_rules_with_a_first_pass_leave_unscaling_to_grad_scaler(make):
    """LARS's norms and cautious Adam's signs read the grads in a first pass: the optimizer
    does not claim the scaling (GradScaler unscales the grads first), so the numbers are those
    of the same optimizer without GradScaler."""
    runs = []
    for scaled in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3))
        opt = make(list(model.parameters()))
        assert not opt._step_supports_amp_scaling
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(4):
            opt.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
        runs.append([p.detach() for p in model.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


STORAGE = {  # (param dtype, options)
    "8bit": (torch.float32, dict(state_bits=8)),
    "bf16_states": (torch.float32, dict(state_dtype=torch.bfloat16)),
    "bf16_states_sr": (torch.float32, dict(state_dtype=torch.bfloat16, stochastic_rounding=True)),
    "kahan": (torch.bfloat16, dict(kahan_sum=True)),
    "float32_states": (torch.bfloat16, dict(state_dtype=torch.float32)),
}


def _storage_run(dtype, options, scaled: bool):
    """Six iterations, the INF_AT one with an inf loss: under GradScaler (the fused step unscales
    and skips it), or unscaled with that iteration left out."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model.to(dtype)
    group = {"params": list(model.parameters()), "min_8bit_size": 64}  # (both weights 8-bit)
    opt = fuseopt.AdamW([group], lr=0.01, fused=True, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    seen = []  # (params, state) after each iteration
    for i in range(6):
        opt.zero_grad()
        loss = model(x).float().square().mean() * (float("inf") if i == INF_AT else 1.0)
        if scaled:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        elif i != INF_AT:
            loss.backward()
            opt.step()
        seen.append(([p.detach().clone() for p in model.parameters()], _compact(opt)))
    return model, opt, seen


def _compact(opt) -> list:
    state = opt.state_dict(compact=True)["state"]
    return [
        (i, k, v.clone() if torch.is_tensor(v) else v) for i in state for k, v in state[i].items()
    ]


def _same(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    same = lambda x, y: torch.equal(x, y) if torch.is_tensor(x) else x == y
    return (
        all(map(torch.equal, pa, pb))
        and len(sa) == len(sb)
        and all(x[:2] == y[:2] and same(x[2], y[2]) for x, y in zip(sa, sb))
    )


@pytest.mark.parametrize("storage", list(STORAGE))
def test_storage_options_under_grad_scaler(storage):
    """The fused step of each storage format unscales the grads (by a power of two: exactly)
    and skips the inf iteration before anything changes: the unscaled run's params and states
    (8-bit codes and scales, compensations) bit for bit. Stochastic rounding draws its seed
    at each launch, the skipped one too: there the skipped iteration is checked alone."""
    dtype, options = STORAGE[storage]
    model, opt, seen = _storage_run(dtype, options, scaled=True)
    assert opt._step_supports_amp_scaling and opt.steps_taken == 5
    assert all(s["step"].item() == 5 for s in opt.state.values())
    assert _same(seen[INF_AT - 1], seen[INF_AT])  # the skipped iteration changed nothing
    assert not _same(seen[INF_AT], seen[INF_AT + 1])
    if storage == "8bit":
        assert opt.state[model[0].weight]["exp_avg"].dtype == torch.uint8
    if not options.get("stochastic_rounding"):
        _, _, plain = _storage_run(dtype, options, scaled=False)
        assert _same(seen[-1], plain[-1])
