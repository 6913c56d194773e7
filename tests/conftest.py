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

# The devices of the tests that compare with torch.optim: the CPU always, and CUDA where torch sees
# a GPU (``pytest -m cuda`` selects exactly those cases; elsewhere they skip, saying why).
NO_CUDA = "no CUDA device: run the GPU command in the README (CUDA: Triton kernels)"
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_MARKS)]
CUDA_ONLY = DEVICES[1:]  # what only a GPU can check (a CUDA graph): indirect=True on ``device``


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    """``"cpu"`` or ``"cuda"``. On CUDA, ``fused=True`` runs the compiled Triton kernels: never
    the interpreter, whatever the shell or an earlier test set."""
    if request.param == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


def make_params(
    dtype: torch.dtype, seed: int = 0, shapes=SHAPES, device: str = "cpu"
) -> list[torch.Tensor]:
    """Leaf params of ``shapes`` on ``device`` (same values for a given seed on every device:
    drawn on the CPU, then moved, transposed ones still transposed)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if shape == "transposed":
            t = torch.randn(3, 5, generator=gen, dtype=dtype).t()
        else:
            t = torch.randn(shape, generator=gen, dtype=dtype)
        out.append(t.to(device).detach().requires_grad_())
    return out


def _randn_like(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Drawn on the CPU (``gen``), moved to ``p``'s device."""
    if p.is_contiguous():
        t = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    else:
        t = torch.randn(p.t().shape, generator=gen, dtype=p.dtype).t()  # laid out like p
    return t.to(p.device)


def make_grads(params, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """``steps`` lists of gradients for ``params``, each laid out like its param, on its device
    (the same values on every device)."""
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


def assert_refuses_sparse_grads(make) -> None:
    """``make(params)`` builds an optimizer; its step with a sparse grad raises (a RuntimeError
    naming sparse grads) and changes nothing: the param as it was, no state made."""
    p = torch.ones(4, 2, requires_grad=True)
    opt = make([p])
    p.grad = torch.ones(4, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(p, torch.ones(4, 2)) and not opt.state


def assert_state_dict_round_trip(saved: dict, again: dict) -> None:
    """``again``, the state dict of a fresh optimizer that loaded ``saved``, is ``saved``: the
    same groups (backfilled, as torch's ``__setstate__``, with off flags only: None or False)
    and the same state, key for key, in order."""
    for group, before in zip(again["param_groups"], saved["param_groups"]):
        assert {k: group[k] for k in before} == before
        assert all(group[k] in (None, False) for k in set(group) - set(before))
    for i, state in saved["state"].items():
        assert list(again["state"][i]) == list(state)
        for key, value in state.items():
            assert torch.equal(again["state"][i][key], value)


def assert_bfloat16_close(ours, theirs, share: float = 0.99, worst: float = 2**-3) -> None:
    """bfloat16 results of fuseopt's kernels (float32 math, one rounding per store) against a
    reference that rounds every op to bfloat16: at least ``share`` of the elements within 2**-6
    (relative and absolute), none further apart than ``worst``. Each side is a tensor, or a list
    of tensors compared as one flat tensor."""

    def flat(x):
        x = x if isinstance(x, (list, tuple)) else [x]
        return torch.cat([t.detach().double().flatten() for t in x])

    a, b = flat(ours), flat(theirs)
    if a.numel():
        assert torch.isclose(a, b, rtol=2**-6, atol=2**-6).double().mean() >= share
        assert (a - b).abs().max() <= worst


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
