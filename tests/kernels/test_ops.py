"""The ops vocabulary, per backend, against the ATen op it stands for.

The numba kernels must round like ATen: FMA where ATen's CPU kernels use one (``add`` with alpha,
``addcmul``, ``lerp``), ``a + (v*b)/c`` for ``addcdiv``. These are checked bitwise on a million
random values; ``sqrt`` is correctly rounded in numba, within 1 ulp of torch's vectorised (Sleef)
sqrt, which is not, in float32 and float64 alike.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuseopt import kernels
from fuseopt.kernels import numba_cpu, reference
from fuseopt.kernels.trace import trace
from fuseopt.rule import Flags, Rule

N = 1 << 20


class OneOp(Rule):
    """A rule that writes ``op(param, grad, buf)`` into the param: one vocabulary op under test."""

    has_step = False

    def __init__(self, op):
        self.op = op

    def __hash__(self):
        return hash(self.op)

    def __eq__(self, other):
        return isinstance(other, OneOp) and other.op == self.op

    def update(self, ops, f, s, param, grad, buf):
        return dict(param=OPS[self.op](ops, s, param, grad, buf))


OPS = {
    "add_alpha": lambda ops, s, a, b, c: ops.add(a, b, alpha=s.v),
    "addcmul": lambda ops, s, a, b, c: ops.addcmul(a, b, c, value=s.v),
    "addcdiv": lambda ops, s, a, b, c: ops.addcdiv(a, b, c, value=s.v),
    "lerp_small": lambda ops, s, a, b, c: ops.lerp(a, b, s.w_small),
    "lerp_large": lambda ops, s, a, b, c: ops.lerp(a, b, s.w_large),
    "mul_div_sub": lambda ops, s, a, b, c: (a * s.v - b) / c,
    "rsub_neg": lambda ops, s, a, b, c: s.v - (-a) + b,
    "maximum": lambda ops, s, a, b, c: ops.maximum(a, b),
    "minimum": lambda ops, s, a, b, c: ops.minimum(a, b),
    "sqrt": lambda ops, s, a, b, c: ops.sqrt(c),
    "abs_sign": lambda ops, s, a, b, c: ops.abs(a) + ops.sign(b * a),
    "clamp": lambda ops, s, a, b, c: ops.clamp(a * b, s.w_small, s.w_large),
    "where_masks": lambda ops, s, a, b, c: ops.where(
        ops.gt(a, 0), s.v, ops.where(ops.lt(b, 0), b, ops.where(ops.eq(ops.sign(a), 0), 1, c))
    ),
    "rdiv": lambda ops, s, a, b, c: s.v / c,
    # operands, their negation and a constant: a value bfloat16 holds, stored without rounding
    "where_exact": lambda ops, s, a, b, c: ops.where(
        ops.lt(b, 0), -a, ops.where(ops.gt(a, 0), 0, ops.abs(c))
    ),
}
SCALARS = dict(v=0.37, w_small=0.1, w_large=0.9)


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(N, generator=gen, dtype=dtype) for _ in range(3))
    a[:4] = torch.tensor([float("nan"), 1.0, -0.0, float("inf")], dtype=dtype)
    return a, b, c.abs() + 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", ["foreach", "numba"])
def test_op_matches_reference(op, backend, dtype):
    a, b, c = _inputs(dtype)
    expected = a.clone()
    kernels.run("reference", OneOp(op), Flags(), SCALARS, [expected], [b], {"buf": [c]})
    got = a.clone()
    kernels.run(backend, OneOp(op), Flags(), SCALARS, [got], [b], {"buf": [c]})
    if op == "sqrt" and backend == "numba":
        # torch's vectorised sqrt (Sleef) is not correctly rounded: allow 1 ulp
        torch.testing.assert_close(got, expected, rtol=torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(got.isnan(), expected.isnan())
        ok = got.isnan()
        assert torch.equal(got[~ok], expected[~ok]), (got - expected).abs().nanmean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_16bit_op_is_float32_op_rounded_once(op, dtype):
    """16-bit operands are widened exactly, the op runs in float32, the result is rounded to
    nearest even once: the float32 reference result converted by torch, bit for bit."""
    a, b, c = (t.to(dtype) for t in _inputs(torch.float32))
    expected = a.float()
    kernels.run("reference", OneOp(op), Flags(), SCALARS, [expected], [b.float()], {"buf": [c.float()]})
    expected = expected.to(dtype)
    got = a.clone()
    kernels.run("numba", OneOp(op), Flags(), SCALARS, [got], [b], {"buf": [c]})
    assert got.dtype == dtype and torch.equal(got.isnan(), expected.isnan())
    ok = ~got.isnan()
    if op == "sqrt":  # torch's float32 sqrt may be 1 ulp off, and then round the other way
        torch.testing.assert_close(got[ok], expected[ok], rtol=torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(got[ok], expected[ok]), (got - expected)[ok].abs().max()


def test_exact_values_skip_the_bfloat16_rounding():
    """The kernel of ``where_exact`` stores its result unrounded (the test above checks its bits);
    any op that computes a new value is rounded."""
    operands = ("param", "grad", "buf")
    for op, exact in (("where_exact", True), ("clamp", False), ("rsub_neg", False)):
        src = numba_cpu.source(trace(OneOp(op), Flags(), operands), operands, torch.bfloat16)
        assert ("= store_bf16_exact(" in src) is exact, op


def test_reference_is_torch():
    """The reference vocabulary is the ATen ops themselves (bitwise with torch.optim's for-loop);
    a coefficient that autograd tracks (differentiable, a tensor lr) is multiplied in instead,
    since ATen's ``alpha``/``value`` take numbers only."""
    assert reference.TorchOps.lerp is torch.lerp
    a, b, c = (torch.randn(5, dtype=torch.float64) for _ in range(3))
    c = c.abs() + 1
    assert torch.equal(reference.TorchOps.addcdiv(a, b, c, value=0.3), torch.addcdiv(a, b, c, value=0.3))
    assert torch.equal(reference.TorchOps.add(a, b, alpha=0.3), torch.add(a, b, alpha=0.3))
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = reference.TorchOps.addcdiv(a, b, c, value=lr)
    torch.testing.assert_close(out, torch.addcdiv(a, b, c, value=0.3))
    out.sum().backward()
    torch.testing.assert_close(lr.grad, (b / c).sum())


def test_numba_follows_torch_thread_count():
    """The kernel runs with torch's thread count (no oversubscription beside torch's pool)."""
    import numba

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, b, c = _inputs(torch.float32)
        kernels.run("numba", OneOp("add_alpha"), Flags(), SCALARS, [a], [b], {"buf": [c]})
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _in_a_new_process(code: str) -> list[str]:
    """What ``code`` prints, run by a new Python in the repository (once-per-process effects)."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_first_kernel_keeps_torch_thread_count():
    """Starting numba's OpenMP layer resets the OpenMP thread count, which torch shares and reports:
    the first fused step must leave torch's count as the user set it. A fresh process, since the
    layer starts once per process."""
    code = (
        "import torch, fuseopt\n"
        "torch.set_num_threads(1)\n"
        "p = torch.zeros(1 << 18, requires_grad=True)\n"  # above SERIAL_BELOW: the pool runs
        "p.grad = torch.ones_like(p)\n"
        "fuseopt.Adam([p], fused=True).step()\n"
        "import numba\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n"
    )
    assert _in_a_new_process(code) == ["1", "1"]


def test_first_step_skips_scipy_linalg_and_numba_blas_still_works():
    """numba's first compile imports ``scipy.linalg`` just to set a flag (a quarter of a second);
    fuseopt's first step must not pay for it, and numba's ``np.dot`` must still reach BLAS."""
    pytest.importorskip("scipy")
    code = (
        "import sys, torch, fuseopt, numba, numpy as np\n"
        "p = torch.zeros(8, requires_grad=True)\n"
        "p.grad = torch.ones_like(p)\n"
        "fuseopt.Adam([p], fused=True).step()\n"
        "print('scipy.linalg' in sys.modules)\n"
        "a = np.arange(6.0).reshape(2, 3)\n"
        "print(numba.njit(lambda x: np.dot(x, x.T))(a).tolist() == (a @ a.T).tolist())\n"
    )
    assert _in_a_new_process(code) == ["False", "True"]


def test_chunks_cover_every_element_once():
    numels = (0, 1, numba_cpu.CHUNK, numba_cpu.CHUNK + 1, 3 * numba_cpu.CHUNK - 5)
    chunks = numba_cpu.chunk_table(numels)
    for t, n in enumerate(numels):
        mine = chunks[chunks[:, 0] == t]
        covered = sum(int(stop - start) for _, start, stop in mine)
        assert covered == n
        assert all(0 < stop - start <= numba_cpu.CHUNK for _, start, stop in mine)


def test_concurrent_steps_from_threads_match_sequential():
    """Optimizers stepped from two Python threads at once give the sequential results."""
    import threading

    import fuseopt

    def make():
        gen = torch.Generator().manual_seed(5)
        ps = [torch.randn(200_000, generator=gen).requires_grad_() for _ in range(3)]
        return ps, fuseopt.Adam(ps, lr=0.01, fused=True)

    def train(ps, opt):
        for i in range(5):
            for p in ps:
                p.grad = torch.full_like(p, 0.1 * (i + 1))
            opt.step()

    sequential = [make() for _ in range(2)]
    for ps, opt in sequential:
        train(ps, opt)
    concurrent = [make() for _ in range(2)]
    threads = [threading.Thread(target=train, args=c) for c in concurrent]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (ps_a, _), (ps_b, _) in zip(sequential, concurrent):
        assert all(torch.equal(a, b) for a, b in zip(ps_a, ps_b))
