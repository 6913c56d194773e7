"""Contract tests on every rule: its state matches torch's keys, every flag combination traces,
host scalars are runtime arguments (a new lr compiles nothing), and kernels are cached on disk."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from algorithms import ALGORITHMS

import fuseopt
from fuseopt.kernels import numba_cpu
from fuseopt.kernels.trace import trace
from fuseopt.rule import Flags, ScalarState

RULES = {a.name: a.ours for a in ALGORITHMS}


def _flag_combinations(cls):
    """Every combination of the flag values the rule of ``cls`` can produce."""
    rule = cls.rule
    group = dict(cls._signature_defaults(), weight_decay=0.0, decoupled_weight_decay=False)
    sv = {s.name: 1.0 for s in rule.state if isinstance(s, ScalarState)}
    names = list(rule.flags(group, False, 10.0, sv))
    for values in itertools.product([False, True], repeat=len(names)):
        yield Flags(zip(names, values))


@pytest.mark.parametrize("name", list(RULES))
def test_every_flag_combination_traces_and_generates(name):
    rule = RULES[name].rule
    for flags in _flag_combinations(RULES[name]):
        states = tuple(s.name for s in rule.state if not isinstance(s, ScalarState))
        graph = trace(rule, flags, ("param", "grad", *states))
        assert "param" in graph.outputs
        for dtype in (torch.float32, torch.bfloat16):
            src = numba_cpu.source(graph, ("param", "grad", *states), dtype)
            compile(src, "<kernel>", "exec")  # valid Python
            assert "np.float64(" not in src  # typed constants only: no promotion to float64
        # one store per output: rounded, or as it is where bfloat16 holds the value exactly
        assert src.count("= store_bf16(") + src.count("= store_bf16_exact(") == len(graph.outputs)
        operands = ("param", "grad", *states)
        exact = numba_cpu._exact(graph, operands, numba_cpu.per_operand(operands, torch.bfloat16))
        assert src.count("= store_bf16_exact(") == sum(n in exact for n in graph.outputs.values())


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
def test_state_keys_match_torch(algo):
    for _, kwargs in algo.configs():
        p, q = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
        p.grad, q.grad = torch.ones(3), torch.ones(3)
        ours, theirs = algo.ours([p], **kwargs), algo.theirs([q], **kwargs)
        ours.step()
        theirs.step()
        assert list(ours.state[p]) == list(theirs.state[q])


def test_new_lr_compiles_nothing():
    p = torch.ones(10, requires_grad=True)
    opt = fuseopt.Adam([p], lr=0.1, fused=True)
    p.grad = torch.ones(10)
    opt.step()
    before = numba_cpu.import_source.cache_info().currsize
    for lr in (0.01, 0.002, 3e-4):
        opt.param_groups[0]["lr"] = lr
        opt.step()
    assert numba_cpu.import_source.cache_info().currsize == before


def test_kernel_cache_survives_processes(tmp_path):
    """A second process loads the compiled kernel from the disk cache instead of compiling."""
    code = (
        "import time, torch, fuseopt\n"
        "p = torch.ones(8, requires_grad=True); p.grad = torch.ones(8)\n"
        "opt = fuseopt.Adam([p], fused=True, amsgrad=True, weight_decay=0.3)\n"
        "t = time.perf_counter(); opt.step(); print(time.perf_counter() - t)\n"
    )
    env = dict(os.environ, FUSEOPT_CACHE_DIR=str(tmp_path))
    run = lambda: float(subprocess.check_output([sys.executable, "-c", code], env=env))
    cold = run()
    warm = run()
    files = os.listdir(tmp_path)
    assert any(f.endswith(".py") for f in files) and "__pycache__" in files
    assert any(f.endswith(".nbi") for f in os.listdir(tmp_path / "__pycache__"))
    assert warm < cold


def test_read_only_cache_dir_falls_back(tmp_path, monkeypatch):
    """A read-only cache location (e.g. a read-only home) falls back to a temporary directory."""
    ro = str(tmp_path / "ro")
    monkeypatch.setenv("FUSEOPT_CACHE_DIR", ro)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != ro and real_access(p, mode))
    path = numba_cpu.cache_dir()
    assert path != ro and real_access(path, os.W_OK)


@pytest.mark.parametrize("etas", [(0.5, 1.2), (0.5, 0.5), (1.5, 0.5), (-0.5, 1.2), (0.0, 1.2)])
def test_rprop_matches_torch_for_any_etas(etas):
    """Rprop's kernels take a shorter form of torch's sign -> eta chain for the etas torch accepts
    (0 < eta- < 1 < eta+), and torch's chain for any others a user sets after construction."""
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(200, generator=gen, dtype=torch.float64, requires_grad=True)]
    theirs = [ours[0].detach().clone().requires_grad_()]
    opt = fuseopt.Rprop(ours, lr=0.01)
    ref = torch.optim.Rprop(theirs, lr=0.01, foreach=False)
    opt.param_groups[0]["etas"] = ref.param_groups[0]["etas"] = etas
    for _ in range(6):
        g = torch.randn(200, generator=gen, dtype=torch.float64)
        g[:40] = 0.0  # products of zero: neither grow nor shrink
        ours[0].grad, theirs[0].grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(ours[0], theirs[0])
    for name in ("prev", "step_size"):
        assert torch.equal(opt.state[ours[0]][name], ref.state[theirs[0]][name])
