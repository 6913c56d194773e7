"""``torch.compile`` around fuseopt's ``step``: a compiled function that calls ``opt.step()`` (or a
whole training step) works from its first call in a new process, with ``fullgraph=True`` where it
calls only the step, compiles once however the step count and the lr change, and gives the eager
step's numbers bitwise (the op runs the eager step). Each case runs in a child process: dynamo's
caches and the first call of a process are what is tested."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fuseopt  # noqa: F401  (defines the op fuseopt::step)

ROOT = Path(__file__).parent.parent

_COMMON = """
import torch, fuseopt

graphs = []
def counting(gm, inputs):  # a backend that counts the graphs dynamo compiles
    graphs.append(gm)
    return gm.forward

def problem(lr):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = fuseopt.Adam(model.parameters(), lr=lr)
    sched = fuseopt.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    return model, opt, sched

def lr_of(kind):
    return torch.tensor(0.01) if kind == "tensor" else 0.01
"""

_STEP_ONLY = """
kind = "{kind}"
results = []
for compiled in (True, False):
    model, opt, sched = problem(lr_of(kind))
    step = torch.compile(lambda: opt.step(), backend=counting, fullgraph=True) if compiled else opt.step
    for i in range(6):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1 * (i + 1))
        step()
        sched.step()
    results.append([p.detach().clone() for p in model.parameters()])
assert len(graphs) <= 1, len(graphs)  # no recompilation as the step count and lr change
assert all(torch.equal(a, b) for a, b in zip(*results))
assert all(s["step"].item() == 6.0 for s in opt.state.values())
print("OK", len(graphs))
"""

_TRAIN_STEP = """
kind = "{kind}"
results = []
x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
for compiled in (True, False):
    model, opt, sched = problem(lr_of(kind))

    def train_step(x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    fn = torch.compile(train_step, backend=counting) if compiled else train_step
    losses = []
    for i in range(6):
        losses.append(fn(x).item())
        sched.step()
    results.append(losses)
n = len(graphs)
assert 1 <= n <= 2, n  # the forward (and the code after the step), compiled once
assert results[0] == results[1], results
assert results[0][-1] < results[0][0]
print("OK", n)
"""


def _run(script: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_COMMON) + textwrap.dedent(script)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_compiled_step_works_first_time_and_never_recompiles(kind):
    """``torch.compile(lambda: opt.step(), fullgraph=True)`` in a new process: it ran into
    numba's dispatcher (an AssertionError inside dynamo) before; now the graph is the one op
    ``fuseopt::step``, with the eager step's numbers, and nothing recompiles as the step count
    and a scheduler's lr (a float, or a tensor written in place) change."""
    assert "OK" in _run(_STEP_ONLY.format(kind=kind))


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_compiled_training_step(kind):
    """A compiled forward + backward + ``opt.step()`` + ``zero_grad``: compiled once, with the
    eager losses."""
    assert "OK" in _run(_TRAIN_STEP.format(kind=kind))


_EVERY_ALGORITHM = """
import sys
sys.path.insert(0, "tests")
from torch._dynamo.utils import counters
from algorithms import ALGORITHMS
from conftest import make_grads, make_params

configs = [(a, a.configs()[i][1]) for a in ALGORITHMS for i in (0, -1)]
# one code object compiled for each optimizer in turn (its graph is guarded by the optimizer)
torch._dynamo.config.recompile_limit = len(configs)
for algo, kwargs in configs:
    results = []
    for compiled in (True, False):
        params = make_params(torch.float32)
        opt = algo.ours(params, **kwargs)
        # aot_eager functionalizes the op: it is handed copies of the params, not the params
        step = torch.compile(lambda: opt.step(), fullgraph=True, backend="aot_eager")
        for grads in make_grads(params, 3):
            for p, g in zip(params, grads):
                p.grad = g
            (step if compiled else opt.step)()
        results.append((params, opt.state_dict()["state"]))
    (ours, ours_state), (eager, eager_state) = results
    assert all(torch.equal(a, b) for a, b in zip(ours, eager)), algo.name
    for i, state in eager_state.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(ours_state[i][key]), torch.as_tensor(value)), key
assert counters["stats"]["unique_graphs"] == len(configs), dict(counters["stats"])
print("OK", len(configs))
"""


def test_fullgraph_every_algorithm_on_functionalized_copies():
    """Every elementwise algorithm (its first and last option set) compiles with
    ``fullgraph=True`` once, and 3 compiled steps equal 3 eager ones bitwise, params and state.
    Under ``aot_eager`` the op receives functionalization's copies of the params: it steps the
    live params and copies the values into what it was given, which the graph copies back."""
    assert "OK" in _run(_EVERY_ALGORITHM)


_STORAGE = """
options = [
    (torch.float32, dict(state_bits=8)),
    (torch.float32, dict(state_dtype=torch.bfloat16, stochastic_rounding=True)),
    (torch.bfloat16, dict(kahan_sum=True)),
    (torch.bfloat16, dict(stochastic_rounding=True, state_dtype=torch.float32)),
]
torch._dynamo.config.recompile_limit = len(options)
for dtype, kwargs in options:
    results = []
    for compiled in (True, False):
        torch.manual_seed(0)  # (the stochastic rounding's seeds: the same in both runs)
        params = [torch.randn(64, 80, dtype=dtype).requires_grad_(), torch.randn(80, dtype=dtype)]
        opt = fuseopt.AdamW([{"params": params, "min_8bit_size": 256}], lr=1e-2, fused=True,
                            **kwargs)
        step = torch.compile(lambda: opt.step(), fullgraph=True, backend="aot_eager")
        for i in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(dtype)
            (step if compiled else opt.step)()
        results.append((params, opt.state_dict(compact=True)["state"]))
    (ours, ours_state), (eager, eager_state) = results
    assert all(torch.equal(a, b) for a, b in zip(ours, eager)), kwargs
    for i, state in eager_state.items():
        assert ours_state[i].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(ours_state[i][key]), torch.as_tensor(value)), key
    if "state_bits" in kwargs:
        assert eager_state[0]["exp_avg_codes"].dtype == torch.uint8
print("OK")
"""


def test_fullgraph_storage_options():
    """The storage options through the compiled step: 8-bit states, bfloat16 states rounded
    stochastically, Kahan-compensated bfloat16 params, float32 states of bfloat16 params;
    three compiled steps equal three eager ones bitwise (params, states, 8-bit codes and
    scales), the random bits included."""
    assert "OK" in _run(_STORAGE)


_ORDER = """
def f(scale):
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():  # grads made inside the graph, assigned after it returns
        p.grad = torch.ones_like(p) * scale
    opt.step()
    return before, [p.detach() * 1 for p in model.parameters()]

outs = []
for compiled in (True, False):
    model, opt, sched = problem(0.01)
    fn = torch.compile(f, fullgraph=True) if compiled else f
    outs.append([fn(torch.tensor(0.1 * (i + 1))) for i in range(3)])
for (b1, s1), (b2, s2) in zip(*outs):
    assert all(torch.equal(x, y) for x, y in zip(b1, b2))  # read before the step: old values
    assert all(torch.equal(x, y) for x, y in zip(s1, s2))  # read after it: new values
assert not torch.equal(outs[0][0][0][0], outs[0][1][0][0])  # the compiled steps moved the params
print("OK")
"""


def test_fullgraph_orders_reads_around_the_step():
    """Inductor, ``fullgraph=True``: a read of a param before ``step`` in the same graph sees
    the old value and one after it the new value, and grads computed in the graph (assigned to
    ``.grad`` only when it returns) are the ones the step uses."""
    assert "OK" in _run(_ORDER)


def test_step_op_is_kept_out_of_cuda_graphs():
    """The op's host side (checks, step counts read on the host) must run at every step: it is
    tagged so that inductor never records it into a CUDA graph (``mode="reduce-overhead"``)."""
    op = torch.ops.fuseopt.step.default
    assert torch.Tag.cudagraph_unsafe in op.tags
    assert op._schema.arguments[1].alias_info.is_write  # the params: written
    assert not op._schema.arguments[2].alias_info  # the grads: only read
