"""Hypothesis-chosen sequences of steps and faults (``faults.py``), fuseopt against torch's for-loop
after every action; run as a script in a child process by ``test_faults.py`` (a crash then fails
that test, not the test run).

Each example picks an algorithm, a fuseopt implementation and up to six actions, each a step or a
fault that applies to the algorithm. After each action both optimizers step: the outcomes must
match (the same exception type, or the same numbers within the fused tolerance), and a step that
raises must have changed nothing. The sequence ends at the first exception (torch's for-loop may
have changed part of its state by then). Derandomized: the same examples on every run.
"""

from __future__ import annotations

import sys
import warnings

import faults
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuseopt

# Faults whose outcome is torch's for-loop on every fuseopt implementation compared here, and
# that leave both optimizers comparable after a successful step.
SEQUENCE_FAULTS = [
    f
    for f in faults.FAULTS
    if set(f.expect.values()) <= {"forloop"}
    and not f.name.startswith("load_")  # (a fresh donor each time: covered by the table)
]
IMPLS = {"default": {}, "forloop": dict(foreach=False), "fused": dict(fused=True)}
EXAMPLES = 300


@st.composite
def scenarios(draw):
    algo = draw(st.sampled_from(sorted(faults.BASE)))
    impl = draw(st.sampled_from(sorted(IMPLS)))
    usable = [f.name for f in SEQUENCE_FAULTS if algo in f.algorithms]
    actions = draw(st.lists(st.sampled_from(["step", *usable]), min_size=1, max_size=6))
    return algo, impl, actions


def check(algo: str, impl: str, actions: list[str]) -> None:
    ours, theirs = faults._params(), faults._params()
    fault_kwargs = [faults.BY_NAME[a].algorithms[algo] for a in actions if a != "step"]
    kwargs = fault_kwargs[0] if fault_kwargs else faults.BASE[algo]
    ours_opt = getattr(fuseopt, algo)(ours, **kwargs, **IMPLS[impl])
    theirs_opt = getattr(torch.optim, algo)(theirs, **kwargs, foreach=False)
    for step, action in enumerate(actions):
        fault = faults.BY_NAME.get(action)
        if fault is not None and not fault.after_grads:
            fault.apply(ours_opt, ours)
            fault.apply(theirs_opt, theirs)
        faults._set_grads(ours, step)
        faults._set_grads(theirs, step)
        if fault is not None and fault.after_grads:
            fault.apply(ours_opt, ours)
            fault.apply(theirs_opt, theirs)
        before = faults._snapshot(ours_opt, ours)
        mine, yours = faults._step(ours_opt), faults._step(theirs_opt)
        assert mine == yours, f"after {actions[: step + 1]}: fuseopt {mine}, torch {yours}"
        if mine is not None:
            assert faults._unchanged(before, faults._snapshot(ours_opt, ours)), (
                f"after {actions[: step + 1]}: {mine} changed the state"
            )
            return
        differs = faults._close(ours_opt, theirs_opt, ours, theirs)
        assert differs is None, f"after {actions[: step + 1]}: {differs}"


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(scenarios())
def test_sequences(scenario):
    check(*scenario)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    test_sequences()
    print(f"{EXAMPLES} examples passed")
    sys.exit(0)
