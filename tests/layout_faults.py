"""Layout faults for the rules whose step runs a first pass (LARS, Lamb), in child processes.

The reduction kernels read params, grads and states through the addresses the plan checked: the
plan's layout faults (a grad with gaps or of another layout, a param's storage shrunk, a grad
broadcast, a state resized) must end as the foreach implementation ends (its numbers, or its
error with nothing changed), never in a crash; a crash fails its case, not the test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

_SCRIPT = """
import torch, fuseopt
from fuseopt._facts import storage_problem
def snap(ps):  # (a tensor past its storage's end cannot be read, by the test either)
    return [None if storage_problem(p) else p.detach().clone() for p in ps]
def make(impl):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in [(6, 5), (5,), (4, 3)]]
    opt = {make}
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt, ps
outcomes = []
for impl in (dict(fused=True), dict(foreach=True)):
    opt, ps = make(impl)
    {fault}
    before = snap(ps)
    try:
        opt.step()
        outcomes.append(snap(ps))
    except Exception as e:
        assert all(a is None or torch.equal(a, b) for a, b in zip(before, snap(ps))), "changed"
        outcomes.append(type(e).__name__)
a, b = outcomes
assert (a == b) if isinstance(a, str) else all(
    x is None or torch.allclose(x, y) for x, y in zip(a, b)), (a, b)
print("OK", a if isinstance(a, str) else "same numbers")
"""

# name -> the fault's code; ``{state}`` names a state tensor of the optimizer
FAULTS = {
    "grad_with_gaps": "ps[0].grad = torch.ones(6, 10)[:, ::2]",
    "grad_transposed": "ps[0].grad = torch.ones(5, 6).t()",
    "grad_broadcast": "ps[2].grad.data = torch.full((3,), 0.5)",
    "param_storage_shrunk": "ps[0].data.untyped_storage().resize_(8)",
    "state_resized": "opt.state[ps[0]]['{state}'].resize_(3)",
    "grad_other_dtype": "ps[1].grad.data = torch.ones(5, dtype=torch.float64)",
}


def check(fault: str, make: str, state: str) -> None:
    """Run ``fault`` against the optimizer built by ``make`` (code over ``ps`` and ``impl``),
    whose state ``state`` exists, in a child process; assert it ended as foreach ends."""
    code = textwrap.dedent(_SCRIPT).replace("{make}", make)
    code = code.replace("{fault}", FAULTS[fault].replace("{state}", state))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
