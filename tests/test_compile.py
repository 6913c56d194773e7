"""``torch.compile`` around fuseopt's ``step``: a compiled function that calls ``opt.step()`` (or a
whole training step) works from its first call in a new process, compiles once however the step
count and the lr change, and gives the eager step's numbers. Each case runs in a child process:
dynamo's caches and the first call of a process are what is tested."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
    step = torch.compile(lambda: opt.step(), backend=counting) if compiled else opt.step
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
    """``torch.compile(lambda: opt.step())`` in a new process: it ran into numba's dispatcher
    (an AssertionError inside dynamo) before; now the step runs outside dynamo's graph, with
    the eager step's numbers, and nothing recompiles as the step count and a scheduler's lr
    (a float, or a tensor written in place) change."""
    assert "OK" in _run(_STEP_ONLY.format(kind=kind))


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_compiled_training_step(kind):
    """A compiled forward + backward + ``opt.step()`` + ``zero_grad``: compiled once, with the
    eager losses."""
    assert "OK" in _run(_TRAIN_STEP.format(kind=kind))
