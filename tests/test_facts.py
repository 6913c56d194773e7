"""The facts a step reads of its tensors (``fuseopt._facts``): the two bulk readers agree, the
per-tensor checks say what a kernel cannot take, and the Python reader alone runs every step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fuseopt
from fuseopt import _facts


def _zoo() -> list[torch.Tensor]:
    """Tensors of every kind a step may read: params, views, odd strides and dtypes."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, 6, generator=gen)
    out = [
        torch.nn.Parameter(torch.randn(7, 3, generator=gen)),
        base, base[1:, 2:], base.permute(2, 0, 1), base[:, :, ::2], base[0, 0, 0],
        base.expand(2, 4, 5, 6), torch.zeros(3, 0), torch.zeros(()),
        torch.zeros((2,) * _facts.MAXDIM), torch.zeros((1,) * (_facts.MAXDIM + 2)),
        torch._neg_view(base), base.detach(), base.view(torch.int32),
    ]  # fmt: skip
    out += [torch.ones(3, 2, dtype=d) for d in (torch.bfloat16, torch.float16, torch.float64,
                                                torch.int64, torch.bool, torch.complex64)]
    return out


def test_both_readers_give_the_same_facts():
    """Where the C shim is used, it reads each fact exactly as torch's Python accessors do."""
    if not _facts.shim_works():
        pytest.skip("torch's C shim is not usable here: the Python reader is the only one")
    zoo = _zoo()
    shim, python = _facts.read_shim(zoo), _facts.read_python(zoo)
    assert np.array_equal(shim, python), np.argwhere(shim != python)
    t = zoo[2]  # a view at an offset: the columns mean what they say
    row = dict(zip(_facts.COLUMNS, python[2]))
    assert row["data_ptr"] == t.data_ptr() and row["storage_offset"] == t.storage_offset()
    assert row["storage_bytes"] == t.untyped_storage().nbytes() and row["dim"] == 3
    assert list(python[2, 8:11]) == list(t.shape) and row["contiguous"] == 0


def test_a_tensor_without_storage_is_never_read_as_one():
    """A sparse tensor has no data pointer: the shim marks its row (dim -1), the Python reader
    raises; a step that meets one takes the full check either way."""
    sparse = torch.eye(3).to_sparse()
    if _facts.shim_works():
        assert _facts.read_shim([sparse])[0, 7] == -1
    with pytest.raises(RuntimeError):
        _facts.read_python([sparse])


def test_storage_problem_finds_a_storage_shrunk_under_its_tensor():
    t = torch.zeros(4, 3)
    assert _facts.storage_problem(t) is None
    t.untyped_storage().resize_(8)
    assert "holds 8 bytes" in _facts.storage_problem(t)


def test_entry_check_names_what_a_kernel_cannot_take():
    p = torch.zeros(4, 3)
    ok, g = _facts.entry_check(p, torch.ones(4, 3), {"m": torch.zeros(4, 3)})
    assert ok is None
    for grad, states, words in (
        (torch.ones(4, 3), {"m": torch.zeros(3, 4).t()}, "strides"),
        (torch.ones(4, 3), {"m": torch.zeros(4, 3, dtype=torch.float64)}, "dtype"),
        (torch.ones(4, 3), {"m": torch._neg_view(torch.zeros(4, 3))}, "negative"),
        (torch.ones(12), {}, "shape"),
        (p, {}, "share memory"),
    ):
        problem, _ = _facts.entry_check(p, grad, states)
        assert problem is not None and words in problem, (problem, words)
    # a grad merely laid out otherwise (or with the negative bit) is copied like the param
    problem, g = _facts.entry_check(p, torch._neg_view(torch.ones(4, 3)), {})
    assert problem is None and not g.is_neg() and torch.equal(g, -torch.ones(4, 3))


def test_the_python_reader_alone_steps_and_checks_as_well():
    """With the shim turned off (``FUSEOPT_FACTS=python``), a step still keeps and re-checks
    its plan: a momentum warm-up, a state re-pointed at the same address, in a new process."""
    code = (
        "import torch, fuseopt\n"
        "from fuseopt import _facts\n"
        "assert not _facts.shim_works()\n"
        "ps = [torch.zeros(1000, requires_grad=True) for _ in range(3)]\n"
        "qs = [p.detach().clone().requires_grad_() for p in ps]\n"
        "o, r = fuseopt.SGD(ps, lr=0.1), torch.optim.SGD(qs, lr=0.1, foreach=False)\n"
        "for i in range(6):\n"
        "    if i == 3:\n"
        "        for x in (o, r): x.param_groups[0]['momentum'] = 0.9\n"
        "    for p, q in zip(ps, qs): p.grad = torch.full_like(p, i + 1.0); q.grad = p.grad.clone()\n"
        "    o.step(); r.step()\n"
        "assert o._plan_caches, 'a plan was kept'\n"
        "assert all(torch.equal(p, q) for p, q in zip(ps, qs))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FUSEOPT_FACTS="python")
    root = Path(__file__).parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_the_shim_reader_is_used_where_it_works(monkeypatch):
    """A kept plan re-checks its tensors with the bulk reader (a step over many tensors would
    cost several times more with the Python accessors)."""
    calls = []
    real = _facts.read
    monkeypatch.setattr(_facts, "read", lambda ts: calls.append(len(ts)) or real(ts))
    ps = [torch.zeros(10, requires_grad=True) for _ in range(4)]
    opt = fuseopt.Adam(ps, lr=0.1)
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    assert calls == [4 * 3 + 4 + 4]  # params, 2 states and a step each, grads: the third step
