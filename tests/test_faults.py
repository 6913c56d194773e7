"""Fault injection: every fault of ``faults.py`` against torch.optim and every fuseopt
implementation, each case in a child process (a crash fails its case, not the test run); and
hypothesis-chosen sequences of faults and steps, in a child process too.

Cases run in chunks (one child per chunk, a few seconds of imports saved per case); each chunk is
an ``xdist_group``, so one worker runs it. When a child dies, its running case is reported with
the child's exit status and output, and the rest of the chunk runs in a new child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import faults

HERE = Path(__file__).parent
CASES = faults.cases()
CHUNK = 48
CHUNKS = {case: i // CHUNK for i, case in enumerate(CASES)}
_results: dict[str, dict] = {}


def _child(args: list[str], timeout: int = 900, env: dict | None = None):
    env = dict(os.environ, **(env or {}), PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE
    )


def _run_cases(todo: list[str], env: dict | None = None) -> dict[str, dict]:
    """Run ``todo`` in child processes, a new one after each that dies; every case's result."""
    results: dict[str, dict] = {}
    while todo:
        proc = _child([str(HERE / "faults.py"), *todo], env=env)
        running = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                running = line[6:]
            elif line.startswith("{"):
                result = json.loads(line)
                results[result["case"]] = result
                running = None
        if running is not None:  # the child died in this case
            results[running] = dict(
                case=running,
                ok=False,
                detail=f"the process died (exit status {proc.returncode}): {proc.stderr[-1500:]}",
            )
        elif proc.returncode != 0 or not any(c in results for c in todo):
            raise RuntimeError(f"the fault runner failed: {proc.stderr[-3000:]}")
        todo = [c for c in todo if c not in results]
    return results


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.xdist_group(f"faults{CHUNKS[c]}")) for c in CASES]
)
def test_fault(case):
    """fuseopt's outcome is torch's (or the fault's stated exception), and a step that raises
    changes nothing."""
    if case not in _results:
        _results.update(_run_cases([c for c in CASES if CHUNKS[c] == CHUNKS[case]]))
    result = _results[case]
    assert result["ok"], result["detail"]


def test_every_fault_reaches_every_implementation():
    """The table is not thinned by accident: each fault runs on each implementation."""
    for fault in faults.FAULTS:
        impls = {c.split("/")[2] for c in CASES if c.startswith(fault.name + "/")}
        reachable = {
            i
            for i in fault.impls or faults.IMPLS
            if any(faults.applies(a, kw, i) for a, kw in fault.algorithms.items())
        }  # (an implementation no algorithm of the fault can be built for: none)
        assert impls == reachable and len(reachable) >= 2, fault.name
    assert len(CASES) > 400


def test_a_crash_fails_its_case_only():
    """The runner's own safety: a child that dies in a case marks that case failed, with the
    exit status, and the cases after it still run (in a new child)."""
    first, crashing, last = CASES[0], CASES[1], CASES[2]
    results = _run_cases([first, crashing, last], env={"FUSEOPT_FAULTS_ABORT_IN": crashing})
    assert results[first]["ok"] and results[last]["ok"]
    assert not results[crashing]["ok"]
    assert "the process died" in results[crashing]["detail"]


def test_hypothesis_sequences_of_faults():
    """Random sequences of faults and steps (hypothesis, derandomized: the same examples every
    run), each compared with torch after every action; in a child process."""
    proc = _child([str(HERE / "fault_sequences.py")], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "examples passed" in proc.stdout
