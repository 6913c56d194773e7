"""The numba backend's launches: in a process forked after a parallel launch (multiprocessing's
default on Linux), where numba's GNU OpenMP pool cannot be used again.

(torch's own ops over large tensors may hang in such a child too, in GNU OpenMP: DataLoader's
workers call ``torch.set_num_threads(1)`` for that. The child below runs no torch op that would
use OpenMP, so what it tests is fuseopt's step alone.)"""

from __future__ import annotations

import multiprocessing
import sys

import pytest
import torch

import fuseopt

FUSED_TOL = dict(rtol=1e-5, atol=1e-6)


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in (300_000, 1_000, 7)]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(4)]
    return params, grads


def _steps(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g  # (no copy: a large copy would use torch's OpenMP pool)
        opt.step()


def _child(opt, params, grads, conn) -> None:
    try:
        _steps(opt, params, grads)
        conn.send([p.detach().numpy().copy() for p in params])  # (plain arrays: no sharing)
    except BaseException as e:  # reported to the parent, which fails the test
        conn.send(repr(e))
    conn.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_forked_child_steps_correctly(threads):
    """A process that took fused steps, then forks: the child steps on (the serial kernels,
    spread over threads), with the numbers the parent gets for the same steps."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params, grads = _problem()
        opt = fuseopt.Adam(params, lr=0.01)
        _steps(opt, params, grads[:2])  # the parent used the parallel kernel
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_child, args=(opt, params, grads[2:], child_end))
        child.start()
        got = parent_end.recv() if parent_end.poll(120) else "no answer from the child"
        child.join(60)
        assert child.exitcode == 0, f"the child died (exit status {child.exitcode})"
        assert not isinstance(got, str), got
        _steps(opt, params, grads[2:])  # the same steps in the parent, after the fork
        for mine, theirs in zip(got, params):
            assert torch.equal(torch.from_numpy(mine), theirs.detach())
        ref_params, _ = _problem()
        ref = torch.optim.Adam(ref_params, lr=0.01, foreach=False)
        _steps(ref, ref_params, grads)
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, **FUSED_TOL)
    finally:
        torch.set_num_threads(before)


def test_sources_name_the_helpers_they_inline():
    """numba's cache keys on a kernel's source file only: the generated sources carry a hash of
    the helpers they inline (_numba_ops), so that changed helpers give new files (and machine
    code), never the old code out of the cache."""
    import hashlib
    from pathlib import Path

    from fuseopt.kernels import _numba_ops, numba_cpu

    digest = hashlib.sha1(Path(_numba_ops.__file__).read_bytes()).hexdigest()[:16]
    assert digest in numba_cpu._HEADER
    p = torch.randn(10, requires_grad=True)
    p.grad = torch.ones(10)
    fuseopt.Adam([p], fused=True).step()
    sources = [m for m in sys.modules if m.startswith("fuseopt_kernel_")]
    assert sources
    for name in sources:
        with open(sys.modules[name].__file__) as f:
            assert f.readline().rstrip("\n") == numba_cpu._HEADER
