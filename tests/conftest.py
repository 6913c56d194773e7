"""Shared fixtures: implementations, dtypes and a seeded problem factory."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # xdist's workers share the machine's cores (CI: two workers, two cores): each runs torch
    # and the fused kernels on one thread, and so do the processes the tests start. Two OpenMP
    # pools per core made small steps wait on each other: the parity tests ran 5x slower. (Tests
    # of the multi-threaded launches set their own thread counts.)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# name -> constructor flags that select the implementation
IMPLS = {
    "forloop": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
    "default": {},
}

# Shapes that exercise the backends: a matrix, a vector, a 3-d tensor, a scalar, an empty tensor,
# a transposed (dense, non-contiguous) matrix, and one larger than a kernel chunk.
SHAPES = [(4, 3), (7,), (2, 3, 2), (), (0,), "transposed", (70_001,)]


def make_params(dtype: torch.dtype, seed: int = 0, shapes=SHAPES) -> list[torch.Tensor]:
    """Leaf params of ``shapes`` (same values for a given seed)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if shape == "transposed":
            t = torch.randn(3, 5, generator=gen, dtype=dtype).t()
        else:
            t = torch.randn(shape, generator=gen, dtype=dtype)
        out.append(t.detach().requires_grad_())
    return out


def _randn_like(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if p.is_contiguous():
        return torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return torch.randn(p.t().shape, generator=gen, dtype=p.dtype).t()  # laid out like p


def make_grads(params, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """``steps`` lists of gradients for ``params``, each laid out like its param."""
    gen = torch.Generator().manual_seed(seed)
    return [[_randn_like(p, gen) for p in params] for _ in range(steps)]


def run_steps(cls, params, grads, **kwargs):
    """Build ``cls(params, **kwargs)`` and step it once per list of ``grads``; return it."""
    opt = cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return opt


def error_of(fn) -> tuple[type, str]:
    """(type, message) of the exception ``fn()`` raises; fails the test if it raises none."""
    with pytest.raises(Exception) as info:  # the type is what is compared
        fn()
    return type(info.value), str(info.value)


def expect_error_input(err, make) -> None:
    """``make()`` raises, or warns, what torch's ``optim_db`` error input ``err`` names."""
    expect = pytest.warns if issubclass(err.error_type, Warning) else pytest.raises
    with expect(err.error_type, match=err.error_regex):
        make()


def clone_params(params) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


@pytest.fixture(params=list(IMPLS))
def impl(request) -> str:
    return request.param


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``fuseopt ARGV`` in-process: (exit code, stdout, stderr); argparse's exits included."""
    from fuseopt import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def check_png(path, min_size=(100, 100)) -> None:
    """``path`` is a PNG file that matplotlib reads back as a non-blank RGB(A) image."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= min_size[0] and image.shape[1] >= min_size[1]
    assert image.std() > 0  # something was drawn
